//! Moving data when the ring changes, so scaling keeps the cache warm.
//!
//! After every member-list change each node walks its store in small chunks and sends every
//! item to the members that own it under the new ring but did not under the old one. Each
//! chunk waits for its acknowledgements before the next starts, which bounds the data in
//! flight and keeps hand-off traffic from crowding out clients. A departing member (no
//! longer in the list) owns nothing, so it hands everything over; the operator waits for
//! its `GET /cluster` to report the hand-off done before removing its pod. A chunk with a
//! send that was not acknowledged (an owner restarting, a partition, a full link) is sent
//! again after a pause, until every item is acknowledged or a newer list supersedes it: a
//! hand-off is done only when nothing is left behind, so the operator never removes a
//! node whose data did not arrive (its hand-off deadline bounds the wait).
//!
//! A node that restarts empty while still listed pulls back what it owns (`refill`).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::join_all;
use tokio::io::AsyncWrite;
use tokio::sync::{oneshot, watch};

use super::conn::{self, send};
use super::wire::{self, Frame};
use super::{PeerError, Replicator};
use crate::cluster::ClusterView;
use crate::record::Record;
use crate::store::{now_secs, ScanCursor};

/// Items looked at per chunk (one shard lock each); a chunk also ends once its records
/// reach `--handoff-batch-bytes`.
const CHUNK: usize = 256;
/// How long a chunk waits for its acknowledgements before counting them failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// Pauses before a chunk is sent again: the first, and the longest (short enough that a
/// newer member list is noticed soon).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Bound on a refill from one peer.
const REFILL_TIMEOUT: Duration = Duration::from_secs(60);

/// Progress of hand-offs, reported on `GET /cluster`.
#[derive(Debug, Default)]
pub struct HandoffState {
    /// Member-list version of the hand-off under way or last finished.
    pub version: AtomicU64,
    pub running: AtomicBool,
    /// Whether the hand-off for `version` has finished.
    pub done: AtomicBool,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    /// Sends not acknowledged; their chunk is sent again.
    pub failed: AtomicU64,
    /// Items received by refills.
    pub refilled: AtomicU64,
}

/// Follows member-list changes until `shutdown`, handing items to their new owners.
pub async fn run(replicator: Arc<Replicator>, rate: u64, mut shutdown: watch::Receiver<bool>) {
    let cluster = &replicator.cluster;
    let links = &replicator.links;
    let mut changes = cluster.subscribe();
    // The ring whose hand-off last completed. A hand-off cut short by a newer change does
    // not move it: the next one compares against what was really delivered, so owners
    // added by the interrupted change still get their items.
    let mut delivered = cluster.view();
    loop {
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let next = cluster.view();
        links.retain(&next.list.members);
        if delivered.list.members.is_empty() {
            replicator.handoff.version.store(next.list.version, Relaxed);
            replicator.handoff.done.store(true, Relaxed);
            delivered = next;
        } else if hand_off(&replicator, &delivered, &next, rate).await {
            delivered = next;
        }
    }
}

/// Sends every item to its owners under `next` that were not its owners under `previous`.
/// Returns false when a newer member list cut it short.
async fn hand_off(
    replicator: &Replicator,
    previous: &ClusterView,
    next: &ClusterView,
    rate: u64,
) -> bool {
    let state = &replicator.handoff;
    let (cluster, links) = (&replicator.cluster, &replicator.links);
    let started = std::time::Instant::now();
    let mut sent_here: u64 = 0;
    let version = next.list.version;
    state.version.store(version, Relaxed);
    state.done.store(false, Relaxed);
    state.running.store(true, Relaxed);
    let me = cluster.node_name();
    tracing::info!(version, "hand-off started");
    let mut retry = RETRY_FIRST;
    for shard in 0..replicator.store.shard_count() {
        let mut cursor = Some(ScanCursor::default());
        while let Some(start) = cursor {
            if cluster.view().list.version != version {
                // Superseded: the next change starts a hand-off of its own.
                state.running.store(false, Relaxed);
                return false;
            }
            let mut batch: Vec<(kache_cluster::Member, Record)> = Vec::new();
            let mut batch_bytes = 0;
            let budget = replicator.limits.handoff_batch_bytes;
            cursor = replicator
                .store
                .scan(shard, start, CHUNK, now_secs(), |item| {
                    let key = item.key();
                    let before = previous.owners(key);
                    for owner in next.owners(key) {
                        if owner.name != me && !before.iter().any(|b| b.name == owner.name) {
                            batch_bytes += key.len() + item.value().len();
                            batch.push((owner.clone(), Record::of(item)));
                        }
                    }
                    if batch_bytes >= budget {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
            if batch.is_empty() {
                continue;
            }
            let mut acks = Vec::with_capacity(batch.len());
            let mut failed = 0;
            for (owner, record) in batch {
                let (tx, rx) = oneshot::channel();
                if links.send(&owner, record, Some(tx)) {
                    acks.push(rx);
                } else {
                    failed += 1;
                }
            }
            state.sent.fetch_add(acks.len() as u64, Relaxed);
            sent_here += acks.len() as u64;
            let waited = acks.len() as u64;
            match tokio::time::timeout(ACK_TIMEOUT, join_all(acks)).await {
                Ok(results) => {
                    let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
                    state.acked.fetch_add(ok, Relaxed);
                    failed += waited - ok;
                }
                Err(_) => failed += waited.max(1),
            }
            if failed > 0 {
                // The same chunk again, read afresh from the store (so a newer write is what
                // goes): records carry their versions, so a copy that did arrive is kept.
                state.failed.fetch_add(failed, Relaxed);
                if retry == RETRY_FIRST {
                    // Once per stall, not per attempt: a long outage retries every RETRY_MAX.
                    tracing::warn!(
                        version,
                        shard,
                        failed,
                        "hand-off chunk not acknowledged; sending it again until it is"
                    );
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                cursor = Some(start);
                continue;
            }
            retry = RETRY_FIRST;
            // Throttle to `rate` items per second.
            let due = Duration::from_secs_f64(sent_here as f64 / rate.max(1) as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    state.running.store(false, Relaxed);
    state.done.store(true, Relaxed);
    tracing::info!(
        version,
        sent = state.sent.load(Relaxed),
        acked = state.acked.load(Relaxed),
        failed = state.failed.load(Relaxed),
        "hand-off finished"
    );
    true
}

/// Answers a refill pull: streams every item the calling member owns, in batches.
pub async fn stream_owned_by<W: AsyncWrite + Unpin>(
    replicator: &Replicator,
    stream: &mut W,
    seq: u64,
    caller: &str,
) -> Result<u64, PeerError> {
    let view = replicator.cluster.view();
    let mut sent = 0u64;
    let mut out = BytesMut::new();
    for shard in 0..replicator.store.shard_count() {
        let mut cursor = Some(ScanCursor::default());
        while let Some(start) = cursor {
            let mut records = Vec::new();
            let mut bytes = 0;
            let budget = replicator.limits.handoff_batch_bytes;
            cursor = replicator
                .store
                .scan(shard, start, CHUNK, now_secs(), |item| {
                    if view.owners(item.key()).iter().any(|m| m.name == caller) {
                        bytes += item.key().len() + item.value().len();
                        records.push(Record::of(item));
                    }
                    if bytes >= budget {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                });
            if records.is_empty() {
                continue;
            }
            sent += records.len() as u64;
            out.clear();
            wire::encode(&Frame::Records { seq, records }, &mut out);
            send(stream, &out).await?;
        }
    }
    Ok(sent)
}

/// Pulls back, from every other member, the items this node owns. Used when a node starts
/// empty while the member list already names it.
pub async fn refill(replicator: &Replicator) {
    let cluster = &replicator.cluster;
    let view = cluster.view();
    let me = cluster.node_name().to_string();
    let peers: Vec<_> = view
        .list
        .members
        .iter()
        .filter(|m| m.name != me)
        .cloned()
        .collect();
    let pulls = peers.iter().map(|peer| async {
        let result = tokio::time::timeout(REFILL_TIMEOUT, pull_from(replicator, &me, peer)).await;
        match result {
            Ok(Ok(n)) => {
                replicator.handoff.refilled.fetch_add(n, Relaxed);
                tracing::info!(peer = %peer.name, items = n, "refilled");
            }
            Ok(Err(error)) => tracing::warn!(peer = %peer.name, %error, "refill failed"),
            Err(_) => tracing::warn!(peer = %peer.name, "refill timed out"),
        }
    });
    join_all(pulls).await;
}

async fn pull_from(
    replicator: &Replicator,
    me: &str,
    peer: &kache_cluster::Member,
) -> Result<u64, PeerError> {
    // Over TLS when the node has it, like every connection to a peer.
    let tls = replicator.links.tls();
    let mut stream = conn::open(tls.as_deref(), peer, me, &replicator.secret).await?;
    let mut out = BytesMut::new();
    wire::encode(
        &Frame::Pull {
            seq: 1,
            ring_version: 0,
        },
        &mut out,
    );
    send(&mut stream, &out).await?;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let received = super::apply_until_done(&replicator.store, &mut stream, &mut buf).await?;
    conn::close(&mut stream).await;
    Ok(received.records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::peer::server;
    use crate::record::{apply, Op};
    use kache_cluster::{Member, MemberList};
    use tokio::net::TcpListener;

    const WAIT: Duration = Duration::from_secs(10);
    const KEYS: usize = 200;

    /// Nodes `a` and `b` with their peer ports on loopback.
    struct Pair {
        nodes: Vec<Arc<Replicator>>,
        members: Vec<Member>,
        _stop: watch::Sender<bool>,
    }

    async fn pair() -> Pair {
        pair_serving(true).await.0
    }

    /// Nodes `a` and `b`; unless `b_serves`, nothing listens on b's peer port until the
    /// function returned is called.
    async fn pair_serving(b_serves: bool) -> (Pair, impl FnOnce()) {
        let (stop, stopped) = watch::channel(false);
        let mut nodes = Vec::new();
        let mut members = Vec::new();
        let mut b_port = 0;
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            b_port = listener.local_addr().unwrap().port();
            members.push(Member {
                name: name.into(),
                host: "127.0.0.1".into(),
                ip: "127.0.0.1".into(),
                // The ring places members by client address.
                port: 20_000 + i as u16,
                peer_port: listener.local_addr().unwrap().port(),
            });
            let node = crate::peer::test_replicator(Arc::new(Cluster::new(name)), i as u64 + 1);
            if b_serves || name == "a" {
                tokio::spawn(server::serve(listener, node.clone(), None, stopped.clone()));
            }
            nodes.push(node);
        }
        let b = nodes[1].clone();
        // b's port was bound and released: it is free again for b's server.
        let start_b = move || {
            let listener = std::net::TcpListener::bind(("127.0.0.1", b_port)).unwrap();
            listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(listener).unwrap();
            tokio::spawn(server::serve(listener, b, None, stopped));
        };
        (
            Pair {
                nodes,
                members,
                _stop: stop,
            },
            start_b,
        )
    }

    fn list(version: u64, members: &[Member]) -> MemberList {
        MemberList {
            version,
            replication_factor: 1,
            members: members.to_vec(),
        }
    }

    fn fill(node: &Replicator) {
        for i in 0..KEYS {
            let record = Record {
                op: Op::Set,
                key: format!("key-{i}").into_bytes(),
                version: 10,
                flags: 0,
                exptime: 0,
                value: b"value".to_vec(),
            };
            apply(&node.store, &record, now_secs());
        }
    }

    /// The keys of `0..KEYS` that `name` owns under `members`.
    fn owned_by(name: &str, members: &[Member]) -> Vec<String> {
        let view = ClusterView::new(list(1, members), name);
        (0..KEYS)
            .map(|i| format!("key-{i}"))
            .filter(|k| view.owners(k.as_bytes()).iter().any(|m| m.name == name))
            .collect()
    }

    fn holds(node: &Replicator, key: &str) -> bool {
        node.store
            .with_entry(key.as_bytes(), now_secs(), |e| e.item().is_some())
    }

    #[tokio::test]
    async fn a_ring_change_hands_each_item_to_its_new_owner() {
        let pair = pair().await;
        let (a, b) = (&pair.nodes[0], &pair.nodes[1]);
        fill(a);
        let before = ClusterView::new(list(1, &pair.members[..1]), "a");
        // b joins: what it now owns moves to it.
        a.cluster.update(list(2, &pair.members));
        b.cluster.update(list(2, &pair.members));
        let next = a.cluster.view();
        let finished = tokio::time::timeout(WAIT, hand_off(a, &before, &next, 1_000_000)).await;
        assert_eq!(finished, Ok(true));
        assert!(a.handoff.done.load(Relaxed));
        assert_eq!(a.handoff.version.load(Relaxed), 2);
        let moved = owned_by("b", &pair.members);
        assert!(!moved.is_empty() && moved.len() < KEYS, "{}", moved.len());
        assert_eq!(a.handoff.sent.load(Relaxed), moved.len() as u64);
        assert_eq!(a.handoff.acked.load(Relaxed), moved.len() as u64);
        assert_eq!(a.handoff.failed.load(Relaxed), 0);
        for i in 0..KEYS {
            let key = format!("key-{i}");
            assert_eq!(holds(b, &key), moved.contains(&key), "{key}");
        }
    }

    #[tokio::test]
    async fn a_hand_off_to_an_unreachable_owner_waits_and_delivers_everything_once_it_answers() {
        let (pair, start_b) = pair_serving(false).await;
        let (a, b) = (pair.nodes[0].clone(), pair.nodes[1].clone());
        fill(&a);
        let before = ClusterView::new(list(1, &pair.members[..1]), "a");
        a.cluster.update(list(2, &pair.members));
        b.cluster.update(list(2, &pair.members));
        let next = a.cluster.view();
        let running = {
            let a = a.clone();
            tokio::spawn(async move { hand_off(&a, &before, &next, 1_000_000).await })
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while a.handoff.failed.load(Relaxed) < 2 {
            assert!(tokio::time::Instant::now() < deadline, "no send failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Sends failed twice: the hand-off is still under way, not done with a loss.
        assert!(a.handoff.running.load(Relaxed) && !a.handoff.done.load(Relaxed));
        start_b();
        let finished = tokio::time::timeout(WAIT * 2, running)
            .await
            .unwrap()
            .unwrap();
        assert!(finished);
        assert!(a.handoff.done.load(Relaxed) && !a.handoff.running.load(Relaxed));
        let moved = owned_by("b", &pair.members);
        assert!(!moved.is_empty());
        for key in &moved {
            assert!(holds(&b, key), "{key} was not delivered");
        }
        assert!(a.handoff.acked.load(Relaxed) >= moved.len() as u64);
    }

    #[tokio::test]
    async fn a_refill_pulls_back_exactly_what_the_node_owns() {
        let pair = pair().await;
        let (a, b) = (&pair.nodes[0], &pair.nodes[1]);
        fill(a);
        a.cluster.update(list(1, &pair.members));
        b.cluster.update(list(1, &pair.members));
        refill(b).await;
        let mine = owned_by("b", &pair.members);
        assert!(!mine.is_empty() && mine.len() < KEYS, "{}", mine.len());
        assert_eq!(b.handoff.refilled.load(Relaxed), mine.len() as u64);
        for i in 0..KEYS {
            let key = format!("key-{i}");
            assert_eq!(holds(b, &key), mine.contains(&key), "{key}");
        }
    }

    #[tokio::test]
    async fn a_refill_from_an_unreachable_peer_brings_nothing() {
        let pair = pair().await;
        let b = &pair.nodes[1];
        let mut members = pair.members.clone();
        // a's peer port, bound and released: nothing listens there.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap();
        members[0].peer_port = gone.local_addr().unwrap().port();
        drop(gone);
        b.cluster.update(list(1, &members));
        tokio::time::timeout(WAIT, refill(b)).await.unwrap();
        assert_eq!(b.handoff.refilled.load(Relaxed), 0);
    }
}
