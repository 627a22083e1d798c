//! A shard's hash table of record places: 4-byte places in buckets of eight, each with a
//! one-byte tag of its hash, and a count per bucket of the entries that had to be put past
//! it (F14's "overflow" scheme).
//!
//! Against a general-purpose table (hashbrown's, 5 bytes a bucket too), two things keep it
//! small under a cache's traffic: removing an entry leaves no mark (the overflow counts say
//! where a lookup may stop), so steady churn never forces a table to grow; and its size
//! is any number of buckets, not a power of two, so it grows by a quarter at a time (and
//! the shard shrinks it when it is half empty). An item costs 6 to 8 bytes of table; with
//! hashbrown's it cost 6 to 12, and 13 under the benchmark's churn.

/// Places per bucket.
const WIDTH: usize = 8;
/// A tag of 0 marks an empty place.
const EMPTY: u8 = 0;
/// Bytes of table per bucket: places, tags, overflow count.
const BUCKET_BYTES: usize = WIDTH * (std::mem::size_of::<u32>() + 1) + 1;

/// Bytes of a table of `buckets` buckets.
pub(super) fn table_bytes(buckets: usize) -> usize {
    buckets * BUCKET_BYTES
}

/// Entries a table of `buckets` holds before it must grow: 7/8 of its places.
pub(super) fn table_capacity(buckets: usize) -> usize {
    buckets * WIDTH / 8 * 7
}

/// Buckets for a table holding `entries` (at least one bucket).
pub(super) fn buckets_for(entries: usize) -> usize {
    (entries.saturating_mul(8) / 7).div_ceil(WIDTH).max(1)
}

/// Buckets of the table a full one of `buckets` grows into.
pub(super) fn grown(buckets: usize) -> usize {
    (buckets + buckets / 4).max(buckets + 1)
}

#[derive(Debug, Default)]
pub(super) struct PlaceTable {
    places: Vec<u32>,
    tags: Vec<u8>,
    /// Per bucket: entries whose probe passed it (saturating: 255 stays).
    overflow: Vec<u8>,
    len: usize,
}

fn tag(hash: u64) -> u8 {
    ((hash >> 56) as u8).max(1)
}

impl PlaceTable {
    pub fn with_buckets(buckets: usize) -> PlaceTable {
        PlaceTable {
            places: vec![0; buckets * WIDTH],
            tags: vec![EMPTY; buckets * WIDTH],
            overflow: vec![0; buckets],
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn buckets(&self) -> usize {
        self.overflow.len()
    }

    /// Whether one more entry fits without the table growing.
    pub fn has_room(&self) -> bool {
        self.len < table_capacity(self.buckets())
    }

    fn home(&self, hash: u64) -> usize {
        (((hash & 0xffff_ffff) * self.buckets() as u64) >> 32) as usize
    }

    /// Index (bucket * WIDTH + place) of the entry with this hash that `eq` accepts.
    fn position(&self, hash: u64, mut eq: impl FnMut(u32) -> bool) -> Option<usize> {
        let n = self.buckets();
        if n == 0 {
            return None;
        }
        let t = tag(hash);
        let mut b = self.home(hash);
        for _ in 0..n {
            let base = b * WIDTH;
            for i in base..base + WIDTH {
                if self.tags[i] == t && eq(self.places[i]) {
                    return Some(i);
                }
            }
            if self.overflow[b] == 0 {
                return None;
            }
            b = if b + 1 == n { 0 } else { b + 1 };
        }
        None
    }

    pub fn find(&self, hash: u64, eq: impl FnMut(u32) -> bool) -> Option<u32> {
        self.position(hash, eq).map(|i| self.places[i])
    }

    pub fn find_mut(&mut self, hash: u64, eq: impl FnMut(u32) -> bool) -> Option<&mut u32> {
        let i = self.position(hash, eq)?;
        Some(&mut self.places[i])
    }

    /// Removes the entry `eq` accepts and returns it.
    pub fn remove(&mut self, hash: u64, eq: impl FnMut(u32) -> bool) -> Option<u32> {
        let i = self.position(hash, eq)?;
        self.tags[i] = EMPTY;
        self.len -= 1;
        let (n, found) = (self.buckets(), i / WIDTH);
        let mut b = self.home(hash);
        while b != found {
            if self.overflow[b] != u8::MAX {
                self.overflow[b] -= 1;
            }
            b = if b + 1 == n { 0 } else { b + 1 };
        }
        Some(self.places[i])
    }

    /// Adds an entry for a key not in the table. The caller makes room first
    /// (`has_room`); a table without a free place drops the entry.
    pub fn insert_unique(&mut self, hash: u64, place: u32) {
        let n = self.buckets();
        if self.len >= n * WIDTH {
            return;
        }
        let mut b = self.home(hash);
        loop {
            let base = b * WIDTH;
            if let Some(i) = (base..base + WIDTH).find(|&i| self.tags[i] == EMPTY) {
                self.tags[i] = tag(hash);
                self.places[i] = place;
                self.len += 1;
                return;
            }
            self.overflow[b] = self.overflow[b].saturating_add(1);
            b = if b + 1 == n { 0 } else { b + 1 };
        }
    }

    /// Every entry, in no particular order.
    pub fn places(&self) -> impl Iterator<Item = u32> + '_ {
        self.tags
            .iter()
            .zip(&self.places)
            .filter(|(&t, _)| t != EMPTY)
            .map(|(_, &p)| p)
    }

    /// A table of `buckets` buckets holding these entries, `hash` giving each one's hash.
    pub fn rebuilt(&self, buckets: usize, hash: impl Fn(u32) -> u64) -> PlaceTable {
        let mut fresh = PlaceTable::with_buckets(buckets.max(1));
        for place in self.places() {
            fresh.insert_unique(hash(place), place);
        }
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn h(k: u32) -> u64 {
        // Spread like a real hash, with collisions on the bucket for some keys.
        u64::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }

    #[test]
    fn matches_a_map_under_churn_at_full_load() {
        let buckets = 64;
        let mut t = PlaceTable::with_buckets(buckets);
        let mut model: HashMap<u32, ()> = HashMap::new();
        let mut next = 0u32;
        let mut rng = 12345u64;
        for _ in 0..200_000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let insert = t.has_room() && (rng >> 33).is_multiple_of(2);
            if insert {
                t.insert_unique(h(next), next);
                model.insert(next, ());
                next += 1;
            } else if let Some(&k) = model.keys().nth((rng >> 40) as usize % model.len().max(1)) {
                assert_eq!(t.remove(h(k), |p| p == k), Some(k));
                model.remove(&k);
            }
            assert_eq!(t.len(), model.len());
        }
        for k in 0..next {
            assert_eq!(
                t.find(h(k), |p| p == k).is_some(),
                model.contains_key(&k),
                "{k}"
            );
        }
        // Churn never needed a bigger table, and removals left nothing behind.
        assert_eq!(t.buckets(), buckets);
        let r = t.rebuilt(grown(buckets), h);
        assert_eq!(r.len(), t.len());
        assert!(model.keys().all(|&k| r.find(h(k), |p| p == k) == Some(k)));
    }

    #[test]
    fn same_hash_entries_are_told_apart_by_eq() {
        let mut t = PlaceTable::with_buckets(2);
        for p in 0..table_capacity(2) as u32 {
            t.insert_unique(7, p);
        }
        assert!(!t.has_room());
        for p in 0..table_capacity(2) as u32 {
            assert_eq!(t.find(7, |q| q == p), Some(p));
        }
        assert_eq!(t.remove(7, |q| q == 3), Some(3));
        assert_eq!(t.find(7, |q| q == 3), None);
        *t.find_mut(7, |q| q == 4).unwrap() = 40;
        assert_eq!(t.find(7, |q| q == 40), Some(40));
        assert_eq!(PlaceTable::default().find(7, |_| true), None);
    }

    #[test]
    fn sizes_grow_by_a_quarter_and_cost_about_six_bytes_an_entry() {
        assert_eq!(buckets_for(0), 1);
        assert!(table_capacity(buckets_for(100_000)) >= 100_000);
        assert_eq!(grown(1), 2);
        assert_eq!(grown(100), 125);
        // Full table: 41 bytes per 7 entries.
        let b = buckets_for(100_000);
        assert!(table_bytes(b) as f64 / 100_000.0 <= 5.9);
    }
}
