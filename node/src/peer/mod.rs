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

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::cluster::Cluster;
use crate::record::apply;
use crate::store::Store;
use crate::tls::Tls;
use anti_entropy::AntiEntropyStats;
use handoff::HandoffState;
use link::{LinkConfig, Links};
use replicate::Durability;

/// Why an exchange with a peer failed (the connection it was on is closed).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] wire::WireError),
    #[error("{0}")]
    Connect(#[from] conn::ConnectError),
    #[error("peer closed the connection")]
    Closed,
    #[error("no hello from peer")]
    NoHello,
    #[error("peer spoke before hello")]
    SpokeBeforeHello,
    #[error("peer {0:?} presented a wrong secret")]
    WrongSecret(String),
    #[error("unexpected peer frame {0:?}")]
    UnexpectedFrame(Box<wire::Frame>),
    /// A plain-TCP caller on a TLS peer port.
    #[error("plain-TCP peer on the TLS peer port (it did not start a TLS handshake: is TLS configured on every node?)")]
    PlainOnTlsPort,
    #[error("peer TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("peer TLS handshake timed out")]
    TlsHandshakeTimeout,
    #[error("anti-entropy digests over {got} arcs, expected {expected}")]
    DigestCount { got: usize, expected: usize },
    #[error("anti-entropy request over {arcs} arcs with {entries} entries exceeds the limits")]
    OverLimits { arcs: usize, entries: usize },
}

/// Byte bounds of node-to-node traffic.
#[derive(Clone, Copy, Debug)]
pub struct PeerLimits {
    /// Each outgoing link's queue and stall timeout (`--peer-queue-bytes`, `--peer-timeout-ms`).
    pub link: LinkConfig,
    /// Records per hand-off or refill chunk, in bytes (`--handoff-batch-bytes`).
    pub handoff_batch_bytes: usize,
    /// Values being fetched by read-throughs at once, in bytes (`--read-through-bytes`): a
    /// read-through takes room for one largest item, waiting a little for it; without room
    /// the key is a miss.
    pub read_through_bytes: usize,
}

impl Default for PeerLimits {
    fn default() -> Self {
        PeerLimits {
            link: LinkConfig::default(),
            handoff_batch_bytes: 4 * 1024 * 1024,
            read_through_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Counters of the peer port.
#[derive(Debug, Default)]
pub struct PeerStats {
    /// Records applied from peers.
    pub received: AtomicU64,
    /// Peer connections closed for protocol errors.
    pub rejected: AtomicU64,
    /// Replicated writes whose acknowledgement did not arrive in time.
    pub replication_timeouts: AtomicU64,
    /// Writes answered `SERVER_ERROR` because too few owners acknowledged them.
    pub write_ack_failures: AtomicU64,
    /// Misses answered by fetching the key from its previous owner during a hand-off.
    pub read_through_hits: AtomicU64,
    /// Read-throughs not tried because `--read-through-bytes` stayed in flight too long.
    pub read_through_skipped: AtomicU64,
}

/// How a node talks to its peers: what `Replicator::new` needs besides the store and cluster.
#[derive(Clone, Default)]
pub struct PeerConfig {
    /// The secret peers present on the peer port (`--peer-secret-file`); empty for none.
    pub secret: Arc<[u8]>,
    pub limits: PeerLimits,
    pub durability: Durability,
    /// Peers are reached over TLS (the client port's certificate) when set.
    pub tls: Option<Arc<Tls>>,
}

/// A cluster node's side of node-to-node traffic: its links to the peers, and the state
/// and counters of replication, hand-off, read-through and anti-entropy. Shared by the
/// peer port, the background tasks and the client server; it needs only the store and the
/// member list, never the command engine.
pub struct Replicator {
    pub store: Arc<Store>,
    pub cluster: Arc<Cluster>,
    /// Outgoing peer links (replication, hand-off, read-through).
    pub links: Links,
    /// Progress of hand-offs and refills.
    pub handoff: HandoffState,
    /// Peer-port counters.
    pub stats: PeerStats,
    /// The secret peers present on the peer port; empty for none.
    pub secret: Arc<[u8]>,
    pub limits: PeerLimits,
    /// Room for read-throughs in flight, one permit per largest item.
    pub read_through_slots: tokio::sync::Semaphore,
    /// When a replicated write is acknowledged.
    pub durability: Durability,
    pub anti_entropy: AntiEntropyStats,
}

impl Replicator {
    /// Opens no connection yet: links connect when first used.
    pub fn new(
        store: Arc<Store>,
        cluster: Arc<Cluster>,
        max_item_size: usize,
        config: PeerConfig,
    ) -> Replicator {
        let PeerConfig {
            secret,
            limits,
            durability,
            tls,
        } = config;
        let links = Links::with_config(cluster.node_name(), secret.clone(), limits.link, tls);
        let slots = (limits.read_through_bytes / max_item_size.max(1)).max(1);
        Replicator {
            store,
            cluster,
            links,
            handoff: HandoffState::default(),
            stats: PeerStats::default(),
            secret,
            limits,
            read_through_slots: tokio::sync::Semaphore::new(slots),
            durability,
            anti_entropy: AntiEntropyStats::default(),
        }
    }
}

/// What a peer streamed back and this node applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub records: u64,
    /// Their `Record::weight`.
    pub bytes: usize,
}

/// Applies the `Records` a peer streams in answer to a request (a refill pull, an
/// anti-entropy round's versions) until its `PullDone`.
pub async fn apply_until_done<S: tokio::io::AsyncRead + Unpin + ?Sized>(
    store: &Store,
    stream: &mut S,
    buf: &mut bytes::BytesMut,
) -> Result<Received, PeerError> {
    let mut received = Received::default();
    loop {
        match conn::read_frame(stream, buf).await? {
            wire::Frame::Records { records, .. } => {
                let now = crate::store::now_secs();
                for record in &records {
                    apply(store, record, now);
                    received.bytes += record.weight();
                }
                received.records += records.len() as u64;
            }
            wire::Frame::PullDone { .. } => return Ok(received),
            other => return Err(PeerError::UnexpectedFrame(Box::new(other))),
        }
    }
}

/// A replicator over a small empty store, for tests of the peer layer.
#[cfg(test)]
pub(crate) fn test_replicator(cluster: Arc<Cluster>, node_id: u64) -> Arc<Replicator> {
    let store = Store::new(crate::store::StoreConfig {
        memory_limit: 8 << 20,
        max_item_size: 1024,
        max_shards: 4,
        node_id,
        ..crate::store::StoreConfig::default()
    });
    Arc::new(Replicator::new(
        Arc::new(store),
        cluster,
        1024,
        PeerConfig::default(),
    ))
}
