//! Item versions: a hybrid logical clock whose values double as memcached CAS uniques.
//!
//! A version is `milliseconds since the epoch << 22 | counter << 8 | node id`. Versions from
//! one node only grow, versions of different nodes differ in their low byte, and a node that
//! sees a newer version from a peer moves its clock past it. So "last writer wins" orders
//! concurrent writes the same way on every replica, and a key keeps the same CAS on all of its
//! replicas, so `gets`/`cas` keep working after a client fails over.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const NODE_BITS: u32 = 8;
const COUNTER_BITS: u32 = 14;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;

#[derive(Debug)]
pub struct VersionClock {
    last: AtomicU64,
    node: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl VersionClock {
    /// A clock for the node with this id (only its low 8 bits are used).
    pub fn new(node: u64) -> VersionClock {
        VersionClock {
            last: AtomicU64::new(0),
            node: node & NODE_MASK,
        }
    }

    /// A version greater than every version this clock has issued or observed.
    pub fn next(&self) -> u64 {
        let wall = (now_ms() << (COUNTER_BITS + NODE_BITS)) | self.node;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let after_last = ((last | NODE_MASK) + 1) | self.node;
            let next = wall.max(after_last);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(current) => last = current,
            }
        }
    }

    /// Moves the clock past a version seen from a peer.
    pub fn observe(&self, version: u64) {
        self.last.fetch_max(version, Ordering::Relaxed);
    }
}

/// A node id for the clock, derived from the member name.
pub fn node_id(name: &str) -> u64 {
    // FNV-1a: stable across processes and releases (unlike std's hasher).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_grow_and_carry_the_node_id() {
        let clock = VersionClock::new(7);
        let mut last = 0;
        for _ in 0..10_000 {
            let v = clock.next();
            assert!(v > last);
            assert_eq!(v & NODE_MASK, 7);
            last = v;
        }
    }

    #[test]
    fn observing_a_newer_version_moves_the_clock_past_it() {
        let a = VersionClock::new(1);
        let b = VersionClock::new(2);
        let far_future = (now_ms() + 60_000) << (COUNTER_BITS + NODE_BITS);
        b.observe(far_future | 9);
        let v = b.next();
        assert!(v > far_future);
        assert_eq!(v & NODE_MASK, 2);
        assert!(a.next() < v);
    }
}
