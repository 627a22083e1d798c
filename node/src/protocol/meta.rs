//! Meta-command flags (`mg`, `ms`, `md`, `ma`): parsed once, validated as memcached does.

use std::borrow::Cow;

use base64::Engine as _;

use super::numbers::{parse_i32, parse_u32, parse_u64};

/// Longest opaque token (`O...`), flag character included.
pub const MAX_OPAQUE_LEN: usize = 32;
/// Most tokens a meta command line may have (memcached's count, terminal token included).
pub const MAX_META_TOKENS: usize = 20;

/// What the flags of one meta command ask for.
#[derive(Clone, Debug, Default)]
pub struct MetaFlags<'a> {
    /// The flag tokens in request order; replies echo some of them in this order.
    pub tokens: Vec<&'a [u8]>,
    /// `b`: the key was sent base64-encoded.
    pub base64_key: bool,
    /// `q`: suppress the nominal reply.
    pub quiet: bool,
    /// `v`: return the value.
    pub value: bool,
    /// `u`: do not bump the item in the LRU.
    pub no_update: bool,
    /// `I`: invalidate (mark stale) instead of deleting / accept stale CAS on set.
    pub invalidate: bool,
    /// `N<ttl>`: create the item on a miss, with this exptime.
    pub vivify: Option<i32>,
    /// `T<ttl>`: set a new exptime.
    pub ttl: Option<i32>,
    /// `R<ttl>`: win the recache token when the remaining TTL is below this.
    pub recache: Option<i32>,
    /// `F<flags>`: client flags for `ms`.
    pub client_flags: u32,
    /// `C<cas>`: compare-and-swap value.
    pub cas: Option<u64>,
    /// `M<mode>`: mode switch for `ms` / `ma`.
    pub mode: Option<u8>,
    /// `J<n>`: initial value for `ma` auto-create.
    pub initial: u64,
    /// `D<n>`: delta for `ma`.
    pub delta: Option<u64>,
}

/// A flag-parsing failure: the error line memcached would send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlagError(pub &'static str);

const BAD_TOKEN: &str = "CLIENT_ERROR bad token in command line format";

/// Parses the flag tokens of a meta command and decodes the key when `b` is given.
///
/// Like memcached, a repeated or unknown flag stops parsing at once, while other bad values are
/// noted and parsing goes on, so the last error wins.
pub fn parse_flags<'a>(
    key: &'a [u8],
    flag_tokens: &[&'a [u8]],
) -> Result<(Cow<'a, [u8]>, MetaFlags<'a>), FlagError> {
    let mut flags = MetaFlags {
        tokens: flag_tokens.to_vec(),
        ..MetaFlags::default()
    };
    let mut seen = [false; 128];
    let mut error: Option<&'static str> = None;
    let mut key: Cow<'a, [u8]> = Cow::Borrowed(key);
    for token in flag_tokens {
        let Some(&flag) = token.first() else { continue };
        if flag >= 127 || seen[usize::from(flag)] {
            return Err(FlagError("CLIENT_ERROR duplicate flag"));
        }
        seen[usize::from(flag)] = true;
        let arg = &token[1..];
        match flag {
            b'b' => match base64::engine::general_purpose::STANDARD.decode(key.as_ref()) {
                Ok(decoded) if !decoded.is_empty() => {
                    key = Cow::Owned(decoded);
                    flags.base64_key = true;
                }
                _ => error = Some("CLIENT_ERROR error decoding key"),
            },
            b'N' => match parse_i32(arg) {
                Some(v) => flags.vivify = Some(v),
                None => error = Some(BAD_TOKEN),
            },
            b'T' => match parse_i32(arg) {
                Some(v) => flags.ttl = Some(v),
                None => error = Some(BAD_TOKEN),
            },
            b'R' => match parse_i32(arg) {
                Some(v) => flags.recache = Some(v),
                None => error = Some(BAD_TOKEN),
            },
            b'O' | b'P' | b'L' | b'k' | b's' | b't' | b'c' | b'f' | b'l' | b'h' => {}
            b'v' => flags.value = true,
            b'u' => flags.no_update = true,
            b'q' => flags.quiet = true,
            b'F' => match parse_u32(arg) {
                Some(v) => flags.client_flags = v,
                None => error = Some(error.unwrap_or("CLIENT_ERROR bad command line format")),
            },
            b'C' => match parse_u64(arg) {
                Some(v) => flags.cas = Some(v),
                None => error = Some(BAD_TOKEN),
            },
            b'M' => {
                if token.len() != 2 {
                    error = Some("CLIENT_ERROR incorrect length for M token");
                } else {
                    flags.mode = Some(token[1]);
                }
            }
            b'J' => match parse_u64(arg) {
                Some(v) => flags.initial = v,
                None => error = Some("CLIENT_ERROR invalid numeric initial value"),
            },
            b'D' => match parse_u64(arg) {
                Some(v) => flags.delta = Some(v),
                None => error = Some("CLIENT_ERROR invalid numeric delta value"),
            },
            b'I' => flags.invalidate = true,
            _ => return Err(FlagError("CLIENT_ERROR invalid flag")),
        }
    }
    match error {
        Some(e) => Err(FlagError(e)),
        None => Ok((key, flags)),
    }
}

impl MetaFlags<'_> {
    /// The first opaque token longer than memcached allows, if any.
    pub fn opaque_too_long(&self) -> bool {
        self.tokens
            .iter()
            .any(|t| t.first() == Some(&b'O') && t.len() > MAX_OPAQUE_LEN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_flags() {
        let toks: Vec<&[u8]> = vec![b"v", b"T30", b"Oabc", b"q", b"k"];
        let (key, f) = parse_flags(b"foo", &toks).unwrap();
        assert_eq!(key.as_ref(), b"foo");
        assert!(f.value && f.quiet);
        assert_eq!(f.ttl, Some(30));
        assert_eq!(f.tokens.len(), 5);
    }

    #[test]
    fn rejects_duplicates_and_unknown_flags() {
        assert_eq!(
            parse_flags(b"k", &[b"v", b"v"]).unwrap_err().0,
            "CLIENT_ERROR duplicate flag"
        );
        assert_eq!(
            parse_flags(b"k", &[b"!"]).unwrap_err().0,
            "CLIENT_ERROR invalid flag"
        );
        assert_eq!(parse_flags(b"k", &[b"Tx"]).unwrap_err().0, BAD_TOKEN);
    }

    #[test]
    fn decodes_base64_keys() {
        let (key, f) = parse_flags(b"Zm9v", &[b"b"]).unwrap();
        assert_eq!(key.as_ref(), b"foo");
        assert!(f.base64_key);
        assert!(parse_flags(b"***", &[b"b"]).is_err());
    }
}
