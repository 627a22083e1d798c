//! One shard of the store: a hash table of record places over the shard's own segments,
//! chained by TTL bucket, with expiry by whole segments and eviction by merging.
//!
//! Invariant: a record is linked in the hash table exactly when its `DEAD` bit is clear.
//! Segments are owned by one shard at a time (or by the pool), so everything here runs
//! under the shard's lock alone; the pool's lock is only ever taken inside it, never the
//! other way round, and other shards are only ever `try_lock`ed.

use std::collections::VecDeque;
use std::ops::ControlFlow;

use super::classes::ClassTable;
use super::index::{self, table_bytes, PlaceTable};
use super::item::{self, bits, ItemRef, NewItem, RecordMut};
use super::memory::SegBuf;
use super::segment::{Segment, TTL_BUCKETS};
use super::{ItemStats, Lookup, ScanCursor, Shared, StoreError};

/// Segments merged into one per eviction: of their records read since the last merge,
/// as many as fill one segment survive.
const MERGE: usize = 4;
/// Attempts at finding a segment before an insert gives up with "out of memory".
const ATTEMPTS: usize = 8;

/// Packs a record's place (segment slot in the shard, byte offset) into the u32 the hash
/// table stores: records are not aligned, so a 1 MiB segment needs 20 bits of offset and
/// leaves 12 for 4096 segments per shard (`Store::shards_for` adds shards past that).
#[derive(Clone, Copy, Debug)]
pub(super) struct Geometry {
    offset_bits: u32,
}

impl Geometry {
    /// For segments of `segment_size` bytes (a power of two).
    pub fn new(segment_size: usize) -> Geometry {
        Geometry {
            offset_bits: segment_size.trailing_zeros().min(31),
        }
    }

    fn encode(self, slot: usize, offset: usize) -> u32 {
        ((slot as u32) << self.offset_bits) | offset as u32
    }

    fn decode(self, loc: u32) -> (usize, usize) {
        let mask = (1u32 << self.offset_bits) - 1;
        ((loc >> self.offset_bits) as usize, (loc & mask) as usize)
    }

    /// Segments one shard can address.
    pub fn max_slots(self) -> usize {
        1usize << (32 - self.offset_bits)
    }
}

/// Counters of one shard: the store's (`limit` and `pool` unused; `Store::stats` sums
/// them) and memcached's per class (`Store::class_stats`).
#[derive(Debug, Default)]
pub(super) struct ShardCounters {
    pub items: ItemStats,
    pub classes: ClassTable,
}

impl ShardCounters {
    /// Every record that becomes linked passes here.
    fn link(&mut self, it: &ItemRef<'_>, shared: &Shared) {
        let c = &mut self.items;
        c.bytes += it.record_len() as u64;
        if it.has(bits::TOMBSTONE) {
            c.tombstones += 1;
            return;
        }
        c.curr_items += 1;
        c.total_items += 1;
        let size = shared.item_size(it);
        let class = self.classes.get_mut(shared.classes.class_of(size));
        class.number += 1;
        class.mem_requested += size as u64;
        class.bytes += it.record_len() as u64;
        if let Some(sizes) = shared.sizes.load().as_ref() {
            sizes.record(size, it.cas(), true);
        }
    }

    /// Every record that stops being linked passes here, with why it goes.
    fn unlink(&mut self, it: &ItemRef<'_>, why: Drop, shared: &Shared) {
        let c = &mut self.items;
        let len = it.record_len() as u64;
        c.bytes = c.bytes.saturating_sub(len);
        if it.has(bits::TOMBSTONE) {
            c.tombstones = c.tombstones.saturating_sub(1);
            return;
        }
        c.curr_items = c.curr_items.saturating_sub(1);
        let size = shared.item_size(it);
        let id = shared.classes.class_of(size);
        let class = self.classes.get_mut(id);
        class.number = class.number.saturating_sub(1);
        class.mem_requested = class.mem_requested.saturating_sub(size as u64);
        class.bytes = class.bytes.saturating_sub(len);
        if let Some(sizes) = shared.sizes.load().as_ref() {
            sizes.record(size, it.cas(), false);
        }
        let unfetched = u64::from(!it.has(bits::FETCHED));
        match why {
            Drop::Quiet => {}
            Drop::Reclaim => {
                c.reclaimed += 1;
                class.reclaimed += 1;
                c.expired_unfetched += unfetched;
                class.expired_unfetched += unfetched;
            }
            Drop::Crawl => {
                c.crawler_reclaimed += 1;
                class.crawler_reclaimed += 1;
                c.expired_unfetched += unfetched;
                class.expired_unfetched += unfetched;
            }
            Drop::Evict(now) => {
                c.evictions += 1;
                class.evicted += 1;
                class.evicted_nonzero += u64::from(it.exptime() != 0);
                class.evicted_time = now.saturating_sub(it.time());
                class.evicted_at = now;
                c.evicted_unfetched += unfetched;
                class.evicted_unfetched += unfetched;
                if let Some(observer) = shared.evictions.load().as_ref() {
                    observer.evicted(it, id, now);
                }
            }
        }
    }

    /// A crawler's look at a linked item (`crawler_items_checked`).
    fn checked(&mut self, class: u8) {
        self.items.crawler_items_checked += 1;
        self.classes.get_mut(class).crawler_items_checked += 1;
    }

    /// `stats reset`: zeroes the event counters, keeps what is held.
    pub fn reset_events(&mut self) {
        self.classes.reset_events();
        let c = &mut self.items;
        *c = ItemStats {
            curr_items: c.curr_items,
            bytes: c.bytes,
            tombstones: c.tombstones,
            ..ItemStats::default()
        };
    }
}

/// Why a linked record is being dropped, for the counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Drop {
    /// Replaced, deleted, flushed: counted nowhere else.
    Quiet,
    /// Found expired or flushed by a lookup or while making room.
    Reclaim,
    /// Found expired or flushed by the crawler (the background sweeper, `lru_crawler`).
    Crawl,
    /// Pushed out to make room, at this Unix second.
    Evict(u32),
}

#[derive(Debug, Default)]
struct Bucket {
    /// Segment slots, oldest first; the last one takes new records.
    chain: VecDeque<u32>,
}

#[derive(Debug)]
pub(super) struct Shard {
    index: PlaceTable,
    /// Buckets the table keeps however few entries it has (`-o hashpower`).
    reserved_buckets: usize,
    segs: Vec<Option<Segment>>,
    /// Bumped each time a slot gets a new segment, so a scan cursor notices.
    gens: Vec<u32>,
    free_slots: Vec<u32>,
    buckets: Vec<Bucket>,
    /// Buckets that may have segments (pruned lazily).
    active_buckets: Vec<u16>,
    pub counters: ShardCounters,
    sweep_at: (usize, usize),
}

fn record(segs: &[Option<Segment>], geo: Geometry, loc: u32) -> Option<ItemRef<'_>> {
    let (slot, offset) = geo.decode(loc);
    segs.get(slot)?.as_ref()?.item(offset)
}

fn key_hash(segs: &[Option<Segment>], geo: Geometry, shared: &Shared, loc: u32) -> u64 {
    record(segs, geo, loc).map_or(0, |it| shared.hash(it.key()))
}

/// Whether a record is dead by time: expired, or untouched since a `flush_all` that is due.
fn gone(it: &ItemRef<'_>, now: u32, flush_at: u32) -> bool {
    it.is_expired(now) || (flush_at != 0 && flush_at <= now && it.time() < flush_at)
}

impl Shard {
    pub fn new() -> Shard {
        Shard {
            index: PlaceTable::default(),
            reserved_buckets: 0,
            segs: Vec::new(),
            gens: Vec::new(),
            free_slots: Vec::new(),
            buckets: (0..TTL_BUCKETS).map(|_| Bucket::default()).collect(),
            active_buckets: Vec::new(),
            counters: ShardCounters::default(),
            sweep_at: (0, 0),
        }
    }

    /// Segments this shard owns.
    pub fn owned(&self) -> usize {
        self.segs.len() - self.free_slots.len()
    }

    pub fn item(&self, shared: &Shared, loc: u32) -> Option<ItemRef<'_>> {
        record(&self.segs, shared.geometry, loc)
    }

    pub fn item_mut(&mut self, shared: &Shared, loc: u32) -> Option<RecordMut<'_>> {
        let (slot, offset) = shared.geometry.decode(loc);
        self.segs.get_mut(slot)?.as_mut()?.item_mut(offset)
    }

    /// The raw bytes of the record at `loc` (for in-place metadata updates).
    fn record_bytes_mut(&mut self, shared: &Shared, loc: u32) -> Option<&mut [u8]> {
        let (slot, offset) = shared.geometry.decode(loc);
        self.segs.get_mut(slot)?.as_mut()?.record_bytes_mut(offset)
    }

    pub fn record_access(&mut self, shared: &Shared, loc: u32, now: u32, fetched: bool) {
        if let Some(bytes) = self.record_bytes_mut(shared, loc) {
            item::record_access(bytes, now, fetched);
        }
    }

    fn find(&self, shared: &Shared, hash: u64, key: &[u8]) -> Option<u32> {
        let (segs, geo) = (&self.segs, shared.geometry);
        self.index.find(hash, |loc| {
            record(segs, geo, loc).is_some_and(|it| it.key() == key)
        })
    }

    /// Finds the key's record, reclaiming it if it has expired or been flushed.
    pub fn lookup(
        &mut self,
        hash: u64,
        key: &[u8],
        now: u32,
        shared: &Shared,
    ) -> (Option<u32>, Lookup) {
        let Some(loc) = self.find(shared, hash, key) else {
            return (None, Lookup::Miss);
        };
        let flush_at = shared.flush_at();
        let state = match self.item(shared, loc) {
            Some(it) if it.is_expired(now) => Lookup::Expired,
            // A tombstone stays (it orders late replicas of older writes) but is a miss.
            Some(it) if it.has(bits::TOMBSTONE) => return (Some(loc), Lookup::Miss),
            Some(it) if gone(&it, now, flush_at) => Lookup::Flushed,
            Some(_) => return (Some(loc), Lookup::Hit),
            None => return (None, Lookup::Miss),
        };
        self.unlink(loc, hash, Drop::Reclaim, shared, true);
        (None, state)
    }

    /// Takes a linked record out of the hash table and marks it dead. With `free_empty`, a
    /// segment left without records (and not taking appends) goes back to the pool.
    fn unlink(&mut self, loc: u32, hash: u64, why: Drop, shared: &Shared, free_empty: bool) {
        self.index.remove(hash, |l| l == loc);
        self.retire(loc, why, shared, free_empty);
    }

    /// Marks a record that the hash table no longer points at as dead, and counts it.
    fn retire(&mut self, loc: u32, why: Drop, shared: &Shared, free_empty: bool) {
        let (slot, offset) = shared.geometry.decode(loc);
        let Some(seg) = self.segs.get_mut(slot).and_then(|s| s.as_mut()) else {
            return;
        };
        let Some(it) = seg.item(offset) else {
            return;
        };
        if it.has(bits::DEAD) {
            return;
        }
        let len = it.record_len();
        self.counters.unlink(&it, why, shared);
        if let Some(bytes) = seg.record_bytes_mut(offset) {
            item::mark_dead(bytes);
        }
        seg.live_items = seg.live_items.saturating_sub(1);
        seg.live_bytes = seg.live_bytes.saturating_sub(len);
        if free_empty && seg.live_items == 0 && !self.takes_appends(slot) {
            let buf = self.free_segment(slot);
            shared.pool.exchange(vec![buf], false);
        }
    }

    /// Removes the key's linked record at `loc` (a delete, or a failed set).
    pub fn remove(&mut self, loc: u32, hash: u64, shared: &Shared) {
        self.unlink(loc, hash, Drop::Quiet, shared, true);
    }

    fn takes_appends(&self, slot: usize) -> bool {
        self.segs
            .get(slot)
            .and_then(|s| s.as_ref())
            .is_some_and(|s| {
                self.buckets[usize::from(s.bucket)].chain.back() == Some(&(slot as u32))
            })
    }

    /// Stores `item` under `hash`, replacing the key's current record if there is one.
    /// Returns the new record's place.
    pub fn install(
        &mut self,
        hash: u64,
        item: &NewItem<'_>,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> Result<u32, StoreError> {
        let placed = self.place_record(item, now, shared, me);
        let loc = match placed {
            Ok(loc) => loc,
            Err(error) => {
                if item.meta.bits & bits::TOMBSTONE == 0 {
                    let class = shared.classes.class_of_item(
                        item.stored_key().len(),
                        item.meta.client_flags,
                        item.value_len(),
                    );
                    self.counters.classes.get_mut(class).outofmemory += 1;
                }
                return Err(error);
            }
        };
        let (segs, geo) = (&self.segs, shared.geometry);
        let key = item.stored_key();
        let matches = |l: u32| record(segs, geo, l).is_some_and(|it| it.key() == key);
        let replaced = match self.index.find_mut(hash, matches) {
            Some(place) => Some(std::mem::replace(place, loc)),
            None => {
                self.index.insert_unique(hash, loc);
                None
            }
        };
        if let Some(it) = record(&self.segs, geo, loc) {
            self.counters.link(&it, shared);
        }
        if let Some(old) = replaced {
            self.retire(old, Drop::Quiet, shared, true);
        }
        Ok(loc)
    }

    /// Writes an item again in place of its record (to give it room for an expiry): the
    /// same item, so it is not counted as stored again, and it keeps its read count.
    pub fn rewrite(
        &mut self,
        hash: u64,
        item: &NewItem<'_>,
        freq: u8,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> Result<u32, StoreError> {
        let loc = self.install(hash, item, now, shared, me)?;
        let c = &mut self.counters.items;
        c.total_items = c.total_items.saturating_sub(1);
        if let Some(bytes) = self.record_bytes_mut(shared, loc) {
            item::set_frequency(bytes, freq);
        }
        Ok(loc)
    }

    /// Appends `item`'s record (making room in the table and for the record first) and
    /// returns its place, not yet linked.
    fn place_record(
        &mut self,
        item: &NewItem<'_>,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> Result<u32, StoreError> {
        let len = item.record_len();
        if len > shared.pool.segment_size() {
            return Err(StoreError::OutOfMemory);
        }
        // Room in the table first: making it may evict, which must not touch the new record.
        self.ensure_index_room(now, shared, me)?;
        let bucket = shared.bucket(item.meta.exptime, now);
        self.append(bucket, item, len, now, shared, me)
    }

    /// Grows the hash table up front to hold `entries`, if its bytes fit in `budget` and
    /// the pool grants them (`Store::reserve`).
    pub fn reserve(&mut self, entries: usize, budget: usize, shared: &Shared) {
        let buckets = index::buckets_for(entries);
        if buckets <= self.index.buckets() || table_bytes(buckets) > budget {
            return;
        }
        let grow = table_bytes(buckets) - table_bytes(self.index.buckets());
        if shared.pool.grow_index(grow) {
            self.resize_index(buckets, shared);
            self.reserved_buckets = buckets;
        }
    }

    /// Moves the table's entries into one of `buckets` buckets (already charged).
    fn resize_index(&mut self, buckets: usize, shared: &Shared) {
        let (segs, geo) = (&self.segs, shared.geometry);
        self.index = self
            .index
            .rebuilt(buckets, |l| key_hash(segs, geo, shared, l));
    }

    /// Makes sure one more entry fits the hash table without it growing unaccounted: a
    /// table that must grow first charges its new bytes to the pool, evicting if needed.
    fn ensure_index_room(
        &mut self,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> Result<(), StoreError> {
        let have = self.index.buckets();
        if self.index.len() < index::table_capacity(have) / 2 && have > self.reserved_buckets {
            // Far emptier than at its peak (shards trade segments): a smaller table gives
            // the difference back to the segments.
            let fit = index::buckets_for(self.index.len() + self.index.len() / 4);
            let buckets = fit.max(self.reserved_buckets);
            if buckets < have {
                self.resize_index(buckets, shared);
                shared
                    .pool
                    .shrink_index(table_bytes(have) - table_bytes(buckets));
            }
        }
        let buckets = index::grown(self.index.buckets());
        let grow = table_bytes(buckets) - table_bytes(self.index.buckets());
        for _ in 0..ATTEMPTS {
            // An eviction below may have made the room.
            if self.index.has_room() {
                return Ok(());
            }
            if shared.pool.grow_index(grow) {
                self.resize_index(buckets, shared);
                return Ok(());
            }
            let freed = self.evict_segment(now, shared);
            if freed.is_empty() {
                if !self.steal(now, shared, me) {
                    break;
                }
            } else {
                shared.pool.exchange(freed, false);
            }
        }
        Err(StoreError::OutOfMemory)
    }

    /// Appends `item` to the segment taking appends in `bucket`, opening a new one if full.
    fn append(
        &mut self,
        bucket: u16,
        item: &NewItem<'_>,
        len: usize,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> Result<u32, StoreError> {
        for _ in 0..ATTEMPTS {
            if let Some(&tail) = self.buckets[usize::from(bucket)].chain.back() {
                if let Some(seg) = self.segs[tail as usize].as_mut() {
                    if seg.room() >= len {
                        let offset = seg.append(item);
                        return Ok(shared.geometry.encode(tail as usize, offset));
                    }
                }
            }
            let buf = self
                .acquire(now, shared, me)
                .ok_or(StoreError::OutOfMemory)?;
            self.place(buf, bucket, now, shared, me);
        }
        Err(StoreError::OutOfMemory)
    }

    /// A segment to open: from the pool, else by dropping expired segments, else by
    /// eviction here, else from a shard holding more.
    fn acquire(&mut self, now: u32, shared: &Shared, me: usize) -> Option<SegBuf> {
        // After `cache_memlimit` lowered the budget, every segment of ours may have to go
        // before one can be handed out again.
        for _ in 0..ATTEMPTS + self.owned() {
            let slots_left =
                !self.free_slots.is_empty() || self.segs.len() < shared.geometry.max_slots();
            if slots_left {
                if let Some(buf) = shared.pool.take() {
                    return Some(buf);
                }
            }
            let expired = self.expire_segments(now, Drop::Reclaim, shared);
            if !expired.is_empty() {
                if let Some(buf) = shared.pool.exchange(expired, slots_left) {
                    return Some(buf);
                }
                continue;
            }
            // Below its share, a shard makes the one holding the most give a segment up,
            // so shards stay the same size (their tables sized for as many items).
            let fair = shared.pool.stats().segments_in_use / shared.shards.len().max(1);
            if self.owned() < fair && self.steal(now, shared, me) {
                continue;
            }
            let freed = self.evict_segment(now, shared);
            if !freed.is_empty() {
                if let Some(buf) = shared.pool.exchange(freed, true) {
                    return Some(buf);
                }
                continue;
            }
            if !self.steal(now, shared, me) {
                return None;
            }
        }
        None
    }

    /// Makes the shard holding the most segments (of those not busy) evict one into the
    /// pool. Never waits for a lock, so two shards doing this cannot deadlock.
    fn steal(&mut self, now: u32, shared: &Shared, me: usize) -> bool {
        let count = shared.shards.len();
        let mut best: Option<(usize, usize)> = None;
        for step in 1..count {
            let j = (me + step) % count;
            if let Some(other) = shared.shards[j].try_lock() {
                let owned = other.owned();
                if owned > self.owned() + 1 && best.is_none_or(|(_, o)| owned > o) {
                    best = Some((j, owned));
                }
            }
        }
        let Some((j, _)) = best else {
            return false;
        };
        let Some(mut other) = shared.shards[j].try_lock() else {
            return false;
        };
        let freed = other.evict_segment(now, shared);
        drop(other);
        let any = !freed.is_empty();
        shared.pool.exchange(freed, false);
        any
    }

    /// Puts a fresh segment at the end of `bucket`'s chain.
    fn place(&mut self, buf: SegBuf, bucket: u16, now: u32, shared: &Shared, me: usize) {
        let slot = match self.free_slots.pop() {
            Some(slot) => slot as usize,
            None => {
                self.segs.push(None);
                self.gens.push(0);
                self.segs.len() - 1
            }
        };
        self.gens[slot] = self.gens[slot].wrapping_add(1);
        self.segs[slot] = Some(Segment::new(buf, bucket, now, me, shared.next_order()));
        let chain = &mut self.buckets[usize::from(bucket)].chain;
        if chain.is_empty() && !self.active_buckets.contains(&bucket) {
            self.active_buckets.push(bucket);
        }
        chain.push_back(slot as u32);
    }

    /// Takes a segment (whose records are all dead) out of its chain and returns its memory.
    fn free_segment(&mut self, slot: usize) -> SegBuf {
        let seg = self.segs[slot].take();
        self.free_slots.push(slot as u32);
        let Some(seg) = seg else {
            return SegBuf::zeroed(0);
        };
        let bucket = &mut self.buckets[usize::from(seg.bucket)];
        if let Some(pos) = bucket.chain.iter().position(|&s| s as usize == slot) {
            bucket.chain.remove(pos);
        }
        seg.into_buf()
    }

    /// Unlinks every linked record of a segment (before the segment is freed): the live
    /// ones for `why`, the expired or flushed ones for `dead`.
    fn drop_records(&mut self, slot: usize, why: Drop, dead: Drop, now: u32, shared: &Shared) {
        let flush_at = shared.flush_at();
        let Some(seg) = self.segs.get(slot).and_then(|s| s.as_ref()) else {
            return;
        };
        let linked: Vec<(usize, u64, bool)> = seg
            .records(0)
            .filter(|(_, it)| !it.has(bits::DEAD))
            .map(|(offset, it)| (offset, shared.hash(it.key()), gone(&it, now, flush_at)))
            .collect();
        for (offset, hash, gone) in linked {
            let why = if gone { dead } else { why };
            self.unlink(
                shared.geometry.encode(slot, offset),
                hash,
                why,
                shared,
                false,
            );
        }
    }

    /// Frees the segments whose every record has expired, oldest first in each bucket,
    /// counting their records as reclaimed for `why`.
    fn expire_segments(&mut self, now: u32, why: Drop, shared: &Shared) -> Vec<SegBuf> {
        let mut freed = Vec::new();
        for i in 0..self.active_buckets.len() {
            let bucket = usize::from(self.active_buckets[i]);
            while let Some(&head) = self.buckets[bucket].chain.front() {
                let head = head as usize;
                if !self.segs[head].as_ref().is_some_and(|s| s.expired(now)) {
                    break;
                }
                self.drop_records(head, why, why, now, shared);
                freed.push(self.free_segment(head));
                self.counters.items.expired_segments += 1;
            }
        }
        self.prune_buckets();
        freed
    }

    /// Takes back segments read from the `-e` file (each with its table entry) and rebuilds
    /// their chains and the hash table from their records. Records that expired meanwhile
    /// are dropped; of two live records of one key (a crash between writing a new one and
    /// unlinking the old) the newer version stays.
    pub fn restore(
        &mut self,
        segments: Vec<(SegBuf, super::persist::Entry)>,
        now: u32,
        shared: &Shared,
    ) {
        let mut segments = segments;
        segments.sort_by_key(|(_, e)| (e.bucket, e.order));
        for (buf, entry) in segments {
            let slot = self.segs.len();
            self.segs.push(Some(Segment::restored(buf, &entry)));
            self.gens.push(1);
            let chain = &mut self.buckets[usize::from(entry.bucket)].chain;
            if chain.is_empty() {
                self.active_buckets.push(entry.bucket);
            }
            chain.push_back(slot as u32);
        }
        let geo = shared.geometry;
        for slot in 0..self.segs.len() {
            let Some(seg) = self.segs[slot].as_mut() else {
                continue;
            };
            // A record that does not parse ends what can be read of the segment.
            let readable = seg
                .records(0)
                .map(|(at, it)| at + it.record_len())
                .last()
                .unwrap_or(0);
            if readable < seg.write {
                seg.set_write(readable);
            }
            let records: Vec<(usize, u64, bool)> = seg
                .records(0)
                .filter(|(_, it)| !it.has(bits::DEAD))
                .map(|(at, it)| (at, shared.hash(it.key()), it.is_expired(now)))
                .collect();
            for (at, hash, expired) in records {
                let loc = geo.encode(slot, at);
                let Some(it) = record(&self.segs, geo, loc) else {
                    continue;
                };
                if expired {
                    if let Some(bytes) = self.segs[slot]
                        .as_mut()
                        .and_then(|s| s.record_bytes_mut(at))
                    {
                        item::mark_dead(bytes);
                    }
                    continue;
                }
                shared.versions.observe(it.cas());
                let (key, cas) = (it.key(), it.cas());
                let segs = &self.segs;
                let existing = self.index.find_mut(hash, |l| {
                    record(segs, geo, l).is_some_and(|o| o.key() == key)
                });
                let loser = match existing {
                    Some(place) => {
                        let older = record(segs, geo, *place).map_or(0, |o| o.cas());
                        if older < cas {
                            Some(std::mem::replace(place, loc))
                        } else {
                            Some(loc)
                        }
                    }
                    None => {
                        if !self.index.has_room() {
                            let buckets = index::grown(self.index.buckets());
                            shared.pool.charge_index(
                                table_bytes(buckets) - table_bytes(self.index.buckets()),
                            );
                            self.index = self
                                .index
                                .rebuilt(buckets, |l| key_hash(segs, geo, shared, l));
                        }
                        self.index.insert_unique(hash, loc);
                        None
                    }
                };
                if loser != Some(loc) {
                    if let Some(seg) = self.segs[slot].as_mut() {
                        let len = seg.item(at).map_or(0, |it| it.record_len());
                        seg.live_items += 1;
                        seg.live_bytes += len;
                        let exptime = seg.item(at).map_or(0, |it| it.exptime());
                        seg.expire_at = item::later_expiry(seg.expire_at, exptime);
                    }
                    if let Some(it) = record(&self.segs, geo, loc) {
                        self.counters.link(&it, shared);
                    }
                }
                match loser {
                    Some(l) if l == loc => {
                        if let Some(bytes) = self.segs[slot]
                            .as_mut()
                            .and_then(|s| s.record_bytes_mut(at))
                        {
                            item::mark_dead(bytes);
                        }
                    }
                    Some(old) => self.retire(old, Drop::Quiet, shared, false),
                    None => {}
                }
            }
        }
        // Segments left without records go back to the pool.
        let empty: Vec<usize> = (0..self.segs.len())
            .filter(|&s| self.segs[s].as_ref().is_some_and(|seg| seg.live_items == 0))
            .filter(|&s| !self.takes_appends(s))
            .collect();
        let freed: Vec<SegBuf> = empty.into_iter().map(|s| self.free_segment(s)).collect();
        shared.pool.exchange(freed, false);
        self.prune_buckets();
    }

    /// Seals every segment's table entry for a clean shutdown (checksums of its bytes).
    pub fn seal(&mut self) {
        for seg in self.segs.iter_mut().flatten() {
            let (entry, data) = seg.buf.entry_and_bytes_mut();
            if let Some(entry) = entry {
                super::persist::entry_seal(entry, data);
            }
        }
    }

    fn prune_buckets(&mut self) {
        let buckets = &self.buckets;
        self.active_buckets
            .retain(|&b| !buckets[usize::from(b)].chain.is_empty());
    }

    /// Frees at least one segment by eviction, from the bucket whose oldest segment is
    /// oldest. Its first `MERGE` sealed segments (not taking appends) are merged: records
    /// read since they were written or last kept survive, the most read first, as many as
    /// fill one segment, which then goes to the young end of the chain (a second chance,
    /// like CLOCK); the rest are evicted. A bucket with one sealed segment moves its read
    /// records into the open segment's free room instead. Without reads this is FIFO, so
    /// the newest items are the last to go. Returns the freed memory.
    fn evict_segment(&mut self, now: u32, shared: &Shared) -> Vec<SegBuf> {
        if !shared.evict {
            return self.compact(now, shared);
        }
        self.prune_buckets();
        let mut best: Option<(u16, u32)> = None;
        for &b in &self.active_buckets {
            let Some(&slot) = self.buckets[usize::from(b)].chain.front() else {
                continue;
            };
            let created = self.segs[slot as usize].as_ref().map_or(0, |s| s.created);
            if best.is_none_or(|(_, c)| created < c) {
                best = Some((b, created));
            }
        }
        let Some((b, _)) = best else {
            return Vec::new();
        };
        let chain = &self.buckets[usize::from(b)].chain;
        let sealed = chain.len() - 1;
        let Some(&tail) = chain.back() else {
            return Vec::new();
        };
        let tail = tail as usize;
        if sealed == 0 {
            // The bucket's only segment: evicted whole.
            self.drop_records(tail, Drop::Evict(now), Drop::Reclaim, now, shared);
            let buf = self.free_segment(tail);
            self.prune_buckets();
            return vec![buf];
        }
        let group: Vec<usize> = chain
            .range(..sealed.min(MERGE))
            .map(|&s| s as usize)
            .collect();
        if !self.any_read(&group) {
            // Nothing would survive a merge: evicting the oldest segment alone frees what
            // is needed and keeps the other items a while longer.
            let oldest = group[0];
            self.drop_records(oldest, Drop::Evict(now), Drop::Reclaim, now, shared);
            let buf = self.free_segment(oldest);
            self.prune_buckets();
            return vec![buf];
        }
        let into = if group.len() >= 2 { group[0] } else { tail };
        let (kept, mut freed) = self.merge(&group, into, false, now, shared);
        if into == group[0] {
            if kept == 0 {
                freed.push(self.free_segment(into));
            } else {
                // Survivors get a full turn before they are looked at again.
                let chain = &mut self.buckets[usize::from(b)].chain;
                if let Some(pos) = chain.iter().position(|&s| s as usize == into) {
                    chain.remove(pos);
                    let before_tail = chain.len().saturating_sub(1);
                    chain.insert(before_tail, into as u32);
                }
                // The file keeps chains by order: the survivors, then the open segment.
                let tail = chain.back().map(|&t| t as usize);
                for slot in [Some(into), tail].into_iter().flatten() {
                    if let Some(seg) = self.segs[slot].as_mut() {
                        seg.set_order(shared.next_order());
                    }
                }
            }
        }
        self.prune_buckets();
        freed
    }

    /// Whether any live record of these segments has been read since it was written or
    /// last kept by a merge (what a merge keeps).
    fn any_read(&self, group: &[usize]) -> bool {
        group.iter().any(|&slot| {
            self.segs[slot].as_ref().is_some_and(|seg| {
                seg.records(0)
                    .any(|(_, it)| it.freq() > 0 && !it.has(bits::DEAD))
            })
        })
    }

    /// Without eviction (`-M`): frees memory by moving the live records of a bucket's oldest
    /// sealed segments into fewer segments, never dropping one. Expired and flushed
    /// records are reclaimed on the way. Returns the freed memory, none when no group of
    /// segments has its live records fit in one fewer (the store is full).
    fn compact(&mut self, now: u32, shared: &Shared) -> Vec<SegBuf> {
        self.prune_buckets();
        for i in 0..self.active_buckets.len() {
            let chain = &self.buckets[usize::from(self.active_buckets[i])].chain;
            let Some(&tail) = chain.back() else {
                continue;
            };
            let tail = tail as usize;
            let sealed: Vec<usize> = chain
                .range(..chain.len() - 1)
                .map(|&s| s as usize)
                .collect();
            let live = |slots: &[usize]| -> usize {
                slots
                    .iter()
                    .filter_map(|&s| self.segs[s].as_ref())
                    .map(|seg| seg.live_bytes)
                    .sum()
            };
            // The oldest run of (up to `MERGE`, the longest first) sealed segments whose
            // records fit in the first of them, else the oldest sealed segment whose
            // records fit in the open segment's room.
            let capacity = |slot: usize| self.segs[slot].as_ref().map_or(0, |s| s.capacity());
            let run = (0..sealed.len()).find_map(|start| {
                let longest = MERGE.min(sealed.len() - start);
                (2..=longest)
                    .rev()
                    .find(|&n| live(&sealed[start..start + n]) <= capacity(sealed[start]))
                    .map(|n| sealed[start..start + n].to_vec())
            });
            let tail_room = self.segs[tail].as_ref().map_or(0, |seg| seg.room());
            let (group, into) = match run {
                Some(run) => {
                    let into = run[0];
                    (run, into)
                }
                None => match sealed.iter().find(|&&s| live(&[s]) <= tail_room) {
                    Some(&s) => (vec![s], tail),
                    None => continue,
                },
            };
            let (kept, mut freed) = self.merge(&group, into, true, now, shared);
            if into != tail && kept == 0 {
                freed.push(self.free_segment(into));
            }
            self.prune_buckets();
            return freed;
        }
        Vec::new()
    }

    /// Moves the records of `group` (oldest segments of one chain) worth keeping into
    /// `into` — the group's first segment, compacted from its start, or the chain's open
    /// segment, after what it holds — and evicts the others. Expired and flushed records
    /// are reclaimed; a record is worth keeping if it was read since it was written or
    /// last kept, the most read first and, among equals, the newest, as many as fit. Kept
    /// records' read counts are halved. With `keep_all` every live record is kept (the
    /// caller has made sure they fit). Returns how many were kept and the memory of the
    /// group's segments other than `into`, which are left empty.
    fn merge(
        &mut self,
        group: &[usize],
        into: usize,
        keep_all: bool,
        now: u32,
        shared: &Shared,
    ) -> (u32, Vec<SegBuf>) {
        struct Rec {
            segment: usize,
            offset: usize,
            len: usize,
            freq: u8,
            hash: u64,
        }
        let geo = shared.geometry;
        let flush_at = shared.flush_at();
        let compacting = group.contains(&into);
        let Some(target) = self.segs[into].as_ref() else {
            return (0, Vec::new());
        };
        let mut write = if compacting { 0 } else { target.write };
        let room = target.capacity() - write;
        let mut recs: Vec<Rec> = Vec::new();
        let mut gone_recs: Vec<(u32, u64)> = Vec::new();
        let mut bytes_by_freq = [0usize; 256];
        for (g, &slot) in group.iter().enumerate() {
            let Some(seg) = self.segs[slot].as_ref() else {
                continue;
            };
            for (offset, it) in seg.records(0) {
                if it.has(bits::DEAD) {
                    continue;
                }
                let hash = shared.hash(it.key());
                if gone(&it, now, flush_at) {
                    gone_recs.push((geo.encode(slot, offset), hash));
                    continue;
                }
                bytes_by_freq[usize::from(it.freq())] += it.record_len();
                recs.push(Rec {
                    segment: g,
                    offset,
                    len: it.record_len(),
                    freq: it.freq(),
                    hash,
                });
            }
        }
        for (loc, hash) in gone_recs {
            self.unlink(loc, hash, Drop::Reclaim, shared, false);
        }
        // Keep every read count above `cut`, and of count `cut` the newest that fit; never
        // records not read at all.
        let mut kept_bytes = 0;
        let mut cut: (usize, usize) = (0, 0);
        for freq in (1..256).rev() {
            if kept_bytes + bytes_by_freq[freq] > room {
                cut = (freq, room - kept_bytes);
                break;
            }
            kept_bytes += bytes_by_freq[freq];
        }
        let (cut_freq, mut cut_room) = cut;
        let mut keep_cut_from = recs.len();
        if cut_freq > 0 {
            for (i, r) in recs.iter().enumerate().rev() {
                if usize::from(r.freq) == cut_freq {
                    if r.len > cut_room {
                        break;
                    }
                    cut_room -= r.len;
                    keep_cut_from = i;
                }
            }
        }
        let keep = |i: usize, r: &Rec| {
            let f = usize::from(r.freq);
            keep_all || f > cut_freq || (f == cut_freq && f > 0 && i >= keep_cut_from)
        };
        let Some(mut target) = self.segs[into].take() else {
            return (0, Vec::new());
        };
        if compacting {
            // A crash while records move must not leave the file claiming the old bytes.
            target.set_write(0);
        }
        let (mut live, mut live_bytes, mut expire_at) = if compacting {
            (0, 0, 0)
        } else {
            (target.live_items, target.live_bytes, target.expire_at)
        };
        let sources: Vec<Option<Segment>> = group
            .iter()
            .map(|&s| if s == into { None } else { self.segs[s].take() })
            .collect();
        let mut kept = 0;
        for (i, r) in recs.iter().enumerate() {
            let old = geo.encode(group[r.segment], r.offset);
            if keep(i, r) {
                let range = r.offset..r.offset + r.len;
                match sources[r.segment].as_ref() {
                    None => target.buf.bytes_mut().copy_within(range, write),
                    Some(src) => target.buf.bytes_mut()[write..write + r.len]
                        .copy_from_slice(&src.buf.bytes()[range]),
                }
                let bytes = &mut target.buf.bytes_mut()[write..write + r.len];
                item::age_frequency(bytes);
                if let Some(layout) = item::Layout::parse(bytes) {
                    expire_at =
                        item::later_expiry(expire_at, ItemRef::new(bytes, layout).exptime());
                }
                if let Some(place) = self.index.find_mut(r.hash, |l| l == old) {
                    *place = geo.encode(into, write);
                }
                write += r.len;
                live += 1;
                live_bytes += r.len;
                kept += 1;
            } else {
                self.index.remove(r.hash, |l| l == old);
                let seg = sources[r.segment].as_ref().unwrap_or(&target);
                if let Some(it) = seg.record_at(r.offset, r.len) {
                    self.counters.unlink(&it, Drop::Evict(now), shared);
                }
            }
        }
        target.set_write(write);
        target.live_items = live;
        target.live_bytes = live_bytes;
        target.expire_at = expire_at;
        self.segs[into] = Some(target);
        for (g, src) in sources.into_iter().enumerate() {
            if src.is_some() {
                self.segs[group[g]] = src;
            }
        }
        self.counters.items.merges += 1;
        let freed = group
            .iter()
            .filter(|&&s| s != into)
            .map(|&s| self.free_segment(s))
            .collect();
        (kept, freed)
    }

    /// Background reclamation: drops expired segments whole, then looks at up to `budget`
    /// records for expired or flushed ones. Returns how many records it reclaimed.
    pub fn sweep(&mut self, now: u32, budget: usize, shared: &Shared) -> usize {
        let before = self.counters.items.crawler_reclaimed;
        let expired = self.expire_segments(now, Drop::Crawl, shared);
        shared.pool.exchange(expired, false);
        let flush_at = shared.flush_at();
        let (mut slot, mut offset) = self.sweep_at;
        let mut looked = 0;
        let mut wrapped = false;
        let mut checked = Vec::new();
        while looked < budget {
            if slot >= self.segs.len() {
                if wrapped {
                    break;
                }
                wrapped = true;
                slot = 0;
                offset = 0;
                continue;
            }
            let Some(seg) = self.segs[slot].as_ref() else {
                slot += 1;
                offset = 0;
                continue;
            };
            let mut dead = Vec::new();
            let mut next = None;
            for (at, it) in seg.records(offset) {
                if looked >= budget {
                    next = Some(at);
                    break;
                }
                looked += 1;
                if it.has(bits::DEAD) {
                    continue;
                }
                if !it.has(bits::TOMBSTONE) {
                    checked.push(shared.class_of(&it));
                }
                if gone(&it, now, flush_at) {
                    dead.push((at, shared.hash(it.key())));
                }
            }
            for class in checked.drain(..) {
                self.counters.checked(class);
            }
            for (at, hash) in dead {
                self.unlink(
                    shared.geometry.encode(slot, at),
                    hash,
                    Drop::Crawl,
                    shared,
                    false,
                );
            }
            match next {
                Some(at) => offset = at,
                None => {
                    let empty = self.segs[slot].as_ref().is_some_and(|s| s.live_items == 0);
                    if empty && !self.takes_appends(slot) {
                        let buf = self.free_segment(slot);
                        shared.pool.exchange(vec![buf], false);
                    }
                    slot += 1;
                    offset = 0;
                }
            }
        }
        self.sweep_at = (slot, offset);
        self.prune_buckets();
        (self.counters.items.crawler_reclaimed - before) as usize
    }

    /// Calls `f` with the live items (and, with `tombstones`, the tombstones) from `cursor`
    /// on, looking at up to `max` records and stopping early when `f` breaks; returns
    /// where to go on. Expired and flushed records are left out.
    pub fn scan(
        &self,
        cursor: ScanCursor,
        max: usize,
        now: u32,
        tombstones: bool,
        shared: &Shared,
        mut f: impl FnMut(ItemRef<'_>) -> ControlFlow<()>,
    ) -> Option<ScanCursor> {
        let flush_at = shared.flush_at();
        self.walk(cursor, max, |_, _, it| {
            let wanted = !it.has(bits::DEAD) && (tombstones || !it.has(bits::TOMBSTONE));
            if wanted && !gone(&it, now, flush_at) {
                f(it)
            } else {
                ControlFlow::Continue(())
            }
        })
    }

    /// Visits the records (linked or not) from `cursor` on, up to `max` of them, with their
    /// segment slot and offset, stopping after one for which `f` breaks; returns where to
    /// go on.
    fn walk(
        &self,
        cursor: ScanCursor,
        max: usize,
        mut f: impl FnMut(usize, usize, ItemRef<'_>) -> ControlFlow<()>,
    ) -> Option<ScanCursor> {
        let mut slot = cursor.slot as usize;
        let mut offset = if self.gens.get(slot) == Some(&cursor.generation) {
            cursor.offset as usize
        } else {
            0
        };
        let mut looked = 0;
        while slot < self.segs.len() {
            if let Some(seg) = self.segs[slot].as_ref() {
                for (at, it) in seg.records(offset) {
                    if looked >= max {
                        return Some(ScanCursor {
                            slot: slot as u32,
                            generation: self.gens[slot],
                            offset: at as u32,
                        });
                    }
                    looked += 1;
                    if f(slot, at, it).is_break() {
                        // Go on after this record (or stop: nothing may follow).
                        looked = max;
                    }
                }
            }
            slot += 1;
            offset = 0;
        }
        None
    }

    /// `lru_crawler crawl` over up to `max` records from `cursor`: the items whose class
    /// `want` accepts are looked at (counted) and reclaimed if expired or flushed.
    pub fn crawl(
        &mut self,
        cursor: ScanCursor,
        max: usize,
        now: u32,
        shared: &Shared,
        mut want: impl FnMut(u8) -> bool,
    ) -> Option<ScanCursor> {
        let flush_at = shared.flush_at();
        let geo = shared.geometry;
        let mut checked = Vec::new();
        let mut dead = Vec::new();
        let next = self.walk(cursor, max, |slot, offset, it| {
            if it.has(bits::DEAD) || it.has(bits::TOMBSTONE) {
                return ControlFlow::Continue(());
            }
            let class = shared.class_of(&it);
            if want(class) {
                checked.push(class);
                if gone(&it, now, flush_at) {
                    dead.push((geo.encode(slot, offset), shared.hash(it.key())));
                }
            }
            ControlFlow::Continue(())
        });
        for class in checked {
            self.counters.checked(class);
        }
        for (loc, hash) in dead {
            self.unlink(loc, hash, Drop::Crawl, shared, true);
        }
        next
    }

    /// Drops everything (`flush_all` without delay).
    pub fn clear(&mut self, shared: &Shared) {
        let freed: Vec<SegBuf> = self
            .segs
            .iter_mut()
            .filter_map(|s| s.take())
            .map(|s| s.buf)
            .collect();
        shared.pool.exchange(freed, false);
        self.segs.clear();
        self.gens.clear();
        self.free_slots.clear();
        for bucket in &mut self.buckets {
            *bucket = Bucket::default();
        }
        self.active_buckets.clear();
        shared.pool.shrink_index(table_bytes(self.index.buckets()));
        self.index = PlaceTable::default();
        self.sweep_at = (0, 0);
        let c = &mut self.counters.items;
        c.curr_items = 0;
        c.bytes = 0;
        c.tombstones = 0;
        self.counters.classes.clear_items();
    }
}
