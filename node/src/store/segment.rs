//! A segment: a fixed-size buffer that records are appended to, and the TTL buckets that
//! group segments by how long their items live.

use super::item::{later_expiry, ItemRef, Layout, NewItem, RecordMut};
use super::memory::SegBuf;
use super::persist;

/// One segment: its memory and what the shard knows about its records.
#[derive(Debug)]
pub(super) struct Segment {
    pub buf: SegBuf,
    /// Bytes appended so far; records lie in `0..write`.
    pub write: usize,
    /// Records still linked in the index (items and tombstones).
    pub live_items: u32,
    /// Bytes of those records.
    pub live_bytes: usize,
    /// Unix second the segment was opened.
    pub created: u32,
    /// The latest expiry of any record in it (`NEVER` if one never expires, 0 while empty):
    /// once it has passed, the whole segment is garbage.
    pub expire_at: u32,
    pub bucket: u16,
}

impl Segment {
    /// A segment opened now for `bucket` of `shard`; `order` places it in its chain (for
    /// the `-e` file's table).
    pub fn new(buf: SegBuf, bucket: u16, now: u32, shard: usize, order: u64) -> Segment {
        let mut seg = Segment {
            buf,
            write: 0,
            live_items: 0,
            live_bytes: 0,
            created: now,
            expire_at: 0,
            bucket,
        };
        if let Some(e) = seg.buf.entry_mut() {
            persist::entry_open(e, shard as u32, bucket, now, order);
        }
        seg
    }

    /// A segment read back from the `-e` file, its records not yet counted.
    pub fn restored(buf: SegBuf, entry: &persist::Entry) -> Segment {
        Segment {
            buf,
            write: entry.write as usize,
            live_items: 0,
            live_bytes: 0,
            created: entry.created,
            expire_at: 0,
            bucket: entry.bucket,
        }
    }

    /// Sets how far the segment is written (after the bytes are in place).
    pub fn set_write(&mut self, write: usize) {
        self.write = write;
        if let Some(e) = self.buf.entry_mut() {
            persist::entry_set_write(e, write);
        }
    }

    /// Gives the segment a new place in its chain.
    pub fn set_order(&mut self, order: u64) {
        if let Some(e) = self.buf.entry_mut() {
            persist::entry_set_order(e, order);
        }
    }

    /// The segment's memory, its table entry marked free.
    pub fn into_buf(mut self) -> SegBuf {
        if let Some(e) = self.buf.entry_mut() {
            persist::entry_free(e);
        }
        self.buf
    }

    pub fn capacity(&self) -> usize {
        self.buf.len()
    }

    pub fn room(&self) -> usize {
        self.capacity() - self.write
    }

    /// Appends `item` (which must fit) and returns its offset.
    pub fn append(&mut self, item: &NewItem<'_>) -> usize {
        let at = self.write;
        let len = item.record_len();
        item.write(&mut self.buf.bytes_mut()[at..at + len]);
        self.set_write(at + len);
        self.live_items += 1;
        self.live_bytes += len;
        self.expire_at = later_expiry(self.expire_at, item.meta.exptime);
        at
    }

    /// The record at `offset`, if one can be read there.
    pub fn layout_at(&self, offset: usize) -> Option<Layout> {
        Layout::parse(self.buf.bytes().get(offset..self.write)?)
    }

    /// The record of `len` bytes at `offset`, even past `write` (a merge resets `write`
    /// before it moves records).
    pub fn record_at(&self, offset: usize, len: usize) -> Option<ItemRef<'_>> {
        let bytes = self.buf.bytes().get(offset..offset.checked_add(len)?)?;
        Some(ItemRef::new(bytes, Layout::parse(bytes)?))
    }

    pub fn item(&self, offset: usize) -> Option<ItemRef<'_>> {
        let layout = self.layout_at(offset)?;
        Some(ItemRef::new(
            &self.buf.bytes()[offset..offset + layout.len],
            layout,
        ))
    }

    pub fn item_mut(&mut self, offset: usize) -> Option<RecordMut<'_>> {
        let layout = self.layout_at(offset)?;
        let bytes = &mut self.buf.bytes_mut()[offset..offset + layout.len];
        Some(RecordMut::new(bytes, layout, &mut self.expire_at))
    }

    /// The raw bytes of the record at `offset` (for in-place metadata updates).
    pub fn record_bytes_mut(&mut self, offset: usize) -> Option<&mut [u8]> {
        let layout = self.layout_at(offset)?;
        self.buf.bytes_mut().get_mut(offset..offset + layout.len)
    }

    /// The offset and layout of every record from `from` on, in append order. Stops at the
    /// first place that does not parse (never reads past `write`).
    pub fn records(&self, from: usize) -> Records<'_> {
        Records {
            segment: self,
            at: from,
        }
    }

    /// Whether every record in it has expired at `now`.
    pub fn expired(&self, now: u32) -> bool {
        self.expire_at != 0 && self.expire_at != super::item::NEVER && self.expire_at <= now
    }
}

pub(super) struct Records<'a> {
    segment: &'a Segment,
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = (usize, ItemRef<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let at = self.at;
        let layout = self.segment.layout_at(at)?;
        self.at = at + layout.len;
        let bytes = &self.segment.buf.bytes()[at..at + layout.len];
        Some((at, ItemRef::new(bytes, layout)))
    }
}

/// Number of TTL buckets.
pub(super) const TTL_BUCKETS: usize = 1024;
/// The bucket of items that never expire.
pub(super) const NO_TTL_BUCKET: u16 = (TTL_BUCKETS - 1) as u16;

/// The TTL bucket of an item expiring at `exptime`: buckets are 8 s wide for TTLs under
/// ~34 minutes, then 128 s, 2048 s and 32768 s wide, so that the segments of one bucket
/// expire in the order they were filled and can be dropped whole.
pub(super) fn ttl_bucket(exptime: u32, now: u32) -> u16 {
    if exptime == 0 {
        return NO_TTL_BUCKET;
    }
    let ttl = exptime.saturating_sub(now);
    let bucket = match ttl {
        0..2048 => ttl / 8,
        2048..32_768 => 256 + (ttl - 2048) / 128,
        32_768..524_288 => 496 + (ttl - 32_768) / 2048,
        _ => (736 + (ttl - 524_288) / 32_768).min(NO_TTL_BUCKET as u32 - 1),
    };
    bucket as u16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::item::ItemMeta;

    #[test]
    fn buckets_grow_coarser_with_the_ttl_and_stay_in_range() {
        assert_eq!(ttl_bucket(0, 100), NO_TTL_BUCKET);
        assert_eq!(ttl_bucket(101, 100), 0);
        assert_eq!(ttl_bucket(100 + 8, 100), 1);
        assert_eq!(ttl_bucket(100 + 2048, 100), 256);
        assert_eq!(ttl_bucket(100 + 32_768, 100), 496);
        assert_eq!(ttl_bucket(100 + 524_288, 100), 736);
        assert!(ttl_bucket(u32::MAX, 0) < NO_TTL_BUCKET);
        // Already expired (absolute time in the past) lands in the first bucket.
        assert_eq!(ttl_bucket(5, 100), 0);
    }

    #[test]
    fn appends_and_iterates_records() {
        let mut seg = Segment::new(SegBuf::zeroed(4096), 0, 1, 0, 0);
        let a = seg.append(&NewItem::new(b"a", &[b"1"], ItemMeta::default()));
        let b = seg.append(&NewItem::new(
            b"bb",
            &[b"22"],
            ItemMeta {
                exptime: 50,
                ..ItemMeta::default()
            },
        ));
        assert_eq!(seg.expire_at, super::super::item::NEVER);
        let keys: Vec<(usize, Vec<u8>)> = seg
            .records(0)
            .map(|(at, it)| (at, it.key().to_vec()))
            .collect();
        assert_eq!(keys, vec![(a, b"a".to_vec()), (b, b"bb".to_vec())]);
        assert_eq!(
            seg.item(b).map(|it| it.value().to_vec()),
            Some(b"22".to_vec())
        );
        assert!(seg.item(seg.write).is_none());
    }
}
