//! The item store: segments of fixed size under one byte budget, sharded by key hash.
//!
//! The design follows Segcache (Yang et al., NSDI '21). Memory is cut into segments of
//! equal size (1 MiB, or the next power of two above `-I`), each allocated once and reused.
//! An item is appended as one record (20-byte header, key, value; see `item`) to the open
//! segment of its TTL bucket, so the segments of a bucket expire in the order they were
//! filled and are dropped whole once their last item has expired. The hash table holds
//! only each record's place (4 bytes). When the budget is spent, a shard evicts by merging
//! a few consecutive segments of one bucket into one, keeping the records read most often
//! since the last merge (and, among equals, the newest): hot items survive, one-hit
//! wonders go, and nothing is ever allocated per item.
//!
//! Each shard (a key's hash picks it) owns its segments and its hash table behind one
//! mutex; free segments and the byte budget live in the pool (`pool`), which also charges
//! the hash tables' memory, so `-m` bounds segments and tables together.

pub mod classes;
mod item;
mod mapping;
mod memory;
mod persist;
mod pool;
mod segment;
mod shard;
mod version;

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use crossbeam_utils::CachePadded;
use parking_lot::Mutex;

pub use item::{bits, record_len, ItemMeta, ItemMut, ItemRef, NewItem};
pub use persist::{Discard, OpenError};
pub use pool::PoolStats;
pub use version::{node_id, VersionClock};

use classes::{ClassConfig, ClassOp, ClassStats, Classes, SizeHistogram};
use mapping::Region;
use pool::Pool;
use shard::{Geometry, Shard};

/// memcached's largest relative expiry (30 days); larger values are absolute Unix times.
pub const REALTIME_MAXDELTA: i64 = 60 * 60 * 24 * 30;

/// Smallest and largest segment size chosen from the memory limit (a larger `-I` makes
/// segments larger still: every item fits in one segment).
const MIN_SEGMENT: usize = 1024;
const MAX_SEGMENT: usize = 1 << 20;
/// Segments per shard at least: each shard keeps one open segment per TTL bucket in use,
/// and those are partly empty.
const SEGMENTS_PER_SHARD: usize = 16;

/// Current Unix time in seconds.
pub fn now_secs() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

/// Converts a protocol exptime to an absolute expiry (0 = never), as memcached's `realtime()`:
/// negative means already expired, up to 30 days is relative, beyond is a Unix time.
pub fn absolute_expiry(exptime: i64, now: u32) -> u32 {
    if exptime < 0 {
        return 1;
    }
    if exptime == 0 {
        return 0;
    }
    if exptime > REALTIME_MAXDELTA {
        let at = u32::try_from(exptime).unwrap_or(u32::MAX);
        return if at <= now { 1 } else { at };
    }
    now.saturating_add(exptime as u32)
}

/// Store sizing.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Total bytes of segments and hash tables.
    pub memory_limit: usize,
    /// Largest item accepted (`-I`); segments are at least this large.
    pub max_item_size: usize,
    /// Upper bound on the number of shards (rounded to a power of two).
    pub max_shards: usize,
    /// Low byte of every version (CAS) this store issues; distinct per cluster member.
    pub node_id: u64,
    /// Whether a full store evicts (memcached's default) or refuses new items (`-M`).
    pub evict: bool,
    /// memcached's slab classes, which items are reported under.
    pub classes: ClassConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            memory_limit: 64 * 1024 * 1024,
            max_item_size: 1024 * 1024,
            max_shards: 16,
            node_id: 0,
            evict: true,
            classes: ClassConfig::default(),
        }
    }
}

impl StoreConfig {
    /// The segment size for this configuration: 1/64 of the limit within 1 KiB..1 MiB,
    /// at least `max_item_size`, a power of two.
    pub fn segment_size(&self) -> usize {
        let floor = (self.memory_limit / 64).clamp(MIN_SEGMENT, MAX_SEGMENT);
        self.max_item_size.max(floor).next_power_of_two()
    }
}

/// Why an item could not be stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("SERVER_ERROR out of memory storing object")]
    OutOfMemory,
}

/// What a lookup found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Hit,
    Miss,
    /// The key was present but its TTL had run out.
    Expired,
    /// The key was present but a `flush_all` invalidated it.
    Flushed,
}

/// Counters of the whole store, summed over shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemStats {
    pub curr_items: u64,
    pub total_items: u64,
    /// Bytes of the records linked (items and tombstones, headers included).
    pub bytes: u64,
    pub tombstones: u64,
    pub evictions: u64,
    pub reclaimed: u64,
    pub expired_unfetched: u64,
    pub evicted_unfetched: u64,
    /// Segment merges done to make room.
    pub merges: u64,
    /// Segments dropped whole because every record in them had expired.
    pub expired_segments: u64,
    /// Expired or flushed items the crawler (background sweeper, `lru_crawler crawl`)
    /// removed, and items it looked at.
    pub crawler_reclaimed: u64,
    pub crawler_items_checked: u64,
    pub limit: u64,
    pub pool: PoolStats,
}

impl ItemStats {
    /// Adds a shard's counters (not its `limit` or `pool`).
    fn add(&mut self, c: &ItemStats) {
        self.curr_items += c.curr_items;
        self.total_items += c.total_items;
        self.bytes += c.bytes;
        self.tombstones += c.tombstones;
        self.evictions += c.evictions;
        self.reclaimed += c.reclaimed;
        self.expired_unfetched += c.expired_unfetched;
        self.evicted_unfetched += c.evicted_unfetched;
        self.merges += c.merges;
        self.expired_segments += c.expired_segments;
        self.crawler_reclaimed += c.crawler_reclaimed;
        self.crawler_items_checked += c.crawler_items_checked;
    }
}

/// Where a `Store::scan` of one shard goes on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanCursor {
    slot: u32,
    generation: u32,
    offset: u32,
}

/// Told of every item the store evicts (`watch evictions`). Called under the shard's lock:
/// it must not block.
pub trait EvictionObserver: Send + Sync {
    fn evicted(&self, item: &ItemRef<'_>, class: u8, now: u32);
}

/// Shared, read-mostly state every shard operation needs.
struct Shared {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    pool: Pool,
    geometry: Geometry,
    /// TTL buckets are merged `1 << ttl_shift` at a time when a shard has few segments, so
    /// that open (partly filled) segments stay a small share of memory.
    ttl_shift: u32,
    hasher: ahash::RandomState,
    versions: VersionClock,
    /// Unix second from which items last touched before it count as flushed (0 = none).
    flush_at: AtomicU32,
    /// Orders segments within their chains in the `-e` file.
    order: AtomicU64,
    /// The `-e` file's header, when segments live in one.
    header: Option<Mutex<Region>>,
    /// memcached's classes, which items are counted under.
    classes: Classes,
    /// Whether a full store evicts (no `-M`).
    evict: bool,
    /// `stats sizes`, when tracking is on.
    sizes: ArcSwapOption<SizeHistogram>,
    evictions: ArcSwapOption<Box<dyn EvictionObserver>>,
}

impl Shared {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn flush_at(&self) -> u32 {
        self.flush_at.load(Ordering::Relaxed)
    }

    fn next_order(&self) -> u64 {
        self.order.fetch_add(1, Ordering::Relaxed)
    }

    /// memcached's size of an item ([`Classes::item_size`]).
    fn item_size(&self, it: &ItemRef<'_>) -> usize {
        self.classes
            .item_size(it.key().len(), it.client_flags(), it.value().len())
    }

    /// The memcached class `it` is reported under (0 for tombstones).
    fn class_of(&self, it: &ItemRef<'_>) -> u8 {
        if it.has(bits::TOMBSTONE) {
            return 0;
        }
        self.classes.class_of(self.item_size(it))
    }

    /// The TTL bucket a record expiring at `exptime` is appended to.
    fn bucket(&self, exptime: u32, now: u32) -> u16 {
        match segment::ttl_bucket(exptime, now) {
            segment::NO_TTL_BUCKET => segment::NO_TTL_BUCKET,
            b => b >> self.ttl_shift,
        }
    }
}

/// A key's place in its (locked) shard: the live item if there is one, and the operations
/// the command layer builds memcached's semantics from.
pub struct Entry<'a> {
    shard: &'a mut Shard,
    shard_index: usize,
    shared: &'a Shared,
    key: &'a [u8],
    hash: u64,
    /// The key's record: a live item or a tombstone.
    loc: Option<u32>,
    now: u32,
    lookup: Lookup,
    /// Whether `loc` holds a live item (not a tombstone).
    live: bool,
}

impl Entry<'_> {
    /// What the lookup found.
    pub fn lookup(&self) -> Lookup {
        self.lookup
    }

    pub fn now(&self) -> u32 {
        self.now
    }

    pub fn item(&self) -> Option<ItemRef<'_>> {
        self.loc
            .filter(|_| self.live)
            .and_then(|loc| self.shard.item(self.shared, loc))
    }

    pub fn item_mut(&mut self) -> Option<ItemMut<'_>> {
        let loc = self.loc.filter(|_| self.live)?;
        self.shard.item_mut(self.shared, loc)
    }

    /// What the key holds now: the live item or a tombstone.
    pub fn current(&self) -> Option<ItemRef<'_>> {
        self.loc.and_then(|loc| self.shard.item(self.shared, loc))
    }

    /// Version of what the key holds now, item or tombstone.
    pub fn version(&self) -> Option<u64> {
        self.current().map(|it| it.cas())
    }

    /// A fresh CAS unique (a new version).
    pub fn next_cas(&self) -> u64 {
        self.shared.versions.next()
    }

    /// Counts a command that found this key's item, under the item's class (`stats slabs`).
    pub fn count(&mut self, op: ClassOp) {
        let Some(id) = self.item().map(|it| self.shared.class_of(&it)) else {
            return;
        };
        self.shard.counters.classes.get_mut(id).ops[op as usize] += 1;
    }

    /// Marks the item as read now: fetched, access time, and a point of frequency that
    /// helps it survive eviction.
    pub fn bump(&mut self) {
        self.access(true);
    }

    /// Moves the item up without marking it fetched (memcached's `do_item_update`).
    pub fn touch_lru(&mut self) {
        self.access(false);
    }

    fn access(&mut self, fetched: bool) {
        if let Some(loc) = self.loc.filter(|_| self.live) {
            self.shard
                .record_access(self.shared, loc, self.now, fetched);
        }
    }

    /// Stores `item` under this key with a new CAS, replacing any live item.
    pub fn store(&mut self, item: NewItem<'_>) -> Result<u64, StoreError> {
        let mut item = item;
        item.meta.cas = self.next_cas();
        self.store_versioned(item)
    }

    /// Stores `item` keeping its CAS (a version decided elsewhere, e.g. by a peer).
    pub fn store_versioned(&mut self, item: NewItem<'_>) -> Result<u64, StoreError> {
        let mut item = item;
        let cas = item.meta.cas;
        self.shared.versions.observe(cas);
        item.meta.time = self.now;
        let result = self
            .shard
            .install(self.hash, &item, self.now, self.shared, self.shard_index);
        match result {
            Ok(loc) => {
                self.loc = Some(loc);
                self.live = item.meta.bits & bits::TOMBSTONE == 0;
                Ok(cas)
            }
            Err(error) => {
                // Making room may have evicted what the key held.
                let (loc, lookup) = self
                    .shard
                    .lookup(self.hash, self.key, self.now, self.shared);
                self.loc = loc;
                self.live = lookup == Lookup::Hit;
                Err(error)
            }
        }
    }

    /// Removes the live item, if any. Returns whether there was one.
    pub fn remove(&mut self) -> bool {
        let Some(loc) = self.loc.filter(|_| self.live) else {
            return false;
        };
        self.shard.remove(loc, self.hash, self.shared);
        self.loc = None;
        self.live = false;
        true
    }

    /// Deletes the live item, leaving a tombstone for `ttl` seconds so that older copies
    /// arriving later from peers cannot bring it back. Returns the tombstone's version.
    pub fn delete_with_tombstone(&mut self, key: &[u8], ttl: u32) -> Option<u64> {
        self.item()?;
        self.leave_tombstone(key, ttl)
    }

    /// Makes sure the key holds a tombstone (for `ttl` seconds), whatever it held: the
    /// tombstone already there is kept as it is (same version); otherwise a new one is
    /// stored. Returns the tombstone's version (None: no memory for it).
    pub fn leave_tombstone(&mut self, key: &[u8], ttl: u32) -> Option<u64> {
        if !self.live {
            if let Some(version) = self.version() {
                return Some(version);
            }
        }
        let tombstone = NewItem::new(
            key,
            &[],
            ItemMeta {
                exptime: self.now.saturating_add(ttl),
                bits: bits::TOMBSTONE,
                ..ItemMeta::default()
            },
        );
        self.store(tombstone).ok()
    }
}

/// The sharded store. Shareable across threads.
pub struct Store {
    shared: Shared,
}

impl Store {
    /// A store whose segments are allocated from the heap as they are first needed.
    pub fn new(config: StoreConfig) -> Store {
        let segment_size = config.segment_size();
        let shards = Self::shards_for(&config, segment_size);
        let pool = Pool::new(segment_size, config.memory_limit);
        Self::build(
            config,
            segment_size,
            shards,
            pool,
            ahash::RandomState::new(),
            None,
        )
    }

    /// A store whose segments live in the file at `path` (memcached's `-e`): the items a
    /// previous run left there are served again if the file is whole and was made for the
    /// same `-m` and `-I`; otherwise (logged) the file is started afresh.
    pub fn open(config: StoreConfig, path: &Path) -> Result<Store, OpenError> {
        // Segments are whole pages, so their pages can be given back one by one.
        let segment_size = config.segment_size().max(4096);
        let geometry = persist::FileGeometry {
            segment_size,
            segment_count: config.memory_limit / segment_size,
        };
        let shards = Self::shards_for(&config, segment_size);
        let opened = persist::open(path, geometry, shards)?;
        let header = opened.header;
        let mut per_shard: Vec<Vec<(memory::SegBuf, persist::Entry)>> =
            (0..header.shards).map(|_| Vec::new()).collect();
        let mut free = Vec::new();
        for seg in opened.segments {
            let entry = seg.entry().map(persist::read_entry);
            match entry {
                Some(e) if opened.recovered && e.used => per_shard[e.shard as usize].push((seg, e)),
                _ => free.push(seg),
            }
        }
        let in_use = per_shard.iter().map(Vec::len).sum();
        let pool = Pool::with_segments(segment_size, config.memory_limit, free, in_use, false);
        let [k0, k1, k2, k3] = header.seeds;
        let hasher = ahash::RandomState::with_seeds(k0, k1, k2, k3);
        let store = Self::build(
            config,
            segment_size,
            header.shards,
            pool,
            hasher,
            Some(opened.header_region),
        );
        store
            .shared
            .flush_at
            .store(header.flush_at, Ordering::Relaxed);
        store.shared.order.store(header.order, Ordering::Relaxed);
        let now = now_secs();
        for (i, segments) in per_shard.into_iter().enumerate() {
            if !segments.is_empty() {
                store.shared.shards[i]
                    .lock()
                    .restore(segments, now, &store.shared);
            }
        }
        if let Some(h) = &store.shared.header {
            persist::mark_running(
                &mut h.lock(),
                header.flush_at,
                store.shared.order.load(Ordering::Relaxed),
            );
        }
        let stats = store.stats();
        tracing::info!(
            path = %path.display(),
            items = stats.curr_items,
            segments = geometry.segment_count,
            segment_size,
            "memory file in use"
        );
        Ok(store)
    }

    /// Shards for a configuration: up to `max_shards`, but no fewer than
    /// `SEGMENTS_PER_SHARD` segments each.
    fn shards_for(config: &StoreConfig, segment_size: usize) -> usize {
        let segments = config.memory_limit / segment_size;
        let by_memory = (segments / SEGMENTS_PER_SHARD).max(1);
        let by_memory = 1usize << by_memory.ilog2();
        config.max_shards.max(1).next_power_of_two().min(by_memory)
    }

    fn build(
        config: StoreConfig,
        segment_size: usize,
        count: usize,
        pool: Pool,
        hasher: ahash::RandomState,
        header: Option<Region>,
    ) -> Store {
        let segments = config.memory_limit / segment_size;
        let ttl_shift = match segments / count.max(1) {
            128.. => 0,
            32..128 => 3,
            _ => 10,
        };
        let shards = (0..count)
            .map(|_| CachePadded::new(Mutex::new(Shard::new())))
            .collect();
        Store {
            shared: Shared {
                shards,
                pool,
                geometry: Geometry::new(segment_size),
                ttl_shift,
                hasher,
                versions: VersionClock::new(config.node_id),
                flush_at: AtomicU32::new(0),
                order: AtomicU64::new(0),
                header: header.map(Mutex::new),
                classes: Classes::new(&config.classes),
                evict: config.evict,
                sizes: ArcSwapOption::empty(),
                evictions: ArcSwapOption::empty(),
            },
        }
    }

    /// Whether the segments live in a `-e` file.
    pub fn is_persistent(&self) -> bool {
        self.shared.header.is_some()
    }

    /// For a store in a `-e` file: seals every segment and writes the clean-shutdown record
    /// with every shard locked, then calls `then` with the outcome while they stay locked,
    /// so that nothing changes the file after it; `then` is meant to end the process. For
    /// a heap store, `then` gets `Ok(false)` at once.
    pub fn persist_then<R>(&self, then: impl FnOnce(std::io::Result<bool>) -> R) -> R {
        let Some(header) = &self.shared.header else {
            return then(Ok(false));
        };
        let mut shards: Vec<_> = self.shared.shards.iter().map(|s| s.lock()).collect();
        for shard in shards.iter_mut() {
            shard.seal();
        }
        let result = persist::mark_clean(
            &mut header.lock(),
            self.shared.flush_at(),
            self.shared.order.load(Ordering::Relaxed),
        );
        then(result.map(|()| true))
    }

    /// Changes the memory limit (`cache_memlimit`). A lower limit takes effect as segments
    /// are next needed (each shard evicts until it fits); a higher one allows more segments.
    pub fn set_limit(&self, bytes: usize) {
        self.shared.pool.set_limit(bytes);
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shared.shards.len()
    }

    /// Bytes per segment.
    pub fn segment_size(&self) -> usize {
        self.shared.pool.segment_size()
    }

    fn shard_index(&self, hash: u64) -> usize {
        // High bits pick the shard; the table uses the low bits.
        (hash >> 40) as usize & (self.shared.shards.len() - 1)
    }

    /// Runs `f` with the key's entry while holding its shard's lock.
    pub fn with_entry<R>(&self, key: &[u8], now: u32, f: impl FnOnce(&mut Entry<'_>) -> R) -> R {
        let hash = self.shared.hash(key);
        let shard_index = self.shard_index(hash);
        let mut shard = self.shared.shards[shard_index].lock();
        let (loc, lookup) = shard.lookup(hash, key, now, &self.shared);
        let mut entry = Entry {
            shard: &mut shard,
            shard_index,
            shared: &self.shared,
            key,
            hash,
            loc,
            now,
            lookup,
            live: lookup == Lookup::Hit,
        };
        f(&mut entry)
    }

    /// `flush_all`: with no delay, drops every item now; with a delay, items not touched
    /// again before that time become invisible then.
    pub fn flush(&self, at: Option<u32>) {
        let flush_at = at.unwrap_or(0);
        self.shared.flush_at.store(flush_at, Ordering::Relaxed);
        if let Some(h) = &self.shared.header {
            persist::set_flush_at(&mut h.lock(), flush_at);
        }
        if at.is_none() {
            for shard in self.shared.shards.iter() {
                shard.lock().clear(&self.shared);
            }
            if let Some(sizes) = self.shared.sizes.load().as_ref() {
                sizes.clear();
            }
        }
    }

    /// The background sweeper (memcached's LRU crawler): reclaims expired and flushed items.
    /// Segments whose items have all expired go whole, and up to `budget` records per shard
    /// are looked at one by one; all of it counts as the crawler's. Returns how many items
    /// were reclaimed.
    pub fn sweep(&self, now: u32, budget: usize) -> usize {
        self.shared
            .shards
            .iter()
            .map(|shard| shard.lock().sweep(now, budget, &self.shared))
            .sum()
    }

    /// Calls `f` with the live items of shard `shard` from `cursor` on (start with
    /// `ScanCursor::default()`), looking at no more than `max` records and stopping after
    /// an item for which `f` breaks, under the shard's lock only. Returns where to
    /// continue, or `None` once the shard is done. Items moved by a merge between two
    /// calls may be seen twice or not at all.
    pub fn scan(
        &self,
        shard: usize,
        cursor: ScanCursor,
        max: usize,
        now: u32,
        f: impl FnMut(ItemRef<'_>) -> ControlFlow<()>,
    ) -> Option<ScanCursor> {
        self.scan_shard(shard, cursor, max, now, false, f)
    }

    /// As `scan`, but tombstones (deleted keys still remembered) are included: anti-entropy
    /// compares them between replicas so a delete reaches a replica that missed it.
    pub fn scan_with_tombstones(
        &self,
        shard: usize,
        cursor: ScanCursor,
        max: usize,
        now: u32,
        f: impl FnMut(ItemRef<'_>) -> ControlFlow<()>,
    ) -> Option<ScanCursor> {
        self.scan_shard(shard, cursor, max, now, true, f)
    }

    fn scan_shard(
        &self,
        shard: usize,
        cursor: ScanCursor,
        max: usize,
        now: u32,
        tombstones: bool,
        f: impl FnMut(ItemRef<'_>) -> ControlFlow<()>,
    ) -> Option<ScanCursor> {
        let shared = &self.shared;
        let shard = shared.shards.get(shard)?.lock();
        shard.scan(cursor, max, now, tombstones, shared, f)
    }

    /// `lru_crawler crawl`: reclaims the expired and flushed items among up to `max`
    /// records of shard `shard` from `cursor`, looking only at items whose class `want`
    /// accepts; the looks count as the crawler's. Returns where to continue, or `None` once
    /// the shard is done.
    pub fn crawl(
        &self,
        shard: usize,
        cursor: ScanCursor,
        max: usize,
        now: u32,
        want: impl FnMut(u8) -> bool,
    ) -> Option<ScanCursor> {
        self.shared
            .shards
            .get(shard)?
            .lock()
            .crawl(cursor, max, now, &self.shared, want)
    }

    /// Sizes the hash tables for `items` keys up front (memcached's `-o hashpower`). The
    /// tables' bytes come out of the memory limit like any table growth, so at most a
    /// quarter of it goes to them this way; beyond, tables grow as keys arrive.
    pub fn reserve(&self, items: usize) {
        let per_shard = items / self.shared.shards.len() + 1;
        let budget = self.shared.pool.limit() / 4 / self.shared.shards.len();
        for shard in self.shared.shards.iter() {
            shard.lock().reserve(per_shard, budget, &self.shared);
        }
    }

    /// memcached's class table, as configured.
    pub fn classes(&self) -> &Classes {
        &self.shared.classes
    }

    /// Per-class figures summed over shards, indexed by class id.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        let mut total = Vec::new();
        for shard in self.shared.shards.iter() {
            shard.lock().counters.classes.add_into(&mut total);
        }
        total
    }

    /// `stats reset`: zeroes the store's event counters (evictions, reclaims, per-class
    /// hits), not what it holds.
    pub fn reset_stats(&self) {
        for shard in self.shared.shards.iter() {
            shard.lock().counters.reset_events();
        }
    }

    /// Starts (`true`, counting items stored from now on) or stops `stats sizes`.
    pub fn track_sizes(&self, on: bool) {
        if !on {
            self.shared.sizes.store(None);
        } else if self.shared.sizes.load().is_none() {
            let cas_min = self.shared.versions.next();
            let max = self.shared.classes.item_size_max();
            self.shared
                .sizes
                .store(Some(Arc::new(SizeHistogram::new(max, cas_min))));
        }
    }

    /// The `stats sizes` histogram, when tracking is on.
    pub fn sizes(&self) -> Option<Arc<SizeHistogram>> {
        self.shared.sizes.load_full()
    }

    /// Tells `observer` of every eviction from now on (`None` to stop).
    pub fn observe_evictions(&self, observer: Option<Box<dyn EvictionObserver>>) {
        self.shared.evictions.store(observer.map(Arc::new));
    }

    /// Whether the store evicts when full (no `-M`).
    pub fn evicts(&self) -> bool {
        self.shared.evict
    }

    /// A new version from this store's clock.
    pub fn next_version(&self) -> u64 {
        self.shared.versions.next()
    }

    /// Counters summed over shards, and the pool's state.
    pub fn stats(&self) -> ItemStats {
        let mut total = ItemStats {
            limit: self.shared.pool.limit() as u64,
            pool: self.shared.pool.stats(),
            ..ItemStats::default()
        };
        for shard in self.shared.shards.iter() {
            total.add(&shard.lock().counters.items);
        }
        total
    }

    /// Total memory limit in bytes.
    pub fn limit(&self) -> usize {
        self.shared.pool.limit()
    }
}

#[cfg(test)]
mod tests;
