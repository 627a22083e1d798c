//! Sizes as kache-node's flags and the CacheCluster spec write them: a byte count with an
//! optional unit, `b` (bytes), `k`, `m` or `g` (KiB, MiB, GiB), in either case: `1m`,
//! `512k`, `1048576`. memcached's `-I` reads the same numbers (kache adds `g` and `b`).
//!
//! This is the one grammar both sides use: the node parses its flags with [`parse_size`],
//! the operator validates the spec with it, and the CRD's OpenAPI `pattern` is
//! [`SIZE_PATTERN`], which accepts exactly the strings [`parse_size`] parses (a test holds
//! them to each other).

use std::ops::RangeInclusive;

/// One KiB.
pub const KIB: u64 = 1024;
/// One MiB.
pub const MIB: u64 = 1024 * KIB;
/// One GiB.
pub const GIB: u64 = 1024 * MIB;

/// The strings [`parse_size`] accepts, as a regular expression (the CRD's `pattern`): an
/// optional `+`, digits, an optional unit. It does not bound the value; that is the
/// parser's (overflow) and the field's range.
pub const SIZE_PATTERN: &str = r"^\+?[0-9]+[bBkKmMgG]?$";

/// Range of the byte bounds kache-node takes as sizes (`--peer-queue-bytes`,
/// `--handoff-batch-bytes`, `--read-through-bytes`, `--anti-entropy-rate`, the proxy's
/// `-I` and `--node-queue-bytes`): 1k to 1g.
pub const BYTE_LIMIT_RANGE: RangeInclusive<u64> = KIB..=GIB;

/// Largest item a node of a cluster takes (`-I`): one item must fit a peer frame. kache-node's
/// peer protocol holds its frames to this (a test in the operator holds the two equal), and
/// the operator validates `maxItemSize` against it.
pub const MAX_CLUSTER_ITEM_SIZE: u64 = 8 * MIB;

/// kache-node's default `slab_chunk_max` (memcached's: half a 1 MiB slab page). `-I` must be a
/// multiple of it unless `-o slab_chunk_max` (or an option implying one) says otherwise.
pub const DEFAULT_SLAB_CHUNK_MAX: u64 = 512 * KIB;

/// Why a size did not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number before the unit.
    #[error("invalid size {0:?}: expected a number with optional k, m or g")]
    NotANumber(String),
    /// A letter that is not a unit.
    #[error("invalid size unit in {0:?}: use k, m or g")]
    Unit(String),
    /// More bytes than a `u64` holds.
    #[error("size {0:?} is too large")]
    TooLarge(String),
    /// A valid size outside the range the flag allows.
    #[error("size {text:?} must be between {} and {}", show(*.range.start()), show(*.range.end()))]
    OutOfRange {
        /// The size as written.
        text: String,
        /// What the flag allows.
        range: RangeInclusive<u64>,
    },
}

/// A byte count in the shortest unit that writes it exactly (`1k`, `1g`, `1000`).
pub fn show(bytes: u64) -> String {
    match bytes {
        0 => "0".into(),
        b if b % GIB == 0 => format!("{}g", b / GIB),
        b if b % MIB == 0 => format!("{}m", b / MIB),
        b if b % KIB == 0 => format!("{}k", b / KIB),
        b => b.to_string(),
    }
}

/// The bytes `text` stands for. Strict: no surrounding space (the node trims its command
/// line first, the API server stores what was written).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 'b'),
    };
    let digits_only = digits.strip_prefix('+').unwrap_or(digits);
    if digits_only.is_empty() || !digits_only.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::NotANumber(text.to_string()));
    }
    let n: u64 = digits_only
        .parse()
        .map_err(|_| SizeError::TooLarge(text.to_string()))?;
    let multiplier = match unit {
        'b' => 1,
        'k' => KIB,
        'm' => MIB,
        'g' => GIB,
        _ => return Err(SizeError::Unit(text.to_string())),
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// [`parse_size`], then checked against `range`.
pub fn parse_size_in(text: &str, range: RangeInclusive<u64>) -> Result<u64, SizeError> {
    let bytes = parse_size(text)?;
    if range.contains(&bytes) {
        Ok(bytes)
    } else {
        Err(SizeError::OutOfRange {
            text: text.to_string(),
            range,
        })
    }
}

/// A byte bound of kache-node's (see [`BYTE_LIMIT_RANGE`]).
pub fn parse_byte_limit(text: &str) -> Result<u64, SizeError> {
    parse_size_in(text, BYTE_LIMIT_RANGE)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Strings with what they mean, or `None` where they are not sizes.
    const TABLE: &[(&str, Option<u64>)] = &[
        ("0", Some(0)),
        ("1", Some(1)),
        ("1048576", Some(MIB)),
        ("1024b", Some(KIB)),
        ("1024B", Some(KIB)),
        ("512k", Some(512 * KIB)),
        ("512K", Some(512 * KIB)),
        ("1m", Some(MIB)),
        ("2M", Some(2 * MIB)),
        ("1g", Some(GIB)),
        ("8G", Some(8 * GIB)),
        ("01m", Some(MIB)),
        ("+1m", Some(MIB)),
        ("", None),
        ("m", None),
        ("+", None),
        ("+m", None),
        ("-1", None),
        ("-1m", None),
        ("1x", None),
        ("1mb", None),
        ("1.5m", None),
        (" 1m", None),
        ("1m ", None),
        ("1 m", None),
        ("0x10", None),
        ("1e3", None),
        ("١m", None),
        ("18446744073709551615", Some(u64::MAX)),
        ("18446744073709551616", None),
        ("17179869184g", None),
    ];

    #[test]
    fn sizes_parse_as_the_table_says() {
        for (text, bytes) in TABLE {
            assert_eq!(parse_size(text).ok(), *bytes, "{text:?}");
        }
        assert_eq!(
            parse_size("1x"),
            Err(SizeError::Unit("1x".into())),
            "a letter that is not a unit is named as such"
        );
        assert_eq!(
            parse_size("18446744073709551616"),
            Err(SizeError::TooLarge("18446744073709551616".into()))
        );
    }

    /// The pattern accepts a string exactly when the parser's grammar does (values that
    /// overflow are the parser's alone to refuse).
    #[test]
    fn pattern_accepts_what_the_parser_parses() {
        let pattern = regex::Regex::new(SIZE_PATTERN).unwrap();
        for (text, bytes) in TABLE {
            let overflow = matches!(parse_size(text), Err(SizeError::TooLarge(_)));
            assert_eq!(
                pattern.is_match(text),
                bytes.is_some() || overflow,
                "{text:?}"
            );
        }
    }

    #[test]
    fn byte_limits_are_1k_to_1g() {
        assert_eq!(parse_byte_limit("1k"), Ok(KIB));
        assert_eq!(parse_byte_limit("1g"), Ok(GIB));
        let err = parse_byte_limit("2g").unwrap_err();
        assert_eq!(err.to_string(), "size \"2g\" must be between 1k and 1g");
        assert!(parse_byte_limit("1023").is_err());
    }

    #[test]
    fn sizes_show_in_their_largest_exact_unit() {
        for (bytes, text) in [
            (0, "0"),
            (1000, "1000"),
            (KIB, "1k"),
            (1536 * KIB, "1536k"),
            (MIB, "1m"),
            (GIB, "1g"),
        ] {
            assert_eq!(show(bytes), text);
            assert_eq!(parse_size(text), Ok(bytes));
        }
    }
}
