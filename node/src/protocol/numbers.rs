//! Number parsing with the exact acceptance rules memcached applies to protocol tokens.
//!
//! memcached parses numbers with `strtol`/`strtoul`/`strtoull` wrapped in its `safe_strto*`
//! helpers: leading white space and a sign are accepted, the number must be followed by white
//! space or the end of the token, values that overflow 64 bits are rejected, and 32-bit
//! results are truncated from the 64-bit C `long`. Clients depend on these corners (for example
//! `incr` on a value with trailing spaces), so they are reproduced here rather than using
//! Rust's stricter `str::parse`.

fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// Result of scanning a C-style integer: magnitude, sign, and where the digits ended.
struct Scanned {
    negative: bool,
    magnitude: u64,
    end: usize,
}

/// Scans like `strtoull`: optional white space, optional sign, decimal digits.
/// Returns `None` when there are no digits or the magnitude overflows 64 bits (ERANGE).
fn scan(s: &[u8]) -> Option<Scanned> {
    let mut i = 0;
    while i < s.len() && is_c_space(s[i]) {
        i += 1;
    }
    let mut negative = false;
    if i < s.len() && (s[i] == b'+' || s[i] == b'-') {
        negative = s[i] == b'-';
        i += 1;
    }
    let digits_start = i;
    let mut magnitude: u64 = 0;
    while i < s.len() && s[i].is_ascii_digit() {
        magnitude = magnitude
            .checked_mul(10)?
            .checked_add(u64::from(s[i] - b'0'))?;
        i += 1;
    }
    if i == digits_start {
        return None;
    }
    Some(Scanned {
        negative,
        magnitude,
        end: i,
    })
}

/// The number must be followed by white space or the end of the string (C's NUL included).
fn terminated(s: &[u8], end: usize) -> bool {
    end == s.len() || is_c_space(s[end]) || s[end] == 0
}

/// memcached's `safe_strtoull`: unsigned 64-bit; a negated value is accepted only while it
/// still looks non-negative as a signed number (so `-1` is rejected, `-0` is 0).
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let sc = scan(s)?;
    if !terminated(s, sc.end) {
        return None;
    }
    let value = if sc.negative {
        sc.magnitude.wrapping_neg()
    } else {
        sc.magnitude
    };
    if (value as i64) < 0 && s.contains(&b'-') {
        return None;
    }
    Some(value)
}

/// memcached's `safe_strtoul` on a 64-bit platform: parsed as an unsigned long, then
/// truncated to 32 bits (so `4294967296` reads as 0, as memcached stores it).
pub fn parse_u32(s: &[u8]) -> Option<u32> {
    parse_u64(s).map(|v| v as u32)
}

/// memcached's `safe_strtoll`: signed 64-bit with overflow rejected.
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let sc = scan(s)?;
    if !terminated(s, sc.end) {
        return None;
    }
    if sc.negative {
        if sc.magnitude > (i64::MAX as u64) + 1 {
            return None;
        }
        Some((sc.magnitude as i64).wrapping_neg())
    } else {
        i64::try_from(sc.magnitude).ok()
    }
}

/// memcached's `safe_strtol` on a 64-bit platform: a signed long truncated to 32 bits.
pub fn parse_i32(s: &[u8]) -> Option<i32> {
    parse_i64(s).map(|v| v as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_accepts_what_strtoull_accepts() {
        assert_eq!(parse_u64(b"0"), Some(0));
        assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64(b"18446744073709551616"), None);
        assert_eq!(parse_u64(b" 12"), Some(12));
        assert_eq!(parse_u64(b"+12"), Some(12));
        assert_eq!(parse_u64(b"12 "), Some(12));
        assert_eq!(parse_u64(b"12\r\n"), Some(12));
        assert_eq!(parse_u64(b"12abc"), None);
        assert_eq!(parse_u64(b""), None);
        assert_eq!(parse_u64(b"-"), None);
        assert_eq!(parse_u64(b"-1"), None);
        assert_eq!(parse_u64(b"-0"), Some(0));
    }

    #[test]
    fn small_negatives_wrap_like_c() {
        // strtoull("-5") is 2^64-5, which is negative as i64 and contains '-': rejected.
        assert_eq!(parse_u64(b"-5"), None);
    }

    #[test]
    fn thirty_two_bit_values_truncate() {
        assert_eq!(parse_u32(b"4294967295"), Some(u32::MAX));
        assert_eq!(parse_u32(b"4294967296"), Some(0));
        assert_eq!(parse_i32(b"-1"), Some(-1));
        assert_eq!(parse_i32(b"4294967297"), Some(1));
        assert_eq!(parse_i32(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i32(b"1x"), None);
    }
}
