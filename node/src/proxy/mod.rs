//! `kache-node proxy`: a local memcached endpoint that routes over the cluster's ring.
//!
//! An application's plain memcached client talks to the proxy as to one server. For each
//! batch of pipelined requests the proxy plans where each goes (pure: `plan`), sends every
//! node its share in one pipelined write, and answers the client in request order:
//!
//! - key-bearing commands go to the key's owner, or, when the owner cannot be reached and
//!   `replicationFactor` ≥ 2, to the next owner on the ring (which holds a replica);
//! - multi-key `get`/`gets`/`gat`/`gats` are split by owner and reassembled in the client's
//!   key order;
//! - `flush_all`, `cache_memlimit`, `stats reset`, `stats detail on|off` and the
//!   `lru_crawler` commands go to every member (`OK` when all agree, otherwise the first
//!   other reply); `stats` sums every member's counters, `stats slabs|items|sizes` and
//!   `stats detail dump` their per-class and per-prefix figures; `lru_crawler metadump` and
//!   `stats cachedump` concatenate their lines; other `stats` subcommands are answered by
//!   the first member; `watch` and `shutdown` are refused (they are per node);
//! - `version`, `verbosity`, `mn`, `quit` and `config get cluster` are answered by the proxy;
//! - bad input gets the same reply a node gives (the same parser produces it).
//!
//! The member list is followed live; client connections survive every change.

pub mod backend;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::join_all;
use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::cluster::{Cluster, ClusterView};
use crate::engine::version_string;
use crate::listener::{Received, RequestReader, Service, READ_CHUNK};
use crate::protocol::admin::{AdminRequest, CrawlerCommand};
use crate::protocol::forward::{
    encode_admin, encode_get, encode_keyed, value_blocks, Quiet, ReplyKind,
};
use crate::protocol::reply::Response;
use crate::protocol::{parse, reply, Limits, MetaCommand, ParseOutcome, Request, StoreMode};
pub use backend::NodeAccess;
use backend::{await_reply, Backend, ExchangeError};

/// Requests of one client run together at most: bounds the replies the proxy holds for a
/// client that pipelines large reads.
const MAX_BATCH: usize = 32;
const UNAVAILABLE: &[u8] = b"SERVER_ERROR no cache node available\r\n";
const BROKEN: &[u8] = b"SERVER_ERROR cache node connection failed\r\n";

/// Proxy counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub backend_errors: AtomicU64,
    pub failovers: AtomicU64,
    pub curr_connections: AtomicU64,
    pub total_connections: AtomicU64,
    pub rejected_connections: AtomicU64,
}

/// How the replies of a request sent to every member combine into one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Combine {
    /// `OK` (or `RESET`) when every member answers it, otherwise the first other reply.
    Agree,
    /// Sum the counters of every member's `stats`.
    SumStats,
    /// Sum per-class (`stats slabs|items|sizes`) or per-prefix (`stats detail dump`) figures.
    SumClasses,
    /// Concatenate the members' dump lines (`lru_crawler metadump`, `stats cachedump`), at
    /// most `limit` lines (0: all), then `END`.
    Concat { limit: u32 },
}

/// The plan for one client request.
#[derive(Debug)]
enum Job {
    /// Answered by the proxy.
    Local(Bytes),
    /// One request for a key's owners (indices into the member list), tried in order.
    Keyed {
        owners: Vec<usize>,
        bytes: Bytes,
        kind: ReplyKind,
        quiet: Quiet,
        /// Whether a replica may be asked when the owner failed after the request was
        /// written to it (a read or a plain `set`: repeating it is harmless).
        retry_safe: bool,
    },
    /// A retrieval split by owner, reassembled in `order`.
    Split {
        parts: Vec<(Vec<usize>, Bytes)>,
        order: Vec<Vec<u8>>,
    },
    /// The same request to every member.
    All {
        bytes: Bytes,
        kind: ReplyKind,
        combine: Combine,
        quiet: Quiet,
    },
    /// `quit`.
    Close,
}

pub struct Proxy {
    cluster: Arc<Cluster>,
    /// The backends of the current member list, rebuilt when the list changes.
    routes: ArcSwap<Routes>,
    /// Serialises rebuilds of `routes`.
    rebuild: Mutex<()>,
    limits: Limits,
    pool_size: usize,
    /// How to connect to the nodes (TLS, login).
    access: Arc<NodeAccess>,
    pub stats: ProxyStats,
}

/// A member list and its members' backends, by member index: resolved once per list
/// rather than once per request.
struct Routes {
    view: Arc<ClusterView>,
    backends: Vec<Arc<Backend>>,
}

impl Routes {
    /// The backends for `view`, reusing those of `old` whose member kept its address (so
    /// their open connections survive the change).
    fn new(
        view: Arc<ClusterView>,
        old: &Routes,
        pool_size: usize,
        access: &Arc<NodeAccess>,
    ) -> Routes {
        let backends = view
            .list
            .members
            .iter()
            .map(|member| {
                let addr = format!("{}:{}", member.host, member.port);
                old.view
                    .list
                    .members
                    .iter()
                    .zip(&old.backends)
                    .find(|(m, b)| m.name == member.name && b.addr == addr)
                    .map(|(_, b)| b.clone())
                    .unwrap_or_else(|| {
                        Backend::new(&member.host, member.port, pool_size, access.clone())
                    })
            })
            .collect();
        Routes { view, backends }
    }
}

impl Proxy {
    /// A proxy over `cluster` keeping `pool_size` connections per node, logging in to the
    /// nodes as `access` says.
    pub fn new(
        cluster: Arc<Cluster>,
        limits: Limits,
        pool_size: usize,
        access: NodeAccess,
    ) -> Proxy {
        let access = Arc::new(access);
        let routes = Routes {
            view: cluster.view(),
            backends: Vec::new(),
        };
        let routes = Routes::new(routes.view.clone(), &routes, pool_size, &access);
        Proxy {
            cluster,
            routes: ArcSwap::from_pointee(routes),
            rebuild: Mutex::new(()),
            limits,
            pool_size,
            access,
            stats: ProxyStats::default(),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The routes for the current member list.
    fn routes(&self) -> Arc<Routes> {
        let routes = self.routes.load_full();
        let view = self.cluster.view();
        if Arc::ptr_eq(&routes.view, &view) {
            return routes;
        }
        let _guard = self.rebuild.lock();
        let routes = self.routes.load_full();
        let view = self.cluster.view();
        if Arc::ptr_eq(&routes.view, &view) {
            return routes;
        }
        let fresh = Arc::new(Routes::new(view, &routes, self.pool_size, &self.access));
        self.routes.store(fresh.clone());
        fresh
    }

    /// Members whose node the proxy currently cannot reach (for metrics).
    pub fn nodes_down(&self) -> usize {
        self.routes
            .load()
            .backends
            .iter()
            .filter(|b| b.is_down())
            .count()
    }

    /// Connections opened to nodes so far (for metrics).
    pub fn node_connections_opened(&self) -> u64 {
        self.access.connects.load(Relaxed)
    }

    /// Failed node connections and requests so far (for metrics).
    pub fn backend_errors(&self) -> u64 {
        self.access.errors.load(Relaxed)
    }

    /// Requests refused because their node connection's queue was full (for metrics).
    pub fn node_queue_full(&self) -> u64 {
        self.access.queue_full.load(Relaxed)
    }

    /// Bytes of requests queued for nodes now (for metrics).
    pub fn node_queued_bytes(&self) -> u64 {
        self.access.queued_bytes.load(Relaxed)
    }

    /// Accepts clients until `shutdown`, then lets open connections finish for `drain`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        max_connections: usize,
        shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        crate::listener::serve(listener, self, max_connections, shutdown, drain).await;
    }

    async fn client(
        &self,
        mut stream: TcpStream,
        id: usize,
        shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut read = BytesMut::with_capacity(READ_CHUNK);
        let mut write = BytesMut::with_capacity(READ_CHUNK);
        let mut jobs = Vec::new();
        let mut replies = Vec::new();
        let mut swallow = 0usize;
        let mut reader = RequestReader::new(shutdown);
        loop {
            let between_requests = read.is_empty() && swallow == 0;
            match reader
                .read(&mut stream, &mut read, between_requests, None)
                .await?
            {
                Received::Bytes(_) => {}
                Received::Done | Received::Idle => return Ok(()),
            }
            loop {
                let (close, more) = self
                    .batch(
                        &mut read,
                        &mut swallow,
                        id,
                        &mut jobs,
                        &mut replies,
                        &mut write,
                    )
                    .await;
                stream.write_all(&write).await?;
                write.clear();
                if close {
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
                if !more {
                    break;
                }
            }
        }
    }

    /// Parses up to `MAX_BATCH` requests from `read`, runs them, and composes their replies
    /// into `write`. Returns whether the connection is to close, and whether `read` holds
    /// more complete requests than one batch takes (the cap bounds the replies held per
    /// client).
    async fn batch(
        &self,
        read: &mut BytesMut,
        swallow: &mut usize,
        id: usize,
        jobs: &mut Vec<Job>,
        replies: &mut Vec<Bytes>,
        write: &mut BytesMut,
    ) -> (bool, bool) {
        let routes = self.routes();
        let mut close = false;
        let mut more = false;
        loop {
            if jobs.len() == MAX_BATCH {
                more = true;
                break;
            }
            if *swallow > 0 {
                let k = (*swallow).min(read.len());
                read.advance(k);
                *swallow -= k;
                if *swallow > 0 {
                    break;
                }
            }
            let consumed = match parse(read, &self.limits) {
                ParseOutcome::Request {
                    request,
                    consumed,
                    swallow: s,
                } => {
                    *swallow = s;
                    jobs.push(plan(&request, &routes.view));
                    consumed
                }
                ParseOutcome::Incomplete => break,
                ParseOutcome::Close => {
                    close = true;
                    break;
                }
            };
            read.advance(consumed);
            if matches!(jobs.last(), Some(Job::Close)) {
                break;
            }
        }
        self.stats.requests.fetch_add(jobs.len() as u64, Relaxed);
        self.run(jobs, &routes, id, replies).await;
        for (job, reply) in jobs.iter().zip(replies.drain(..)) {
            if matches!(job, Job::Close) {
                close = true;
                break;
            }
            write.put_slice(&reply);
        }
        jobs.clear();
        (close, more && !close)
    }

    /// Executes a batch of jobs and appends one reply per job, in order, to `replies`.
    ///
    /// Every request of one client connection to one node goes through the same backend
    /// connection (`lane`), so a node sees a client's requests in the client's order.
    async fn run(&self, jobs: &[Job], routes: &Routes, lane: usize, replies: &mut Vec<Bytes>) {
        if jobs.is_empty() {
            // A read that completed no request (part of a large value).
            return;
        }
        // The common case, a lone request for one key, needs no bookkeeping.
        if let [Job::Keyed {
            owners,
            bytes,
            kind,
            quiet,
            retry_safe,
        }] = jobs
        {
            let reply = self
                .call(routes, lane, owners, bytes, *kind, *retry_safe)
                .await;
            replies.push(if quiet.delivers(&reply) {
                reply
            } else {
                Bytes::new()
            });
            return;
        }
        // Every request a node must answer, in job order: where it may go, and which
        // candidate it is at.
        struct Call<'j> {
            candidates: &'j [usize],
            bytes: &'j Bytes,
            kind: ReplyKind,
            retry_safe: bool,
            attempt: usize,
        }
        let everyone: Vec<usize> = (0..routes.backends.len()).collect();
        // Which nodes count as down is decided once for the batch: requests for one key
        // then go to the same node, in the client's order, even if a node is found down
        // midway (they all move on to the next owner together, in order).
        let down: Vec<bool> = routes.backends.iter().map(|b| b.is_down()).collect();
        let mut calls: Vec<Call<'_>> = Vec::new();
        // Calls of job j: calls[spans[j]..spans[j + 1]].
        let mut spans = Vec::with_capacity(jobs.len() + 1);
        for job in jobs {
            spans.push(calls.len());
            let call = |candidates, bytes, kind, retry_safe| Call {
                candidates,
                bytes,
                kind,
                retry_safe,
                attempt: 0,
            };
            match job {
                Job::Keyed {
                    owners,
                    bytes,
                    kind,
                    retry_safe,
                    ..
                } => calls.push(call(owners, bytes, *kind, *retry_safe)),
                Job::Split { parts, .. } => calls.extend(
                    parts
                        .iter()
                        .map(|(owners, bytes)| call(owners, bytes, ReplyKind::Retrieval, true)),
                ),
                // flush_all, cache_memlimit and stats are harmless to repeat.
                Job::All { bytes, kind, .. } => calls.extend(
                    everyone
                        .iter()
                        .map(|m| call(std::slice::from_ref(m), bytes, *kind, true)),
                ),
                Job::Local(_) | Job::Close => {}
            }
        }
        spans.push(calls.len());
        let mut results: Vec<Option<Bytes>> = vec![None; calls.len()];
        let mut pending: Vec<usize> = (0..calls.len()).collect();
        // Each round queues every pending call on its current candidate, in order; calls
        // whose node was unreachable move on to their next candidate (the next owner on
        // the ring, which holds a replica).
        while !pending.is_empty() {
            let mut waiting = Vec::with_capacity(pending.len());
            for i in pending.drain(..) {
                let call = &mut calls[i];
                call.attempt = skip_down(&down, call.candidates, call.attempt);
                let Some(backend) = call
                    .candidates
                    .get(call.attempt)
                    .and_then(|&m| routes.backends.get(m))
                else {
                    results[i] = Some(Bytes::from_static(UNAVAILABLE));
                    continue;
                };
                let queued = backend.enqueue(lane, call.bytes.clone(), call.kind, call.retry_safe);
                waiting.push((i, call.retry_safe, queued));
            }
            // Each reply is taken as it comes: a node that stalls costs only its own
            // requests (its connection gives up on it and they fail over).
            let outcomes = join_all(waiting.into_iter().map(
                |(i, retry_safe, queued)| async move {
                    let outcome = match queued {
                        Ok(reply) => await_reply(reply, retry_safe).await,
                        Err(error) => Err(error),
                    };
                    (i, outcome)
                },
            ))
            .await;
            for (i, outcome) in outcomes {
                let call = &mut calls[i];
                match self.settle(outcome, call.attempt, call.candidates.len()) {
                    Some(reply) => results[i] = Some(reply),
                    None => {
                        call.attempt += 1;
                        pending.push(i);
                    }
                }
            }
        }
        for (j, job) in jobs.iter().enumerate() {
            replies.push(assemble(job, &mut results[spans[j]..spans[j + 1]]));
        }
    }

    /// One request to a key's owners, failing over along `candidates` while the node it
    /// went to could not be reached.
    async fn call(
        &self,
        routes: &Routes,
        lane: usize,
        candidates: &[usize],
        bytes: &Bytes,
        kind: ReplyKind,
        retry_safe: bool,
    ) -> Bytes {
        let mut attempt = first_up(candidates.len(), 0, |a| {
            routes
                .backends
                .get(candidates[a])
                .is_none_or(|b| b.is_down())
        });
        loop {
            let Some(backend) = candidates
                .get(attempt)
                .and_then(|&m| routes.backends.get(m))
            else {
                return Bytes::from_static(UNAVAILABLE);
            };
            let outcome = backend
                .exchange(lane, bytes.clone(), kind, retry_safe)
                .await;
            match self.settle(outcome, attempt, candidates.len()) {
                Some(reply) => return reply,
                None => attempt += 1,
            }
        }
    }

    /// The one failover rule, for a node's answer to a call at `attempt` of `candidates`
    /// candidates: the reply to give, or `None` to try the next candidate (the next owner
    /// on the ring, which holds a replica) when the node could not be reached.
    fn settle(
        &self,
        outcome: Result<Bytes, ExchangeError>,
        attempt: usize,
        candidates: usize,
    ) -> Option<Bytes> {
        match outcome {
            Ok(reply) => Some(reply),
            Err(ExchangeError::Unreachable) if attempt + 1 < candidates => {
                self.stats.failovers.fetch_add(1, Relaxed);
                None
            }
            Err(ExchangeError::Unreachable) => Some(Bytes::from_static(UNAVAILABLE)),
            Err(ExchangeError::Broken) => Some(Bytes::from_static(BROKEN)),
        }
    }
}

impl Service for Proxy {
    fn rejected(&self) {
        self.stats.rejected_connections.fetch_add(1, Relaxed);
    }

    fn opened(&self) -> u64 {
        self.stats.curr_connections.fetch_add(1, Relaxed);
        self.stats.total_connections.fetch_add(1, Relaxed)
    }

    fn closed(&self) {
        self.stats.curr_connections.fetch_sub(1, Relaxed);
    }

    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        _peer: std::net::SocketAddr,
        number: u64,
        shutdown: watch::Receiver<bool>,
    ) {
        let _ = self.client(stream, number as usize, shutdown).await;
    }
}

/// The first candidate from `attempt` on whose node `down` (by member index) does not
/// mark down, or the last one when all are.
fn skip_down(down: &[bool], candidates: &[usize], attempt: usize) -> usize {
    first_up(candidates.len(), attempt, |a| {
        down.get(candidates[a]).copied().unwrap_or(true)
    })
}

/// The first of `len` candidates from `attempt` on that `is_down` does not reject, or the
/// last one when all are down.
fn first_up(len: usize, mut attempt: usize, is_down: impl Fn(usize) -> bool) -> usize {
    while attempt + 1 < len && is_down(attempt) {
        attempt += 1;
    }
    attempt
}

/// The reply to one job from the node replies gathered for its calls, in call order.
fn assemble(job: &Job, results: &mut [Option<Bytes>]) -> Bytes {
    let mut take = |i: usize| {
        results
            .get_mut(i)
            .and_then(Option::take)
            .unwrap_or_else(|| Bytes::from_static(BROKEN))
    };
    match job {
        Job::Local(bytes) => bytes.clone(),
        Job::Close => Bytes::new(),
        Job::Keyed { quiet, .. } => {
            let reply = take(0);
            if quiet.delivers(&reply) {
                reply
            } else {
                Bytes::new()
            }
        }
        Job::Split { parts, order } => {
            let replies: Vec<Bytes> = (0..parts.len()).map(take).collect();
            // An error from any part answers the whole request, as one node would.
            if let Some(err) = replies
                .iter()
                .find(|r| !r.starts_with(reply::VALUE) && !r.starts_with(reply::END))
            {
                return err.clone();
            }
            let mut by_key: HashMap<&[u8], std::collections::VecDeque<&[u8]>> = HashMap::new();
            for reply in &replies {
                for (key, block) in value_blocks(reply) {
                    by_key.entry(key).or_default().push_back(block);
                }
            }
            let mut out = BytesMut::new();
            for key in order {
                if let Some(block) = by_key.get_mut(key.as_slice()).and_then(|q| q.pop_front()) {
                    out.put_slice(block);
                }
            }
            out.put_slice(reply::END);
            out.freeze()
        }
        Job::All { combine, quiet, .. } => {
            let replies: Vec<Bytes> = results.iter_mut().filter_map(Option::take).collect();
            let combined = match combine {
                Combine::Agree => replies
                    .iter()
                    .find(|r| !Response::Ok.is(r) && !Response::Reset.is(r))
                    .or_else(|| replies.first())
                    .cloned()
                    .unwrap_or_else(|| Bytes::from_static(UNAVAILABLE)),
                Combine::SumStats => sum_stats(&replies),
                Combine::SumClasses => sum_class_stats(&replies),
                Combine::Concat { limit } => concat_dumps(&replies, *limit),
            };
            if quiet.delivers(&combined) {
                combined
            } else {
                Bytes::new()
            }
        }
    }
}

/// Adds up the members' `stats`: numbers are summed, other values (and identity fields such
/// as `pid`, `version`) come from the first member.
fn sum_stats(replies: &[Bytes]) -> Bytes {
    const FIRST_ONLY: &[&str] = &["pid", "uptime", "time", "version", "pointer_size"];
    let mut order: Vec<String> = Vec::new();
    let mut values: HashMap<String, String> = HashMap::new();
    for reply in replies {
        for line in std::str::from_utf8(reply).unwrap_or_default().lines() {
            let mut fields = line.splitn(3, ' ');
            let (Some("STAT"), Some(name), Some(value)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            match values.get_mut(name) {
                None => {
                    order.push(name.to_string());
                    values.insert(name.to_string(), value.to_string());
                }
                Some(current) if !FIRST_ONLY.contains(&name) => {
                    if let (Ok(a), Ok(b)) = (current.parse::<u64>(), value.parse::<u64>()) {
                        *current = (a + b).to_string();
                    }
                }
                Some(_) => {}
            }
        }
    }
    if order.is_empty() {
        return replies
            .first()
            .cloned()
            .unwrap_or_else(|| Bytes::from_static(UNAVAILABLE));
    }
    let mut out = BytesMut::new();
    for name in order {
        reply::stat(&mut out, &name, &values[&name]);
    }
    out.put_slice(reply::END);
    out.freeze()
}

/// How a per-class figure of several nodes combines: sizes of a class are the same on every
/// node, an age is the oldest, everything else adds up.
fn class_figure(name: &str) -> fn(u64, u64) -> u64 {
    match name.rsplit(':').next() {
        Some("chunk_size" | "chunks_per_page") => |a, _| a,
        Some("age" | "evicted_time") => u64::max,
        _ => |a, b| a + b,
    }
}

/// Sums `stats slabs`, `stats items`, `stats sizes` and `stats detail dump` over the
/// members, in class order (`active_slabs` counts the classes any member uses).
fn sum_class_stats(replies: &[Bytes]) -> Bytes {
    use std::collections::BTreeMap;
    if let Some(first) = replies.first() {
        // A single line (an error, `sizes_status`) is answered as the first member gave it.
        if !first.ends_with(reply::END) {
            return first.clone();
        }
    }
    // (class, first-seen position) orders lines; totals come after the classes.
    let mut stats: BTreeMap<(u64, usize), (String, String)> = BTreeMap::new();
    let mut index: HashMap<String, (u64, usize)> = HashMap::new();
    let mut prefixes: BTreeMap<String, [u64; 4]> = BTreeMap::new();
    let mut classes = std::collections::BTreeSet::new();
    for reply in replies {
        for line in std::str::from_utf8(reply).unwrap_or_default().lines() {
            if let Some(rest) = line.strip_prefix("PREFIX ") {
                let fields: Vec<&str> = rest.split(' ').collect();
                if let [prefix, "get", g, "hit", h, "set", s, "del", d] = fields[..] {
                    let sums = prefixes.entry(prefix.to_string()).or_default();
                    for (sum, v) in sums.iter_mut().zip([g, h, s, d]) {
                        *sum += v.parse::<u64>().unwrap_or(0);
                    }
                }
                continue;
            }
            let mut fields = line.splitn(3, ' ');
            let (Some("STAT"), Some(name), Some(value)) =
                (fields.next(), fields.next(), fields.next())
            else {
                continue;
            };
            let class = name
                .trim_start_matches("items:")
                .split(':')
                .next()
                .and_then(|c| c.parse::<u64>().ok())
                .filter(|_| name.contains(':'));
            if let Some(c) = class {
                classes.insert(c);
            }
            let order_key = match index.get(name) {
                Some(&k) => k,
                None => {
                    let k = (class.unwrap_or(u64::MAX), index.len());
                    index.insert(name.to_string(), k);
                    k
                }
            };
            match stats.get_mut(&order_key) {
                None => {
                    stats.insert(order_key, (name.to_string(), value.to_string()));
                }
                Some((_, current)) => {
                    if let (Ok(a), Ok(b)) = (current.parse::<u64>(), value.parse::<u64>()) {
                        *current = class_figure(name)(a, b).to_string();
                    }
                }
            }
        }
    }
    let mut out = BytesMut::new();
    for (name, value) in stats.values() {
        if name == "active_slabs" {
            reply::stat(&mut out, name, classes.len());
        } else {
            reply::stat(&mut out, name, value);
        }
    }
    for (prefix, [g, h, s, d]) in prefixes {
        out.put_slice(format!("PREFIX {prefix} get {g} hit {h} set {s} del {d}\r\n").as_bytes());
    }
    out.put_slice(reply::END);
    out.freeze()
}

/// Concatenates the members' dumps; a member's one-line answer (`BUSY`, an error) is the
/// answer.
fn concat_dumps(replies: &[Bytes], limit: u32) -> Bytes {
    let mut out = BytesMut::new();
    let mut lines = 0u32;
    for dump in replies {
        let Some(body) = dump.strip_suffix(reply::END) else {
            return dump.clone();
        };
        for line in body.split_inclusive(|&b| b == b'\n') {
            if limit != 0 && lines >= limit {
                break;
            }
            out.put_slice(line);
            lines += 1;
        }
    }
    out.put_slice(reply::END);
    out.freeze()
}

/// Room for a request line naming `keys` (command, numbers and flags included), so
/// encoding it allocates once.
fn line_capacity(keys: &[&[u8]]) -> usize {
    keys.iter().map(|k| k.len() + 1).sum::<usize>() + 96
}

/// A reply the proxy gives itself, composed as a node would (`noreply` included).
fn local(response: Response, noreply: bool) -> Job {
    let mut out = BytesMut::new();
    response.compose(noreply, &mut out);
    Job::Local(out.freeze())
}

fn local_line(text: &'static str) -> Job {
    local(Response::Line(text), false)
}

/// Decides where a request goes. Pure: depends only on the request and the ring.
fn plan(request: &Request<'_>, view: &ClusterView) -> Job {
    let owners = |key: &[u8]| -> Vec<usize> {
        view.ring
            .owners(key, usize::from(view.list.replication_factor.max(1)))
    };
    match request {
        Request::Get {
            command,
            exptime,
            keys,
        } => {
            let mut parts: Vec<(Vec<usize>, Vec<&[u8]>)> = Vec::new();
            let mut order = Vec::new();
            for key in keys.iter() {
                order.push(key.to_vec());
                let key_owners = owners(key);
                // Keys go together only when every owner is the same, so a part that fails
                // over asks a node that holds a replica of each of its keys.
                match parts.iter_mut().find(|(o, _)| *o == key_owners) {
                    Some((_, keys)) => keys.push(key),
                    None => parts.push((key_owners, vec![key])),
                }
            }
            if parts.is_empty() {
                return Job::Local(Bytes::from_static(reply::END));
            }
            if parts.iter().any(|(o, _)| o.is_empty()) {
                return Job::Local(Bytes::from_static(UNAVAILABLE));
            }
            if let [(owners, keys)] = parts.as_mut_slice() {
                // One node holds every key: it answers in the client's order itself.
                let mut out = BytesMut::with_capacity(line_capacity(keys));
                encode_get(*command, *exptime, keys, &mut out);
                return Job::Keyed {
                    owners: std::mem::take(owners),
                    bytes: out.freeze(),
                    kind: ReplyKind::Retrieval,
                    quiet: Quiet::None,
                    retry_safe: true,
                };
            }
            let parts = parts
                .into_iter()
                .map(|(o, keys)| {
                    let mut out = BytesMut::with_capacity(line_capacity(&keys));
                    encode_get(*command, *exptime, &keys, &mut out);
                    (o, out.freeze())
                })
                .collect();
            Job::Split { parts, order }
        }
        Request::Store(_)
        | Request::Delete { .. }
        | Request::Arithmetic { .. }
        | Request::Touch { .. }
        | Request::Meta(_)
        | Request::MetaDebug { .. } => {
            let key: &[u8] = match request {
                Request::Store(s) => s.key,
                Request::Delete { key, .. }
                | Request::Arithmetic { key, .. }
                | Request::Touch { key, .. } => key,
                Request::Meta(m) => &m.key,
                Request::MetaDebug { key } => key,
                _ => &[],
            };
            let data = match request {
                Request::Store(s) => s.data.len(),
                _ => 0,
            };
            let mut out = BytesMut::with_capacity(line_capacity(&[key]) + data);
            let Some((kind, quiet)) = encode_keyed(request, &mut out) else {
                return local_line("ERROR");
            };
            let owners = owners(key);
            if owners.is_empty() {
                return Job::Local(Bytes::from_static(UNAVAILABLE));
            }
            // Reads and plain sets may be repeated on a replica; `incr`, `add`, `append`,
            // deletes (a second one answers NOT_FOUND) and the like may not.
            let retry_safe = match request {
                Request::Store(s) => s.mode == StoreMode::Set,
                Request::Touch { .. } | Request::MetaDebug { .. } => true,
                Request::Meta(m) => m.command == MetaCommand::Get,
                _ => false,
            };
            Job::Keyed {
                owners,
                bytes: out.freeze(),
                kind,
                quiet,
                retry_safe,
            }
        }
        Request::TooLarge { noreply, .. } => local(Response::Line(reply::TOO_LARGE), *noreply),
        Request::FlushAll { delay, noreply } => {
            let text = if *delay > 0 {
                format!("flush_all {delay}\r\n")
            } else {
                "flush_all\r\n".to_string()
            };
            Job::All {
                bytes: Bytes::from(text),
                kind: ReplyKind::Line,
                combine: Combine::Agree,
                quiet: if *noreply { Quiet::All } else { Quiet::None },
            }
        }
        Request::CacheMemlimit { megabytes, noreply } => Job::All {
            bytes: Bytes::from(format!("cache_memlimit {megabytes}\r\n")),
            kind: ReplyKind::Line,
            combine: Combine::Agree,
            quiet: if *noreply { Quiet::All } else { Quiet::None },
        },
        Request::Stats { sub, arg } => {
            let (bytes, combine) = match (*sub, *arg) {
                (b"", _) => (Bytes::from_static(b"stats\r\n"), Combine::SumStats),
                (b"reset", _) => (Bytes::from_static(b"stats reset\r\n"), Combine::Agree),
                (b"slabs" | b"items" | b"sizes", _) | (b"detail", b"dump") => {
                    let mut out = BytesMut::new();
                    out.put_slice(b"stats ");
                    out.put_slice(sub);
                    out.put_slice(if *sub == b"detail" {
                        &b" dump\r\n"[..]
                    } else {
                        b"\r\n"
                    });
                    (out.freeze(), Combine::SumClasses)
                }
                (b"detail", b"on") => (Bytes::from_static(b"stats detail on\r\n"), Combine::Agree),
                (b"detail", b"off") => {
                    (Bytes::from_static(b"stats detail off\r\n"), Combine::Agree)
                }
                _ => {
                    // Other subcommands describe one node: the first member answers.
                    let mut out = BytesMut::new();
                    out.put_slice(b"stats ");
                    out.put_slice(sub);
                    if !arg.is_empty() {
                        out.put_u8(b' ');
                        out.put_slice(arg);
                    }
                    out.put_slice(b"\r\n");
                    if view.list.members.is_empty() {
                        return Job::Local(Bytes::from_static(UNAVAILABLE));
                    }
                    return Job::Keyed {
                        owners: vec![0],
                        bytes: out.freeze(),
                        kind: ReplyKind::Stats,
                        quiet: Quiet::None,
                        retry_safe: true,
                    };
                }
            };
            Job::All {
                bytes,
                kind: ReplyKind::Stats,
                combine,
                quiet: Quiet::None,
            }
        }
        Request::ConfigGet { what } => {
            if *what == b"cluster" {
                Job::Local(Bytes::from(view.list.elasticache_config_reply()))
            } else {
                local_line(reply::UNKNOWN_CONFIG_KEY)
            }
        }
        Request::Version => {
            let mut out = BytesMut::new();
            reply::version(&mut out, &version_string());
            Job::Local(out.freeze())
        }
        Request::Verbosity { noreply, .. } => local(Response::Ok, *noreply),
        Request::Quit => Job::Close,
        Request::MetaNoop => local(Response::MetaNoop, false),
        Request::Admin(admin) => match admin {
            AdminRequest::Watch(_) => {
                local_line("CLIENT_ERROR watch is per node: connect to a node to watch it")
            }
            // The proxy does not shut nodes down.
            AdminRequest::Shutdown { .. } | AdminRequest::ShutdownInvalid => {
                local_line(reply::SHUTDOWN_NOT_ENABLED)
            }
            AdminRequest::CacheDump(Err(error)) => local_line(error),
            _ => {
                let mut out = BytesMut::new();
                let Some(kind) = encode_admin(admin, &mut out) else {
                    return local_line("ERROR");
                };
                if view.list.members.is_empty() {
                    return Job::Local(Bytes::from_static(UNAVAILABLE));
                }
                let combine = match admin {
                    AdminRequest::CacheDump(Ok((_, limit))) => Combine::Concat { limit: *limit },
                    AdminRequest::LruCrawler(CrawlerCommand::Metadump(_)) => {
                        Combine::Concat { limit: 0 }
                    }
                    _ => Combine::Agree,
                };
                Job::All {
                    bytes: out.freeze(),
                    kind,
                    combine,
                    quiet: Quiet::None,
                }
            }
        },
        Request::Error {
            reply: text,
            noreply,
        } => local(Response::Line(text), *noreply),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kache_cluster::{Member, MemberList};

    fn view(n: u16, rf: u8) -> ClusterView {
        let members = (0..n)
            .map(|i| Member {
                name: format!("n{i}"),
                host: "127.0.0.1".into(),
                ip: "127.0.0.1".into(),
                port: 30000 + i,
                peer_port: 31000 + i,
            })
            .collect();
        ClusterView::new(
            MemberList {
                version: 1,
                replication_factor: rf,
                members,
            },
            "proxy",
        )
    }

    fn planned(input: &[u8], view: &ClusterView) -> Job {
        match parse(input, &Limits::default()) {
            ParseOutcome::Request { request, .. } => plan(&request, view),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keyed_requests_go_to_the_owners_in_failover_order() {
        let v = view(3, 2);
        match planned(b"set user:1 0 0 1 noreply\r\nx\r\n", &v) {
            Job::Keyed {
                owners,
                bytes,
                quiet,
                ..
            } => {
                let expected: Vec<String> =
                    v.owners(b"user:1").iter().map(|m| m.name.clone()).collect();
                assert_eq!(
                    owners
                        .iter()
                        .map(|&i| v.list.members[i].name.clone())
                        .collect::<Vec<_>>(),
                    expected
                );
                assert_eq!(owners.len(), 2);
                assert_eq!(&bytes[..], b"set user:1 0 0 1\r\nx\r\n");
                assert_eq!(quiet, Quiet::All);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn multi_gets_split_by_owner_and_keep_the_order() {
        let v = view(3, 1);
        let keys: Vec<String> = (0..30).map(|i| format!("k{i}")).collect();
        let line = format!("get {}\r\n", keys.join(" "));
        match planned(line.as_bytes(), &v) {
            Job::Split { parts, order } => {
                assert_eq!(parts.len(), 3);
                assert_eq!(order.len(), 30);
                assert_eq!(order[7], b"k7");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reassembles_split_replies_in_client_order() {
        let job = Job::Split {
            parts: vec![(vec![], Bytes::new()), (vec![], Bytes::new())],
            order: vec![b"b".to_vec(), b"a".to_vec(), b"c".to_vec()],
        };
        let mut results = [
            Some(Bytes::from_static(b"VALUE a 0 1\r\n1\r\nEND\r\n")),
            Some(Bytes::from_static(b"VALUE b 0 1\r\n2\r\nEND\r\n")),
        ];
        let reply = assemble(&job, &mut results);
        assert_eq!(
            &reply[..],
            b"VALUE b 0 1\r\n2\r\nVALUE a 0 1\r\n1\r\nEND\r\n"
        );
    }

    #[test]
    fn stats_are_summed() {
        let a = Bytes::from_static(b"STAT pid 1\r\nSTAT cmd_get 2\r\nSTAT version x\r\nEND\r\n");
        let b = Bytes::from_static(b"STAT pid 9\r\nSTAT cmd_get 5\r\nSTAT version x\r\nEND\r\n");
        assert_eq!(
            &sum_stats(&[a, b])[..],
            b"STAT pid 1\r\nSTAT cmd_get 7\r\nSTAT version x\r\nEND\r\n"
        );
    }

    #[test]
    fn local_answers_need_no_node() {
        let v = view(0, 1);
        assert!(matches!(planned(b"version\r\n", &v), Job::Local(_)));
        assert!(matches!(planned(b"bogus\r\n", &v), Job::Local(b) if &b[..] == b"ERROR\r\n"));
        assert!(
            matches!(planned(b"get k\r\n", &v), Job::Local(b) if b.starts_with(b"SERVER_ERROR"))
        );
    }
}
