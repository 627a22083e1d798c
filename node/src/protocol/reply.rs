//! Composing replies into a connection's write buffer.

use bytes::{BufMut, BytesMut};

/// `shutdown` where it is not allowed (memcached without `-A`; always, through the proxy).
pub const SHUTDOWN_NOT_ENABLED: &str = "ERROR: shutdown not enabled";
/// A value over the item size limit (`-I`).
pub const TOO_LARGE: &str = "SERVER_ERROR object too large for cache";
/// `config get` of anything but `cluster`, in a cluster.
pub const UNKNOWN_CONFIG_KEY: &str = "CLIENT_ERROR unknown config key";
/// A store that found no memory for the item.
pub const OUT_OF_MEMORY_STORING: &str = "SERVER_ERROR out of memory storing object";
/// An incr/decr that found no memory for its result.
pub const OUT_OF_MEMORY: &str = "SERVER_ERROR out of memory";
/// An incr/decr of a value that is not a number.
pub const NON_NUMERIC: &str = "CLIENT_ERROR cannot increment or decrement non-numeric value";
/// The end of a retrieval or stats reply.
pub const END: &[u8] = b"END\r\n";
/// How each value of a retrieval reply starts.
pub const VALUE: &[u8] = b"VALUE ";

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
    /// `stats reset`'s answer.
    Reset,
    /// The end of a retrieval or stats reply.
    End,
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
            Response::Reset => "RESET",
            Response::End => "END",
            Response::MetaNoop => "MN",
            Response::Line(text) => text,
            Response::Number(_) => return None,
        })
    }

    /// Whether `reply` (one line with its CRLF) is this reply.
    pub fn is(self, reply: &[u8]) -> bool {
        match (self, self.text()) {
            (Response::Number(n), _) => {
                let mut buf = itoa::Buffer::new();
                reply.strip_suffix(b"\r\n") == Some(buf.format(n).as_bytes())
            }
            (_, Some(text)) => reply.strip_suffix(b"\r\n") == Some(text.as_bytes()),
            (_, None) => false,
        }
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

/// One `VALUE` block of a text retrieval (`get`, `gets`, `gat`, `gats`), the data borrowed
/// from the item it was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Value<'a> {
    pub key: &'a [u8],
    pub client_flags: u32,
    pub data: &'a [u8],
    /// Returned by `gets` and `gats`.
    pub cas: Option<u64>,
}

impl Value<'_> {
    /// Appends `VALUE <key> <flags> <bytes>[ <cas>]\r\n<data>\r\n`.
    pub fn compose(&self, out: &mut BytesMut) {
        out.reserve(self.key.len() + self.data.len() + 48);
        out.put_slice(VALUE);
        out.put_slice(self.key);
        out.put_u8(b' ');
        number(out, self.client_flags);
        out.put_u8(b' ');
        number(out, self.data.len());
        if let Some(cas) = self.cas {
            out.put_u8(b' ');
            number(out, cas);
        }
        out.put_slice(b"\r\n");
        out.put_slice(self.data);
        out.put_slice(b"\r\n");
    }
}

/// Appends `VERSION <version>`.
pub fn version(out: &mut BytesMut, version: &str) {
    out.put_slice(b"VERSION ");
    line(out, version);
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
        let value = Value {
            key: b"k",
            client_flags: 5,
            data: b"abc",
            cas: Some(9),
        };
        value.compose(&mut out);
        Value { cas: None, ..value }.compose(&mut out);
        Value { data: b"", ..value }.compose(&mut out);
        stat(&mut out, "curr_items", 3);
        version(&mut out, "1.6.18-kache-0.1.0");
        assert_eq!(
            &out[..],
            &b"VALUE k 5 3 9\r\nabc\r\nVALUE k 5 3\r\nabc\r\nVALUE k 5 0 9\r\n\r\n\
               STAT curr_items 3\r\nVERSION 1.6.18-kache-0.1.0\r\n"[..]
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
            Response::Reset,
            Response::End,
            Response::MetaNoop,
            Response::Number(18446744073709551615),
            Response::Line(TOO_LARGE),
        ] {
            let mut one = BytesMut::new();
            response.compose(false, &mut one);
            assert!(response.is(&one), "{response:?} is what it composes");
            response.compose(false, &mut out);
            // noreply silences successes and errors alike.
            response.compose(true, &mut out);
        }
        assert_eq!(
            &out[..],
            &b"STORED\r\nNOT_STORED\r\nEXISTS\r\nNOT_FOUND\r\nDELETED\r\nTOUCHED\r\nOK\r\nRESET\r\n\
               END\r\nMN\r\n18446744073709551615\r\nSERVER_ERROR object too large for cache\r\n"[..]
        );
        assert!(!Response::Ok.is(b"OK") && !Response::Ok.is(b"OKAY\r\n"));
        assert!(!Response::Number(1).is(b"10\r\n") && !Response::Reset.is(b"OK\r\n"));
    }
}
