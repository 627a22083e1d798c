//! Composing replies into a connection's write buffer.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};

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
}
