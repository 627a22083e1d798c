//! How one item is laid out inside a segment, and views of it.
//!
//! An item is appended to a segment as one record, right after the one before (records are
//! not aligned: every field is read as bytes):
//!
//! ```text
//! 0..8   CAS (the item's version)          12  key length
//! 8..12  last access (Unix s)              13  state bits (`bits`)
//!                                          14  access frequency (eviction)
//! 15..   value length (LEB128, 1..5 bytes), expiry (Unix s, 4 bytes, only when set),
//!        client flags (4 bytes, only when nonzero), key, value
//! ```
//!
//! 16 bytes of header for a value under 128 bytes without expiry or flags (17 under 16 KiB),
//! against memcached's 56. The record is the only copy of the metadata: the hash table
//! holds just the record's place. An item without an expiry that is given one (`touch`,
//! `gat`, meta `T`) is written again with the field (`Entry::item_mut`).

/// Bit flags kept per item.
pub mod bits {
    /// The item has been read at least once since it was stored (meta `h` flag).
    pub const FETCHED: u8 = 1;
    /// A recache/vivify "win" token was handed out (meta `W`/`Z` flags).
    pub const TOKEN_SENT: u8 = 2;
    /// The item was invalidated and is stale (meta `X` flag).
    pub const STALE: u8 = 4;
    /// The key was sent base64-encoded and is binary (meta `b` flag).
    pub const KEY_BINARY: u8 = 8;
    /// Not an item but the record of a delete, kept briefly to order late replicas.
    pub const TOMBSTONE: u8 = 16;
    /// The record is no longer linked (replaced, deleted, evicted): its space is garbage.
    pub(crate) const DEAD: u8 = 32;
    /// Client flags follow the value length (and the expiry).
    pub(crate) const HAS_FLAGS: u8 = 64;
    /// An expiry follows the value length.
    pub(crate) const HAS_EXPTIME: u8 = 128;
    /// Bits a caller may set or clear; the others describe the record's layout and life.
    pub(crate) const PUBLIC: u8 = FETCHED | TOKEN_SENT | STALE | KEY_BINARY | TOMBSTONE;
}

const CAS: usize = 0;
const TIME: usize = 8;
const KEY_LEN: usize = 12;
const BITS: usize = 13;
const FREQ: usize = 14;
const VALUE_LEN: usize = 15;
/// Bytes of fixed header before the value length.
pub const FIXED_HEADER: usize = VALUE_LEN;
/// Longest key a record can hold.
pub const MAX_KEY: usize = u8::MAX as usize;

/// The metadata of a new item.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemMeta {
    pub cas: u64,
    /// Absolute expiry in Unix seconds, 0 for never.
    pub exptime: u32,
    /// Last access or store, Unix seconds.
    pub time: u32,
    pub client_flags: u32,
    pub bits: u8,
}

/// An item to store: its key, its value in parts (concatenated), and its metadata.
#[derive(Clone, Copy, Debug)]
pub struct NewItem<'a> {
    pub key: &'a [u8],
    pub value: &'a [&'a [u8]],
    pub meta: ItemMeta,
}

impl<'a> NewItem<'a> {
    pub fn new(key: &'a [u8], value: &'a [&'a [u8]], meta: ItemMeta) -> NewItem<'a> {
        NewItem { key, value, meta }
    }

    /// The key as stored (at most `MAX_KEY` bytes; the protocol allows 250).
    pub fn stored_key(&self) -> &'a [u8] {
        &self.key[..self.key.len().min(MAX_KEY)]
    }

    pub fn value_len(&self) -> usize {
        self.value.iter().map(|p| p.len()).sum()
    }

    /// Bytes the record takes in a segment.
    pub fn record_len(&self) -> usize {
        record_len(
            self.stored_key().len(),
            self.value_len(),
            self.meta.client_flags,
            self.meta.exptime,
        )
    }

    /// Writes the record at the start of `out` (at least `record_len()` long).
    pub(crate) fn write(&self, out: &mut [u8]) {
        let key = self.stored_key();
        let value_len = self.value_len();
        let mut flag_bits = self.meta.bits & bits::PUBLIC;
        if self.meta.client_flags != 0 {
            flag_bits |= bits::HAS_FLAGS;
        }
        if self.meta.exptime != 0 {
            flag_bits |= bits::HAS_EXPTIME;
        }
        out[CAS..CAS + 8].copy_from_slice(&self.meta.cas.to_le_bytes());
        out[TIME..TIME + 4].copy_from_slice(&self.meta.time.to_le_bytes());
        out[KEY_LEN] = key.len() as u8;
        out[BITS] = flag_bits;
        out[FREQ] = 0;
        let mut at = VALUE_LEN + write_varint(&mut out[VALUE_LEN..], value_len as u32);
        if self.meta.exptime != 0 {
            out[at..at + 4].copy_from_slice(&self.meta.exptime.to_le_bytes());
            at += 4;
        }
        if self.meta.client_flags != 0 {
            out[at..at + 4].copy_from_slice(&self.meta.client_flags.to_le_bytes());
            at += 4;
        }
        out[at..at + key.len()].copy_from_slice(key);
        at += key.len();
        for part in self.value {
            out[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
    }
}

/// Bytes a record with this key, value, flags and expiry takes in a segment.
pub fn record_len(key_len: usize, value_len: usize, client_flags: u32, exptime: u32) -> usize {
    let flags = if client_flags == 0 { 0 } else { 4 };
    let expiry = if exptime == 0 { 0 } else { 4 };
    FIXED_HEADER + varint_len(value_len as u32) + expiry + flags + key_len.min(MAX_KEY) + value_len
}

fn varint_len(mut v: u32) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn write_varint(out: &mut [u8], mut v: u32) -> usize {
    let mut i = 0;
    while v >= 0x80 {
        out[i] = (v as u8) | 0x80;
        v >>= 7;
        i += 1;
    }
    out[i] = v as u8;
    i + 1
}

/// Reads a LEB128 u32; None when truncated or longer than 5 bytes.
fn read_varint(b: &[u8]) -> Option<(u32, usize)> {
    let mut v: u32 = 0;
    for (i, &byte) in b.iter().take(5).enumerate() {
        v |= u32::from(byte & 0x7f).checked_shl(7 * i as u32)?;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Little-endian u32 at `at` (the record and the `-e` file's fields are all little-endian).
pub(crate) fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

pub(crate) fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Where the parts of a record are, relative to its start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Where the expiry is, when the record has one.
    pub exptime_at: Option<usize>,
    pub key_at: usize,
    pub value_at: usize,
    pub value_len: usize,
    /// Record length.
    pub len: usize,
}

impl Layout {
    /// The layout of no record (an empty view).
    pub const EMPTY: Layout = Layout {
        exptime_at: None,
        key_at: 0,
        value_at: 0,
        value_len: 0,
        len: 0,
    };

    /// Parses the record at the start of `b` (which runs to the end of the written part of
    /// its segment). None when the bytes cannot be a record: a corrupt or foreign segment
    /// is never read past its end.
    pub fn parse(b: &[u8]) -> Option<Layout> {
        if b.len() < FIXED_HEADER + 1 {
            return None;
        }
        let key_len = usize::from(b[KEY_LEN]);
        let (value_len, n) = match b[VALUE_LEN] {
            short @ 0..0x80 => (u32::from(short), 1),
            _ => read_varint(&b[VALUE_LEN..])?,
        };
        let flags = if b[BITS] & bits::HAS_FLAGS != 0 { 4 } else { 0 };
        let exptime_at = (b[BITS] & bits::HAS_EXPTIME != 0).then_some(VALUE_LEN + n);
        let key_at = VALUE_LEN + n + 4 * usize::from(exptime_at.is_some()) + flags;
        let value_at = key_at + key_len;
        let len = value_at.checked_add(value_len as usize)?;
        (len <= b.len()).then_some(Layout {
            exptime_at,
            key_at,
            value_at,
            value_len: value_len as usize,
            len,
        })
    }
}

/// A read-only view of a stored item (or tombstone).
#[derive(Clone, Copy, Debug)]
pub struct ItemRef<'a> {
    bytes: &'a [u8],
    layout: Layout,
}

impl<'a> ItemRef<'a> {
    pub(crate) fn new(bytes: &'a [u8], layout: Layout) -> ItemRef<'a> {
        ItemRef { bytes, layout }
    }

    pub fn key(&self) -> &'a [u8] {
        &self.bytes[self.layout.key_at..self.layout.value_at]
    }

    pub fn value(&self) -> &'a [u8] {
        &self.bytes[self.layout.value_at..self.layout.value_at + self.layout.value_len]
    }

    pub fn cas(&self) -> u64 {
        read_u64(self.bytes, CAS)
    }

    pub fn exptime(&self) -> u32 {
        self.layout
            .exptime_at
            .map_or(0, |at| read_u32(self.bytes, at))
    }

    /// Last access (or store), Unix seconds.
    pub fn time(&self) -> u32 {
        read_u32(self.bytes, TIME)
    }

    pub fn client_flags(&self) -> u32 {
        if self.bytes[BITS] & bits::HAS_FLAGS == 0 {
            0
        } else {
            read_u32(self.bytes, self.layout.key_at - 4)
        }
    }

    pub fn bits(&self) -> u8 {
        self.bytes[BITS] & bits::PUBLIC
    }

    pub(crate) fn freq(&self) -> u8 {
        self.bytes[FREQ]
    }

    pub fn has(&self, bit: u8) -> bool {
        self.bytes[BITS] & bit != 0
    }

    /// Bytes the record takes in its segment.
    pub fn record_len(&self) -> usize {
        self.layout.len
    }

    /// Whether the item's time to live has run out at `now`.
    pub fn is_expired(&self, now: u32) -> bool {
        let exptime = self.exptime();
        exptime != 0 && exptime <= now
    }

    /// Meta of this item, for rebuilding it with another value.
    pub fn meta(&self) -> ItemMeta {
        ItemMeta {
            cas: self.cas(),
            exptime: self.exptime(),
            time: self.time(),
            client_flags: self.client_flags(),
            bits: self.bits(),
        }
    }
}

/// A view of a stored record whose metadata (and value, at the same length) can change in
/// place. Setting a later expiry also moves its segment's expiry.
#[derive(Debug)]
pub(crate) struct RecordMut<'a> {
    bytes: &'a mut [u8],
    layout: Layout,
    segment_expiry: &'a mut u32,
}

impl<'a> RecordMut<'a> {
    pub(crate) fn new(bytes: &'a mut [u8], layout: Layout, segment_expiry: &'a mut u32) -> Self {
        RecordMut {
            bytes,
            layout,
            segment_expiry,
        }
    }

    /// The record as it reads now.
    #[cfg(test)]
    pub fn view(&self) -> ItemRef<'_> {
        ItemRef::new(self.bytes, self.layout)
    }

    /// The value, writable in place (same length), for as long as the view's borrow.
    pub fn into_value_mut(self) -> &'a mut [u8] {
        let at = self.layout.value_at;
        &mut self.bytes[at..at + self.layout.value_len]
    }

    pub fn set_cas(&mut self, cas: u64) {
        self.bytes[CAS..CAS + 8].copy_from_slice(&cas.to_le_bytes());
    }

    /// Sets the expiry in place; false (and nothing changed) when the record has no room
    /// for one and `exptime` is not 0, so it must be written again.
    pub fn set_exptime(&mut self, exptime: u32) -> bool {
        match self.layout.exptime_at {
            Some(at) => self.bytes[at..at + 4].copy_from_slice(&exptime.to_le_bytes()),
            None if exptime == 0 => {}
            None => return false,
        }
        *self.segment_expiry = later_expiry(*self.segment_expiry, exptime);
        true
    }

    pub fn set_bits(&mut self, bit: u8) {
        self.bytes[BITS] |= bit & bits::PUBLIC;
    }

    pub fn clear_bits(&mut self, bit: u8) {
        self.bytes[BITS] &= !(bit & bits::PUBLIC);
    }
}

/// A segment's expiry after it gains an item expiring at `exptime`: the later of the two,
/// where `NEVER` (an item without expiry) is latest.
pub(crate) fn later_expiry(segment: u32, exptime: u32) -> u32 {
    if exptime == 0 {
        NEVER
    } else {
        segment.max(exptime)
    }
}

/// Segment expiry meaning "holds an item that never expires".
pub(crate) const NEVER: u32 = u32::MAX;

/// Marks the record at the start of `b` as no longer linked.
pub(crate) fn mark_dead(b: &mut [u8]) {
    b[BITS] |= bits::DEAD;
}

/// Records an access: last-access time, and the frequency eviction keeps hot items by.
pub(crate) fn record_access(b: &mut [u8], now: u32, fetched: bool) {
    b[TIME..TIME + 4].copy_from_slice(&now.to_le_bytes());
    b[FREQ] = b[FREQ].saturating_add(1);
    if fetched {
        b[BITS] |= bits::FETCHED;
    }
}

/// Sets the frequency of a record written again in place of another.
pub(crate) fn set_frequency(b: &mut [u8], freq: u8) {
    b[FREQ] = freq;
}

/// Halves a moved record's frequency, so that only items still being read keep winning.
pub(crate) fn age_frequency(b: &mut [u8]) {
    b[FREQ] /= 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(item: &NewItem<'_>) -> Vec<u8> {
        let mut buf = vec![0u8; item.record_len()];
        item.write(&mut buf);
        buf
    }

    #[test]
    fn round_trips_header_key_and_value() {
        let meta = ItemMeta {
            cas: 7,
            exptime: 100,
            time: 50,
            client_flags: 0xdead_beef,
            bits: bits::FETCHED,
        };
        let mut buf = write(&NewItem::new(b"key", &[b"val", b"ue"], meta));
        let layout = Layout::parse(&buf).unwrap();
        let it = ItemRef::new(&buf, layout);
        assert_eq!((it.key(), it.value()), (&b"key"[..], &b"value"[..]));
        assert_eq!(it.meta(), meta);
        assert_eq!(it.record_len(), buf.len());
        let mut seg_expiry = 0;
        let mut m = RecordMut::new(&mut buf, layout, &mut seg_expiry);
        m.set_cas(9);
        assert!(m.set_exptime(5));
        m.set_bits(bits::STALE | bits::DEAD);
        assert_eq!((m.view().cas(), m.view().exptime()), (9, 5));
        assert!(m.view().has(bits::STALE) && !m.view().has(bits::DEAD));
        assert!(m.view().is_expired(5) && !m.view().is_expired(4));
        assert_eq!(seg_expiry, 5);
    }

    #[test]
    fn header_is_sixteen_bytes_for_small_values_without_expiry_or_flags() {
        let item = NewItem::new(b"k", &[&[b'x'; 100]], ItemMeta::default());
        assert_eq!(item.record_len(), 16 + 1 + 100);
        let meta = ItemMeta {
            exptime: 9,
            client_flags: 3,
            ..ItemMeta::default()
        };
        assert_eq!(NewItem::new(b"k", &[b"v"], meta).record_len(), 16 + 8 + 2);
        // A record without an expiry takes one only by being written again.
        let mut buf = write(&item);
        let layout = Layout::parse(&buf).unwrap();
        let mut seg_expiry = 0;
        let mut m = RecordMut::new(&mut buf, layout, &mut seg_expiry);
        assert!(m.set_exptime(0) && !m.set_exptime(7));
        assert_eq!(m.view().exptime(), 0);
        let big = vec![b'y'; 300_000];
        let buf = write(&NewItem::new(b"kk", &[&big], ItemMeta::default()));
        let layout = Layout::parse(&buf).unwrap();
        assert_eq!(ItemRef::new(&buf, layout).value(), &big[..]);
    }

    #[test]
    fn truncated_or_garbage_records_do_not_parse() {
        let buf = write(&NewItem::new(b"key", &[b"value"], ItemMeta::default()));
        for cut in 0..buf.len() - 3 {
            assert_eq!(Layout::parse(&buf[..cut]), None, "cut at {cut}");
        }
        assert_eq!(Layout::parse(&[0xff; 40]), None);
    }
}
