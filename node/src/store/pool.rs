//! The store's byte budget: segments not owned by a shard, and the bytes of every shard's
//! hash table.
//!
//! The budget is `-m` (or `cache_memlimit`) and covers the segments in use, the free ones
//! kept for reuse, and the hash tables. A table that needs to grow takes its bytes from the
//! segments: free ones are given back to the allocator until the total fits again, and if
//! none is free the growing shard first evicts one of its own.

use parking_lot::Mutex;

use super::memory::SegBuf;

#[derive(Debug)]
struct Inner {
    /// Allocated segments nobody uses.
    free: Vec<SegBuf>,
    /// Segments of the `-e` file the budget does not cover now (their pages given back).
    retired: Vec<SegBuf>,
    /// Segments the budget allows that have not been allocated yet (heap segments only:
    /// the file's are all there from the start).
    unallocated: usize,
    /// Whether segments are allocated on demand (heap) rather than fixed (file).
    growable: bool,
    /// Segments owned by shards.
    in_use: usize,
    /// Bytes of all hash tables.
    index_bytes: usize,
    limit: usize,
}

/// What the pool holds, for `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub segment_size: usize,
    pub segments_in_use: usize,
    pub segments_free: usize,
    /// Segments the budget allows now (in use + free + not yet allocated).
    pub segments_allowed: usize,
    pub index_bytes: usize,
}

#[derive(Debug)]
pub(super) struct Pool {
    segment_size: usize,
    inner: Mutex<Inner>,
}

impl Inner {
    fn allowed(&self, segment_size: usize) -> usize {
        self.limit.saturating_sub(self.index_bytes) / segment_size
    }

    /// Drops free (then never-allocated) segments until what the pool could hand out fits
    /// the budget. Segments in use above it are given back as their shards evict.
    fn trim(&mut self, segment_size: usize) {
        let allowed = self.allowed(segment_size);
        while self.in_use + self.free.len() + self.unallocated > allowed {
            if self.unallocated > 0 {
                self.unallocated -= 1;
            } else if let Some(mut buf) = self.free.pop() {
                if buf.mapped_id().is_some() {
                    buf.discard();
                    self.retired.push(buf);
                }
            } else {
                break;
            }
        }
        while self.in_use + self.free.len() + self.unallocated < allowed {
            if let Some(buf) = self.retired.pop() {
                self.free.push(buf);
            } else if self.growable {
                self.unallocated += allowed - (self.in_use + self.free.len() + self.unallocated);
            } else {
                break;
            }
        }
    }

    fn take(&mut self, segment_size: usize) -> Option<SegBuf> {
        if self.in_use >= self.allowed(segment_size) {
            return None;
        }
        let buf = match self.free.pop() {
            Some(buf) => buf,
            None if self.unallocated > 0 => {
                self.unallocated -= 1;
                SegBuf::zeroed(segment_size)
            }
            None => return None,
        };
        self.in_use += 1;
        Some(buf)
    }
}

impl Pool {
    /// A pool of heap segments, allocated as the budget allows.
    pub fn new(segment_size: usize, limit: usize) -> Pool {
        Self::with_segments(segment_size, limit, Vec::new(), 0, true)
    }

    /// A pool over a fixed set of (file) segments: `free` ones, and `in_use` already
    /// handed to shards.
    pub fn with_segments(
        segment_size: usize,
        limit: usize,
        free: Vec<SegBuf>,
        in_use: usize,
        growable: bool,
    ) -> Pool {
        let mut inner = Inner {
            free,
            retired: Vec::new(),
            unallocated: 0,
            growable,
            in_use,
            index_bytes: 0,
            limit,
        };
        inner.trim(segment_size);
        Pool {
            segment_size,
            inner: Mutex::new(inner),
        }
    }

    pub fn segment_size(&self) -> usize {
        self.segment_size
    }

    /// A segment for a shard, if the budget allows one more.
    pub fn take(&self) -> Option<SegBuf> {
        self.inner.lock().take(self.segment_size)
    }

    /// Takes back segments a shard freed and, with `want`, hands one out again in the same
    /// step, so a shard that evicted for room is not beaten to it by another.
    pub fn exchange(&self, freed: Vec<SegBuf>, want: bool) -> Option<SegBuf> {
        let mut inner = self.inner.lock();
        inner.in_use = inner.in_use.saturating_sub(freed.len());
        inner.free.extend(freed);
        inner.trim(self.segment_size);
        if want {
            inner.take(self.segment_size)
        } else {
            None
        }
    }

    /// Charges `bytes` more of hash table; false if even without free segments they do not
    /// fit (the caller must evict first).
    pub fn grow_index(&self, bytes: usize) -> bool {
        let mut inner = self.inner.lock();
        let in_use = inner.in_use * self.segment_size;
        if in_use + inner.index_bytes + bytes > inner.limit {
            return false;
        }
        inner.index_bytes += bytes;
        inner.trim(self.segment_size);
        true
    }

    /// Charges hash-table bytes even past the budget (tables rebuilt from the `-e` file);
    /// the excess is evicted as segments are next needed.
    pub fn charge_index(&self, bytes: usize) {
        let mut inner = self.inner.lock();
        inner.index_bytes += bytes;
        inner.trim(self.segment_size);
    }

    /// Releases hash-table bytes (a table dropped by `flush_all`).
    pub fn shrink_index(&self, bytes: usize) {
        let mut inner = self.inner.lock();
        inner.index_bytes = inner.index_bytes.saturating_sub(bytes);
        inner.trim(self.segment_size);
    }

    pub fn set_limit(&self, limit: usize) {
        let mut inner = self.inner.lock();
        inner.limit = limit;
        inner.trim(self.segment_size);
    }

    pub fn limit(&self) -> usize {
        self.inner.lock().limit
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.inner.lock();
        PoolStats {
            segment_size: self.segment_size,
            segments_in_use: inner.in_use,
            segments_free: inner.free.len(),
            segments_allowed: inner.in_use + inner.free.len() + inner.unallocated,
            index_bytes: inner.index_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_what_the_budget_allows_and_gives_up_segments_for_the_index() {
        let pool = Pool::new(1024, 4 * 1024);
        let mut held: Vec<SegBuf> = (0..4).filter_map(|_| pool.take()).collect();
        assert_eq!(held.len(), 4);
        assert!(pool.take().is_none());
        // The index cannot grow while every segment is in use...
        assert!(!pool.grow_index(100));
        // ...but can once one is given back, which the pool then drops.
        let one = held.pop().unwrap();
        assert!(pool.exchange(vec![one], false).is_none());
        assert!(pool.grow_index(100));
        let s = pool.stats();
        assert_eq!(
            (s.segments_in_use, s.segments_free, s.segments_allowed),
            (3, 0, 3)
        );
        assert!(pool.take().is_none());
        pool.shrink_index(100);
        assert!(pool.take().is_some());
    }

    #[test]
    fn a_lower_limit_takes_effect_as_segments_come_back() {
        let pool = Pool::new(1024, 4 * 1024);
        let held: Vec<SegBuf> = (0..4).filter_map(|_| pool.take()).collect();
        pool.set_limit(2 * 1024);
        assert!(pool.take().is_none());
        assert_eq!(pool.stats().segments_in_use, 4);
        assert!(pool.exchange(held, true).is_some());
        let s = pool.stats();
        assert_eq!((s.segments_in_use, s.segments_allowed), (1, 2));
    }
}
