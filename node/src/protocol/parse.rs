//! Framing and parsing of the text and meta protocols.
//!
//! `parse` looks at the unread bytes of a connection and returns one request borrowing from
//! them, `Incomplete` when more bytes are needed, or `Close` when the peer broke framing in a
//! way memcached answers by closing the connection. It never allocates for the common commands
//! and never reads past the buffer; every size it accepts is bounded by `Limits`.

use std::borrow::Cow;

use super::admin;
use super::meta::{parse_flags, MetaFlags, MAX_META_TOKENS};
use super::numbers::{parse_i32, parse_u32, parse_u64};
use super::request::{
    GetCommand, KeyList, MetaCommand, MetaRequest, Request, StoreMode, StoreRequest,
};
use super::tokens::{memchr, Tokens};

/// Longest key, in bytes.
pub const KEY_MAX_LENGTH: usize = 250;
/// memcached closes a connection whose unterminated line exceeds this, unless it is a `get`.
pub const MAX_LINE_WITHOUT_NEWLINE: usize = 2048;

const BAD_FORMAT: &str = "CLIENT_ERROR bad command line format";
const BAD_CHUNK: &str = "CLIENT_ERROR bad data chunk";

/// Size limits the parser enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest item (memcached's `-I`), header included as memcached counts it.
    pub max_item_size: usize,
    /// Longest multi-key `get` line accepted; longer ones close the connection.
    pub max_get_line: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_item_size: 1024 * 1024,
            max_get_line: 2 * 1024 * 1024,
        }
    }
}

/// What the parser made of the buffered bytes.
#[derive(Debug)]
pub enum ParseOutcome<'a> {
    /// One request. `consumed` bytes of the buffer belong to it; `swallow` more bytes that
    /// follow it (maybe not received yet) are to be discarded unread.
    Request {
        request: Request<'a>,
        consumed: usize,
        swallow: usize,
    },
    /// More bytes are needed.
    Incomplete,
    /// Close the connection.
    Close,
}

fn done(request: Request<'_>, consumed: usize) -> ParseOutcome<'_> {
    ParseOutcome::Request {
        request,
        consumed,
        swallow: 0,
    }
}

fn error(reply: &'static str, noreply: bool, consumed: usize) -> ParseOutcome<'static> {
    ParseOutcome::Request {
        request: Request::Error { reply, noreply },
        consumed,
        swallow: 0,
    }
}

/// Whether memcached would refuse an item of this shape as too large for `max_item_size`.
pub fn exceeds_item_size(key_len: usize, flags: u32, value_len: usize, max: usize) -> bool {
    crate::store::classes::memcached_item_size(key_len, flags, value_len, true) > max
}

/// Parses one request from the front of `buf`.
pub fn parse<'a>(buf: &'a [u8], limits: &Limits) -> ParseOutcome<'a> {
    let Some(newline) = memchr(b'\n', buf) else {
        return unterminated(buf, limits);
    };
    let consumed = newline + 1;
    let mut line = &buf[..newline];
    if line.len() > 1 && line[line.len() - 1] == b'\r' {
        line = &line[..line.len() - 1];
    }
    let tokens = Tokens::new(line);
    let command = tokens.get(0);
    if tokens.ntokens() < 2 || command.len() < 2 {
        return error("ERROR", false, consumed);
    }
    let after_line = &buf[consumed..];
    match command {
        b"get" | b"bget" => parse_get(GetCommand::Get, line, &tokens, consumed),
        b"gets" => parse_get(GetCommand::Gets, line, &tokens, consumed),
        b"gat" => parse_get(GetCommand::Gat, line, &tokens, consumed),
        b"gats" => parse_get(GetCommand::Gats, line, &tokens, consumed),
        b"set" => parse_store(StoreMode::Set, &tokens, consumed, after_line, limits),
        b"add" => parse_store(StoreMode::Add, &tokens, consumed, after_line, limits),
        b"replace" => parse_store(StoreMode::Replace, &tokens, consumed, after_line, limits),
        b"append" => parse_store(StoreMode::Append, &tokens, consumed, after_line, limits),
        b"prepend" => parse_store(StoreMode::Prepend, &tokens, consumed, after_line, limits),
        b"cas" => parse_store(StoreMode::Cas, &tokens, consumed, after_line, limits),
        b"delete" => parse_delete(&tokens, consumed),
        b"incr" => parse_arithmetic(true, &tokens, consumed),
        b"decr" => parse_arithmetic(false, &tokens, consumed),
        b"touch" => parse_touch(&tokens, consumed),
        b"mg" => parse_meta(MetaCommand::Get, &tokens, consumed),
        b"md" => parse_meta(MetaCommand::Delete, &tokens, consumed),
        b"ma" => parse_meta(MetaCommand::Arithmetic, &tokens, consumed),
        b"ms" => parse_meta_set(&tokens, consumed, after_line, limits),
        b"mn" => done(Request::MetaNoop, consumed),
        b"me" => parse_meta_debug(&tokens, consumed),
        b"stats" if tokens.get(1) == b"cachedump" => {
            done(admin::parse_cachedump(&tokens), consumed)
        }
        b"lru_crawler" => done(admin::parse_lru_crawler(&tokens), consumed),
        b"watch" => done(admin::parse_watch(&tokens), consumed),
        b"stats" => done(
            Request::Stats {
                sub: tokens.get(1),
                arg: tokens.get(2),
            },
            consumed,
        ),
        b"flush_all" => parse_flush_all(&tokens, consumed),
        b"version" => done(Request::Version, consumed),
        b"quit" => done(Request::Quit, consumed),
        b"verbosity" => parse_verbosity(&tokens, consumed),
        b"config" if tokens.ntokens() == 4 && tokens.get(1) == b"get" => done(
            Request::ConfigGet {
                what: tokens.get(2),
            },
            consumed,
        ),
        b"cache_memlimit" => parse_memlimit(&tokens, consumed),
        b"shutdown" => done(admin::parse_shutdown(&tokens), consumed),
        _ if command.len() == 2 && command[0] == b'm' => error("ERROR", false, consumed),
        _ => {
            // memcached hangs up on what looks like an HTTP request.
            if tokens.get(tokens.len() - 1).starts_with(b"HTTP/") {
                ParseOutcome::Close
            } else {
                error("ERROR", false, consumed)
            }
        }
    }
}

/// No newline yet: wait, unless the line is already longer than memcached tolerates.
fn unterminated<'a>(buf: &'a [u8], limits: &Limits) -> ParseOutcome<'a> {
    if buf.len() <= MAX_LINE_WITHOUT_NEWLINE {
        return ParseOutcome::Incomplete;
    }
    let spaces = buf.iter().take_while(|&&b| b == b' ').count();
    let rest = &buf[spaces..];
    let is_get = rest.starts_with(b"get ") || rest.starts_with(b"gets ");
    if spaces > 100 || !is_get || buf.len() > limits.max_get_line {
        return ParseOutcome::Close;
    }
    ParseOutcome::Incomplete
}

/// Byte offset of `token` inside `line` (tokens are sub-slices of the line).
fn offset_in(line: &[u8], token: &[u8]) -> usize {
    (token.as_ptr() as usize).saturating_sub(line.as_ptr() as usize)
}

fn parse_get<'a>(
    command: GetCommand,
    line: &'a [u8],
    tokens: &Tokens<'a>,
    consumed: usize,
) -> ParseOutcome<'a> {
    if tokens.ntokens() < 3 {
        return error("ERROR", false, consumed);
    }
    let mut first_key = 1;
    let mut exptime = 0;
    if command.touches() {
        match parse_i32(tokens.get(1)) {
            Some(e) => exptime = e,
            None => return error("CLIENT_ERROR invalid exptime argument", false, consumed),
        }
        first_key = 2;
    }
    // Keys run from the first key token to the end of the line (past the 23-token window).
    // The line is cut at an embedded NUL, as memcached's strlen() would.
    let line = match memchr(0, line) {
        Some(nul) => &line[..nul],
        None => line,
    };
    let text = if first_key < tokens.len() {
        &line[offset_in(line, tokens.get(first_key))..]
    } else {
        &[][..]
    };
    let keys = KeyList::new(text);
    if keys.iter().any(|k| k.len() > KEY_MAX_LENGTH) {
        return error(BAD_FORMAT, false, consumed);
    }
    done(
        Request::Get {
            command,
            exptime,
            keys,
        },
        consumed,
    )
}

fn parse_store<'a>(
    mode: StoreMode,
    tokens: &Tokens<'a>,
    consumed: usize,
    after_line: &'a [u8],
    limits: &Limits,
) -> ParseOutcome<'a> {
    let (min, max) = if mode == StoreMode::Cas {
        (7, 8)
    } else {
        (6, 7)
    };
    if tokens.ntokens() != min && tokens.ntokens() != max {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    let key = tokens.get(1);
    if key.len() > KEY_MAX_LENGTH {
        return error(BAD_FORMAT, noreply, consumed);
    }
    let (Some(flags), Some(exptime), Some(vlen)) = (
        parse_u32(tokens.get(2)),
        parse_i32(tokens.get(3)),
        parse_i32(tokens.get(4)),
    ) else {
        return error(BAD_FORMAT, noreply, consumed);
    };
    let mut cas = 0;
    if mode == StoreMode::Cas {
        match parse_u64(tokens.get(5)) {
            Some(c) => cas = c,
            None => return error(BAD_FORMAT, noreply, consumed),
        }
    }
    let Ok(vlen) = usize::try_from(vlen) else {
        return error(BAD_FORMAT, noreply, consumed);
    };
    if vlen > (i32::MAX as usize) - 2 {
        return error(BAD_FORMAT, noreply, consumed);
    }
    if exceeds_item_size(key.len(), flags, vlen, limits.max_item_size) {
        return ParseOutcome::Request {
            request: Request::TooLarge {
                key: Cow::Borrowed(key),
                drop_existing: mode == StoreMode::Set,
                noreply,
            },
            consumed,
            swallow: vlen + 2,
        };
    }
    with_data_block(after_line, vlen, consumed, noreply, |data| {
        Request::Store(StoreRequest {
            mode,
            key,
            flags,
            exptime,
            data,
            cas,
            noreply,
        })
    })
}

/// Completes a storage request once its data block has arrived: `Incomplete` until then,
/// memcached's "bad data chunk" when the block does not end in `\r\n` (the declared length
/// is consumed either way), otherwise the request `build` makes of the data.
fn with_data_block<'a>(
    after_line: &'a [u8],
    vlen: usize,
    line_len: usize,
    noreply: bool,
    build: impl FnOnce(&'a [u8]) -> Request<'a>,
) -> ParseOutcome<'a> {
    let Some(data) = data_block(after_line, vlen) else {
        return ParseOutcome::Incomplete;
    };
    let consumed = line_len + vlen + 2;
    match data {
        Some(data) => done(build(data), consumed),
        None => error(BAD_CHUNK, noreply, consumed),
    }
}

/// The `vlen` data bytes and their `\r\n`: `None` if not all received yet, `Some(None)` when
/// the block is not terminated by `\r\n` (memcached's "bad data chunk").
fn data_block(after_line: &[u8], vlen: usize) -> Option<Option<&[u8]>> {
    if after_line.len() < vlen + 2 {
        return None;
    }
    if &after_line[vlen..vlen + 2] != b"\r\n" {
        return Some(None);
    }
    Some(Some(&after_line[..vlen]))
}

fn parse_delete<'a>(tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    let n = tokens.ntokens();
    if !(3..=5).contains(&n) {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    if n > 3 {
        let hold_is_zero = tokens.get(2) == b"0";
        let valid = (n == 4 && (hold_is_zero || noreply)) || (n == 5 && hold_is_zero && noreply);
        if !valid {
            return error(
                "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]",
                noreply,
                consumed,
            );
        }
    }
    let key = tokens.get(1);
    if key.len() > KEY_MAX_LENGTH {
        return error(BAD_FORMAT, noreply, consumed);
    }
    done(Request::Delete { key, noreply }, consumed)
}

fn parse_arithmetic<'a>(incr: bool, tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    if tokens.ntokens() != 4 && tokens.ntokens() != 5 {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    let key = tokens.get(1);
    if key.len() > KEY_MAX_LENGTH {
        return error(BAD_FORMAT, noreply, consumed);
    }
    let Some(delta) = parse_u64(tokens.get(2)) else {
        return error(
            "CLIENT_ERROR invalid numeric delta argument",
            noreply,
            consumed,
        );
    };
    done(
        Request::Arithmetic {
            incr,
            key,
            delta,
            noreply,
        },
        consumed,
    )
}

fn parse_touch<'a>(tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    if tokens.ntokens() != 4 && tokens.ntokens() != 5 {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    let key = tokens.get(1);
    if key.len() > KEY_MAX_LENGTH {
        return error(BAD_FORMAT, noreply, consumed);
    }
    let Some(exptime) = parse_i32(tokens.get(2)) else {
        return error("CLIENT_ERROR invalid exptime argument", noreply, consumed);
    };
    done(
        Request::Touch {
            key,
            exptime,
            noreply,
        },
        consumed,
    )
}

fn parse_flush_all<'a>(tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    let n = tokens.ntokens();
    if !(2..=4).contains(&n) {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    let mut delay = 0;
    if n != if noreply { 3 } else { 2 } {
        match parse_i32(tokens.get(1)) {
            Some(d) => delay = d,
            None => return error("CLIENT_ERROR invalid exptime argument", noreply, consumed),
        }
    }
    done(Request::FlushAll { delay, noreply }, consumed)
}

fn parse_verbosity<'a>(tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    if tokens.ntokens() != 3 && tokens.ntokens() != 4 {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    match parse_u32(tokens.get(1)) {
        Some(level) => done(Request::Verbosity { level, noreply }, consumed),
        None => error(BAD_FORMAT, noreply, consumed),
    }
}

fn parse_memlimit<'a>(tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    if tokens.ntokens() != 3 && tokens.ntokens() != 4 {
        return error("ERROR", false, consumed);
    }
    let noreply = tokens.noreply();
    match parse_u32(tokens.get(1)) {
        Some(megabytes) => done(Request::CacheMemlimit { megabytes, noreply }, consumed),
        None => error("ERROR", noreply, consumed),
    }
}

/// Checks shared by `mg`, `md` and `ma` before their flags are read.
fn parse_meta<'a>(command: MetaCommand, tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    if tokens.ntokens() < 3 {
        return error("ERROR", false, consumed);
    }
    let key = tokens.get(1);
    if key.len() > KEY_MAX_LENGTH {
        return error(BAD_FORMAT, false, consumed);
    }
    if tokens.ntokens() > MAX_META_TOKENS {
        let reply = if command == MetaCommand::Get {
            "CLIENT_ERROR options flags are too long"
        } else {
            "CLIENT_ERROR options flags too long"
        };
        return error(reply, false, consumed);
    }
    let (key, flags) = match parse_flags(key, tokens.slice(2)) {
        Ok(parsed) => parsed,
        Err(e) => {
            let reply = if command == MetaCommand::Get {
                e.0
            } else {
                "CLIENT_ERROR invalid or duplicate flag"
            };
            return error(reply, false, consumed);
        }
    };
    if flags.opaque_too_long() {
        return error("CLIENT_ERROR opaque token too long", false, consumed);
    }
    if command == MetaCommand::Arithmetic
        && !matches!(flags.mode, None | Some(b'I' | b'+' | b'D' | b'-'))
    {
        return error("CLIENT_ERROR invalid mode for ma M token", false, consumed);
    }
    done(
        Request::Meta(MetaRequest {
            command,
            key,
            flags,
            data: &[],
        }),
        consumed,
    )
}

/// The store mode an `ms` mode switch selects (a CAS value upgrades set/replace to cas).
fn meta_store_mode(flags: &MetaFlags<'_>) -> Option<StoreMode> {
    let mode = match flags.mode {
        None | Some(b'S') => StoreMode::Set,
        Some(b'E') => StoreMode::Add,
        Some(b'A') => StoreMode::Append,
        Some(b'P') => StoreMode::Prepend,
        Some(b'R') => StoreMode::Replace,
        Some(_) => return None,
    };
    Some(match mode {
        StoreMode::Set | StoreMode::Replace if flags.cas.is_some() => StoreMode::Cas,
        other => other,
    })
}

fn parse_meta_set<'a>(
    tokens: &Tokens<'a>,
    consumed: usize,
    after_line: &'a [u8],
    limits: &Limits,
) -> ParseOutcome<'a> {
    if tokens.ntokens() < 3 {
        return error("ERROR", false, consumed);
    }
    let key = tokens.get(1);
    if key.len() > KEY_MAX_LENGTH || tokens.ntokens() == 3 {
        return error(BAD_FORMAT, false, consumed);
    }
    if tokens.ntokens() > MAX_META_TOKENS {
        return error("CLIENT_ERROR options flags too long", false, consumed);
    }
    let vlen = match parse_i32(tokens.get(2)).map(usize::try_from) {
        Some(Ok(v)) if v <= (i32::MAX as usize) - 2 => v,
        _ => return error(BAD_FORMAT, false, consumed),
    };
    // From here on, errors also discard the data block that follows the line.
    let swallow_with = |reply: &'static str| ParseOutcome::Request {
        request: Request::Error {
            reply,
            noreply: false,
        },
        consumed,
        swallow: vlen + 2,
    };
    let (key, flags) = match parse_flags(key, tokens.slice(3)) {
        Ok(parsed) => parsed,
        Err(e) => return swallow_with(e.0),
    };
    if flags.opaque_too_long() {
        return swallow_with("CLIENT_ERROR opaque token too long");
    }
    if meta_store_mode(&flags).is_none() {
        return swallow_with("CLIENT_ERROR invalid mode for ms M token");
    }
    if exceeds_item_size(key.len(), flags.client_flags, vlen, limits.max_item_size) {
        return ParseOutcome::Request {
            request: Request::TooLarge {
                key,
                drop_existing: true,
                noreply: false,
            },
            consumed,
            swallow: vlen + 2,
        };
    }
    with_data_block(after_line, vlen, consumed, false, |data| {
        Request::Meta(MetaRequest {
            command: MetaCommand::Set,
            key,
            flags,
            data,
        })
    })
}

/// The store mode of a parsed `ms` request.
pub fn meta_set_mode(flags: &MetaFlags<'_>) -> StoreMode {
    meta_store_mode(flags).unwrap_or(StoreMode::Set)
}

fn parse_meta_debug<'a>(tokens: &Tokens<'a>, consumed: usize) -> ParseOutcome<'a> {
    let key = tokens.get(1);
    if tokens.ntokens() < 3 || key.len() > KEY_MAX_LENGTH {
        return error(BAD_FORMAT, false, consumed);
    }
    if tokens.ntokens() >= 4 && tokens.get(2) == b"b" {
        use base64::Engine as _;
        return match base64::engine::general_purpose::STANDARD.decode(key) {
            Ok(decoded) if !decoded.is_empty() => done(
                Request::MetaDebug {
                    key: Cow::Owned(decoded),
                },
                consumed,
            ),
            _ => error(BAD_FORMAT, false, consumed),
        };
    }
    done(
        Request::MetaDebug {
            key: Cow::Borrowed(key),
        },
        consumed,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(input: &[u8]) -> ParseOutcome<'_> {
        parse(input, &Limits::default())
    }

    #[test]
    fn waits_for_a_whole_line_and_data_block() {
        assert!(matches!(parse_all(b"get a"), ParseOutcome::Incomplete));
        assert!(matches!(
            parse_all(b"set a 0 0 5\r\nhel"),
            ParseOutcome::Incomplete
        ));
        match parse_all(b"set a 1 2 5\r\nhello\r\nget a\r\n") {
            ParseOutcome::Request {
                request: Request::Store(s),
                consumed,
                swallow: 0,
            } => {
                assert_eq!(consumed, 20);
                assert_eq!(s.data, b"hello");
                assert_eq!((s.flags, s.exptime), (1, 2));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bad_data_chunk_consumes_the_declared_length() {
        match parse_all(b"set a 0 0 3\r\nabcde\r\n") {
            ParseOutcome::Request {
                request: Request::Error { reply, .. },
                consumed,
                ..
            } => {
                assert_eq!(reply, BAD_CHUNK);
                assert_eq!(consumed, 13 + 5);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn too_large_values_are_swallowed() {
        let limits = Limits {
            max_item_size: 1024,
            ..Limits::default()
        };
        match parse(b"set a 0 0 2000 noreply\r\n", &limits) {
            ParseOutcome::Request {
                request:
                    Request::TooLarge {
                        drop_existing,
                        noreply,
                        ..
                    },
                swallow,
                ..
            } => {
                assert!(drop_existing && noreply);
                assert_eq!(swallow, 2002);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn long_lines_close_unless_they_are_gets() {
        let garbage = vec![b'x'; MAX_LINE_WITHOUT_NEWLINE + 1];
        assert!(matches!(parse_all(&garbage), ParseOutcome::Close));
        let mut get = b"get ".to_vec();
        get.extend(std::iter::repeat_n(b'k', MAX_LINE_WITHOUT_NEWLINE));
        assert!(matches!(parse_all(&get), ParseOutcome::Incomplete));
    }

    #[test]
    fn multi_get_keys_span_past_the_token_window() {
        let line: String = (0..40).map(|i| format!(" k{i}")).collect();
        let input = format!("get{line}\r\n");
        match parse_all(input.as_bytes()) {
            ParseOutcome::Request {
                request: Request::Get { keys, .. },
                ..
            } => assert_eq!(keys.iter().count(), 40),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn item_size_limit_matches_memcached() {
        // memcached -I 1m refuses a value of exactly 1 MiB but stores 1 MiB minus its header.
        let max = 1024 * 1024;
        assert!(exceeds_item_size(1, 0, max, max));
        assert!(!exceeds_item_size(1, 0, max - 100, max));
    }
}
