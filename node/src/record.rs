//! A change to one key as nodes exchange it (replication, hand-off, refill, read-through,
//! anti-entropy), and how a node applies one to its store: the vocabulary the engine (which
//! produces records) and the peer layer (which carries and applies them) share, so neither
//! depends on the other.

use crate::store::{bits, ItemMeta, ItemRef, NewItem, Store, StoreError};

/// Default of `--tombstone-ttl`, in seconds: how long a delete's tombstone outlives the
/// item, so that an older copy arriving later (a late replication, a hand-off, a replica
/// that was cut off and comes back through anti-entropy) cannot bring the key back. A delete
/// survives a partition shorter than this (less one anti-entropy interval).
pub const DEFAULT_TOMBSTONE_TTL: u32 = 300;

/// What a record does to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Store this value (set, add, replace, append, prepend, cas, incr/decr results).
    Set = 1,
    /// The key was deleted at this version (a tombstone).
    Delete = 2,
    /// New expiry for the key (touch, gat).
    Touch = 3,
    /// `flush_all`: drop everything at `exptime` (0 = now). The key is empty.
    Flush = 4,
}

impl Op {
    /// The op a wire byte names, if any.
    pub fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::Set,
            2 => Op::Delete,
            3 => Op::Touch,
            4 => Op::Flush,
            _ => return None,
        })
    }
}

/// One change to one key, stamped with the version that orders it (last writer wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub op: Op,
    pub key: Vec<u8>,
    pub version: u64,
    pub flags: u32,
    /// Absolute expiry in Unix seconds, 0 for never.
    pub exptime: u32,
    pub value: Vec<u8>,
}

impl Record {
    /// The record that reproduces `item` (a value, or a tombstone) on a peer.
    pub fn of(item: ItemRef<'_>) -> Record {
        let tombstone = item.has(bits::TOMBSTONE);
        Record {
            op: if tombstone { Op::Delete } else { Op::Set },
            key: item.key().to_vec(),
            version: item.cas(),
            flags: item.client_flags(),
            exptime: item.exptime(),
            value: if tombstone {
                Vec::new()
            } else {
                item.value().to_vec()
            },
        }
    }

    /// A new expiry for `key` (touch, gat, `mg T`).
    pub fn touch(key: &[u8], exptime: u32) -> Record {
        Record {
            op: Op::Touch,
            key: key.to_vec(),
            version: 0,
            flags: 0,
            exptime,
            value: Vec::new(),
        }
    }

    /// `flush_all` at `at` (0: now).
    pub fn flush(at: u32) -> Record {
        Record {
            op: Op::Flush,
            key: Vec::new(),
            version: 0,
            flags: 0,
            exptime: at,
            value: Vec::new(),
        }
    }

    /// What the record weighs against a byte budget (hand-off chunks, anti-entropy
    /// answers): its key and value plus 32 for the rest.
    pub fn weight(&self) -> usize {
        self.key.len() + self.value.len() + 32
    }
}

/// What applying a record did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    Stored,
    /// The key already holds this version or a newer one (last writer wins).
    Stale,
    /// Touch of a key that is not here, or an already-expired value.
    Ignored,
    NoMemory,
}

/// Applies a peer's record to the local store, keeping whichever version is newer.
pub fn apply(store: &Store, record: &Record, now: u32) -> Applied {
    match record.op {
        Op::Flush => {
            store.flush((record.exptime != 0).then_some(record.exptime));
            Applied::Stored
        }
        Op::Touch => store.with_entry(&record.key, now, |e| match e.item_mut() {
            Some(mut item) => {
                item.set_exptime(record.exptime);
                Applied::Stored
            }
            None => Applied::Ignored,
        }),
        Op::Set | Op::Delete => {
            let delete = record.op == Op::Delete;
            // An expired value, or a tombstone past its time (a delete carries its
            // tombstone's expiry, so copying it around never prolongs it).
            if record.exptime != 0 && record.exptime <= now {
                return Applied::Ignored;
            }
            store.with_entry(&record.key, now, |e| {
                if e.version().is_some_and(|v| v >= record.version) {
                    return Applied::Stale;
                }
                let meta = ItemMeta {
                    cas: record.version,
                    exptime: if delete && record.exptime == 0 {
                        now.saturating_add(DEFAULT_TOMBSTONE_TTL)
                    } else {
                        record.exptime
                    },
                    client_flags: record.flags,
                    bits: if delete { bits::TOMBSTONE } else { 0 },
                    ..ItemMeta::default()
                };
                match e.store_versioned(NewItem::new(&record.key, &[&record.value], meta)) {
                    Ok(_) => Applied::Stored,
                    Err(StoreError::OutOfMemory) => Applied::NoMemory,
                }
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreConfig;

    fn store() -> Store {
        Store::new(StoreConfig {
            memory_limit: 1 << 20,
            max_item_size: 1024,
            max_shards: 2,
            node_id: 1,
            ..StoreConfig::default()
        })
    }

    fn set(key: &str, version: u64, value: &str) -> Record {
        Record {
            op: Op::Set,
            key: key.into(),
            version,
            flags: 3,
            exptime: 0,
            value: value.into(),
        }
    }

    fn get(s: &Store, key: &str) -> Option<(Vec<u8>, u64)> {
        s.with_entry(key.as_bytes(), 100, |e| {
            e.item().map(|it| (it.value().to_vec(), it.cas()))
        })
    }

    #[test]
    fn last_writer_wins_whatever_the_arrival_order() {
        let orders = [[1, 2, 3], [3, 1, 2], [2, 3, 1]];
        for order in orders {
            let s = store();
            for v in order {
                apply(&s, &set("k", v, &format!("v{v}")), 100);
            }
            assert_eq!(get(&s, "k"), Some((b"v3".to_vec(), 3)));
        }
    }

    #[test]
    fn tombstones_keep_older_copies_from_coming_back() {
        let s = store();
        apply(&s, &set("k", 5, "old"), 100);
        let delete = Record {
            op: Op::Delete,
            ..set("k", 6, "")
        };
        assert_eq!(apply(&s, &delete, 100), Applied::Stored);
        assert_eq!(get(&s, "k"), None);
        assert_eq!(apply(&s, &set("k", 5, "old"), 100), Applied::Stale);
        assert_eq!(get(&s, "k"), None);
        // A newer write after the delete is accepted.
        assert_eq!(apply(&s, &set("k", 7, "new"), 100), Applied::Stored);
        assert_eq!(get(&s, "k"), Some((b"new".to_vec(), 7)));
    }

    #[test]
    fn a_tombstone_keeps_its_expiry_wherever_it_is_copied() {
        let s = store();
        let delete = Record {
            op: Op::Delete,
            exptime: 130,
            ..set("k", 6, "")
        };
        assert_eq!(apply(&s, &delete, 100), Applied::Stored);
        let copied = s
            .with_entry(b"k", 100, |e| e.current().map(Record::of))
            .unwrap();
        assert_eq!(copied.exptime, 130);
        // Past its time a tombstone is nothing: it neither lands nor hides an older value.
        let other = store();
        assert_eq!(apply(&other, &delete, 130), Applied::Ignored);
        assert_eq!(apply(&other, &set("k", 5, "old"), 130), Applied::Stored);
    }

    #[test]
    fn records_round_trip_items() {
        let s = store();
        apply(&s, &set("k", 9, "value"), 100);
        let record = s
            .with_entry(b"k", 100, |e| e.item().map(Record::of))
            .unwrap();
        assert_eq!(record, set("k", 9, "value"));
    }
}
