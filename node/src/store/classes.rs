//! memcached's slab classes: the chunk sizes memcached groups items by, as `memcached -vv`
//! prints them (96 bytes growing by `-f` 1.25, 8-byte aligned, up to `slab_chunk_max`).
//!
//! kache appends items to segments as records, so it has no slabs; it reports each item
//! under the class memcached would have stored it in (`stats slabs`, `stats items`,
//! `stats cachedump`, `lru_crawler metadump`), so tools that read per-class figures see
//! memcached's grouping.
//! The class math is pure: sizes in, class ids out.

use std::sync::atomic::{AtomicU32, Ordering};

/// memcached's `MAX_NUMBER_OF_SLAB_CLASSES`: ids run from 1 to 63.
pub const MAX_CLASSES: usize = 64;
/// memcached's slab page (`slab_page_size`): chunks are cut from 1 MiB pages.
pub const PAGE_SIZE: usize = 1024 * 1024;
/// Every chunk size is a multiple of this (`CHUNK_ALIGN_BYTES`).
const CHUNK_ALIGN: usize = 8;
/// memcached's item header on 64-bit builds (`sizeof(item)`).
pub const ITEM_HEADER: usize = 48;
/// The CAS field memcached adds to every item unless started with `-C`.
const CAS_SIZE: usize = 8;
/// Bytes of client flags memcached stores when they are not zero.
const FLAGS_SIZE: usize = 4;

/// What decides the classes: memcached's `-n`, `-f`, `-I`, `-C` and `-o slab_chunk_max` /
/// `-o slab_sizes`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassConfig {
    /// `-n`: minimum space for key, value and flags (48).
    pub min_size: usize,
    /// `-f`: growth factor between classes (1.25).
    pub factor: f64,
    /// `slab_chunk_max`: the largest chunk; bigger items are chunked (512 KiB).
    pub chunk_max: usize,
    /// `-I`: the largest item.
    pub item_size_max: usize,
    /// Whether items carry a CAS (no `-C`).
    pub cas: bool,
    /// `-o slab_sizes`: explicit chunk sizes instead of the factor.
    pub sizes: Option<Vec<usize>>,
}

impl Default for ClassConfig {
    fn default() -> Self {
        ClassConfig {
            min_size: 48,
            factor: 1.25,
            chunk_max: PAGE_SIZE / 2,
            item_size_max: PAGE_SIZE,
            cas: true,
            sizes: None,
        }
    }
}

/// The class table: chunk size of each class id.
#[derive(Clone, Debug)]
pub struct Classes {
    /// `sizes[id]` for ids 1..=largest; index 0 is unused (class 0 means "no class").
    sizes: Vec<usize>,
    item_size_max: usize,
    cas: bool,
}

impl Classes {
    /// Builds the table as memcached's `slabs_init` does.
    pub fn new(config: &ClassConfig) -> Classes {
        let mut sizes = vec![0];
        let mut size = ITEM_HEADER + config.min_size;
        let mut id = 0;
        loop {
            id += 1;
            if id >= MAX_CLASSES - 1 {
                break;
            }
            if let Some(given) = &config.sizes {
                match given.get(id - 1) {
                    Some(&s) if s != 0 => size = s,
                    _ => break,
                }
            } else if size as f64 >= config.chunk_max as f64 / config.factor {
                break;
            }
            if !size.is_multiple_of(CHUNK_ALIGN) {
                size += CHUNK_ALIGN - size % CHUNK_ALIGN;
            }
            sizes.push(size);
            if config.sizes.is_none() {
                // memcached multiplies an unsigned int by a double and truncates.
                size = (size as f64 * config.factor) as usize;
            }
        }
        sizes.push(config.chunk_max);
        Classes {
            sizes,
            item_size_max: config.item_size_max,
            cas: config.cas,
        }
    }

    /// The largest item (`-I`).
    pub fn item_size_max(&self) -> usize {
        self.item_size_max
    }

    /// Id of the largest class (memcached's `power_largest`).
    pub fn largest(&self) -> u8 {
        (self.sizes.len() - 1) as u8
    }

    /// Chunk size of class `id`.
    pub fn chunk_size(&self, id: u8) -> Option<usize> {
        self.sizes.get(usize::from(id)).copied().filter(|&s| s > 0)
    }

    /// Chunks of class `id` one 1 MiB page holds (`chunks_per_page`).
    pub fn per_page(&self, id: u8) -> usize {
        self.chunk_size(id).map_or(0, |s| PAGE_SIZE / s)
    }

    /// memcached's `ITEM_ntotal`: the bytes an item of this shape takes in memcached (header,
    /// key and its NUL, flags when not zero, value and its CRLF, CAS). This is the `size` of
    /// `lru_crawler metadump` and `mem_requested`, and what `-I` limits.
    pub fn item_size(&self, key_len: usize, flags: u32, value_len: usize) -> usize {
        memcached_item_size(key_len, flags, value_len, self.cas)
    }

    /// memcached's `slabs_clsid`: the smallest class whose chunks hold `size` bytes, the
    /// largest class for chunked items, 0 for sizes no class takes.
    pub fn class_of(&self, size: usize) -> u8 {
        if size == 0 || size > self.item_size_max {
            return 0;
        }
        let i = self.sizes[1..].partition_point(|&chunk| chunk < size);
        if i + 1 >= self.sizes.len() {
            self.largest()
        } else {
            (i + 1) as u8
        }
    }

    /// The class of an item with this key, flags and value.
    pub fn class_of_item(&self, key_len: usize, flags: u32, value_len: usize) -> u8 {
        self.class_of(self.item_size(key_len, flags, value_len))
    }

    /// Every class id with its chunk size, smallest first.
    pub fn iter(&self) -> impl Iterator<Item = (u8, usize)> + '_ {
        self.sizes
            .iter()
            .enumerate()
            .skip(1)
            .map(|(id, &size)| (id as u8, size))
    }
}

/// memcached's item size for a key, flags and value (see [`Classes::item_size`]).
pub fn memcached_item_size(key_len: usize, flags: u32, value_len: usize, cas: bool) -> usize {
    let flags = if flags == 0 { 0 } else { FLAGS_SIZE };
    let cas = if cas { CAS_SIZE } else { 0 };
    ITEM_HEADER + key_len + 1 + flags + value_len + 2 + cas
}

/// A command that memcached counts per class in `stats slabs` when it finds its item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClassOp {
    GetHit,
    Set,
    DeleteHit,
    IncrHit,
    DecrHit,
    CasHit,
    CasBadval,
    TouchHit,
}

impl ClassOp {
    /// Every op with its `stats slabs` name, in memcached's order.
    pub const ALL: [(ClassOp, &'static str); 8] = [
        (ClassOp::GetHit, "get_hits"),
        (ClassOp::Set, "cmd_set"),
        (ClassOp::DeleteHit, "delete_hits"),
        (ClassOp::IncrHit, "incr_hits"),
        (ClassOp::DecrHit, "decr_hits"),
        (ClassOp::CasHit, "cas_hits"),
        (ClassOp::CasBadval, "cas_badval"),
        (ClassOp::TouchHit, "touch_hits"),
    ];
}

/// What the store counts per class (`stats items`, `stats slabs`), named as memcached names
/// the figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClassStats {
    /// Items in the class now.
    pub number: u64,
    /// Sum of their memcached sizes ([`Classes::item_size`]).
    pub mem_requested: u64,
    /// Bytes they count against kache's memory limit (its own sizes, overhead included).
    pub bytes: u64,
    pub evicted: u64,
    /// Evicted items that had an expiry time.
    pub evicted_nonzero: u64,
    /// Seconds the last evicted item had gone unused, and when it was evicted.
    pub evicted_time: u32,
    pub evicted_at: u32,
    /// Stores refused for lack of memory.
    pub outofmemory: u64,
    /// Expired or flushed items removed when looked up.
    pub reclaimed: u64,
    pub expired_unfetched: u64,
    pub evicted_unfetched: u64,
    /// Expired or flushed items removed by the crawler (the background sweeper).
    pub crawler_reclaimed: u64,
    pub crawler_items_checked: u64,
    /// Hits per [`ClassOp`], by its index in [`ClassOp::ALL`].
    pub ops: [u64; 8],
}

impl ClassStats {
    pub fn op(&self, op: ClassOp) -> u64 {
        self.ops[op as usize]
    }

    /// Whether the class has held anything or seen any event (memcached lists a class once
    /// it has a page).
    pub fn is_used(&self) -> bool {
        *self != ClassStats::default()
    }

    /// Adds `other` (another shard's figures for the same class).
    pub fn add(&mut self, other: &ClassStats) {
        self.number += other.number;
        self.mem_requested += other.mem_requested;
        self.bytes += other.bytes;
        self.evicted += other.evicted;
        self.evicted_nonzero += other.evicted_nonzero;
        if other.evicted_at >= self.evicted_at && other.evicted > 0 {
            self.evicted_at = other.evicted_at;
            self.evicted_time = other.evicted_time;
        }
        self.outofmemory += other.outofmemory;
        self.reclaimed += other.reclaimed;
        self.expired_unfetched += other.expired_unfetched;
        self.evicted_unfetched += other.evicted_unfetched;
        self.crawler_reclaimed += other.crawler_reclaimed;
        self.crawler_items_checked += other.crawler_items_checked;
        for (a, b) in self.ops.iter_mut().zip(other.ops) {
            *a += b;
        }
    }

    /// `stats reset`: zeroes the event counters, keeps what the class holds.
    pub fn reset_events(&mut self) {
        *self = ClassStats {
            number: self.number,
            mem_requested: self.mem_requested,
            bytes: self.bytes,
            ..ClassStats::default()
        };
    }
}

/// Per-class figures of one shard, grown to the highest class it has seen (at most
/// [`MAX_CLASSES`] entries).
#[derive(Clone, Debug, Default)]
pub struct ClassTable(Vec<ClassStats>);

impl ClassTable {
    pub fn get_mut(&mut self, id: u8) -> &mut ClassStats {
        let i = usize::from(id).min(MAX_CLASSES - 1);
        if self.0.len() <= i {
            self.0.resize(i + 1, ClassStats::default());
        }
        &mut self.0[i]
    }

    /// Adds this shard's figures into `total` (indexed by class id).
    pub fn add_into(&self, total: &mut Vec<ClassStats>) {
        if total.len() < self.0.len() {
            total.resize(self.0.len(), ClassStats::default());
        }
        for (sum, mine) in total.iter_mut().zip(&self.0) {
            sum.add(mine);
        }
    }

    pub fn reset_events(&mut self) {
        self.0.iter_mut().for_each(ClassStats::reset_events);
    }

    /// `flush_all`: the classes hold nothing any more.
    pub fn clear_items(&mut self) {
        for class in &mut self.0 {
            class.number = 0;
            class.mem_requested = 0;
            class.bytes = 0;
        }
    }
}

/// Width of a `stats sizes` bucket.
pub const SIZE_BUCKET: usize = 32;

/// `stats sizes` (memcached's `-o track_sizes`, `stats sizes_enable`): items by their
/// memcached size, rounded up to 32 bytes. Like memcached, it counts only items stored after
/// it was enabled (CAS at least `cas_min`). One 4-byte counter per bucket up to `-I`.
#[derive(Debug)]
pub struct SizeHistogram {
    cas_min: u64,
    buckets: Box<[AtomicU32]>,
}

impl SizeHistogram {
    pub fn new(item_size_max: usize, cas_min: u64) -> SizeHistogram {
        SizeHistogram {
            cas_min,
            buckets: (0..item_size_max / SIZE_BUCKET + 1)
                .map(|_| AtomicU32::new(0))
                .collect(),
        }
    }

    /// Counts an item of `size` bytes and version `cas` in (`linked`) or out.
    pub fn record(&self, size: usize, cas: u64, linked: bool) {
        if cas < self.cas_min {
            return;
        }
        if let Some(bucket) = self.buckets.get(size.div_ceil(SIZE_BUCKET)) {
            if linked {
                bucket.fetch_add(1, Ordering::Relaxed);
            } else {
                // Never below zero, whatever the order of concurrent updates.
                let _ =
                    bucket.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
        }
    }

    /// `flush_all`: nothing is stored any more.
    pub fn clear(&self) {
        self.buckets
            .iter()
            .for_each(|b| b.store(0, Ordering::Relaxed));
    }

    /// Calls `f` with each non-empty bucket's size and count, smallest first.
    pub fn for_each(&self, mut f: impl FnMut(usize, u32)) {
        for (i, bucket) in self.buckets.iter().enumerate() {
            let n = bucket.load(Ordering::Relaxed);
            if n != 0 {
                f(i * SIZE_BUCKET, n);
            }
        }
    }
}

/// Why memcached refuses a class configuration at start-up (its own messages).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClassConfigError {
    #[error("slab_chunk_max (bytes: {chunk_max}) cannot be larger than -I (item_size_max {item_size_max})")]
    ChunkMaxAboveItemMax {
        chunk_max: usize,
        item_size_max: usize,
    },
    #[error("-I (item_size_max: {item_size_max}) must be evenly divisible by slab_chunk_max (bytes: {chunk_max})")]
    ItemMaxNotMultiple {
        item_size_max: usize,
        chunk_max: usize,
    },
    #[error(
        "slab_chunk_max (bytes: {chunk_max}) must divide evenly into {PAGE_SIZE} (slab_page_size)"
    )]
    ChunkMaxNotDivisor { chunk_max: usize },
}

impl ClassConfig {
    /// memcached's start-up checks of `-I` against `slab_chunk_max`.
    pub fn validate(&self) -> Result<(), ClassConfigError> {
        let (chunk_max, item_size_max) = (self.chunk_max, self.item_size_max);
        if chunk_max == 0 || chunk_max > item_size_max {
            return Err(ClassConfigError::ChunkMaxAboveItemMax {
                chunk_max,
                item_size_max,
            });
        }
        if item_size_max % chunk_max != 0 {
            return Err(ClassConfigError::ItemMaxNotMultiple {
                item_size_max,
                chunk_max,
            });
        }
        if !PAGE_SIZE.is_multiple_of(chunk_max) {
            return Err(ClassConfigError::ChunkMaxNotDivisor { chunk_max });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_classes_are_memcached_vv() {
        // `memcached -vv` (1.6.18, defaults): 39 classes from 96 to 524288 bytes.
        let classes = Classes::new(&ClassConfig::default());
        let sizes: Vec<usize> = classes.iter().map(|(_, s)| s).collect();
        assert_eq!(classes.largest(), 39);
        assert_eq!(&sizes[..6], &[96, 120, 152, 192, 240, 304]);
        assert_eq!(sizes[9], 752);
        assert_eq!(&sizes[36..], &[315_872, 394_840, 524_288]);
        assert_eq!(classes.per_page(1), 10922);
        assert_eq!(classes.per_page(39), 2);
    }

    #[test]
    fn items_land_where_memcached_puts_them() {
        let classes = Classes::new(&ClassConfig::default());
        // `set a 0 0 1`: 61 bytes, class 1; flags 5 and 600 bytes of value: 665, class 10.
        assert_eq!(classes.item_size(1, 0, 1), 61);
        assert_eq!(classes.class_of_item(1, 0, 1), 1);
        assert_eq!(classes.item_size(2, 5, 600), 665);
        assert_eq!(classes.class_of_item(2, 5, 600), 10);
        // Bigger than the largest chunk: chunked, reported in the largest class.
        assert_eq!(classes.class_of_item(3, 0, 700_000), 39);
        assert_eq!(classes.class_of(PAGE_SIZE + 1), 0);
        assert_eq!(classes.class_of(96), 1);
        assert_eq!(classes.class_of(97), 2);
    }

    #[test]
    fn factor_min_size_and_explicit_sizes() {
        let classes = Classes::new(&ClassConfig {
            factor: 2.0,
            min_size: 16,
            ..ClassConfig::default()
        });
        let sizes: Vec<usize> = classes.iter().map(|(_, s)| s).collect();
        assert_eq!(&sizes[..4], &[64, 128, 256, 512]);
        assert_eq!(*sizes.last().unwrap(), PAGE_SIZE / 2);
        let classes = Classes::new(&ClassConfig {
            sizes: Some(vec![100, 1000]),
            ..ClassConfig::default()
        });
        let sizes: Vec<usize> = classes.iter().map(|(_, s)| s).collect();
        assert_eq!(sizes, vec![104, 1000, PAGE_SIZE / 2]);
    }

    #[test]
    fn chunk_max_must_fit_item_max_as_memcached_checks() {
        let ok = ClassConfig {
            item_size_max: 1024,
            chunk_max: 1024,
            ..ClassConfig::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let too_big = ClassConfig {
            item_size_max: 1024,
            ..ClassConfig::default()
        };
        assert!(too_big
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("slab_chunk_max (bytes: 524288) cannot be larger than -I"));
        let uneven = ClassConfig {
            item_size_max: 1024 * 1024 + 1024,
            ..ClassConfig::default()
        };
        assert!(matches!(
            uneven.validate(),
            Err(ClassConfigError::ItemMaxNotMultiple { .. })
        ));
    }
}
