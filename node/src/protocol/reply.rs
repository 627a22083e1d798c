//! Composing replies into a connection's write buffer.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};

/// `shutdown` where it is not allowed (memcached without `-A`; always, through the proxy).
pub const SHUTDOWN_NOT_ENABLED: &str = "ERROR: shutdown not enabled";
/// A value over the item size limit (`-I`).
pub const TOO_LARGE: &str = "SERVER_ERROR object too large for cache";
/// `config get` of anything but `cluster`, in a cluster.
pub const UNKNOWN_CONFIG_KEY: &str = "CLIENT_ERROR unknown config key";
/// The end of a retrieval or stats reply.
pub const END: &[u8] = b"END\r\n";

/// A one-line reply of the text protocol, as the engine (or the proxy) decides it; what it
/// looks like on the wire is `compose`'s business, and `noreply` is the composer's to honour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Response {
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    /// `mn`'s answer.
    MetaNoop,
    /// `incr`/`decr`'s new value.
    Number(u64),
    /// An error, or another fixed line (`CLIENT_ERROR ...`, `MEMLIMIT_TOO_SMALL ...`).
    Line(&'static str),
}

impl Response {
    /// The reply's text, without CRLF (`None` for a number).
    fn text(self) -> Option<&'static str> {
        Some(match self {
            Response::Stored => "STORED",
            Response::NotStored => "NOT_STORED",
            Response::Exists => "EXISTS",
            Response::NotFound => "NOT_FOUND",
            Response::Deleted => "DELETED",
            Response::Touched => "TOUCHED",
            Response::Ok => "OK",
            Response::MetaNoop => "MN",
            Response::Line(text) => text,
            Response::Number(_) => return None,
        })
    }

    /// Appends the reply unless the request asked for none (`noreply`, which silences
    /// errors too, as in memcached).
    pub fn compose(self, noreply: bool, out: &mut BytesMut) {
        if noreply {
            return;
        }
        match (self, self.text()) {
            (Response::Number(n), _) => {
                number(out, n);
                out.put_slice(b"\r\n");
            }
            (_, Some(text)) => line(out, text),
            (_, None) => {}
        }
    }
}

/// Appends `line` and CRLF.
pub fn line(out: &mut BytesMut, line: &str) {
    out.reserve(line.len() + 2);
    out.put_slice(line.as_bytes());
    out.put_slice(b"\r\n");
}

/// Appends a decimal number.
pub fn number(out: &mut BytesMut, n: impl itoa::Integer) {
    let mut buf = itoa::Buffer::new();
    out.put_slice(buf.format(n).as_bytes());
}

/// Appends ` <flag><number>`, as meta replies return flags.
pub fn meta_number(out: &mut BytesMut, flag: u8, n: impl itoa::Integer) {
    out.put_u8(b' ');
    out.put_u8(flag);
    number(out, n);
}

/// Appends ` k<key>`, base64-encoded with a trailing ` b` when the key is binary.
pub fn meta_key(out: &mut BytesMut, key: &[u8], binary: bool) {
    out.put_slice(b" k");
    if binary {
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        out.put_slice(encoded.as_bytes());
        out.put_slice(b" b");
    } else {
        out.put_slice(key);
    }
}

/// Appends `VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n`.
pub fn value(out: &mut BytesMut, key: &[u8], flags: u32, data: &[u8], cas: Option<u64>) {
    out.reserve(key.len() + data.len() + 48);
    out.put_slice(b"VALUE ");
    out.put_slice(key);
    out.put_u8(b' ');
    number(out, flags);
    out.put_u8(b' ');
    number(out, data.len());
    if let Some(cas) = cas {
        out.put_u8(b' ');
        number(out, cas);
    }
    out.put_slice(b"\r\n");
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// Appends one `STAT <name> <value>` line.
pub fn stat(out: &mut BytesMut, name: &str, value: impl std::fmt::Display) {
    use std::fmt::Write as _;
    // Writing into a BytesMut cannot fail.
    let _ = write!(WriteAdapter(out), "STAT {name} {value}\r\n");
}

struct WriteAdapter<'a>(&'a mut BytesMut);

impl std::fmt::Write for WriteAdapter<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_values_and_stats() {
        let mut out = BytesMut::new();
        value(&mut out, b"k", 5, b"abc", Some(9));
        stat(&mut out, "curr_items", 3);
        meta_key(&mut out, b"\x00\x01", true);
        assert_eq!(
            &out[..],
            b"VALUE k 5 3 9\r\nabc\r\nSTAT curr_items 3\r\n kAAE= b"
        );
    }

    #[test]
    fn responses_compose_as_memcached_lines_and_noreply_silences_them() {
        let mut out = BytesMut::new();
        for response in [
            Response::Stored,
            Response::NotStored,
            Response::Exists,
            Response::NotFound,
            Response::Deleted,
            Response::Touched,
            Response::Ok,
            Response::MetaNoop,
            Response::Number(18446744073709551615),
            Response::Line(TOO_LARGE),
        ] {
            response.compose(false, &mut out);
            // noreply silences successes and errors alike.
            response.compose(true, &mut out);
        }
        assert_eq!(
            &out[..],
            &b"STORED\r\nNOT_STORED\r\nEXISTS\r\nNOT_FOUND\r\nDELETED\r\nTOUCHED\r\nOK\r\n\
               MN\r\n18446744073709551615\r\nSERVER_ERROR object too large for cache\r\n"[..]
        );
    }
}
