//! Meta-command replies (`mg`, `ms`, `md`, `ma`, `me`): what the engine decided, as typed
//! values, and how memcached writes them.
//!
//! The engine fills a [`MetaReply`] from the item under the shard lock (the value is a
//! borrowed slice of it) and hands it to [`MetaReply::compose`], which copies it once into
//! the connection's buffer.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use smallvec::SmallVec;

use super::meta::MAX_META_TOKENS;
use super::reply;
use super::MetaCommand;

/// `VA`'s code: the value follows the status line.
pub const VA: &[u8] = b"VA";

/// The reply codes meta `q` ("noreply semantics for return codes") hides for `command`;
/// other codes, errors included, are still sent.
pub fn quiet_hides(command: MetaCommand) -> &'static [&'static [u8]] {
    match command {
        MetaCommand::Get => &[b"EN"],
        MetaCommand::Set | MetaCommand::Delete => &[b"HD"],
        MetaCommand::Arithmetic => &[b"HD", VA],
    }
}

/// The code a meta reply starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaStatus<'a> {
    /// `HD`: done, no value.
    Done,
    /// `VA <size>`, the value on the next line.
    Value(&'a [u8]),
    /// `EN`: `mg`/`me` found nothing.
    Miss,
    /// `NF`: nothing to store into, delete or count (`ms` append/replace/cas, `md`, `ma`).
    NotFound,
    /// `NS`: not stored (`ms` add of an existing key, append to a missing one).
    NotStored,
    /// `EX`: the CAS did not match.
    Exists,
}

impl MetaStatus<'_> {
    fn code(self) -> &'static [u8] {
        match self {
            MetaStatus::Done => b"HD",
            MetaStatus::Value(_) => VA,
            MetaStatus::Miss => b"EN",
            MetaStatus::NotFound => b"NF",
            MetaStatus::NotStored => b"NS",
            MetaStatus::Exists => b"EX",
        }
    }
}

/// A field a meta reply returns because a flag asked for it; fields go out in the order of
/// the request's flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnField<'a> {
    /// `s`: the value's size.
    Size(usize),
    /// `t`: seconds left to live, `None` (`t-1`) for an item that does not expire.
    Ttl(Option<u32>),
    /// `c`: the item's CAS.
    Cas(u64),
    /// `f`: the client flags.
    ClientFlags(u32),
    /// `l`: seconds since the item was last accessed.
    LastAccess(u32),
    /// `h`: whether the item had been fetched before (`h1`/`h0`).
    Fetched(bool),
    /// `O<opaque>`: the request's token, echoed as sent (flag included).
    Opaque(&'a [u8]),
    /// `k<key>`: base64-encoded, with a ` b` after it, when the key is binary.
    Key { key: &'a [u8], binary: bool },
}

impl ReturnField<'_> {
    fn compose(self, out: &mut BytesMut) {
        match self {
            ReturnField::Size(n) => number_field(out, b's', n),
            ReturnField::Ttl(None) => out.put_slice(b" t-1"),
            ReturnField::Ttl(Some(n)) => number_field(out, b't', n),
            ReturnField::Cas(n) => number_field(out, b'c', n),
            ReturnField::ClientFlags(n) => number_field(out, b'f', n),
            ReturnField::LastAccess(n) => number_field(out, b'l', n),
            ReturnField::Fetched(fetched) => number_field(out, b'h', u8::from(fetched)),
            ReturnField::Opaque(token) => {
                out.put_u8(b' ');
                out.put_slice(token);
            }
            ReturnField::Key { key, binary } => {
                out.put_slice(b" k");
                put_key(out, key, binary);
                if binary {
                    out.put_slice(b" b");
                }
            }
        }
    }
}

/// `mg`'s recache markers, written after the fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Markers {
    /// `Z`: a win token for this item was already handed out.
    pub token_sent: bool,
    /// `X`: the item is stale (invalidated).
    pub stale: bool,
    /// `W`: this client won the right to recache the item.
    pub won: bool,
}

/// One meta reply: `<code>[ <size>]<fields>[ Z][ X][ W]\r\n[<value>\r\n]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaReply<'a> {
    pub status: MetaStatus<'a>,
    /// Inline room for every flag a request can carry, so a reply never allocates.
    pub fields: SmallVec<[ReturnField<'a>; MAX_META_TOKENS]>,
    pub markers: Markers,
}

impl<'a> MetaReply<'a> {
    pub fn new(status: MetaStatus<'a>) -> MetaReply<'a> {
        MetaReply {
            status,
            fields: SmallVec::new(),
            markers: Markers::default(),
        }
    }

    /// A reply without an item: the code with the request's `O` and `k` flags echoed, in
    /// request order (the key as the request gave it, base64 again if it came so).
    pub fn echoing(
        status: MetaStatus<'a>,
        tokens: &[&'a [u8]],
        key: &'a [u8],
        binary_key: bool,
    ) -> MetaReply<'a> {
        MetaReply::echoing_with(status, tokens, key, binary_key, |_| None)
    }

    /// As [`MetaReply::echoing`], with the fields `other` returns for the other flags, in
    /// request order too (`ms` returns its new `c` so).
    pub fn echoing_with(
        status: MetaStatus<'a>,
        tokens: &[&'a [u8]],
        key: &'a [u8],
        binary_key: bool,
        mut other: impl FnMut(&'a [u8]) -> Option<ReturnField<'a>>,
    ) -> MetaReply<'a> {
        let mut reply = MetaReply::new(status);
        for &token in tokens {
            let field = match token.first() {
                Some(b'O') => Some(ReturnField::Opaque(token)),
                Some(b'k') => Some(ReturnField::Key {
                    key,
                    binary: binary_key,
                }),
                _ => other(token),
            };
            reply.fields.extend(field);
        }
        reply
    }

    /// Appends the reply, unless `quiet` (the `q` flag) hides this code for `command`.
    pub fn compose(&self, command: MetaCommand, quiet: bool, out: &mut BytesMut) {
        let code = self.status.code();
        if quiet && quiet_hides(command).contains(&code) {
            return;
        }
        out.put_slice(code);
        if let MetaStatus::Value(data) = self.status {
            out.reserve(data.len() + 32);
            out.put_u8(b' ');
            reply::number(out, data.len());
        }
        for field in &self.fields {
            field.compose(out);
        }
        let Markers {
            token_sent,
            stale,
            won,
        } = self.markers;
        for (set, marker) in [(token_sent, b" Z"), (stale, b" X"), (won, b" W")] {
            if set {
                out.put_slice(marker);
            }
        }
        out.put_slice(b"\r\n");
        if let MetaStatus::Value(data) = self.status {
            out.put_slice(data);
            out.put_slice(b"\r\n");
        }
    }
}

/// `me`'s answer for an item, as memcached 1.6.18 prints it:
/// `ME <key> exp=<n> la=<n> cas=<n> fetch=<yes|no> cls=<n> size=<n>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaDebug<'a> {
    pub key: &'a [u8],
    /// Base64-encoded in the reply (without a ` b`: memcached's `me` prints none).
    pub binary_key: bool,
    /// memcached 1.6.18 prints now minus the expiry time (1.6.24 turned it round), -1 for
    /// an item that does not expire.
    pub exp: i64,
    /// Seconds since the last access.
    pub last_access: u32,
    pub cas: u64,
    pub fetched: bool,
    /// memcached's slab class of the item.
    pub class: u8,
    /// memcached's size of the item, as `stats slabs` counts it.
    pub size: usize,
}

impl MetaDebug<'_> {
    pub fn compose(&self, out: &mut BytesMut) {
        out.put_slice(b"ME ");
        put_key(out, self.key, self.binary_key);
        out.put_slice(b" exp=");
        reply::number(out, self.exp);
        out.put_slice(b" la=");
        reply::number(out, self.last_access);
        out.put_slice(b" cas=");
        reply::number(out, self.cas);
        out.put_slice(if self.fetched {
            b" fetch=yes"
        } else {
            b" fetch=no"
        });
        out.put_slice(b" cls=");
        reply::number(out, self.class);
        out.put_slice(b" size=");
        reply::number(out, self.size);
        out.put_slice(b"\r\n");
    }
}

/// Appends ` <flag><number>`, as meta replies return fields.
fn number_field(out: &mut BytesMut, flag: u8, n: impl itoa::Integer) {
    out.put_u8(b' ');
    out.put_u8(flag);
    reply::number(out, n);
}

/// Appends a key as sent, or base64-encoded when it is binary.
fn put_key(out: &mut BytesMut, key: &[u8], binary: bool) {
    if binary {
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        out.put_slice(encoded.as_bytes());
    } else {
        out.put_slice(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn composed(reply: &MetaReply<'_>, command: MetaCommand, quiet: bool) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.compose(command, quiet, &mut out);
        out.to_vec()
    }

    #[test]
    fn a_value_reply_has_its_fields_in_order_then_the_markers_then_the_data() {
        let mut reply = MetaReply::new(MetaStatus::Value(b"hello"));
        reply.fields.extend([
            ReturnField::Opaque(b"Oq1"),
            ReturnField::Ttl(None),
            ReturnField::Size(5),
            ReturnField::Ttl(Some(30)),
            ReturnField::Cas(18446744073709551615),
            ReturnField::ClientFlags(4294967295),
            ReturnField::LastAccess(7),
            ReturnField::Fetched(true),
            ReturnField::Fetched(false),
            ReturnField::Key {
                key: b"foo",
                binary: false,
            },
        ]);
        reply.markers = Markers {
            token_sent: true,
            stale: true,
            won: true,
        };
        assert_eq!(
            composed(&reply, MetaCommand::Get, false),
            b"VA 5 Oq1 t-1 s5 t30 c18446744073709551615 f4294967295 l7 h1 h0 kfoo Z X W\r\n\
              hello\r\n"
        );
        // An empty value still has its data line.
        let empty = MetaReply::new(MetaStatus::Value(b""));
        assert_eq!(composed(&empty, MetaCommand::Get, false), b"VA 0\r\n\r\n");
    }

    #[test]
    fn each_status_has_memcacheds_code() {
        for (status, code) in [
            (MetaStatus::Done, &b"HD\r\n"[..]),
            (MetaStatus::Miss, b"EN\r\n"),
            (MetaStatus::NotFound, b"NF\r\n"),
            (MetaStatus::NotStored, b"NS\r\n"),
            (MetaStatus::Exists, b"EX\r\n"),
        ] {
            assert_eq!(
                composed(&MetaReply::new(status), MetaCommand::Set, false),
                code
            );
        }
    }

    #[test]
    fn binary_keys_go_back_in_base64() {
        let tokens: [&[u8]; 4] = [b"k", b"v", b"Oabc", b"s"];
        let reply = MetaReply::echoing(MetaStatus::Miss, &tokens, b"\x00\xff", true);
        assert_eq!(
            composed(&reply, MetaCommand::Get, false),
            b"EN kAP8= b Oabc\r\n"
        );
        let debug = MetaDebug {
            key: b"\x00\xff",
            binary_key: true,
            exp: -1,
            last_access: 2,
            cas: 9,
            fetched: false,
            class: 1,
            size: 66,
        };
        let mut out = BytesMut::new();
        debug.compose(&mut out);
        assert_eq!(
            &out[..],
            b"ME AP8= exp=-1 la=2 cas=9 fetch=no cls=1 size=66\r\n"
        );
    }

    #[test]
    fn echoing_keeps_only_opaque_and_key_in_request_order() {
        let tokens: [&[u8]; 5] = [b"T30", b"Oxy", b"q", b"k", b"c"];
        let reply = MetaReply::echoing(MetaStatus::NotFound, &tokens, b"key", false);
        assert_eq!(
            composed(&reply, MetaCommand::Delete, true),
            b"NF Oxy kkey\r\n"
        );
    }

    #[test]
    fn quiet_hides_each_commands_nominal_code_only() {
        let value = MetaReply::new(MetaStatus::Value(b"1"));
        let done = MetaReply::new(MetaStatus::Done);
        let miss = MetaReply::new(MetaStatus::Miss);
        let exists = MetaReply::new(MetaStatus::Exists);
        // mg: a miss is hidden, a hit is not.
        assert_eq!(composed(&miss, MetaCommand::Get, true), b"");
        assert_eq!(composed(&value, MetaCommand::Get, true), b"VA 1\r\n1\r\n");
        assert_eq!(composed(&done, MetaCommand::Get, true), b"HD\r\n");
        // ms, md: success is hidden, failures are not.
        for command in [MetaCommand::Set, MetaCommand::Delete] {
            assert_eq!(composed(&done, command, true), b"");
            assert_eq!(composed(&exists, command, true), b"EX\r\n");
        }
        // ma: success is hidden with or without the value.
        assert_eq!(composed(&value, MetaCommand::Arithmetic, true), b"");
        assert_eq!(composed(&done, MetaCommand::Arithmetic, true), b"");
        assert_eq!(composed(&exists, MetaCommand::Arithmetic, true), b"EX\r\n");
        // Without q everything is sent.
        assert_eq!(composed(&miss, MetaCommand::Get, false), b"EN\r\n");
    }
}
