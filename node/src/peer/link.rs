//! Outgoing peer connections: one task per peer, fed by a bounded queue, sending records
//! in batches and resolving each record's acknowledgement when the peer has applied it.
//!
//! Nothing here blocks a client request: when a peer's queue is full the record is dropped
//! and counted, and a writer waiting for an acknowledgement gives up after its own timeout.
//!
//! With TLS configured every link is a TLS connection (see `conn`); a link whose handshake
//! fails is down, like one whose peer cannot be reached, and retries with backoff.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::BytesMut;
use kache_cluster::Member;
use parking_lot::Mutex;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::conn::{self, send, ConnectError, PeerStream};
use super::wire::{self, Decoded, Frame, Record, BATCH_BYTES, BATCH_RECORDS};
use crate::tls::Tls;

/// Records waiting per peer before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 65_536;
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Peer traffic counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub dropped: AtomicU64,
    pub reconnects: AtomicU64,
    /// Woken when a link connects again after being down or broken: records may have been
    /// lost meanwhile, so anti-entropy runs a round.
    pub came_up: tokio::sync::Notify,
}

enum Outgoing {
    Record(Record, Option<oneshot::Sender<()>>),
    Fetch(Vec<u8>, oneshot::Sender<Option<Record>>),
}

struct Link {
    addr: (String, u16),
    tx: mpsc::Sender<Outgoing>,
    /// Set once a connection attempt to the peer failed, until one succeeds again.
    down: Arc<AtomicBool>,
}

/// All outgoing links of this node.
pub struct Links {
    node_name: String,
    /// The shared peer secret sent in every hello (empty for none).
    secret: Arc<[u8]>,
    /// Set (once, at start-up) when peers are reached over TLS.
    tls: Arc<OnceLock<Arc<Tls>>>,
    links: Mutex<HashMap<String, Link>>,
    pub metrics: Arc<LinkMetrics>,
}

impl Links {
    pub fn new(node_name: impl Into<String>, secret: Arc<[u8]>) -> Links {
        Links {
            node_name: node_name.into(),
            secret,
            tls: Arc::new(OnceLock::new()),
            links: Mutex::new(HashMap::new()),
            metrics: Arc::new(LinkMetrics::default()),
        }
    }

    /// Makes every connection to a peer a TLS connection from now on. Called at start-up,
    /// before any link is opened; a second call changes nothing.
    pub fn use_tls(&self, tls: Arc<Tls>) {
        let _ = self.tls.set(tls);
    }

    /// The TLS configuration peers are reached with, if any.
    pub fn tls(&self) -> Option<Arc<Tls>> {
        self.tls.get().cloned()
    }

    /// Opens a connection to `member`'s peer port (TLS when configured), for exchanges
    /// outside the links (refill pulls).
    pub async fn connect(&self, member: &Member) -> Result<PeerStream, ConnectError> {
        conn::connect(self.tls.get().map(|t| &**t), &member.host, member.peer_port).await
    }

    fn sender(&self, member: &Member) -> (mpsc::Sender<Outgoing>, Arc<AtomicBool>) {
        let addr = (member.host.clone(), member.peer_port);
        let mut links = self.links.lock();
        if let Some(link) = links.get(&member.name) {
            if link.addr == addr && !link.tx.is_closed() {
                return (link.tx.clone(), link.down.clone());
            }
        }
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let down = Arc::new(AtomicBool::new(false));
        tokio::spawn(run(
            addr.clone(),
            self.node_name.clone(),
            rx,
            self.metrics.clone(),
            down.clone(),
            self.secret.clone(),
            self.tls.clone(),
        ));
        let link = Link {
            addr,
            tx: tx.clone(),
            down: down.clone(),
        };
        links.insert(member.name.clone(), link);
        (tx, down)
    }

    /// Whether the last attempt to reach `member` failed (a new link is presumed up).
    pub fn is_down(&self, member: &Member) -> bool {
        self.sender(member).1.load(Relaxed)
    }

    /// Queues `record` for `member`. With `ack`, the sender learns when it was applied.
    /// Returns false (and counts a drop) when the peer's queue is full.
    pub fn send(&self, member: &Member, record: Record, ack: Option<oneshot::Sender<()>>) -> bool {
        match self
            .sender(member)
            .0
            .try_send(Outgoing::Record(record, ack))
        {
            Ok(()) => {
                self.metrics.queued.fetch_add(1, Relaxed);
                true
            }
            Err(_) => {
                self.metrics.dropped.fetch_add(1, Relaxed);
                false
            }
        }
    }

    /// Asks `member` for its copy of `key`.
    pub fn fetch(&self, member: &Member, key: &[u8]) -> oneshot::Receiver<Option<Record>> {
        let (tx, rx) = oneshot::channel();
        let _ = self
            .sender(member)
            .0
            .try_send(Outgoing::Fetch(key.to_vec(), tx));
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
}

/// Drives one link until its queue is closed (the peer left the member list).
async fn run(
    addr: (String, u16),
    node_name: String,
    mut rx: mpsc::Receiver<Outgoing>,
    metrics: Arc<LinkMetrics>,
    down: Arc<AtomicBool>,
    secret: Arc<[u8]>,
    tls: Arc<OnceLock<Arc<Tls>>>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut seq: u64 = 0;
    // A message taken from the queue but not yet sent when the connection broke.
    let mut carry: Option<Outgoing> = None;
    // The last connection error logged, so a lasting problem is logged once.
    let mut last_error: Option<ConnectError> = None;
    // Whether a connection of this link has broken (records in flight may be lost).
    let mut broke = false;
    loop {
        let connected = match conn::connect(tls.get().map(|t| &**t), &addr.0, addr.1).await {
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
                            match frame {
                                Frame::Ack { seq } => {
                                    let waiters = pending.lock().acks.remove(&seq);
                                    for w in waiters.into_iter().flatten() {
                                        metrics.acked.fetch_add(1, Relaxed);
                                        let _ = w.send(());
                                    }
                                }
                                Frame::Fetched { seq, record } => {
                                    if let Some(w) = pending.lock().fetches.remove(&seq) {
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
        let mut out = BytesMut::with_capacity(64 * 1024);
        let mut broken = false;
        while !broken {
            let first = match carry.take() {
                Some(m) => m,
                None => match rx.recv().await {
                    Some(m) => m,
                    None => {
                        // The peer left the member list: hang up properly.
                        reader_task.abort();
                        conn::close(&mut writer).await;
                        return;
                    }
                },
            };
            out.clear();
            let mut records = Vec::new();
            let mut acks = Vec::new();
            let mut bytes = 0;
            let mut next = Some(first);
            while let Some(message) = next.take() {
                match message {
                    Outgoing::Record(record, ack) => {
                        bytes += record.key.len() + record.value.len() + 32;
                        records.push(record);
                        acks.extend(ack);
                    }
                    Outgoing::Fetch(key, reply) => {
                        seq += 1;
                        pending.lock().fetches.insert(seq, reply);
                        wire::encode(&Frame::Fetch { seq, key }, &mut out);
                    }
                }
                if records.len() < BATCH_RECORDS && bytes < BATCH_BYTES {
                    next = rx.try_recv().ok();
                }
            }
            if !records.is_empty() {
                seq += 1;
                let count = records.len() as u64;
                pending.lock().acks.insert(seq, acks);
                wire::encode(&Frame::Records { seq, records }, &mut out);
                metrics.sent.fetch_add(count, Relaxed);
                metrics
                    .queued
                    .fetch_sub(count.min(metrics.queued.load(Relaxed)), Relaxed);
            }
            broken = send(&mut writer, &out).await.is_err() || reader_task.is_finished();
        }
        reader_task.abort();
        broke = true;
        metrics.reconnects.fetch_add(1, Relaxed);
        tracing::debug!(peer = %addr.0, port = addr.1, "peer link broken; reconnecting");
    }
}
