//! Node-to-node traffic: replication of writes to a key's other owners, hand-off of items
//! to their new owners when the ring changes, refill of a restarted node, read-through.
//!
//! - `wire`: the frame format (the one definition of the peer protocol).
//! - `conn`: opening and accepting peer connections, plain TCP or TLS, as one stream type.
//! - `link`: outgoing connections to each peer, with bounded queues and acknowledgements.
//! - `server`: the peer port, applying what peers send.
//! - `handoff`: streaming items to new owners after a ring change, and refilling.
//! - `replicate`: sending a client's writes to the keys' other owners, and how many of them
//!   must acknowledge before the client is answered (`--write-acks`).
//! - `anti_entropy`: replicas comparing digests of what they hold and pulling what they
//!   missed (after a partition, a restart, a dropped queue).

pub mod anti_entropy;
pub mod conn;
pub mod handoff;
pub mod link;
pub mod replicate;
pub mod server;
pub mod wire;

use crate::store::{bits, ItemMeta, ItemRef, NewItem, Store, StoreError};
use wire::{Op, Record};

/// Default of `--tombstone-ttl`, in seconds: how long a delete's tombstone outlives the
/// item, so that an older copy arriving later (a late replication, a hand-off, a replica
/// that was cut off and comes back through anti-entropy) cannot bring the key back. A delete
/// survives a partition shorter than this (less one anti-entropy interval).
pub const DEFAULT_TOMBSTONE_TTL: u32 = 300;

/// The record that reproduces `item` (a value, or a tombstone) on a peer.
pub fn record_of(item: ItemRef<'_>) -> Record {
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

/// What a record weighs against a byte budget: its key and value plus 32 for the rest.
pub fn record_bytes(record: &Record) -> usize {
    record.key.len() + record.value.len() + 32
}

/// What a peer streamed back and this node applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub records: u64,
    /// Their `record_bytes`.
    pub bytes: usize,
}

/// Applies the `Records` a peer streams in answer to a request (a refill pull, an
/// anti-entropy round's versions) until its `PullDone`.
pub async fn apply_until_done<S: tokio::io::AsyncRead + Unpin + ?Sized>(
    store: &Store,
    stream: &mut S,
    buf: &mut bytes::BytesMut,
) -> Result<Received, String> {
    let mut received = Received::default();
    loop {
        match conn::read_frame(stream, buf).await? {
            wire::Frame::Records { records, .. } => {
                let now = crate::store::now_secs();
                for record in &records {
                    apply(store, record, now);
                    received.bytes += record_bytes(record);
                }
                received.records += records.len() as u64;
            }
            wire::Frame::PullDone { .. } => return Ok(received),
            other => return Err(format!("unexpected frame {other:?}")),
        }
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
            .with_entry(b"k", 100, |e| e.current().map(record_of))
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
            .with_entry(b"k", 100, |e| e.item().map(record_of))
            .unwrap();
        assert_eq!(record, set("k", 9, "value"));
    }
}
