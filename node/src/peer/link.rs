//! Outgoing peer connections: one task per peer, fed by a queue bounded in bytes, sending
//! records in batches and resolving each record's acknowledgement when the peer has applied
//! it.
//!
//! Nothing here blocks a client request: when a peer's queue is full the record is dropped
//! and counted, and a writer waiting for an acknowledgement gives up after its own timeout.
//! A peer that acknowledges nothing for `LinkConfig::stall_timeout` while records wait (a
//! hung or stopped process, a partition) is marked down: its queue is dropped (counted),
//! writers stop waiting for it, and the link reconnects with backoff. What it missed comes
//! back through anti-entropy: the peer's peer server sees this link connect again and the
//! peer runs a round, pulling from this node (`LinkMetrics::came_up`).
//!
//! With TLS configured every link is a TLS connection (see `conn`); a link whose handshake
//! fails is down, like one whose peer cannot be reached, and retries with backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use kache_cluster::Member;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::conn::{self, send, ConnectError, PeerStream};
use super::wire::{self, Decoded, Frame, BATCH_BYTES, BATCH_RECORDS};
use crate::record::Record;
use crate::tls::Tls;

const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Bounds of each link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Bytes of records (keys, values, framing) queued per peer before new ones are dropped
    /// (`--peer-queue-bytes`).
    pub queue_bytes: usize,
    /// How long a peer may leave records unacknowledged before it counts as down
    /// (`--peer-timeout-ms`).
    pub stall_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            queue_bytes: 16 * 1024 * 1024,
            stall_timeout: Duration::from_secs(2),
        }
    }
}

/// Peer traffic counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    pub queued: AtomicU64,
    /// Bytes queued over all links.
    pub queued_bytes: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
    /// Times a peer was marked down for acknowledging nothing for the stall timeout.
    pub stalls: AtomicU64,
    /// Woken when a link between this node and a peer connects again: this node's after
    /// being down, broken or stalled (it may have dropped records for the peer), or a peer's
    /// new link to this node (the peer may have dropped records for this node, which only
    /// this node's own round pulls back). Anti-entropy then runs a round.
    pub came_up: tokio::sync::Notify,
}

/// Bytes a queued message accounts for beyond its key and value: framing, bookkeeping,
/// its acknowledgement channel.
const MESSAGE_OVERHEAD: usize = 128;

/// Bytes a queued record accounts for.
fn queued_bytes(record: &Record) -> usize {
    record.key.len() + record.value.len() + MESSAGE_OVERHEAD
}

enum Outgoing {
    Record(Record, Option<oneshot::Sender<()>>),
    Fetch(Vec<u8>, oneshot::Sender<Option<Record>>),
}

impl Outgoing {
    fn bytes(&self) -> usize {
        match self {
            Outgoing::Record(record, _) => queued_bytes(record),
            Outgoing::Fetch(key, _) => key.len() + MESSAGE_OVERHEAD,
        }
    }
}

/// The sending side of one link's queue, and what the queue holds.
#[derive(Clone)]
struct Queue {
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Bytes waiting in the queue.
    bytes: Arc<AtomicUsize>,
    /// Set while the peer cannot be reached or has stalled, until a connection works again.
    down: Arc<AtomicBool>,
}

struct Link {
    addr: (String, u16),
    queue: Queue,
}

/// All outgoing links of this node.
pub struct Links {
    node_name: String,
    /// The shared peer secret sent in every hello (empty for none).
    secret: Arc<[u8]>,
    /// Set when peers are reached over TLS.
    tls: Option<Arc<Tls>>,
    links: Mutex<HashMap<String, Link>>,
    config: LinkConfig,
    pub metrics: Arc<LinkMetrics>,
}

impl Links {
    /// Links over plain TCP with the default bounds.
    pub fn new(node_name: impl Into<String>, secret: Arc<[u8]>) -> Links {
        Self::with_config(node_name, secret, LinkConfig::default(), None)
    }

    /// Links within `config`'s bounds, over TLS when `tls` is given.
    pub fn with_config(
        node_name: impl Into<String>,
        secret: Arc<[u8]>,
        config: LinkConfig,
        tls: Option<Arc<Tls>>,
    ) -> Links {
        Links {
            node_name: node_name.into(),
            secret,
            tls,
            links: Mutex::new(HashMap::new()),
            config,
            metrics: Arc::new(LinkMetrics::default()),
        }
    }

    /// The TLS configuration peers are reached with, if any.
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.clone()
    }

    /// Opens a connection to `member`'s peer port (TLS when configured), for exchanges
    /// outside the links (refill pulls).
    pub async fn connect(&self, member: &Member) -> Result<PeerStream, ConnectError> {
        conn::connect(self.tls.as_deref(), &member.host, member.peer_port).await
    }

    fn queue(&self, member: &Member) -> Queue {
        let addr = (member.host.clone(), member.peer_port);
        let mut links = self.links.lock();
        if let Some(link) = links.get(&member.name) {
            if link.addr == addr && !link.queue.tx.is_closed() {
                return link.queue.clone();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Queue {
            tx,
            bytes: Arc::new(AtomicUsize::new(0)),
            down: Arc::new(AtomicBool::new(false)),
        };
        tokio::spawn(run(
            addr.clone(),
            self.node_name.clone(),
            rx,
            queue.clone(),
            self.metrics.clone(),
            self.secret.clone(),
            self.tls.clone(),
            self.config,
        ));
        let link = Link {
            addr,
            queue: queue.clone(),
        };
        links.insert(member.name.clone(), link);
        queue
    }

    /// Opens the link to `member` (it connects in the background) unless one is open.
    pub fn open(&self, member: &Member) {
        self.queue(member);
    }

    /// Whether the peer is down: the last attempt to reach it failed, or it stalled. A peer
    /// without an open link (none yet, or its address changed) is presumed up. Starts
    /// nothing: `open`, `send` and `fetch` do.
    pub fn is_down(&self, member: &Member) -> bool {
        let addr = (member.host.as_str(), member.peer_port);
        self.links.lock().get(&member.name).is_some_and(|link| {
            (link.addr.0.as_str(), link.addr.1) == addr
                && !link.queue.tx.is_closed()
                && link.queue.down.load(Relaxed)
        })
    }

    /// Queues `message` unless that would take the peer's queue past its byte budget.
    fn enqueue(&self, member: &Member, message: Outgoing) -> bool {
        let queue = self.queue(member);
        let size = message.bytes();
        let before = queue.bytes.fetch_add(size, Relaxed);
        if before + size > self.config.queue_bytes || queue.tx.send(message).is_err() {
            queue.bytes.fetch_sub(size, Relaxed);
            return false;
        }
        self.metrics.queued_bytes.fetch_add(size as u64, Relaxed);
        true
    }

    /// Queues `record` for `member`. With `ack`, the sender learns when it was applied.
    /// Returns false (and counts a drop) when the peer's queue is full.
    pub fn send(&self, member: &Member, record: Record, ack: Option<oneshot::Sender<()>>) -> bool {
        if self.enqueue(member, Outgoing::Record(record, ack)) {
            self.metrics.queued.fetch_add(1, Relaxed);
            true
        } else {
            self.metrics.dropped.fetch_add(1, Relaxed);
            false
        }
    }

    /// Asks `member` for its copy of `key`.
    pub fn fetch(&self, member: &Member, key: &[u8]) -> oneshot::Receiver<Option<Record>> {
        let (tx, rx) = oneshot::channel();
        // A full queue drops the request, and with it `tx`: the caller sees a miss.
        self.enqueue(member, Outgoing::Fetch(key.to_vec(), tx));
        rx
    }

    /// Closes links to peers that are no longer members.
    pub fn retain(&self, members: &[Member]) {
        self.links
            .lock()
            .retain(|name, _| members.iter().any(|m| &m.name == name));
    }
}

#[derive(Default)]
struct Pending {
    acks: HashMap<u64, Vec<oneshot::Sender<()>>>,
    fetches: HashMap<u64, oneshot::Sender<Option<Record>>>,
    /// When the peer last showed progress: a frame from it, or the first batch sent while
    /// nothing was outstanding.
    progress: Option<Instant>,
}

impl Pending {
    fn outstanding(&self) -> bool {
        !self.acks.is_empty() || !self.fetches.is_empty()
    }

    /// About to wait for one more answer: the stall clock starts if nothing was waiting.
    fn waiting(&mut self) -> &mut Self {
        if !self.outstanding() {
            self.progress = Some(Instant::now());
        }
        self
    }

    /// Whether records (or fetches) have waited longer than `timeout` without a word from
    /// the peer.
    fn stalled(&self, timeout: Duration) -> bool {
        self.outstanding() && self.progress.is_some_and(|at| at.elapsed() > timeout)
    }
}

/// Takes a message off the queue, releasing its bytes.
fn dequeued(message: Outgoing, queue: &Queue, metrics: &LinkMetrics) -> Outgoing {
    let size = message.bytes();
    queue
        .bytes
        .fetch_sub(size.min(queue.bytes.load(Relaxed)), Relaxed);
    metrics.queued_bytes.fetch_sub(
        (size as u64).min(metrics.queued_bytes.load(Relaxed)),
        Relaxed,
    );
    message
}

/// Drops everything queued for a stalled peer (waiting writers see their acknowledgement
/// fail at once). Returns how many records went.
fn drop_queue(
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    queue: &Queue,
    metrics: &LinkMetrics,
) -> u64 {
    let mut dropped = 0;
    while let Ok(message) = rx.try_recv() {
        if let Outgoing::Record(..) = dequeued(message, queue, metrics) {
            dropped += 1;
        }
    }
    metrics.dropped.fetch_add(dropped, Relaxed);
    metrics
        .queued
        .fetch_sub(dropped.min(metrics.queued.load(Relaxed)), Relaxed);
    dropped
}

/// How a connection ended.
enum Ended {
    /// The peer left the member list.
    Closed,
    /// The connection failed: reconnect.
    Broken,
    /// The peer stopped acknowledging: mark it down, drop its queue, reconnect.
    Stalled,
}

/// Drives one link until its queue is closed (the peer left the member list).
#[allow(clippy::too_many_arguments)]
async fn run(
    addr: (String, u16),
    node_name: String,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    queue: Queue,
    metrics: Arc<LinkMetrics>,
    secret: Arc<[u8]>,
    tls: Option<Arc<Tls>>,
    config: LinkConfig,
) {
    let down = queue.down.clone();
    let mut backoff = Duration::from_millis(50);
    let mut seq: u64 = 0;
    // A message taken from the queue but not yet sent when the connection broke.
    let mut carry: Option<Outgoing> = None;
    // The last connection error logged, so a lasting problem is logged once.
    let mut last_error: Option<ConnectError> = None;
    // Whether a connection of this link has broken (records in flight may be lost).
    let mut broke = false;
    loop {
        let connected = match conn::connect(tls.as_deref(), &addr.0, addr.1).await {
            Ok(mut stream) => conn::greet(&mut stream, &node_name, &secret)
                .await
                .map(|()| stream),
            Err(error) => Err(error),
        };
        let stream = match connected {
            Ok(stream) => {
                let was_down = last_error.take().is_some();
                if was_down {
                    tracing::info!(peer = %addr.0, port = addr.1, "peer link up");
                }
                if was_down || broke {
                    metrics.came_up.notify_one();
                }
                stream
            }
            Err(error) => {
                if last_error.as_ref() != Some(&error) {
                    match &error {
                        ConnectError::Tls(_) | ConnectError::Refused(_) => {
                            tracing::warn!(peer = %addr.0, %error, "peer link down")
                        }
                        ConnectError::Tcp(_) => {
                            tracing::debug!(peer = %addr.0, %error, "peer link down")
                        }
                    }
                    last_error = Some(error);
                }
                down.store(true, Relaxed);
                if rx.is_closed() && rx.is_empty() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        down.store(false, Relaxed);
        let ended = serve(
            stream, &mut rx, &queue, &metrics, &mut seq, &mut carry, config,
        )
        .await;
        match ended {
            Ended::Closed => return,
            Ended::Broken => {
                broke = true;
                metrics.reconnects.fetch_add(1, Relaxed);
                tracing::debug!(peer = %addr.0, port = addr.1, "peer link broken; reconnecting");
            }
            Ended::Stalled => {
                broke = true;
                down.store(true, Relaxed);
                carry = None;
                let dropped = drop_queue(&mut rx, &queue, &metrics);
                metrics.stalls.fetch_add(1, Relaxed);
                metrics.reconnects.fetch_add(1, Relaxed);
                tracing::warn!(
                    peer = %addr.0,
                    port = addr.1,
                    timeout_ms = config.stall_timeout.as_millis() as u64,
                    dropped,
                    "peer acknowledges nothing: marked down, its queue dropped"
                );
                last_error = None;
            }
        }
    }
}

/// Sends queued messages over one connection until it breaks, stalls or the queue closes.
async fn serve(
    stream: PeerStream,
    rx: &mut mpsc::UnboundedReceiver<Outgoing>,
    queue: &Queue,
    metrics: &Arc<LinkMetrics>,
    seq: &mut u64,
    carry: &mut Option<Outgoing>,
    config: LinkConfig,
) -> Ended {
    let (mut reader, mut writer) = tokio::io::split(stream);
    let pending = Arc::new(Mutex::new(Pending::default()));
    let reader_task = {
        let pending = pending.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(4096);
            loop {
                match wire::decode(&buf) {
                    Ok(Decoded::Frame(frame, used)) => {
                        bytes::Buf::advance(&mut buf, used);
                        let mut pending = pending.lock();
                        pending.progress = Some(Instant::now());
                        match frame {
                            Frame::Ack { seq } => {
                                for w in pending.acks.remove(&seq).into_iter().flatten() {
                                    metrics.acked.fetch_add(1, Relaxed);
                                    let _ = w.send(());
                                }
                            }
                            Frame::Fetched { seq, record } => {
                                if let Some(w) = pending.fetches.remove(&seq) {
                                    let _ = w.send(record);
                                }
                            }
                            _ => return,
                        }
                        continue;
                    }
                    Ok(Decoded::Incomplete) => {}
                    Err(_) => return,
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
    };
    // How often a link with records outstanding checks that the peer still answers.
    let check = (config.stall_timeout / 4).max(Duration::from_millis(10));
    let mut out = BytesMut::with_capacity(64 * 1024);
    let ended = loop {
        let first = match carry.take() {
            Some(m) => m,
            None => {
                let outstanding = pending.lock().outstanding();
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => dequeued(m, queue, metrics),
                        None => {
                            // The peer left the member list: hang up properly.
                            reader_task.abort();
                            conn::close(&mut writer).await;
                            return Ended::Closed;
                        }
                    },
                    _ = tokio::time::sleep(check), if outstanding => {
                        if pending.lock().stalled(config.stall_timeout) {
                            break Ended::Stalled;
                        }
                        if reader_task.is_finished() {
                            break Ended::Broken;
                        }
                        continue;
                    }
                }
            }
        };
        out.clear();
        let mut records = Vec::new();
        let mut acks = Vec::new();
        let mut bytes = 0;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match message {
                Outgoing::Record(record, ack) => {
                    bytes += queued_bytes(&record);
                    records.push(record);
                    acks.extend(ack);
                }
                Outgoing::Fetch(key, reply) => {
                    *seq += 1;
                    pending.lock().waiting().fetches.insert(*seq, reply);
                    wire::encode(&Frame::Fetch { seq: *seq, key }, &mut out);
                }
            }
            if records.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
                next = rx.try_recv().ok().map(|m| dequeued(m, queue, metrics));
            }
        }
        if !records.is_empty() {
            *seq += 1;
            let count = records.len() as u64;
            pending.lock().waiting().acks.insert(*seq, acks);
            wire::encode(&Frame::Records { seq: *seq, records }, &mut out);
            metrics.sent.fetch_add(count, Relaxed);
            metrics
                .queued
                .fetch_sub(count.min(metrics.queued.load(Relaxed)), Relaxed);
        }
        // A peer that stopped reading blocks this write once the socket buffers are full.
        match tokio::time::timeout(config.stall_timeout, send(&mut writer, &out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break Ended::Broken,
            Err(_) => break Ended::Stalled,
        }
        if pending.lock().stalled(config.stall_timeout) {
            break Ended::Stalled;
        }
        if reader_task.is_finished() {
            break Ended::Broken;
        }
    };
    reader_task.abort();
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    fn member(name: &str, peer_port: u16) -> Member {
        Member {
            name: name.into(),
            host: "127.0.0.1".into(),
            ip: "127.0.0.1".into(),
            port: 1,
            peer_port,
        }
    }

    fn record(value_bytes: usize) -> Record {
        Record {
            op: crate::record::Op::Set,
            key: b"k".to_vec(),
            version: 1,
            flags: 0,
            exptime: 0,
            value: vec![b'v'; value_bytes],
        }
    }

    /// A port where nothing listens (bound, then released).
    async fn closed_port() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    }

    #[tokio::test]
    async fn asking_whether_a_peer_is_down_opens_nothing() {
        let links = Links::new("a", Arc::from(Vec::new()));
        let b = member("b", closed_port().await);
        assert!(!links.is_down(&b), "a peer without a link is presumed up");
        assert!(links.links.lock().is_empty(), "is_down opened a link");
        links.open(&b);
        assert_eq!(links.links.lock().len(), 1);
        // Opening twice keeps the one link.
        links.open(&b);
        assert_eq!(links.links.lock().len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_peer_is_down_and_keeps_its_records_for_later() {
        let links = Links::new("a", Arc::from(Vec::new()));
        let b = member("b", closed_port().await);
        assert!(links.send(&b, record(10), None));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !links.is_down(&b) {
            assert!(tokio::time::Instant::now() < deadline, "never marked down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Down is not full: records wait (within the byte bound) for the peer to return.
        assert!(links.send(&b, record(10), None));
        assert_eq!(links.metrics.queued.load(Relaxed), 2);
        assert_eq!(links.metrics.dropped.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_peer_queue_is_bounded_in_bytes() {
        // A peer that accepts and never answers the hello: everything stays queued.
        let port = crate::listener::silent_port().await;
        let config = LinkConfig {
            queue_bytes: 64 * 1024,
            stall_timeout: Duration::from_secs(30),
        };
        let links = Links::with_config("a", Arc::from(Vec::new()), config, None);
        let b = member("b", port);
        let record_bytes = queued_bytes(&record(4096));
        let accepted = (0..64)
            .filter(|_| links.send(&b, record(4096), None))
            .count();
        assert!(accepted > 0);
        // At most one record may be in flight (taken off the queue) beyond the bound.
        assert!(
            accepted * record_bytes <= config.queue_bytes + record_bytes,
            "{accepted} records of {record_bytes} bytes queued"
        );
        assert_eq!(
            links.metrics.dropped.load(Relaxed),
            64 - accepted as u64,
            "every refused record is counted"
        );
        // A fetch that does not fit is a miss at once.
        let fetched = tokio::time::timeout(WAIT, links.fetch(&b, &vec![b'k'; 128 * 1024])).await;
        assert!(matches!(fetched, Ok(Err(_))), "{fetched:?}");
    }

    #[tokio::test]
    async fn links_to_members_that_left_are_closed() {
        let links = Links::new("a", Arc::from(Vec::new()));
        let port = closed_port().await;
        let (b, c) = (member("b", port), member("c", port));
        links.open(&b);
        links.open(&c);
        links.retain(std::slice::from_ref(&c));
        let names: Vec<String> = links.links.lock().keys().cloned().collect();
        assert_eq!(names, ["c"]);
    }
}
