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
//! - `flush_all`, `cache_memlimit` and `stats reset` go to every member (`OK` when all agree,
//!   otherwise the first other reply); `stats` sums every member's counters; other `stats`
//!   subcommands are answered by the first member;
//! - `version`, `verbosity`, `mn`, `quit` and `config get cluster` are answered by the proxy;
//! - bad input gets the same reply a node gives (the same parser produces it).
//!
//! The member list is followed live; client connections survive every change.

pub mod backend;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::join_all;
use kache_cluster::Member;
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::cluster::{Cluster, ClusterView};
use crate::engine::version_string;
use crate::protocol::forward::{encode_get, encode_keyed, value_blocks, Quiet, ReplyKind};
use crate::protocol::{parse, reply, Limits, ParseOutcome, Request};
use backend::{Backend, ExchangeError};

const READ_CHUNK: usize = 16 * 1024;
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
}

/// The plan for one client request.
#[derive(Debug)]
enum Job {
    /// Answered by the proxy.
    Local(Bytes),
    /// One request for a key's owners, tried in order.
    Keyed {
        owners: Vec<Member>,
        bytes: Bytes,
        kind: ReplyKind,
        quiet: Quiet,
    },
    /// A retrieval split by owner, reassembled in `order`.
    Split {
        parts: Vec<(Vec<Member>, Bytes)>,
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
    backends: Mutex<HashMap<String, Arc<Backend>>>,
    limits: Limits,
    pool_size: usize,
    pub stats: ProxyStats,
}

impl Proxy {
    pub fn new(cluster: Arc<Cluster>, limits: Limits, pool_size: usize) -> Proxy {
        Proxy {
            cluster,
            backends: Mutex::new(HashMap::new()),
            limits,
            pool_size,
            stats: ProxyStats::default(),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    fn backend(&self, member: &Member) -> Arc<Backend> {
        let addr = format!("{}:{}", member.host, member.port);
        let mut backends = self.backends.lock();
        match backends.get(&member.name) {
            Some(b) if b.addr == addr => b.clone(),
            _ => {
                let b = Backend::new(addr, self.pool_size);
                backends.insert(member.name.clone(), b.clone());
                b
            }
        }
    }

    /// Total backend errors (for metrics).
    pub fn backend_errors(&self) -> u64 {
        self.backends
            .lock()
            .values()
            .map(|b| b.errors.load(Relaxed))
            .sum()
    }

    /// Accepts clients until `shutdown`, then lets open connections finish for `drain`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        max_connections: usize,
        mut shutdown: watch::Receiver<bool>,
        drain: Duration,
    ) {
        let permits = Arc::new(Semaphore::new(max_connections));
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = shutdown.changed() => break,
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                self.stats.rejected_connections.fetch_add(1, Relaxed);
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = stream
                        .write_all(b"ERROR Too many open connections\r\n")
                        .await;
                });
                continue;
            };
            self.stats.curr_connections.fetch_add(1, Relaxed);
            self.stats.total_connections.fetch_add(1, Relaxed);
            let proxy = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _ = proxy.client(stream, shutdown).await;
                drop(permit);
                proxy.stats.curr_connections.fetch_sub(1, Relaxed);
            });
        }
        drop(listener);
        let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
        let _ = tokio::time::timeout(drain, permits.acquire_many(all)).await;
    }

    async fn client(
        &self,
        mut stream: TcpStream,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut read = BytesMut::with_capacity(READ_CHUNK);
        let mut write = BytesMut::with_capacity(READ_CHUNK);
        let mut swallow = 0usize;
        let mut draining = *shutdown.borrow();
        let mut first_read = true;
        loop {
            if draining && read.is_empty() && swallow == 0 {
                return Ok(());
            }
            if read.capacity() - read.len() < READ_CHUNK / 4 {
                read.reserve(READ_CHUNK);
            }
            let n = tokio::select! {
                n = stream.read_buf(&mut read) => n?,
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    continue;
                }
            };
            if n == 0 {
                return Ok(());
            }
            if first_read && crate::server::is_binary_protocol(&read) {
                return Ok(());
            }
            first_read = false;
            let view = self.cluster.view();
            let mut jobs = Vec::new();
            let mut close = false;
            loop {
                if swallow > 0 {
                    let k = swallow.min(read.len());
                    read.advance(k);
                    swallow -= k;
                    if swallow > 0 {
                        break;
                    }
                }
                let consumed = match parse(&read, &self.limits) {
                    ParseOutcome::Request {
                        request,
                        consumed,
                        swallow: s,
                    } => {
                        swallow = s;
                        jobs.push(plan(&request, &view));
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
            let replies = self.run(&jobs, &view).await;
            for (job, reply) in jobs.iter().zip(replies) {
                if matches!(job, Job::Close) {
                    close = true;
                    break;
                }
                write.put_slice(&reply);
            }
            stream.write_all(&write).await?;
            write.clear();
            if close {
                let _ = stream.shutdown().await;
                return Ok(());
            }
        }
    }

    /// Executes a batch of jobs and returns one reply per job, in order.
    async fn run(&self, jobs: &[Job], view: &ClusterView) -> Vec<Bytes> {
        // The calls bound for one node in one round, with their attempt numbers.
        type Group = (Arc<Backend>, Vec<(Call, usize)>);
        // Every request a node must answer: (job, part) and where it may go, in order.
        struct Call {
            job: usize,
            part: usize,
            candidates: Vec<Member>,
            bytes: Bytes,
            kind: ReplyKind,
        }
        let mut calls = Vec::new();
        for (j, job) in jobs.iter().enumerate() {
            match job {
                Job::Keyed {
                    owners,
                    bytes,
                    kind,
                    ..
                } => calls.push(Call {
                    job: j,
                    part: 0,
                    candidates: owners.clone(),
                    bytes: bytes.clone(),
                    kind: *kind,
                }),
                Job::Split { parts, .. } => {
                    for (p, (owners, bytes)) in parts.iter().enumerate() {
                        calls.push(Call {
                            job: j,
                            part: p,
                            candidates: owners.clone(),
                            bytes: bytes.clone(),
                            kind: ReplyKind::Retrieval,
                        });
                    }
                }
                Job::All { bytes, kind, .. } => {
                    for (p, member) in view.list.members.iter().enumerate() {
                        calls.push(Call {
                            job: j,
                            part: p,
                            candidates: vec![member.clone()],
                            bytes: bytes.clone(),
                            kind: *kind,
                        });
                    }
                }
                Job::Local(_) | Job::Close => {}
            }
        }
        let mut results: HashMap<(usize, usize), Bytes> = HashMap::new();
        let mut pending: Vec<(Call, usize)> = calls.into_iter().map(|c| (c, 0)).collect();
        // Each round sends every pending call to its current candidate; calls whose node
        // was unreachable move on to their next candidate (the next owner on the ring).
        while !pending.is_empty() {
            let mut groups: HashMap<String, Group> = HashMap::new();
            for (call, mut attempt) in pending.drain(..) {
                // Skip candidates known to be down while others remain.
                while attempt + 1 < call.candidates.len()
                    && self.backend(&call.candidates[attempt]).is_down()
                {
                    attempt += 1;
                }
                let Some(member) = call.candidates.get(attempt) else {
                    results.insert((call.job, call.part), Bytes::from_static(UNAVAILABLE));
                    continue;
                };
                let backend = self.backend(member);
                groups
                    .entry(member.name.clone())
                    .or_insert_with(|| (backend, Vec::new()))
                    .1
                    .push((call, attempt));
            }
            let exchanges = groups.into_values().map(|(backend, calls)| async move {
                let requests: Vec<(Bytes, ReplyKind)> = calls
                    .iter()
                    .map(|(c, _)| (c.bytes.clone(), c.kind))
                    .collect();
                let outcome = backend.exchange(&requests).await;
                (calls, outcome)
            });
            for (calls, outcome) in join_all(exchanges).await {
                match outcome {
                    Ok(replies) => {
                        for ((call, _), reply) in calls.into_iter().zip(replies) {
                            results.insert((call.job, call.part), reply);
                        }
                    }
                    Err(ExchangeError::Unreachable) => {
                        for (call, attempt) in calls {
                            if attempt + 1 < call.candidates.len() {
                                self.stats.failovers.fetch_add(1, Relaxed);
                                pending.push((call, attempt + 1));
                            } else {
                                results
                                    .insert((call.job, call.part), Bytes::from_static(UNAVAILABLE));
                            }
                        }
                    }
                    Err(ExchangeError::Broken) => {
                        for (call, _) in calls {
                            results.insert((call.job, call.part), Bytes::from_static(BROKEN));
                        }
                    }
                }
            }
        }
        jobs.iter()
            .enumerate()
            .map(|(j, job)| assemble(j, job, &mut results, view.list.members.len()))
            .collect()
    }
}

/// The reply to one job from the node replies gathered for it.
fn assemble(
    j: usize,
    job: &Job,
    results: &mut HashMap<(usize, usize), Bytes>,
    members: usize,
) -> Bytes {
    match job {
        Job::Local(bytes) => bytes.clone(),
        Job::Close => Bytes::new(),
        Job::Keyed { quiet, .. } => {
            let reply = results
                .remove(&(j, 0))
                .unwrap_or_else(|| Bytes::from_static(BROKEN));
            if quiet.delivers(&reply) {
                reply
            } else {
                Bytes::new()
            }
        }
        Job::Split { parts, order } => {
            let replies: Vec<Bytes> = (0..parts.len())
                .map(|p| {
                    results
                        .remove(&(j, p))
                        .unwrap_or_else(|| Bytes::from_static(BROKEN))
                })
                .collect();
            // An error from any part answers the whole request, as one node would.
            if let Some(err) = replies
                .iter()
                .find(|r| !r.starts_with(b"VALUE ") && !r.starts_with(b"END"))
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
            out.put_slice(b"END\r\n");
            out.freeze()
        }
        Job::All { combine, quiet, .. } => {
            let replies: Vec<Bytes> = (0..members)
                .filter_map(|p| results.remove(&(j, p)))
                .collect();
            let combined = match combine {
                Combine::Agree => replies
                    .iter()
                    .find(|r| r.as_ref() != b"OK\r\n" && r.as_ref() != b"RESET\r\n")
                    .or_else(|| replies.first())
                    .cloned()
                    .unwrap_or_else(|| Bytes::from_static(UNAVAILABLE)),
                Combine::SumStats => sum_stats(&replies),
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
    out.put_slice(b"END\r\n");
    out.freeze()
}

fn local_line(text: &str) -> Job {
    let mut out = BytesMut::new();
    reply::line(&mut out, text);
    Job::Local(out.freeze())
}

/// Decides where a request goes. Pure: depends only on the request and the ring.
fn plan(request: &Request<'_>, view: &ClusterView) -> Job {
    let owners = |key: &[u8]| -> Vec<Member> { view.owners(key).into_iter().cloned().collect() };
    match request {
        Request::Get {
            command,
            exptime,
            keys,
        } => {
            let mut parts: Vec<(Vec<Member>, Vec<&[u8]>)> = Vec::new();
            let mut order = Vec::new();
            for key in keys.iter() {
                order.push(key.to_vec());
                let key_owners = owners(key);
                match parts.iter_mut().find(|(o, _)| {
                    o.first().map(|m| &m.name) == key_owners.first().map(|m| &m.name)
                }) {
                    Some((_, keys)) => keys.push(key),
                    None => parts.push((key_owners, vec![key])),
                }
            }
            if parts.is_empty() {
                return Job::Local(Bytes::from_static(b"END\r\n"));
            }
            if parts.iter().any(|(o, _)| o.is_empty()) {
                return Job::Local(Bytes::from_static(UNAVAILABLE));
            }
            let parts = parts
                .into_iter()
                .map(|(o, keys)| {
                    let mut out = BytesMut::new();
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
            let mut out = BytesMut::new();
            let Some((kind, quiet)) = encode_keyed(request, &mut out) else {
                return local_line("ERROR");
            };
            let owners = owners(key);
            if owners.is_empty() {
                return Job::Local(Bytes::from_static(UNAVAILABLE));
            }
            Job::Keyed {
                owners,
                bytes: out.freeze(),
                kind,
                quiet,
            }
        }
        Request::TooLarge { noreply, .. } => {
            if *noreply {
                Job::Local(Bytes::new())
            } else {
                local_line("SERVER_ERROR object too large for cache")
            }
        }
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
            let (bytes, combine) = match *sub {
                b"" => (Bytes::from_static(b"stats\r\n"), Combine::SumStats),
                b"reset" => (Bytes::from_static(b"stats reset\r\n"), Combine::Agree),
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
                    let Some(first) = view.list.members.first() else {
                        return Job::Local(Bytes::from_static(UNAVAILABLE));
                    };
                    return Job::Keyed {
                        owners: vec![first.clone()],
                        bytes: out.freeze(),
                        kind: ReplyKind::Stats,
                        quiet: Quiet::None,
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
                local_line("CLIENT_ERROR unknown config key")
            }
        }
        Request::Version => local_line(&format!("VERSION {}", version_string())),
        Request::Verbosity { noreply, .. } => {
            if *noreply {
                Job::Local(Bytes::new())
            } else {
                local_line("OK")
            }
        }
        Request::Quit => Job::Close,
        Request::MetaNoop => local_line("MN"),
        Request::Error {
            reply: text,
            noreply,
        } => {
            if *noreply {
                Job::Local(Bytes::new())
            } else {
                local_line(text)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kache_cluster::MemberList;

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
                    owners.iter().map(|m| m.name.clone()).collect::<Vec<_>>(),
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
        let mut results = HashMap::new();
        results.insert((0, 0), Bytes::from_static(b"VALUE a 0 1\r\n1\r\nEND\r\n"));
        results.insert((0, 1), Bytes::from_static(b"VALUE b 0 1\r\n2\r\nEND\r\n"));
        let reply = assemble(0, &job, &mut results, 2);
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
