//! memcached's text-protocol authentication (`-Y` / `--auth-file`).
//!
//! Until a connection authenticates, the only request accepted is
//! `set <any key> <any flags> <any exptime> <n>\r\n<user> <password>\r\n`; it is answered
//! `STORED` or `CLIENT_ERROR authentication failure`, and every other line gets
//! `CLIENT_ERROR unauthenticated`, exactly as memcached answers.

use super::numbers::parse_u32;
use super::tokens::{memchr, Tokens};
use super::MAX_LINE_WITHOUT_NEWLINE;

/// Largest credentials block accepted (memcached has no bound; a hostile client gets none).
pub const MAX_CREDENTIALS: usize = 4096;

/// What an unauthenticated connection's bytes amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum AuthStep<'a> {
    Incomplete,
    /// Close the connection (garbage without a newline, or an absurd credentials size).
    Close,
    /// Answer `reply` and drop `consumed` bytes.
    Reply {
        reply: &'static str,
        consumed: usize,
    },
    /// Check these credentials; `consumed` bytes belong to the request.
    Credentials {
        user: &'a [u8],
        password: &'a [u8],
        consumed: usize,
    },
}

/// Looks at the front of an unauthenticated connection's buffer.
pub fn parse_auth(buf: &[u8]) -> AuthStep<'_> {
    let Some(newline) = memchr(b'\n', buf) else {
        return if buf.len() > MAX_LINE_WITHOUT_NEWLINE {
            AuthStep::Close
        } else {
            AuthStep::Incomplete
        };
    };
    let line_len = newline + 1;
    let tokens = Tokens::new(&buf[..newline]);
    let size = match (tokens.ntokens() >= 6 && tokens.get(0) == b"set")
        .then(|| parse_u32(tokens.get(4)))
        .flatten()
    {
        Some(size) => size as usize,
        None => {
            return AuthStep::Reply {
                reply: "CLIENT_ERROR unauthenticated",
                consumed: line_len,
            }
        }
    };
    if size > MAX_CREDENTIALS {
        return AuthStep::Close;
    }
    let total = line_len + size + 2;
    if buf.len() < total {
        return AuthStep::Incomplete;
    }
    let block = &buf[line_len..total];
    if !block.ends_with(b"\r\n") {
        return AuthStep::Reply {
            reply: "CLIENT_ERROR bad command line termination",
            consumed: total,
        };
    }
    let credentials = Tokens::new(&block[..size]);
    if credentials.ntokens() < 3 {
        return AuthStep::Reply {
            reply: "CLIENT_ERROR bad authentication token format",
            consumed: total,
        };
    }
    AuthStep::Credentials {
        user: credentials.get(0),
        password: credentials.get(1),
        consumed: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_auth_set_and_refuses_everything_else() {
        assert_eq!(
            parse_auth(b"set x 0 0 9\r\nuser pass\r\n"),
            AuthStep::Credentials {
                user: b"user",
                password: b"pass",
                consumed: 24
            }
        );
        assert_eq!(
            parse_auth(b"get foo\r\n"),
            AuthStep::Reply {
                reply: "CLIENT_ERROR unauthenticated",
                consumed: 9
            }
        );
        assert_eq!(parse_auth(b"set x 0 0 9\r\nuser"), AuthStep::Incomplete);
        assert!(matches!(
            parse_auth(b"set x 0 0 4\r\nuserXX"),
            AuthStep::Reply {
                reply: "CLIENT_ERROR bad command line termination",
                ..
            }
        ));
        assert!(matches!(
            parse_auth(b"set x 0 0 4\r\nuser\r\n"),
            AuthStep::Reply {
                reply: "CLIENT_ERROR bad authentication token format",
                ..
            }
        ));
        assert_eq!(parse_auth(b"set x 0 0 99999999\r\n"), AuthStep::Close);
        assert_eq!(parse_auth(&[b'x'; 3000]), AuthStep::Close);
    }
}
