//! Anti-entropy: the owners of a key reconcile what one of them missed — writes made while
//! it was cut off by a partition, paused or restarting, records its peers dropped from a
//! full queue or lost with a broken connection — without waiting for a hand-off that may
//! never come.
//!
//! Every `--anti-entropy-interval`, and whenever a link between it and a peer comes back up
//! (its own link, or the peer's link to it: the peer may have dropped records meant for
//! it), a node runs a round with each peer it shares keys with. A round is a pull:
//!
//! 1. The node sends a digest per arc of the key-hash space (`ARCS` equal ranges) over the
//!    items and tombstones it holds whose keys both nodes own. A digest is an
//!    order-independent fold of (key hash, version), so equal arcs match without listing
//!    them. The peer computes the same over what it holds and names the arcs that differ.
//! 2. For those arcs (a group at a time, at most `MAX_ENTRIES` entries per request) the node
//!    sends its (key hash, version) pairs; the peer answers with its items that are newer or
//!    that the node lacks, up to a byte budget, and the node applies them (last writer wins,
//!    as for any record).
//!
//! Each side pulls for itself, so after a partition heals both sides run their own rounds.
//! Tombstones take part, which is how a delete reaches a replica that missed it — while the
//! tombstone lives (`--tombstone-ttl`): an older copy outliving it comes back. Touches
//! (expiry changes without a new version) are not reconciled.
//!
//! Bounds: one request carries at most `MAX_ENTRIES` entries (1 MiB), one answer at most
//! `MAX_ANSWER_BYTES` of records (less when `--anti-entropy-rate` is lower), and the pulling
//! node waits between requests so that it takes at most `--anti-entropy-rate` bytes per
//! second. Each round walks the store a chunk per lock, yielding in between.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kache_cluster::Member;
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use super::conn::{self, send};
use super::wire::{self, Frame, BATCH_BYTES};
use super::{PeerError, Replicator};
use crate::cluster::ClusterView;
use crate::record::Record;
use crate::store::{now_secs, ItemRef, ScanCursor, Store};
use crate::tls::Tls;

/// Arcs of the key-hash space compared with each peer (a power of two).
pub const ARCS: usize = 1024;
const ARC_SHIFT: u32 = 64 - ARCS.trailing_zeros();
/// Records looked at per store lock.
const CHUNK: usize = 256;
/// Most (key hash, version) entries one `Versions` request carries: 1 MiB.
pub const MAX_ENTRIES: usize = 65_536;
/// Most bytes of records one answer carries.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;
/// A round with one peer gives up after this long.
const ROUND_TIMEOUT: Duration = Duration::from_secs(120);

/// Anti-entropy counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct AntiEntropyStats {
    /// Rounds completed with a peer.
    pub rounds: AtomicU64,
    /// Rounds that failed (peer unreachable, broken connection, timeout).
    pub failed_rounds: AtomicU64,
    /// Arcs found to differ, summed over rounds.
    pub arcs_differing: AtomicU64,
    /// Items and tombstones pulled from peers, and their bytes.
    pub items_pulled: AtomicU64,
    pub bytes_pulled: AtomicU64,
    /// Items and tombstones sent to peers that pulled them.
    pub items_served: AtomicU64,
}

/// `--anti-entropy-interval` and `--anti-entropy-rate`.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Time between rounds; zero turns anti-entropy off.
    pub interval: Duration,
    /// Most bytes of items pulled per second.
    pub rate: usize,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// A key's 64-bit hash, the same on every node and release (FNV-1a, then mixed so that the
/// high bits, which pick the arc, are uniform).
pub fn key_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    splitmix(h)
}

fn arc(hash: u64) -> usize {
    (hash >> ARC_SHIFT) as usize
}

/// One item's share of its arc's digest.
fn fold(hash: u64, version: u64) -> u64 {
    splitmix(hash ^ splitmix(version))
}

/// Whether both this node and `peer` own `key` under `view`.
fn shared(view: &ClusterView, me: &str, peer: &str, key: &[u8]) -> bool {
    let owners = view.owners(key);
    owners.iter().any(|m| m.name == me) && owners.iter().any(|m| m.name == peer)
}

/// A walk over the store's items and tombstones, one chunk per shard lock.
struct Walk {
    shard: usize,
    cursor: Option<ScanCursor>,
    now: u32,
}

impl Walk {
    fn new() -> Walk {
        Walk {
            shard: 0,
            cursor: Some(ScanCursor::default()),
            now: now_secs(),
        }
    }

    /// Calls `f` with the next chunk's items. False once the store is done.
    fn step(&mut self, store: &Store, mut f: impl FnMut(ItemRef<'_>)) -> bool {
        while self.shard < store.shard_count() {
            match self.cursor {
                Some(start) => {
                    self.cursor =
                        store.scan_with_tombstones(self.shard, start, CHUNK, self.now, |item| {
                            f(item);
                            ControlFlow::Continue(())
                        });
                    return true;
                }
                None => {
                    self.shard += 1;
                    self.cursor = Some(ScanCursor::default());
                }
            }
        }
        false
    }
}

/// Digest and item count of every arc, over what this node holds that it shares with `peer`.
struct Summary {
    digests: Vec<u64>,
    counts: Vec<usize>,
}

async fn summarize(replicator: &Replicator, view: &ClusterView, me: &str, peer: &str) -> Summary {
    let mut summary = Summary {
        digests: vec![0; ARCS],
        counts: vec![0; ARCS],
    };
    let mut walk = Walk::new();
    while walk.step(&replicator.store, |item| {
        if shared(view, me, peer, item.key()) {
            let hash = key_hash(item.key());
            summary.digests[arc(hash)] ^= fold(hash, item.cas());
            summary.counts[arc(hash)] += 1;
        }
    }) {
        tokio::task::yield_now().await;
    }
    summary
}

/// Splits `arcs` into groups whose items (by `counts`) fit one request.
fn group_arcs(arcs: &[u32], counts: &[usize]) -> Vec<Vec<u32>> {
    let mut groups: Vec<Vec<u32>> = Vec::new();
    let mut in_group = 0;
    for &a in arcs {
        let n = counts.get(a as usize).copied().unwrap_or(0);
        match groups.last_mut() {
            Some(group) if in_group + n <= MAX_ENTRIES => group.push(a),
            _ => {
                groups.push(vec![a]);
                in_group = 0;
            }
        }
        in_group += n;
    }
    groups
}

/// This node's (key hash, version) pairs in `arcs` for keys shared with `peer`, at most
/// `MAX_ENTRIES` of them.
async fn entries_in(
    replicator: &Replicator,
    view: &ClusterView,
    me: &str,
    peer: &str,
    arcs: &HashSet<usize>,
) -> Vec<(u64, u64)> {
    let mut entries = Vec::new();
    let mut walk = Walk::new();
    while walk.step(&replicator.store, |item| {
        let hash = key_hash(item.key());
        if entries.len() < MAX_ENTRIES
            && arcs.contains(&arc(hash))
            && shared(view, me, peer, item.key())
        {
            entries.push((hash, item.cas()));
        }
    }) {
        tokio::task::yield_now().await;
    }
    entries
}

/// Peer side of step 1: the arcs whose digest differs from the caller's.
pub async fn answer_digests(
    replicator: &Replicator,
    caller: &str,
    theirs: &[u64],
) -> Result<Vec<u32>, PeerError> {
    let cluster = &replicator.cluster;
    if theirs.len() != ARCS {
        return Err(PeerError::DigestCount {
            got: theirs.len(),
            expected: ARCS,
        });
    }
    let view = cluster.view();
    let mine = summarize(replicator, &view, cluster.node_name(), caller).await;
    Ok((0..ARCS)
        .filter(|&a| mine.digests[a] != theirs[a])
        .map(|a| a as u32)
        .collect())
}

/// Peer side of step 2: sends, as `Records` frames numbered `seq`, the items in `arcs` that
/// the caller lacks or holds an older version of, up to `max_bytes`. Returns how many.
pub async fn answer_versions<W: AsyncWrite + Unpin + ?Sized>(
    replicator: &Replicator,
    stream: &mut W,
    seq: u64,
    caller: &str,
    max_bytes: usize,
    arcs: &[u32],
    entries: &[(u64, u64)],
) -> Result<u64, PeerError> {
    let cluster = &replicator.cluster;
    // What this node's own rounds send; more is a confused or hostile peer.
    if entries.len() > MAX_ENTRIES || arcs.len() > ARCS {
        return Err(PeerError::OverLimits {
            arcs: arcs.len(),
            entries: entries.len(),
        });
    }
    let view = cluster.view();
    let me = cluster.node_name();
    let arcs: HashSet<usize> = arcs.iter().map(|&a| a as usize).collect();
    let theirs: HashMap<u64, u64> = entries.iter().copied().collect();
    let max_bytes = max_bytes.min(MAX_ANSWER_BYTES);
    let mut budget_left = max_bytes;
    let mut batch: Vec<Record> = Vec::new();
    let mut batch_bytes = 0;
    let mut sent = 0u64;
    let mut out = BytesMut::new();
    let mut walk = Walk::new();
    while budget_left > 0
        && walk.step(&replicator.store, |item| {
            let hash = key_hash(item.key());
            let newer = theirs.get(&hash).is_none_or(|&v| v < item.cas());
            if budget_left > 0
                && newer
                && arcs.contains(&arc(hash))
                && shared(&view, me, caller, item.key())
            {
                let record = Record::of(item);
                let size = record.weight();
                budget_left = budget_left.saturating_sub(size);
                batch_bytes += size;
                batch.push(record);
            }
        })
    {
        if batch_bytes >= BATCH_BYTES {
            sent += flush(stream, seq, &mut batch, &mut out).await?;
            batch_bytes = 0;
        }
        tokio::task::yield_now().await;
    }
    sent += flush(stream, seq, &mut batch, &mut out).await?;
    replicator
        .anti_entropy
        .items_served
        .fetch_add(sent, Relaxed);
    Ok(sent)
}

async fn flush<W: AsyncWrite + Unpin + ?Sized>(
    stream: &mut W,
    seq: u64,
    batch: &mut Vec<Record>,
    out: &mut BytesMut,
) -> Result<u64, PeerError> {
    if batch.is_empty() {
        return Ok(0);
    }
    let records = std::mem::take(batch);
    let count = records.len() as u64;
    out.clear();
    wire::encode(&Frame::Records { seq, records }, out);
    send(stream, out).await?;
    Ok(count)
}

/// What one round with a peer did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RoundReport {
    pub arcs_differing: usize,
    pub items_pulled: u64,
    /// Whether an answer was cut at its byte budget: more may be waiting.
    pub saturated: bool,
}

/// One anti-entropy round with `peer`: pulls what this node misses of the keys both own.
pub async fn round(
    replicator: &Replicator,
    view: &ClusterView,
    me: &str,
    peer: &Member,
    tls: Option<&Tls>,
    rate: usize,
) -> Result<RoundReport, PeerError> {
    let started = Instant::now();
    let stats = &replicator.anti_entropy;
    let mine = summarize(replicator, view, me, &peer.name).await;
    let mut stream = conn::open(tls, peer, me, &replicator.secret).await?;
    let mut out = BytesMut::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut seq = 1;
    wire::encode(
        &Frame::Digests {
            seq,
            digests: mine.digests.clone(),
        },
        &mut out,
    );
    send(&mut stream, &out).await?;
    let differing = match conn::read_frame(&mut stream, &mut buf).await? {
        Frame::DigestDiff { arcs, .. } => arcs,
        other => return Err(PeerError::UnexpectedFrame(Box::new(other))),
    };
    let mut report = RoundReport {
        arcs_differing: differing.len(),
        ..RoundReport::default()
    };
    stats
        .arcs_differing
        .fetch_add(differing.len() as u64, Relaxed);
    let max_bytes = rate.clamp(1, MAX_ANSWER_BYTES);
    let mut pulled_bytes = 0usize;
    for group in group_arcs(&differing, &mine.counts) {
        let arcs: HashSet<usize> = group.iter().map(|&a| a as usize).collect();
        let entries = entries_in(replicator, view, me, &peer.name, &arcs).await;
        seq += 1;
        out.clear();
        wire::encode(
            &Frame::Versions {
                seq,
                max_bytes: u32::try_from(max_bytes).unwrap_or(u32::MAX),
                arcs: group,
                entries,
            },
            &mut out,
        );
        send(&mut stream, &out).await?;
        let received = super::apply_until_done(&replicator.store, &mut stream, &mut buf).await?;
        let answer_bytes = received.bytes;
        report.items_pulled += received.records;
        stats.items_pulled.fetch_add(received.records, Relaxed);
        stats.bytes_pulled.fetch_add(answer_bytes as u64, Relaxed);
        report.saturated |= answer_bytes >= max_bytes;
        pulled_bytes += answer_bytes;
        // Keep to `rate` bytes per second.
        let due = Duration::from_secs_f64(pulled_bytes as f64 / rate.max(1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    conn::close(&mut stream).await;
    Ok(report)
}

/// Runs rounds with every peer until `shutdown`: each interval, whenever a link comes back
/// up, and at once again after a round whose answers were cut at their budget.
pub async fn run(
    replicator: Arc<Replicator>,
    settings: Settings,
    mut shutdown: watch::Receiver<bool>,
) {
    let (cluster, links) = (&replicator.cluster, &replicator.links);
    if settings.interval.is_zero() {
        return;
    }
    let mut again = false;
    loop {
        if !again {
            tokio::select! {
                _ = tokio::time::sleep(settings.interval) => {}
                _ = links.metrics.came_up.notified() => {}
                _ = shutdown.changed() => return,
            }
        }
        again = false;
        let view = cluster.view();
        if view.me.is_none() || view.list.replication_factor < 2 {
            continue;
        }
        let me = cluster.node_name();
        let tls = links.tls();
        for peer in view.list.members.iter().filter(|m| m.name != me) {
            // The link to every peer stays open, so a peer coming back up wakes a round.
            links.open(peer);
            if links.is_down(peer) {
                continue;
            }
            let result = tokio::time::timeout(
                ROUND_TIMEOUT,
                round(&replicator, &view, me, peer, tls.as_deref(), settings.rate),
            )
            .await;
            match result {
                Ok(Ok(report)) => {
                    replicator.anti_entropy.rounds.fetch_add(1, Relaxed);
                    if report.items_pulled > 0 {
                        tracing::info!(
                            peer = %peer.name,
                            arcs = report.arcs_differing,
                            items = report.items_pulled,
                            "anti-entropy repaired"
                        );
                    }
                    again |= report.saturated;
                }
                Ok(Err(error)) => {
                    replicator.anti_entropy.failed_rounds.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %peer.name, %error, "anti-entropy round failed");
                }
                Err(_) => {
                    replicator.anti_entropy.failed_rounds.fetch_add(1, Relaxed);
                    tracing::debug!(peer = %peer.name, "anti-entropy round timed out");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Cluster;
    use crate::peer::server;
    use crate::peer::wire::Decoded;
    use crate::record::{apply, Op};
    use kache_cluster::MemberList;
    use tokio::net::TcpListener;

    fn member(name: &str, port: u16, peer_port: u16) -> Member {
        Member {
            name: name.into(),
            host: "127.0.0.1".into(),
            ip: "127.0.0.1".into(),
            port,
            peer_port,
        }
    }

    /// Two nodes `a` and `b` owning every key (R = 2), their peer ports on loopback.
    async fn pair() -> (Vec<Arc<Replicator>>, Vec<Member>, watch::Sender<bool>) {
        let (stop, stopped) = watch::channel(false);
        let mut listeners = Vec::new();
        let mut members = Vec::new();
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            members.push(member(name, 30_000 + i as u16, port));
            listeners.push(listener);
        }
        let list = MemberList {
            version: 1,
            replication_factor: 2,
            members: members.clone(),
        };
        let mut nodes = Vec::new();
        for (i, listener) in listeners.into_iter().enumerate() {
            let cluster = Arc::new(Cluster::new(members[i].name.clone()));
            cluster.update(list.clone());
            let replicator = crate::peer::test_replicator(cluster, i as u64 + 1);
            tokio::spawn(server::serve(
                listener,
                replicator.clone(),
                None,
                stopped.clone(),
            ));
            nodes.push(replicator);
        }
        (nodes, members, stop)
    }

    fn put(replicator: &Replicator, key: &str, version: u64, value: &str) {
        let record = Record {
            op: Op::Set,
            key: key.into(),
            version,
            flags: 0,
            exptime: 0,
            value: value.into(),
        };
        apply(&replicator.store, &record, now_secs());
    }

    fn delete(replicator: &Replicator, key: &str, version: u64) {
        let record = Record {
            op: Op::Delete,
            key: key.into(),
            version,
            flags: 0,
            exptime: now_secs() + 100,
            value: Vec::new(),
        };
        apply(&replicator.store, &record, now_secs());
    }

    /// What a node holds for `key`: (version, deleted, value).
    fn held(replicator: &Replicator, key: &str) -> Option<(u64, bool, Vec<u8>)> {
        replicator
            .store
            .with_entry(key.as_bytes(), now_secs(), |e| {
                e.current().map(|it| {
                    let deleted = it.has(crate::store::bits::TOMBSTONE);
                    (it.cas(), deleted, it.value().to_vec())
                })
            })
    }

    async fn pull(nodes: &[Arc<Replicator>], members: &[Member], from: usize) -> RoundReport {
        let me = 1 - from;
        let view = nodes[me].cluster.view();
        round(
            &nodes[me],
            &view,
            &members[me].name,
            &members[from],
            None,
            64 << 20,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn two_replicas_that_diverged_converge_in_one_round_each() {
        let (nodes, members, _stop) = pair().await;
        let (a, b) = (&nodes[0], &nodes[1]);
        for i in 0..200 {
            put(a, &format!("k{i}"), 100, "same");
            put(b, &format!("k{i}"), 100, "same");
        }
        for i in 0..10 {
            put(a, &format!("k{i}"), 200, "newer on a");
            put(a, &format!("only-a-{i}"), 150, "a");
            put(b, &format!("k{}", 20 + i), 300, "newer on b");
        }
        delete(a, "k30", 400);
        delete(b, "k31", 500);
        // b pulls from a, then a from b.
        let report = pull(&nodes, &members, 0).await;
        assert!(report.arcs_differing > 0);
        assert_eq!(report.items_pulled, 21);
        let report = pull(&nodes, &members, 1).await;
        assert_eq!(report.items_pulled, 11);
        let keys = (0..200)
            .map(|i| format!("k{i}"))
            .chain((0..10).map(|i| format!("only-a-{i}")));
        for key in keys {
            assert_eq!(held(a, &key), held(b, &key), "{key}");
            assert!(held(a, &key).is_some(), "{key}");
        }
        assert_eq!(held(b, "k5").unwrap().2, b"newer on a");
        assert_eq!(held(a, "k25").unwrap().2, b"newer on b");
        // Deletes travel as tombstones, whichever side made them.
        assert!(held(b, "k30").unwrap().1 && held(a, "k31").unwrap().1);
        // Nothing differs any more.
        assert_eq!(pull(&nodes, &members, 0).await, RoundReport::default());
        assert_eq!(a.anti_entropy.items_pulled.load(Relaxed), 11);
        assert_eq!(b.anti_entropy.items_served.load(Relaxed), 11);
    }

    #[tokio::test]
    async fn an_answer_stops_at_its_byte_budget() {
        let (nodes, members, _stop) = pair().await;
        for i in 0..50 {
            put(&nodes[1], &format!("key-{i:02}"), 10, "0123456789");
        }
        let arcs: Vec<u32> = (0..ARCS as u32).collect();
        let mut out: Vec<u8> = Vec::new();
        let sent = answer_versions(&nodes[1], &mut out, 7, &members[0].name, 300, &arcs, &[])
            .await
            .unwrap();
        // Each record counts 5 + 10 + 32 bytes: the one that crosses 300 is the last.
        assert_eq!(sent, 7);
        let mut records = 0;
        let mut at = 0;
        while let Decoded::Frame(frame, used) = wire::decode(&out[at..]).unwrap() {
            at += used;
            match frame {
                Frame::Records { seq: 7, records: r } => records += r.len(),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(records, 7);
        // What the caller already has at the same version is not sent again.
        let entries: Vec<(u64, u64)> = (0..50)
            .map(|i| (key_hash(format!("key-{i:02}").as_bytes()), 10))
            .collect();
        let mut out: Vec<u8> = Vec::new();
        let sent = answer_versions(
            &nodes[1],
            &mut out,
            8,
            &members[0].name,
            1 << 20,
            &arcs,
            &entries,
        )
        .await
        .unwrap();
        assert_eq!(sent, 0);
        // A request larger than any node sends is refused, not served.
        let flood = vec![(0u64, 0u64); MAX_ENTRIES + 1];
        let refused = answer_versions(&nodes[1], &mut out, 9, "a", 1, &arcs, &flood).await;
        assert!(refused.is_err());
    }

    #[test]
    fn arcs_cover_the_hash_space_evenly() {
        let mut counts = vec![0usize; ARCS];
        for i in 0..(ARCS * 64) {
            counts[arc(key_hash(format!("key-{i}").as_bytes()))] += 1;
        }
        let (min, max) = (*counts.iter().min().unwrap(), *counts.iter().max().unwrap());
        assert!(min > 16 && max < 160, "arc sizes {min}..{max}");
        assert_eq!(arc(u64::MAX), ARCS - 1);
        assert_eq!(arc(0), 0);
    }

    #[test]
    fn digests_depend_on_versions_not_order() {
        let items = [
            (key_hash(b"a"), 1),
            (key_hash(b"b"), 2),
            (key_hash(b"c"), 3),
        ];
        let forward = items.iter().fold(0, |d, &(h, v)| d ^ fold(h, v));
        let backward = items.iter().rev().fold(0, |d, &(h, v)| d ^ fold(h, v));
        assert_eq!(forward, backward);
        let newer = fold(items[0].0, 4) ^ fold(items[1].0, 2) ^ fold(items[2].0, 3);
        assert_ne!(forward, newer);
    }

    #[test]
    fn groups_of_arcs_fit_one_request() {
        let mut counts = vec![0; ARCS];
        counts[1] = MAX_ENTRIES / 2;
        counts[2] = MAX_ENTRIES / 2;
        counts[3] = 1;
        counts[4] = MAX_ENTRIES * 2;
        let groups = group_arcs(&[1, 2, 3, 4, 5], &counts);
        assert_eq!(groups, vec![vec![1, 2], vec![3], vec![4], vec![5]]);
        assert!(group_arcs(&[], &counts).is_empty());
    }
}
