//! Replicating a client's writes to the keys' other owners, and deciding when a write counts
//! as acknowledged (`--write-acks`).
//!
//! A write is applied by the node that receives it, then sent to the key's other owners. The
//! client's reply waits (up to `--write-timeout-ms`) for their acknowledgements:
//!
//! - `one`: the write is acknowledged once this node has applied it. The reply still waits
//!   for the other owners that are up, so in a healthy cluster every owner has the write when
//!   the client hears back; an owner that is down or slow is left to catch up later (its
//!   queue, anti-entropy). A write acknowledged while an owner was unreachable lives on fewer
//!   owners until then: losing those nodes loses it.
//! - `quorum`: a majority of the key's owners (this node included) must have applied it.
//! - `all`: every owner must have applied it. An owner that is down counts as a refusal at
//!   once, without waiting.
//!
//! A write that falls short is answered `SERVER_ERROR` (memcached's reply for a write the
//! server could not carry out). Its outcome is then unknown, as after any server error: the
//! owners that did apply it keep it, and anti-entropy spreads it once they can reach the
//! others. Only value changes (sets, deletes) are judged; touches and `flush_all` are sent
//! to the other owners without a verdict.
//! Under `quorum`/`all` a delete that finds nothing here is a delete too (the engine leaves
//! a tombstone for it), so its `NOT_FOUND` is judged like a `DELETED`.

use std::str::FromStr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use futures::future::join_all;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Replicator;
use crate::record::{Op, Record};

/// How many of a key's owners must have a write before it is acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum WriteAcks {
    #[default]
    One,
    Quorum,
    All,
}

/// A `--write-acks` value that is none of `one`, `quorum`, `all`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown write-acks mode {0:?}: use one, quorum or all")]
pub struct UnknownWriteAcks(String);

impl FromStr for WriteAcks {
    type Err = UnknownWriteAcks;
    fn from_str(text: &str) -> Result<WriteAcks, UnknownWriteAcks> {
        match text {
            "one" => Ok(WriteAcks::One),
            "quorum" => Ok(WriteAcks::Quorum),
            "all" => Ok(WriteAcks::All),
            other => Err(UnknownWriteAcks(other.to_string())),
        }
    }
}

impl WriteAcks {
    /// Acknowledgements needed from other nodes for a key with `owners` owners, when this
    /// node is (`local_owner`) or is not one of them.
    pub fn required(self, owners: usize, local_owner: bool) -> usize {
        let mine = usize::from(local_owner);
        match self {
            WriteAcks::One => 0,
            WriteAcks::Quorum => (owners / 2 + 1).saturating_sub(mine),
            WriteAcks::All => owners.saturating_sub(mine),
        }
    }
}

/// When a replicated write is acknowledged.
#[derive(Clone, Debug)]
pub struct Durability {
    pub write_acks: WriteAcks,
    /// Longest wait for the other owners' acknowledgements.
    pub write_timeout: Duration,
}

impl Default for Durability {
    fn default() -> Durability {
        Durability {
            write_acks: WriteAcks::One,
            write_timeout: Duration::from_secs(1),
        }
    }
}

/// What one record waits for.
struct Wait {
    /// Acknowledgements that make it count as replicated (0: none judged).
    required: usize,
    acks: Vec<oneshot::Receiver<()>>,
}

/// Sends `records` (one batch of a client's changes) to their keys' other owners and waits,
/// bounded by the write timeout. Returns, per record, whether it was acknowledged as
/// `--write-acks` requires.
pub async fn replicate(replicator: &Replicator, records: Vec<Record>) -> Vec<bool> {
    let (cluster, links) = (&replicator.cluster, &replicator.links);
    let policy = &replicator.durability;
    let view = cluster.view();
    let me = cluster.node_name();
    let mut waits = Vec::with_capacity(records.len());
    for record in records {
        let targets: Vec<&kache_cluster::Member> = if record.op == Op::Flush {
            view.list.members.iter().collect()
        } else {
            view.owners(&record.key)
        };
        let local_owner = targets.iter().any(|m| m.name == me);
        let required = match record.op {
            Op::Set | Op::Delete => policy.write_acks.required(targets.len(), local_owner),
            Op::Touch | Op::Flush => 0,
        };
        let mut acks = Vec::new();
        for member in targets.into_iter().filter(|m| m.name != me) {
            // A peer that is down gets the record when it reconnects (or from anti-entropy),
            // but nobody waits for it.
            if links.is_down(member) {
                links.send(member, record.clone(), None);
            } else {
                let (tx, rx) = oneshot::channel();
                if links.send(member, record.clone(), Some(tx)) {
                    acks.push(rx);
                }
            }
        }
        waits.push(Wait { required, acks });
    }
    let deadline = Instant::now() + policy.write_timeout;
    let outcomes = join_all(waits.into_iter().map(|w| wait(w, deadline))).await;
    if outcomes.iter().any(|o| o.timed_out) {
        replicator.stats.replication_timeouts.fetch_add(1, Relaxed);
    }
    outcomes.into_iter().map(|o| o.acknowledged).collect()
}

struct Outcome {
    acknowledged: bool,
    timed_out: bool,
}

/// Waits for one record's acknowledgements: until `required` have come (or, when none is
/// required, until every owner that is up has answered), or the deadline.
async fn wait(w: Wait, deadline: Instant) -> Outcome {
    if w.acks.len() < w.required {
        // Too few owners are up to ever meet the requirement: fail now, not at the deadline.
        return Outcome {
            acknowledged: false,
            timed_out: false,
        };
    }
    let target = if w.required == 0 {
        w.acks.len()
    } else {
        w.required
    };
    let mut pending: FuturesUnordered<_> = w.acks.into_iter().collect();
    let mut got = 0;
    let mut timed_out = false;
    while got < target {
        match tokio::time::timeout_at(deadline, pending.next()).await {
            Ok(Some(Ok(()))) => got += 1,
            // The link dropped the record (connection lost before the peer applied it).
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                timed_out = true;
                break;
            }
        }
    }
    Outcome {
        acknowledged: got >= w.required,
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requirements_by_mode() {
        // Two owners, this node one of them.
        assert_eq!(WriteAcks::One.required(2, true), 0);
        assert_eq!(WriteAcks::Quorum.required(2, true), 1);
        assert_eq!(WriteAcks::All.required(2, true), 1);
        // Three owners: a quorum is two, this node included.
        assert_eq!(WriteAcks::Quorum.required(3, true), 1);
        assert_eq!(WriteAcks::All.required(3, true), 2);
        // A node that does not own the key counts for nothing.
        assert_eq!(WriteAcks::Quorum.required(3, false), 2);
        assert_eq!(WriteAcks::All.required(2, false), 2);
        // No replication at all.
        assert_eq!(WriteAcks::All.required(1, true), 0);
    }

    #[test]
    fn modes_parse_by_name() {
        assert_eq!("all".parse(), Ok(WriteAcks::All));
        assert_eq!("quorum".parse(), Ok(WriteAcks::Quorum));
        assert_eq!("one".parse(), Ok(WriteAcks::One));
        assert!("two".parse::<WriteAcks>().is_err());
    }

    #[tokio::test]
    async fn a_record_counts_once_enough_owners_answered() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (tx1, rx1) = oneshot::channel();
        let (_tx2, rx2) = oneshot::channel::<()>();
        tx1.send(()).unwrap();
        // One of two is enough for a quorum of three: the silent one is not waited for.
        let w = Wait {
            required: 1,
            acks: vec![rx1, rx2],
        };
        let outcome = wait(w, deadline).await;
        assert!(outcome.acknowledged && !outcome.timed_out);
    }

    #[tokio::test]
    async fn a_silent_or_missing_owner_fails_an_all_write() {
        let (_tx, rx) = oneshot::channel::<()>();
        let soon = Instant::now() + Duration::from_millis(50);
        let outcome = wait(
            Wait {
                required: 1,
                acks: vec![rx],
            },
            soon,
        )
        .await;
        assert!(!outcome.acknowledged && outcome.timed_out);
        // An owner known to be down: refused at once.
        let far = Instant::now() + Duration::from_secs(60);
        let started = Instant::now();
        let outcome = wait(
            Wait {
                required: 1,
                acks: vec![],
            },
            far,
        )
        .await;
        assert!(!outcome.acknowledged);
        assert!(started.elapsed() < Duration::from_secs(1));
        // A dropped record (the link lost it) is no acknowledgement.
        let (tx, rx) = oneshot::channel::<()>();
        drop(tx);
        let outcome = wait(
            Wait {
                required: 1,
                acks: vec![rx],
            },
            far,
        )
        .await;
        assert!(!outcome.acknowledged && !outcome.timed_out);
    }

    #[tokio::test]
    async fn one_waits_for_the_owners_that_are_up_but_never_fails() {
        let (_tx, rx) = oneshot::channel::<()>();
        let soon = Instant::now() + Duration::from_millis(50);
        let outcome = wait(
            Wait {
                required: 0,
                acks: vec![rx],
            },
            soon,
        )
        .await;
        assert!(outcome.acknowledged && outcome.timed_out);
    }
}
