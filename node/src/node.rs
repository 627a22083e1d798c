//! A kache node: the command engine, and in a cluster the replicator that carries its
//! changes to the keys' other owners, hands items over when the ring changes and reads
//! through to previous owners. The client server talks to this layer; the engine below it
//! knows nothing of peers, and the peer layer nothing of commands.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;

use crate::engine::Engine;
use crate::peer::Replicator;
use crate::protocol::{MetaCommand, Request};
use crate::record::{apply, Record};
use crate::store::now_secs;

/// How long a read-through waits for one previous owner.
const READ_THROUGH_TIMEOUT: Duration = Duration::from_millis(250);

/// The engine, and its replicator when the node is in a cluster.
pub struct Node {
    pub engine: Engine,
    pub replicator: Option<Arc<Replicator>>,
}

impl Node {
    pub fn new(engine: Engine, replicator: Option<Arc<Replicator>>) -> Node {
        Node { engine, replicator }
    }

    /// A node outside any cluster.
    pub fn standalone(engine: Engine) -> Node {
        Node::new(engine, None)
    }

    /// Before `request` executes: fetches the keys it misses and that this node has only
    /// just become an owner of from their previous owners, storing what they return, so the
    /// request is answered with a hit while a hand-off may still be bringing them. Nothing
    /// (and cheap) outside the window after a ring change; bounded by
    /// `READ_THROUGH_TIMEOUT` per source.
    pub async fn read_through(&self, request: &Request<'_>, now: u32) {
        let Some(replicator) = &self.replicator else {
            return;
        };
        let candidates = read_through_candidates(replicator, request, now);
        if candidates.is_empty() {
            return;
        }
        let links = &replicator.links;
        let fetches = candidates.into_iter().map(|(key, sources)| async move {
            // Room for the value it may bring (waiting for other fetches to finish); without
            // room in time the key is simply a miss.
            let room = tokio::time::timeout(
                READ_THROUGH_TIMEOUT,
                replicator.read_through_slots.acquire(),
            )
            .await;
            let Ok(Ok(_room)) = room else {
                replicator.stats.read_through_skipped.fetch_add(1, Relaxed);
                return;
            };
            for source in sources {
                // A peer known to be down cannot answer: asking it would only add the timeout
                // to this miss (for every miss, while it stays down).
                if links.is_down(&source) {
                    continue;
                }
                let reply =
                    tokio::time::timeout(READ_THROUGH_TIMEOUT, links.fetch(&source, &key)).await;
                if let Ok(Ok(Some(record))) = reply {
                    apply(&replicator.store, &record, now_secs());
                    replicator.stats.read_through_hits.fetch_add(1, Relaxed);
                    return;
                }
            }
        });
        join_all(fetches).await;
    }

    /// Sends `records` (one batch of a client's changes) to their keys' other owners and
    /// waits, bounded, for the acknowledgements `--write-acks` asks for. Returns, per
    /// record, whether it was acknowledged enough (always, outside a cluster).
    pub async fn replicate(&self, records: Vec<Record>) -> Vec<bool> {
        match &self.replicator {
            Some(replicator) => crate::peer::replicate::replicate(replicator, records).await,
            None => vec![true; records.len()],
        }
    }

    /// Counts writes answered `SERVER_ERROR` for too few acknowledgements.
    pub fn count_write_ack_failures(&self, writes: usize) {
        if let Some(replicator) = &self.replicator {
            replicator
                .stats
                .write_ack_failures
                .fetch_add(writes as u64, Relaxed);
        }
    }
}

/// Keys of `request` this node should fetch from their previous owners before answering:
/// keys it misses and has only just become an owner of.
fn read_through_candidates(
    replicator: &Replicator,
    request: &Request<'_>,
    now: u32,
) -> Vec<(Vec<u8>, Vec<kache_cluster::Member>)> {
    let cluster = &replicator.cluster;
    if !cluster.in_read_through_window() {
        return Vec::new();
    }
    let keys: Vec<&[u8]> = match request {
        Request::Get { keys, .. } => keys.iter().collect(),
        Request::Meta(m) if m.command == MetaCommand::Get => vec![&m.key[..]],
        _ => return Vec::new(),
    };
    keys.into_iter()
        // A tombstone means deleted here: nothing to fetch.
        .filter(|key| {
            replicator
                .store
                .with_entry(key, now, |e| e.current().is_none())
        })
        .filter_map(|key| {
            let sources = cluster.read_through_sources(key);
            (!sources.is_empty()).then(|| (key.to_vec(), sources))
        })
        .collect()
}
