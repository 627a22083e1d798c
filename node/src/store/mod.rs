//! The in-memory item store: sharded hash tables under a byte budget, CLOCK eviction, TTLs.
//!
//! Each shard is a hash table of slot numbers plus a slot vector of items, behind its own
//! mutex; a key's hash picks its shard, so requests for different keys rarely meet on a lock.
//! One byte budget covers the whole store. A shard that needs room evicts its own items by
//! CLOCK (an approximate LRU: an accessed item gets a second chance) and, if it has nothing
//! left to give, takes from other shards it can lock without waiting. Expired items are
//! removed when looked up and by `sweep`, which a background thread runs.

pub mod classes;
mod item;
mod version;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;

use crossbeam_utils::CachePadded;
use hashbrown::HashTable;
use parking_lot::Mutex;

use classes::{ClassConfig, ClassOp, ClassStats, ClassTable, Classes, SizeHistogram};
pub use item::{bits, Item, ItemMeta, HEADER_LEN, OVERHEAD};
pub use version::{node_id, VersionClock};

/// memcached's largest relative expiry (30 days); larger values are absolute Unix times.
pub const REALTIME_MAXDELTA: i64 = 60 * 60 * 24 * 30;

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
    /// Total bytes items may use, per-item overhead included.
    pub memory_limit: usize,
    /// Largest item accepted; each shard's budget is kept at least twice this.
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

/// Item counters of the whole store, summed over shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemStats {
    pub curr_items: u64,
    pub total_items: u64,
    pub bytes: u64,
    pub evictions: u64,
    pub reclaimed: u64,
    pub expired_unfetched: u64,
    pub evicted_unfetched: u64,
    /// Expired or flushed items the crawler (background sweeper) removed, and items it looked at.
    pub crawler_reclaimed: u64,
    pub crawler_items_checked: u64,
    pub limit: u64,
}

/// Told of every item the store evicts (`watch evictions`). Called under the shard's lock:
/// it must not block.
pub trait EvictionObserver: Send + Sync {
    fn evicted(&self, item: &Item, class: u8, now: u32);
}

/// Shared, read-mostly state every shard operation needs.
struct Shared {
    shards: Box<[CachePadded<Mutex<Shard>>]>,
    /// Bytes charged by all items (and tombstones) together.
    used: AtomicUsize,
    /// The memory limit (`-m`, or `cache_memlimit`).
    limit: AtomicUsize,
    hasher: ahash::RandomState,
    versions: VersionClock,
    /// Unix second from which items last touched before it count as flushed (0 = none).
    flush_at: AtomicU32,
    classes: Classes,
    evict: bool,
    /// `stats sizes`, when tracking is on.
    sizes: ArcSwapOption<SizeHistogram>,
    evictions: ArcSwapOption<Box<dyn EvictionObserver>>,
}

impl Shared {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn over_budget(&self, needed: usize) -> bool {
        self.used.load(Ordering::Relaxed) + needed > self.limit.load(Ordering::Relaxed)
    }

    /// The memcached class `item` is reported under (0 for tombstones).
    fn class_of(&self, item: &Item) -> u8 {
        if item.has(bits::TOMBSTONE) {
            return 0;
        }
        self.classes
            .class_of_item(item.key().len(), item.client_flags(), item.value().len())
    }
}

/// How many slots a store started with `-M` looks at for an expired item to replace before
/// it refuses a new one (memcached looks at a few items at the tail of the LRU).
const NO_EVICT_SEARCH: usize = 64;

#[derive(Default)]
struct Shard {
    table: HashTable<u32>,
    slots: Vec<Option<Item>>,
    free: Vec<u32>,
    hand: usize,
    used: usize,
    counters: ItemStats,
    classes: ClassTable,
}

impl Shard {
    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&idx| {
                slots
                    .get(idx as usize)
                    .and_then(|s| s.as_ref())
                    .is_some_and(|it| it.key() == key)
            })
            .copied()
    }

    fn item(&self, slot: u32) -> Option<&Item> {
        self.slots.get(slot as usize).and_then(|s| s.as_ref())
    }

    fn item_mut(&mut self, slot: u32) -> Option<&mut Item> {
        self.slots.get_mut(slot as usize).and_then(|s| s.as_mut())
    }

    /// Counts `item` in (`linked`) or out of its class.
    fn account(&mut self, item: &Item, shared: &Shared, linked: bool) {
        if item.has(bits::TOMBSTONE) {
            return;
        }
        let size =
            shared
                .classes
                .item_size(item.key().len(), item.client_flags(), item.value().len());
        let class = self.classes.get_mut(shared.classes.class_of(size));
        let charge = item.charge() as u64;
        if linked {
            class.number += 1;
            class.mem_requested += size as u64;
            class.bytes += charge;
        } else {
            class.number = class.number.saturating_sub(1);
            class.mem_requested = class.mem_requested.saturating_sub(size as u64);
            class.bytes = class.bytes.saturating_sub(charge);
        }
        if let Some(sizes) = shared.sizes.load().as_ref() {
            sizes.record(size, item.cas(), linked);
        }
    }

    /// Unlinks the item in `slot` and returns it.
    fn remove_slot(&mut self, slot: u32, shared: &Shared) -> Option<Item> {
        let item = self.slots.get_mut(slot as usize)?.take()?;
        let hash = shared.hash(item.key());
        if let Ok(entry) = self.table.find_entry(hash, |&idx| idx == slot) {
            entry.remove();
        }
        self.free.push(slot);
        self.used = self.used.saturating_sub(item.charge());
        shared.used.fetch_sub(item.charge(), Ordering::Relaxed);
        self.counters.curr_items = self.counters.curr_items.saturating_sub(1);
        self.account(&item, shared, false);
        Some(item)
    }

    /// Removes an item found dead (expired or flushed) by a lookup or, `by_crawler`, the
    /// sweeper.
    fn reclaim(&mut self, slot: u32, shared: &Shared, by_crawler: bool) {
        if let Some(item) = self.remove_slot(slot, shared) {
            let class = self.classes.get_mut(shared.class_of(&item));
            if by_crawler {
                self.counters.crawler_reclaimed += 1;
                class.crawler_reclaimed += 1;
            } else {
                self.counters.reclaimed += 1;
                class.reclaimed += 1;
            }
            if !item.has(bits::FETCHED) {
                self.counters.expired_unfetched += 1;
                class.expired_unfetched += 1;
            }
        }
    }

    fn is_flushed(item: &Item, flush_at: u32, now: u32) -> bool {
        flush_at != 0 && flush_at <= now && item.time() < flush_at
    }

    /// Finds a live item, reclaiming it if it has expired or been flushed.
    fn lookup(
        &mut self,
        hash: u64,
        key: &[u8],
        now: u32,
        shared: &Shared,
    ) -> (Option<u32>, Lookup) {
        let Some(slot) = self.find(hash, key) else {
            return (None, Lookup::Miss);
        };
        let flush_at = shared.flush_at.load(Ordering::Relaxed);
        let state = match self.item(slot) {
            Some(it) if it.is_expired(now) => Lookup::Expired,
            // A tombstone stays (it orders late replicas of older writes) but is a miss.
            Some(it) if it.has(bits::TOMBSTONE) => return (Some(slot), Lookup::Miss),
            Some(it) if Self::is_flushed(it, flush_at, now) => Lookup::Flushed,
            Some(_) => return (Some(slot), Lookup::Hit),
            None => return (None, Lookup::Miss),
        };
        self.reclaim(slot, shared, false);
        (None, state)
    }

    /// Frees one item by CLOCK (expired ones first come free), never touching `protect`.
    /// Returns false when the shard has nothing it can give up.
    fn evict_one(&mut self, protect: Option<u32>, now: u32, shared: &Shared) -> bool {
        let flush_at = shared.flush_at.load(Ordering::Relaxed);
        // Two full turns of the hand: the first may only clear reference bits. Without
        // eviction (`-M`) only a few slots are searched for an expired item.
        let mut budget = if shared.evict {
            self.slots.len().saturating_mul(2) + 1
        } else {
            NO_EVICT_SEARCH.min(self.slots.len())
        };
        while budget > 0 && !self.slots.is_empty() {
            budget -= 1;
            if self.hand >= self.slots.len() {
                self.hand = 0;
            }
            let slot = self.hand as u32;
            self.hand += 1;
            if Some(slot) == protect {
                continue;
            }
            let Some(item) = self.item_mut(slot) else {
                continue;
            };
            if item.is_expired(now) || Self::is_flushed(item, flush_at, now) {
                self.reclaim(slot, shared, false);
                return true;
            }
            if !shared.evict {
                continue;
            }
            if item.has(bits::REFERENCED) {
                item.clear_bits(bits::REFERENCED);
                continue;
            }
            if let Some(victim) = self.remove_slot(slot, shared) {
                let id = shared.class_of(&victim);
                let class = self.classes.get_mut(id);
                self.counters.evictions += 1;
                class.evicted += 1;
                class.evicted_nonzero += u64::from(victim.exptime() != 0);
                class.evicted_time = now.saturating_sub(victim.time());
                class.evicted_at = now;
                if !victim.has(bits::FETCHED) {
                    self.counters.evicted_unfetched += 1;
                    class.evicted_unfetched += 1;
                }
                if let Some(observer) = shared.evictions.load().as_ref() {
                    observer.evicted(&victim, id, now);
                }
                return true;
            }
        }
        false
    }

    /// Evicts until `needed` more bytes fit the store's budget: from this shard first, then
    /// from any other shard whose lock is free (never waiting, so shards cannot deadlock).
    fn make_room(
        &mut self,
        needed: usize,
        protect: Option<u32>,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> bool {
        while shared.over_budget(needed) {
            if !self.evict_one(protect, now, shared) {
                break;
            }
        }
        // Nothing left here: take from the shard whose next victim is oldest (versions grow
        // with write order), so a shard holding one fresh item does not lose it first.
        let count = shared.shards.len();
        while shared.over_budget(needed) {
            let mut oldest: Option<(usize, u64)> = None;
            for step in 1..count {
                let j = (me + step) % count;
                if let Some(other) = shared.shards[j].try_lock() {
                    if let Some(version) = other.next_victim_version() {
                        if oldest.is_none_or(|(_, v)| version < v) {
                            oldest = Some((j, version));
                        }
                    }
                }
            }
            let Some((j, _)) = oldest else { break };
            let Some(mut other) = shared.shards[j].try_lock() else {
                break;
            };
            if !other.evict_one(None, now, shared) {
                break;
            }
        }
        !shared.over_budget(needed)
    }

    /// Version of the item the CLOCK hand reaches first, if any.
    fn next_victim_version(&self) -> Option<u64> {
        let n = self.slots.len();
        (0..n)
            .filter_map(|i| self.slots[(self.hand + i) % n].as_ref())
            .map(Item::cas)
            .next()
    }

    /// Installs `item` under `hash`, replacing the item in `existing` if given.
    fn install(
        &mut self,
        hash: u64,
        existing: Option<u32>,
        item: Item,
        now: u32,
        shared: &Shared,
        me: usize,
    ) -> Result<u32, StoreError> {
        let old = existing
            .and_then(|s| self.item(s))
            .map_or(0, |it| it.charge());
        let new = item.charge();
        let needed = new.saturating_sub(old);
        if !self.make_room(needed, existing, now, shared, me) {
            self.classes.get_mut(shared.class_of(&item)).outofmemory += 1;
            return Err(StoreError::OutOfMemory);
        }
        self.counters.total_items += 1;
        shared.used.fetch_add(new, Ordering::Relaxed);
        self.account(&item, shared, true);
        if let Some(slot) = existing {
            if let Some(place) = self.slots.get_mut(slot as usize) {
                if let Some(old) = place.replace(item) {
                    self.account(&old, shared, false);
                }
                self.used = self.used.saturating_sub(old) + new;
                shared.used.fetch_sub(old, Ordering::Relaxed);
                return Ok(slot);
            }
        }
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(item);
                slot
            }
            None => {
                self.slots.push(Some(item));
                (self.slots.len() - 1) as u32
            }
        };
        let slots = &self.slots;
        self.table.insert_unique(hash, slot, |&idx| {
            slots
                .get(idx as usize)
                .and_then(|s| s.as_ref())
                .map_or(0, |it| shared.hash(it.key()))
        });
        self.used += new;
        self.counters.curr_items += 1;
        Ok(slot)
    }

    fn clear(&mut self, shared: &Shared) {
        shared.used.fetch_sub(self.used, Ordering::Relaxed);
        self.table = HashTable::new();
        self.slots = Vec::new();
        self.free = Vec::new();
        self.hand = 0;
        self.used = 0;
        self.counters.curr_items = 0;
        self.classes.clear_items();
    }
}

/// A key's place in its (locked) shard: the live item if there is one, and the operations
/// the command layer builds memcached's semantics from.
pub struct Entry<'a> {
    shard: &'a mut Shard,
    shard_index: usize,
    shared: &'a Shared,
    hash: u64,
    slot: Option<u32>,
    now: u32,
    lookup: Lookup,
    /// Whether `slot` holds a live item (not a tombstone).
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

    pub fn item(&self) -> Option<&Item> {
        self.slot
            .filter(|_| self.live)
            .and_then(|s| self.shard.item(s))
    }

    pub fn item_mut(&mut self) -> Option<&mut Item> {
        if !self.live {
            return None;
        }
        self.slot.and_then(|s| self.shard.item_mut(s))
    }

    /// What the key holds now: the live item or a tombstone.
    pub fn current(&self) -> Option<&Item> {
        self.slot.and_then(|s| self.shard.item(s))
    }

    /// Version of what the key holds now, item or tombstone.
    pub fn version(&self) -> Option<u64> {
        self.slot.and_then(|s| self.shard.item(s)).map(Item::cas)
    }

    /// Counts a command that found this key's item, under the item's class (`stats slabs`).
    pub fn count(&mut self, op: ClassOp) {
        let Some(id) = self.item().map(|it| self.shared.class_of(it)) else {
            return;
        };
        self.shard.classes.get_mut(id).ops[op as usize] += 1;
    }

    /// A fresh CAS unique (a new version).
    pub fn next_cas(&self) -> u64 {
        self.shared.versions.next()
    }

    /// Marks the item as used now: second chance for CLOCK, fetched, access time.
    pub fn bump(&mut self) {
        let now = self.now;
        if let Some(item) = self.item_mut() {
            item.set_bits(bits::REFERENCED | bits::FETCHED);
            item.set_time(now);
        }
    }

    /// Moves the item up the LRU without marking it fetched (memcached's `do_item_update`).
    pub fn touch_lru(&mut self) {
        let now = self.now;
        if let Some(item) = self.item_mut() {
            item.set_bits(bits::REFERENCED);
            item.set_time(now);
        }
    }

    /// Stores `item` under this key with a new CAS, replacing any live item.
    pub fn store(&mut self, mut item: Item) -> Result<u64, StoreError> {
        let cas = self.next_cas();
        item.set_cas(cas);
        self.store_versioned(item)
    }

    /// Stores `item` keeping its CAS (a version decided elsewhere, e.g. by a peer).
    pub fn store_versioned(&mut self, mut item: Item) -> Result<u64, StoreError> {
        let cas = item.cas();
        self.shared.versions.observe(cas);
        item.set_time(self.now);
        let live = !item.has(bits::TOMBSTONE);
        let slot = self.shard.install(
            self.hash,
            self.slot,
            item,
            self.now,
            self.shared,
            self.shard_index,
        )?;
        self.slot = Some(slot);
        self.live = live;
        Ok(cas)
    }

    /// Removes the live item, if any.
    pub fn remove(&mut self) -> Option<Item> {
        if !self.live {
            return None;
        }
        let slot = self.slot.take()?;
        self.live = false;
        self.shard.remove_slot(slot, self.shared)
    }

    /// Deletes the live item, leaving a tombstone for `ttl` seconds so that older copies
    /// arriving later from peers cannot bring it back. Returns the tombstone's version.
    pub fn delete_with_tombstone(&mut self, key: &[u8], ttl: u32) -> Option<u64> {
        self.item()?;
        let tombstone = Item::new(
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
    pub fn new(config: StoreConfig) -> Store {
        let count = config.max_shards.max(1).next_power_of_two();
        let shards = (0..count)
            .map(|_| CachePadded::new(Mutex::new(Shard::default())))
            .collect();
        Store {
            shared: Shared {
                shards,
                used: AtomicUsize::new(0),
                limit: AtomicUsize::new(config.memory_limit),
                hasher: ahash::RandomState::new(),
                versions: VersionClock::new(config.node_id),
                flush_at: AtomicU32::new(0),
                classes: Classes::new(&config.classes),
                evict: config.evict,
                sizes: ArcSwapOption::empty(),
                evictions: ArcSwapOption::empty(),
            },
        }
    }

    /// Sizes the hash tables for `items` keys up front (memcached's `-o hashpower`).
    pub fn reserve(&self, items: usize) {
        let per_shard = items / self.shared.shards.len() + 1;
        for shard in self.shared.shards.iter() {
            let shard = &mut *shard.lock();
            let slots = &shard.slots;
            shard.table.reserve(per_shard, |&idx| {
                slots
                    .get(idx as usize)
                    .and_then(|s| s.as_ref())
                    .map_or(0, |it| self.shared.hash(it.key()))
            });
        }
    }

    /// Changes the memory limit (`cache_memlimit`); items beyond it go as new ones arrive.
    pub fn set_limit(&self, bytes: usize) {
        self.shared.limit.store(bytes, Ordering::Relaxed);
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shared.shards.len()
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
        let (slot, lookup) = shard.lookup(hash, key, now, &self.shared);
        let mut entry = Entry {
            shard: &mut shard,
            shard_index,
            shared: &self.shared,
            hash,
            slot,
            now,
            lookup,
            live: lookup == Lookup::Hit,
        };
        f(&mut entry)
    }

    /// `flush_all`: with no delay, drops every item now; with a delay, items not touched
    /// again before that time become invisible then.
    pub fn flush(&self, at: Option<u32>) {
        match at {
            None => {
                self.shared.flush_at.store(0, Ordering::Relaxed);
                for shard in self.shared.shards.iter() {
                    shard.lock().clear(&self.shared);
                }
                if let Some(sizes) = self.shared.sizes.load().as_ref() {
                    sizes.clear();
                }
            }
            Some(at) => self.shared.flush_at.store(at, Ordering::Relaxed),
        }
    }

    /// Reclaims expired and flushed items, looking at no more than `budget` slots per shard.
    /// Returns how many items were reclaimed.
    pub fn sweep(&self, now: u32, budget: usize, cursors: &mut Vec<usize>) -> usize {
        cursors.resize(self.shared.shards.len(), 0);
        let flush_at = self.shared.flush_at.load(Ordering::Relaxed);
        let mut reclaimed = 0;
        for (shard, cursor) in self.shared.shards.iter().zip(cursors.iter_mut()) {
            let mut shard = shard.lock();
            for _ in 0..budget.min(shard.slots.len()) {
                if *cursor >= shard.slots.len() {
                    *cursor = 0;
                }
                let slot = *cursor as u32;
                *cursor += 1;
                let Some(item) = shard.item(slot) else {
                    continue;
                };
                let dead = item.is_expired(now) || Shard::is_flushed(item, flush_at, now);
                let id = self.shared.class_of(item);
                shard.counters.crawler_items_checked += 1;
                shard.classes.get_mut(id).crawler_items_checked += 1;
                if dead {
                    shard.reclaim(slot, &self.shared, true);
                    reclaimed += 1;
                }
            }
        }
        reclaimed
    }

    /// Calls `f` with up to `max` live items of shard `shard` starting at slot `start`, under
    /// the shard's lock. Returns where to continue, or `None` once the shard is done.
    pub fn scan(
        &self,
        shard: usize,
        start: usize,
        max: usize,
        now: u32,
        f: impl FnMut(&Item),
    ) -> Option<usize> {
        self.scan_slots(shard, start, max, now, false, f)
    }

    /// As `scan`, but tombstones (deleted keys still remembered) are included: anti-entropy
    /// compares them between replicas so a delete reaches a replica that missed it.
    pub fn scan_with_tombstones(
        &self,
        shard: usize,
        start: usize,
        max: usize,
        now: u32,
        f: impl FnMut(&Item),
    ) -> Option<usize> {
        self.scan_slots(shard, start, max, now, true, f)
    }

    fn scan_slots(
        &self,
        shard: usize,
        start: usize,
        max: usize,
        now: u32,
        tombstones: bool,
        mut f: impl FnMut(&Item),
    ) -> Option<usize> {
        let shard = self.shared.shards.get(shard)?.lock();
        let flush_at = self.shared.flush_at.load(Ordering::Relaxed);
        let end = start.saturating_add(max).min(shard.slots.len());
        for slot in shard.slots.get(start..end)?.iter().flatten() {
            if (tombstones || !slot.has(bits::TOMBSTONE))
                && !slot.is_expired(now)
                && !Shard::is_flushed(slot, flush_at, now)
            {
                f(slot);
            }
        }
        (end < shard.slots.len()).then_some(end)
    }

    /// Reclaims the expired and flushed items among up to `max` slots of shard `shard` from
    /// `start` (`lru_crawler crawl`), looking only at items whose class `want` accepts; the
    /// looks count as the crawler's. Returns where to continue, or `None` once the shard is
    /// done.
    pub fn crawl(
        &self,
        shard: usize,
        start: usize,
        max: usize,
        now: u32,
        mut want: impl FnMut(u8) -> bool,
    ) -> Option<usize> {
        let mut shard = self.shared.shards.get(shard)?.lock();
        let flush_at = self.shared.flush_at.load(Ordering::Relaxed);
        let end = start.saturating_add(max).min(shard.slots.len());
        for slot in start..end {
            let Some(item) = shard.item(slot as u32) else {
                continue;
            };
            let id = self.shared.class_of(item);
            if id == 0 || !want(id) {
                continue;
            }
            let dead = item.is_expired(now) || Shard::is_flushed(item, flush_at, now);
            shard.counters.crawler_items_checked += 1;
            shard.classes.get_mut(id).crawler_items_checked += 1;
            if dead {
                shard.reclaim(slot as u32, &self.shared, true);
            }
        }
        (end < shard.slots.len()).then_some(end)
    }

    /// memcached's class table, as configured.
    pub fn classes(&self) -> &Classes {
        &self.shared.classes
    }

    /// Per-class figures summed over shards, indexed by class id.
    pub fn class_stats(&self) -> Vec<ClassStats> {
        let mut total = Vec::new();
        for shard in self.shared.shards.iter() {
            shard.lock().classes.add_into(&mut total);
        }
        total
    }

    /// `stats reset`: zeroes the store's event counters (evictions, reclaims, per-class hits),
    /// not what it holds.
    pub fn reset_stats(&self) {
        for shard in self.shared.shards.iter() {
            let mut shard = shard.lock();
            shard.classes.reset_events();
            let c = &mut shard.counters;
            *c = ItemStats {
                curr_items: c.curr_items,
                ..ItemStats::default()
            };
        }
    }

    /// Starts (`Some`, counting items stored from now on) or stops (`None`) `stats sizes`.
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

    /// Item counters summed over shards.
    pub fn stats(&self) -> ItemStats {
        let mut total = ItemStats {
            limit: self.shared.limit.load(Ordering::Relaxed) as u64,
            ..ItemStats::default()
        };
        for shard in self.shared.shards.iter() {
            let shard = shard.lock();
            let c = &shard.counters;
            total.curr_items += c.curr_items;
            total.total_items += c.total_items;
            total.bytes += shard.used as u64;
            total.evictions += c.evictions;
            total.reclaimed += c.reclaimed;
            total.expired_unfetched += c.expired_unfetched;
            total.evicted_unfetched += c.evicted_unfetched;
            total.crawler_reclaimed += c.crawler_reclaimed;
            total.crawler_items_checked += c.crawler_items_checked;
        }
        total
    }

    /// Total memory limit in bytes.
    pub fn limit(&self) -> usize {
        self.shared.limit.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(limit: usize) -> Store {
        Store::new(StoreConfig {
            memory_limit: limit,
            max_item_size: 1024,
            max_shards: 4,
            node_id: 0,
            ..StoreConfig::default()
        })
    }

    fn set(store: &Store, key: &[u8], value: &[u8], now: u32) {
        store
            .with_entry(key, now, |e| {
                e.store(Item::new(key, &[value], ItemMeta::default()))
            })
            .unwrap();
    }

    fn get(store: &Store, key: &[u8], now: u32) -> Option<Vec<u8>> {
        store.with_entry(key, now, |e| {
            e.bump();
            e.item().map(|it| it.value().to_vec())
        })
    }

    #[test]
    fn stores_replaces_and_removes() {
        let s = store(1 << 20);
        set(&s, b"a", b"1", 10);
        set(&s, b"a", b"22", 10);
        assert_eq!(get(&s, b"a", 10).as_deref(), Some(&b"22"[..]));
        assert_eq!(s.stats().curr_items, 1);
        assert_eq!(s.stats().total_items, 2);
        assert!(s.with_entry(b"a", 10, |e| e.remove()).is_some());
        assert_eq!(get(&s, b"a", 10), None);
        assert_eq!(s.stats().bytes, 0);
    }

    #[test]
    fn never_exceeds_the_memory_limit_and_counts_evictions() {
        let limit = 64 * 1024;
        let s = store(limit);
        for i in 0..10_000u32 {
            set(&s, format!("key{i}").as_bytes(), &[b'x'; 100], 10);
            assert!(s.stats().bytes as usize <= limit);
        }
        let stats = s.stats();
        assert!(stats.evictions > 0);
        assert!(stats.curr_items > 100);
        // The most recent write survives.
        assert!(get(&s, b"key9999", 10).is_some());
    }

    #[test]
    fn large_items_use_the_whole_budget_whatever_their_shard() {
        // 40 items of 900 KiB fit in 64 MiB even though several land in the same shard.
        let s = Store::new(StoreConfig {
            memory_limit: 64 << 20,
            max_item_size: 1 << 20,
            max_shards: 32,
            node_id: 0,
            ..StoreConfig::default()
        });
        let big = vec![b'x'; 900 * 1024];
        for i in 0..40u32 {
            set(&s, format!("big{i}").as_bytes(), &big, 10);
        }
        assert_eq!(s.stats().evictions, 0);
        assert_eq!(s.stats().curr_items, 40);
        // Past the budget, the oldest go, from whichever shards hold them.
        for i in 40..100u32 {
            set(&s, format!("big{i}").as_bytes(), &big, 10);
            assert!(s.stats().bytes <= 64 << 20);
        }
        assert!(s.stats().evictions > 0);
        assert!(get(&s, b"big99", 10).is_some());
    }

    #[test]
    fn recently_read_items_survive_eviction() {
        let s = store(64 * 1024);
        set(&s, b"hot", b"v", 10);
        for i in 0..5_000u32 {
            let _ = get(&s, b"hot", 10);
            set(&s, format!("cold{i}").as_bytes(), &[b'x'; 100], 10);
        }
        assert!(get(&s, b"hot", 10).is_some());
    }

    #[test]
    fn expiry_follows_memcached_rules() {
        assert_eq!(absolute_expiry(0, 1000), 0);
        assert_eq!(absolute_expiry(-1, 1000), 1);
        assert_eq!(absolute_expiry(10, 1000), 1010);
        assert_eq!(absolute_expiry(REALTIME_MAXDELTA + 1, 1_000_000_000), 1);
        assert_eq!(absolute_expiry(2_000_000_000, 1_000_000_000), 2_000_000_000);
        let s = store(1 << 20);
        s.with_entry(b"t", 100, |e| {
            e.store(Item::new(
                b"t",
                &[b"v"],
                ItemMeta {
                    exptime: 105,
                    ..ItemMeta::default()
                },
            ))
        })
        .unwrap();
        assert!(get(&s, b"t", 104).is_some());
        assert_eq!(s.with_entry(b"t", 105, |e| e.lookup()), Lookup::Expired);
        assert_eq!(s.stats().reclaimed, 1);
    }

    #[test]
    fn sweep_reclaims_expired_items() {
        let s = store(1 << 20);
        for i in 0..100u32 {
            s.with_entry(format!("k{i}").as_bytes(), 100, |e| {
                e.store(Item::new(
                    b"k",
                    &[b"v"],
                    ItemMeta {
                        exptime: 101,
                        ..ItemMeta::default()
                    },
                ))
            })
            .unwrap();
        }
        let mut cursors = Vec::new();
        assert_eq!(s.sweep(200, 1000, &mut cursors), 100);
        assert_eq!(s.stats().curr_items, 0);
    }

    #[test]
    fn flush_now_and_later() {
        let s = store(1 << 20);
        set(&s, b"a", b"1", 10);
        s.flush(None);
        assert_eq!(get(&s, b"a", 10), None);
        set(&s, b"b", b"1", 10);
        s.flush(Some(20));
        assert!(get(&s, b"b", 19).is_some());
        assert_eq!(s.with_entry(b"b", 20, |e| e.lookup()), Lookup::Flushed);
        set(&s, b"c", b"1", 21);
        assert!(get(&s, b"c", 22).is_some());
    }

    #[test]
    fn items_are_counted_in_memcacheds_classes() {
        let s = store(1 << 20);
        set(&s, b"a", b"1", 10);
        set(&s, b"bb", &[b'x'; 600], 10);
        set(&s, b"a", b"2", 10);
        let classes = s.class_stats();
        assert_eq!((classes[1].number, classes[1].mem_requested), (1, 61));
        assert_eq!(classes[10].number, 1);
        s.with_entry(b"bb", 10, |e| {
            e.count(ClassOp::GetHit);
            e.remove()
        });
        let classes = s.class_stats();
        assert_eq!(
            (classes[10].number, classes[10].op(ClassOp::GetHit)),
            (0, 1)
        );
        assert_eq!(classes[10].bytes, 0);
        s.flush(None);
        assert_eq!(s.class_stats()[1].number, 0);
    }

    #[test]
    fn without_eviction_a_full_store_refuses() {
        let s = Store::new(StoreConfig {
            memory_limit: 16 * 1024,
            max_item_size: 1024,
            max_shards: 2,
            evict: false,
            ..StoreConfig::default()
        });
        let mut stored = 0;
        let refused = loop {
            let key = format!("k{stored}");
            let r = s.with_entry(key.as_bytes(), 10, |e| {
                e.store(Item::new(
                    key.as_bytes(),
                    &[&[b'x'; 500]],
                    ItemMeta::default(),
                ))
            });
            if r.is_err() {
                break r;
            }
            stored += 1;
        };
        assert_eq!(refused, Err(StoreError::OutOfMemory));
        assert_eq!(s.stats().evictions, 0);
        assert!((0..stored).all(|i| get(&s, format!("k{i}").as_bytes(), 10).is_some()));
        let oom: u64 = s.class_stats().iter().map(|c| c.outofmemory).sum();
        assert_eq!(oom, 1);
    }

    #[test]
    fn a_crawl_reclaims_the_expired_items_of_the_chosen_classes() {
        let s = store(1 << 20);
        for i in 0..10u32 {
            let key = format!("e{i}");
            s.with_entry(key.as_bytes(), 100, |e| {
                e.store(Item::new(
                    key.as_bytes(),
                    &[b"v"],
                    ItemMeta {
                        exptime: 101,
                        ..ItemMeta::default()
                    },
                ))
            })
            .unwrap();
        }
        set(&s, b"live", b"v", 100);
        for shard in 0..s.shard_count() {
            // Class 2 holds nothing: nothing is looked at.
            assert_eq!(s.crawl(shard, 0, 1000, 200, |class| class == 2), None);
        }
        assert_eq!(s.class_stats()[1].crawler_items_checked, 0);
        for shard in 0..s.shard_count() {
            let _ = s.crawl(shard, 0, 1000, 200, |class| class == 1);
        }
        let class = s.class_stats()[1];
        assert_eq!(
            (class.crawler_reclaimed, class.crawler_items_checked),
            (10, 11)
        );
        assert_eq!(class.number, 1);
    }
}
