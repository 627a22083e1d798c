//! One cached item: a single heap allocation holding a small header, the key and the value.
//!
//! Keeping metadata inside the item's own allocation (22 bytes, against memcached's ~56) is
//! what lets a node hold more items than memcached in the same memory.

/// Bit flags kept per item.
pub mod bits {
    /// Set on access, cleared by the CLOCK hand: a second chance before eviction.
    pub const REFERENCED: u8 = 1;
    /// The item has been read at least once since it was stored (meta `h` flag).
    pub const FETCHED: u8 = 2;
    /// A recache/vivify "win" token was handed out (meta `W`/`Z` flags).
    pub const TOKEN_SENT: u8 = 4;
    /// The item was invalidated and is stale (meta `X` flag).
    pub const STALE: u8 = 8;
    /// The key was sent base64-encoded and is binary (meta `b` flag).
    pub const KEY_BINARY: u8 = 16;
    /// Not an item but the record of a delete, kept briefly to order late replicas.
    pub const TOMBSTONE: u8 = 32;
}

const CAS: usize = 0;
const EXPTIME: usize = 8;
const TIME: usize = 12;
const FLAGS: usize = 16;
const KEY_LEN: usize = 20;
const BITS: usize = 21;
/// Bytes of header in front of the key.
pub const HEADER_LEN: usize = 22;

/// Estimated bytes per item beyond its allocation: slot pointer, hash-table entry and the
/// allocator's own header and rounding. Counted against the memory limit so `-m` bounds the
/// real footprint, not just the payload.
pub const OVERHEAD: usize = 48;

/// A cached item. Immutable in size once built; metadata is updated in place.
#[derive(Debug)]
pub struct Item(Box<[u8]>);

fn read_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The metadata of a new item.
#[derive(Clone, Copy, Debug, Default)]
pub struct ItemMeta {
    pub cas: u64,
    /// Absolute expiry in Unix seconds, 0 for never.
    pub exptime: u32,
    /// Last access or store, Unix seconds.
    pub time: u32,
    pub client_flags: u32,
    pub bits: u8,
}

impl Item {
    /// Builds an item from its key and the concatenation of `value_parts`.
    /// Keys are at most 250 bytes (checked by the protocol layer); longer keys are cut.
    pub fn new(key: &[u8], value_parts: &[&[u8]], meta: ItemMeta) -> Item {
        let key = &key[..key.len().min(u8::MAX as usize)];
        let value_len: usize = value_parts.iter().map(|p| p.len()).sum();
        let mut data = Vec::with_capacity(HEADER_LEN + key.len() + value_len);
        data.extend_from_slice(&meta.cas.to_le_bytes());
        data.extend_from_slice(&meta.exptime.to_le_bytes());
        data.extend_from_slice(&meta.time.to_le_bytes());
        data.extend_from_slice(&meta.client_flags.to_le_bytes());
        data.push(key.len() as u8);
        data.push(meta.bits);
        data.extend_from_slice(key);
        for part in value_parts {
            data.extend_from_slice(part);
        }
        Item(data.into_boxed_slice())
    }

    /// Bytes this item counts against the memory limit.
    pub fn charge(&self) -> usize {
        Self::charge_for(self.key().len(), self.value().len())
    }

    /// Bytes an item with this key and value would count against the memory limit.
    pub fn charge_for(key_len: usize, value_len: usize) -> usize {
        HEADER_LEN + key_len + value_len + OVERHEAD
    }

    fn key_len(&self) -> usize {
        usize::from(self.0[KEY_LEN])
    }

    pub fn key(&self) -> &[u8] {
        &self.0[HEADER_LEN..HEADER_LEN + self.key_len()]
    }

    pub fn value(&self) -> &[u8] {
        &self.0[HEADER_LEN + self.key_len()..]
    }

    /// The value, writable in place (same length).
    pub fn value_mut(&mut self) -> &mut [u8] {
        let start = HEADER_LEN + self.key_len();
        &mut self.0[start..]
    }

    pub fn cas(&self) -> u64 {
        read_u64(&self.0, CAS)
    }

    pub fn set_cas(&mut self, cas: u64) {
        self.0[CAS..CAS + 8].copy_from_slice(&cas.to_le_bytes());
    }

    pub fn exptime(&self) -> u32 {
        read_u32(&self.0, EXPTIME)
    }

    pub fn set_exptime(&mut self, exptime: u32) {
        self.0[EXPTIME..EXPTIME + 4].copy_from_slice(&exptime.to_le_bytes());
    }

    pub fn time(&self) -> u32 {
        read_u32(&self.0, TIME)
    }

    pub fn set_time(&mut self, time: u32) {
        self.0[TIME..TIME + 4].copy_from_slice(&time.to_le_bytes());
    }

    pub fn client_flags(&self) -> u32 {
        read_u32(&self.0, FLAGS)
    }

    pub fn bits(&self) -> u8 {
        self.0[BITS]
    }

    pub fn has(&self, bit: u8) -> bool {
        self.0[BITS] & bit != 0
    }

    pub fn set_bits(&mut self, bit: u8) {
        self.0[BITS] |= bit;
    }

    pub fn clear_bits(&mut self, bit: u8) {
        self.0[BITS] &= !bit;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_header_key_and_value() {
        let meta = ItemMeta {
            cas: 7,
            exptime: 100,
            time: 50,
            client_flags: 0xdead_beef,
            bits: bits::FETCHED,
        };
        let mut item = Item::new(b"key", &[b"val", b"ue"], meta);
        assert_eq!(item.key(), b"key");
        assert_eq!(item.value(), b"value");
        assert_eq!(item.cas(), 7);
        assert_eq!(item.client_flags(), 0xdead_beef);
        assert!(item.has(bits::FETCHED) && !item.has(bits::STALE));
        item.set_cas(9);
        item.set_exptime(5);
        item.set_bits(bits::STALE);
        assert_eq!((item.cas(), item.exptime()), (9, 5));
        assert!(item.is_expired(5) && !item.is_expired(4));
        assert!(item.has(bits::STALE));
        assert_eq!(item.charge(), HEADER_LEN + 8 + OVERHEAD);
    }
}
