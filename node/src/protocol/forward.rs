//! Forwarding requests to a node and framing its replies (used by the proxy).
//!
//! A forwarded request is re-encoded without `noreply` and without the meta `q` flag, so the
//! node always answers and replies can be matched to requests by position; the proxy then
//! drops the replies the client asked not to see (`Quiet`), exactly as a node would.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};

use super::admin::{AdminRequest, ClassSelection, CrawlerCommand};
use super::request::{GetCommand, MetaCommand, MetaRequest, Request, StoreMode, StoreRequest};
use super::tokens::memchr;
use super::{meta_reply, reply};

/// How a node's reply to a forwarded request ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplyKind {
    /// `VALUE` blocks then `END` (or one error line).
    Retrieval,
    /// One line.
    Line,
    /// One line, followed by a data block when it starts with `VA <n>`.
    Meta,
    /// `STAT` lines then `END` (or one line such as `RESET` or an error).
    Stats,
    /// `lru_crawler metadump` / `stats cachedump`: `key=` or `ITEM ` lines then `END` (or
    /// one line such as `BUSY ...` or an error).
    Dump,
}

/// Which replies the client asked to suppress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Every reply is delivered.
    None,
    /// Text `noreply`: nothing is delivered.
    All,
    /// Meta `q`: these reply codes are dropped (others, errors included, are delivered).
    Codes(&'static [&'static [u8]]),
}

impl Quiet {
    /// Whether the reply `bytes` is delivered to the client.
    pub fn delivers(self, bytes: &[u8]) -> bool {
        match self {
            Quiet::None => true,
            Quiet::All => false,
            Quiet::Codes(codes) => !codes
                .iter()
                .any(|c| bytes.starts_with(c) && matches!(bytes.get(c.len()), Some(b' ' | b'\r'))),
        }
    }
}

fn store_command(mode: StoreMode) -> &'static [u8] {
    match mode {
        StoreMode::Set => b"set",
        StoreMode::Add => b"add",
        StoreMode::Replace => b"replace",
        StoreMode::Append => b"append",
        StoreMode::Prepend => b"prepend",
        StoreMode::Cas => b"cas",
    }
}

fn put_number(out: &mut BytesMut, n: impl itoa::Integer) {
    reply::number(out, n);
}

/// Encodes a retrieval of `keys` for one node.
pub fn encode_get(command: GetCommand, exptime: i32, keys: &[&[u8]], out: &mut BytesMut) {
    out.put_slice(match command {
        GetCommand::Get => b"get",
        GetCommand::Gets => b"gets",
        GetCommand::Gat => b"gat",
        GetCommand::Gats => b"gats",
    });
    if command.touches() {
        out.put_u8(b' ');
        put_number(out, exptime);
    }
    for key in keys {
        out.put_u8(b' ');
        out.put_slice(key);
    }
    out.put_slice(b"\r\n");
}

/// Encodes a single-key request for its owner. Returns the reply kind and what to suppress,
/// or `None` for requests that are not forwarded this way.
pub fn encode_keyed(request: &Request<'_>, out: &mut BytesMut) -> Option<(ReplyKind, Quiet)> {
    match request {
        Request::Store(StoreRequest {
            mode,
            key,
            flags,
            exptime,
            data,
            cas,
            noreply,
        }) => {
            out.put_slice(store_command(*mode));
            out.put_u8(b' ');
            out.put_slice(key);
            out.put_u8(b' ');
            put_number(out, *flags);
            out.put_u8(b' ');
            put_number(out, *exptime);
            out.put_u8(b' ');
            put_number(out, data.len());
            if *mode == StoreMode::Cas {
                out.put_u8(b' ');
                put_number(out, *cas);
            }
            out.put_slice(b"\r\n");
            out.put_slice(data);
            out.put_slice(b"\r\n");
            Some((ReplyKind::Line, text_quiet(*noreply)))
        }
        Request::Delete { key, noreply } => {
            out.put_slice(b"delete ");
            out.put_slice(key);
            out.put_slice(b"\r\n");
            Some((ReplyKind::Line, text_quiet(*noreply)))
        }
        Request::Arithmetic {
            incr,
            key,
            delta,
            noreply,
        } => {
            out.put_slice(if *incr { b"incr " } else { b"decr " });
            out.put_slice(key);
            out.put_u8(b' ');
            put_number(out, *delta);
            out.put_slice(b"\r\n");
            Some((ReplyKind::Line, text_quiet(*noreply)))
        }
        Request::Touch {
            key,
            exptime,
            noreply,
        } => {
            out.put_slice(b"touch ");
            out.put_slice(key);
            out.put_u8(b' ');
            put_number(out, *exptime);
            out.put_slice(b"\r\n");
            Some((ReplyKind::Line, text_quiet(*noreply)))
        }
        Request::Meta(meta) => Some(encode_meta(meta, out)),
        Request::MetaDebug { key } => {
            out.put_slice(b"me ");
            out.put_slice(key);
            out.put_slice(b"\r\n");
            Some((ReplyKind::Line, Quiet::None))
        }
        _ => None,
    }
}

fn text_quiet(noreply: bool) -> Quiet {
    if noreply {
        Quiet::All
    } else {
        Quiet::None
    }
}

fn encode_meta(meta: &MetaRequest<'_>, out: &mut BytesMut) -> (ReplyKind, Quiet) {
    out.put_slice(match meta.command {
        MetaCommand::Get => b"mg ",
        MetaCommand::Set => b"ms ",
        MetaCommand::Delete => b"md ",
        MetaCommand::Arithmetic => b"ma ",
    });
    if meta.flags.base64_key {
        let encoded = base64::engine::general_purpose::STANDARD.encode(&meta.key);
        out.put_slice(encoded.as_bytes());
    } else {
        out.put_slice(&meta.key);
    }
    if meta.command == MetaCommand::Set {
        out.put_u8(b' ');
        put_number(out, meta.data.len());
    }
    for token in &meta.flags.tokens {
        if token.first() != Some(&b'q') {
            out.put_u8(b' ');
            out.put_slice(token);
        }
    }
    out.put_slice(b"\r\n");
    if meta.command == MetaCommand::Set {
        out.put_slice(meta.data);
        out.put_slice(b"\r\n");
    }
    let quiet = if !meta.flags.quiet {
        Quiet::None
    } else {
        Quiet::Codes(meta_reply::quiet_hides(meta.command))
    };
    (ReplyKind::Meta, quiet)
}

/// Bytes from a node that are not a reply of the expected kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedReply;

/// Length of the complete reply at the front of `buf`, `Ok(None)` if more bytes are needed,
/// `Err` if the bytes cannot be a reply of this kind.
pub fn reply_len(buf: &[u8], kind: ReplyKind) -> Result<Option<usize>, MalformedReply> {
    let line_end = |from: usize| memchr(b'\n', &buf[from..]).map(|i| from + i + 1);
    match kind {
        ReplyKind::Line => Ok(line_end(0)),
        ReplyKind::Meta => {
            let Some(end) = line_end(0) else {
                return Ok(None);
            };
            let Some(size_and_fields) = buf[..end]
                .strip_prefix(meta_reply::VA)
                .and_then(|rest| rest.strip_prefix(b" "))
            else {
                return Ok(Some(end));
            };
            let size = data_size(size_and_fields).ok_or(MalformedReply)?;
            // Sizes come from the node: never trust them not to overflow.
            let total = end
                .checked_add(size)
                .and_then(|t| t.checked_add(2))
                .ok_or(MalformedReply)?;
            Ok((buf.len() >= total).then_some(total))
        }
        ReplyKind::Dump => {
            let mut at = 0;
            loop {
                let Some(end) = line_end(at) else {
                    return Ok(None);
                };
                let line = &buf[at..end];
                if line == reply::END || (at == 0 && !is_dump_line(line)) {
                    return Ok(Some(end));
                }
                if !is_dump_line(line) {
                    return Err(MalformedReply);
                }
                at = end;
            }
        }
        ReplyKind::Retrieval | ReplyKind::Stats => {
            let mut at = 0;
            loop {
                let Some(end) = line_end(at) else {
                    return Ok(None);
                };
                let line = &buf[at..end];
                if line == reply::END {
                    return Ok(Some(end));
                }
                if kind == ReplyKind::Retrieval && line.starts_with(reply::VALUE) {
                    let size = value_size(line).ok_or(MalformedReply)?;
                    let next = end
                        .checked_add(size)
                        .and_then(|n| n.checked_add(2))
                        .ok_or(MalformedReply)?;
                    if buf.len() < next {
                        return Ok(None);
                    }
                    at = next;
                } else if kind == ReplyKind::Stats
                    && (line.starts_with(b"STAT ") || line.starts_with(b"PREFIX "))
                {
                    at = end;
                } else if at == 0 {
                    // A single line instead of a block: an error, RESET, OK...
                    return Ok(Some(end));
                } else {
                    return Err(MalformedReply);
                }
            }
        }
    }
}

fn is_dump_line(line: &[u8]) -> bool {
    line.starts_with(b"key=") || line.starts_with(b"ITEM ")
}

/// Encodes an operations command for a node (`None` for those the proxy answers itself).
pub fn encode_admin(request: &AdminRequest, out: &mut BytesMut) -> Option<ReplyKind> {
    fn classes(selection: ClassSelection, out: &mut BytesMut) {
        match selection {
            ClassSelection::All => out.put_slice(b"all"),
            ClassSelection::Hash => out.put_slice(b"hash"),
            // Class 0 is no class: the node answers BADCLASS, as it would to the original.
            ClassSelection::Invalid => out.put_u8(b'0'),
            ClassSelection::Classes(_) => {
                let ids: Vec<String> = (1..64u8)
                    .filter(|&id| selection.includes(id))
                    .map(|id| id.to_string())
                    .collect();
                out.put_slice(ids.join(",").as_bytes());
            }
        }
    }
    let kind = match request {
        AdminRequest::CacheDump(Ok((class, limit))) => {
            out.put_slice(b"stats cachedump ");
            put_number(out, *class);
            out.put_u8(b' ');
            put_number(out, *limit);
            ReplyKind::Dump
        }
        AdminRequest::LruCrawler(command) => {
            out.put_slice(b"lru_crawler ");
            match *command {
                CrawlerCommand::Metadump(selection) => {
                    out.put_slice(b"metadump ");
                    classes(selection, out);
                    out.put_slice(b"\r\n");
                    return Some(ReplyKind::Dump);
                }
                CrawlerCommand::Crawl(selection) => {
                    out.put_slice(b"crawl ");
                    classes(selection, out);
                }
                CrawlerCommand::ToCrawl(n) => {
                    out.put_slice(b"tocrawl ");
                    put_number(out, n);
                }
                CrawlerCommand::Sleep(n) => {
                    out.put_slice(b"sleep ");
                    put_number(out, n);
                }
                CrawlerCommand::Enable => out.put_slice(b"enable"),
                CrawlerCommand::Disable => out.put_slice(b"disable"),
            }
            ReplyKind::Line
        }
        _ => return None,
    };
    out.put_slice(b"\r\n");
    Some(kind)
}

fn data_size(rest_of_line: &[u8]) -> Option<usize> {
    let digits: &[u8] = rest_of_line.split(|&b| b == b' ' || b == b'\r').next()?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Data size in a `VALUE <key> <flags> <bytes> [<cas>]` line.
fn value_size(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n")?;
    let field = line.split(|&b| b == b' ').nth(3)?;
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// Splits a retrieval reply into its `VALUE` blocks, each with its key.
pub fn value_blocks(reply: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut blocks = Vec::new();
    let mut at = 0;
    while at < reply.len() {
        let Some(end) = memchr(b'\n', &reply[at..]).map(|i| at + i + 1) else {
            break;
        };
        let line = &reply[at..end];
        if !line.starts_with(reply::VALUE) {
            break;
        }
        let Some(size) = value_size(line) else { break };
        let next = end.saturating_add(size).saturating_add(2).min(reply.len());
        let key = line[6..].split(|&b| b == b' ').next().unwrap_or_default();
        blocks.push((key, &reply[at..next]));
        at = next;
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{parse, Limits, ParseOutcome};

    fn request(input: &[u8]) -> Request<'_> {
        match parse(input, &Limits::default()) {
            ParseOutcome::Request { request, .. } => request,
            other => panic!("{other:?}"),
        }
    }

    fn encoded(input: &[u8]) -> (Vec<u8>, ReplyKind, Quiet) {
        let mut out = BytesMut::new();
        let (kind, quiet) = encode_keyed(&request(input), &mut out).unwrap();
        (out.to_vec(), kind, quiet)
    }

    #[test]
    fn noreply_and_q_are_stripped_and_remembered() {
        let (bytes, kind, quiet) = encoded(b"set k 1 2 3 noreply\r\nabc\r\n");
        assert_eq!(bytes, b"set k 1 2 3\r\nabc\r\n");
        assert_eq!((kind, quiet), (ReplyKind::Line, Quiet::All));
        let (bytes, kind, quiet) = encoded(b"mg k v q Oab\r\n");
        assert_eq!(bytes, b"mg k v Oab\r\n");
        assert_eq!(kind, ReplyKind::Meta);
        assert!(!quiet.delivers(b"EN\r\n") && quiet.delivers(b"HD\r\n"));
        let (bytes, ..) = encoded(b"ms Zm9v 2 b T5 q\r\nhi\r\n");
        assert_eq!(bytes, b"ms Zm9v 2 b T5\r\nhi\r\n");
        let (bytes, ..) = encoded(b"cas k 0 0 1 77\r\nx\r\n");
        assert_eq!(bytes, b"cas k 0 0 1 77\r\nx\r\n");
    }

    #[test]
    fn frames_every_reply_kind() {
        let r = b"VALUE a 0 3\r\nEND\r\nVALUE b 0 1 9\r\nx\r\nEND\r\nnext";
        // The first value is the three bytes "END": framing goes by sizes, not by content.
        assert_eq!(reply_len(r, ReplyKind::Retrieval), Ok(Some(41)));
        assert_eq!(reply_len(&r[..20], ReplyKind::Retrieval), Ok(None));
        assert_eq!(reply_len(b"END\r\n", ReplyKind::Retrieval), Ok(Some(5)));
        assert_eq!(
            reply_len(b"CLIENT_ERROR bad\r\n", ReplyKind::Retrieval),
            Ok(Some(18))
        );
        assert_eq!(
            reply_len(b"VA 2 f0\r\nhi\r\nHD\r\n", ReplyKind::Meta),
            Ok(Some(13))
        );
        assert_eq!(reply_len(b"VA 2 f0\r\nh", ReplyKind::Meta), Ok(None));
        assert_eq!(reply_len(b"STORED\r\n", ReplyKind::Line), Ok(Some(8)));
        assert_eq!(
            reply_len(b"STAT a 1\r\nSTAT b 2\r\nEND\r\n", ReplyKind::Stats),
            Ok(Some(25))
        );
        assert!(reply_len(b"VALUE a 0 x\r\n", ReplyKind::Retrieval).is_err());
    }

    #[test]
    fn splits_value_blocks() {
        let r = b"VALUE a 0 3\r\nEND\r\nVALUE b 0 1\r\nx\r\nEND\r\n";
        let blocks = value_blocks(r);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].0, b"a");
        assert_eq!(blocks[1], (&b"b"[..], &b"VALUE b 0 1\r\nx\r\n"[..]));
    }
}
