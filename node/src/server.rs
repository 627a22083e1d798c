//! The client-facing TCP server: accepting under a connection limit, one task per
//! connection, batched reads and writes, graceful shutdown.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::admin_commands::conns::{ConnInfo, ConnState};
use crate::admin_commands::dump::Metadump;
use crate::admin_commands::watch::Registration as WatchRegistration;
use crate::engine::{Context, Engine, Next, Outbox};
use crate::listener::{Received, RequestReader, Service, READ_CHUNK};
use crate::node::Node;
use crate::protocol::auth::{parse_auth, AuthStep};
use crate::protocol::{parse, reply, Limits, ParseOutcome};
use crate::stats::Counters;
use crate::store::now_secs;
use crate::tls::Tls;

/// Replies buffered before they are written out mid-batch, so a long pipeline of large
/// values cannot grow the write buffer without bound.
const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// A metadump is written out in chunks of about this many bytes.
const DUMP_CHUNK: usize = 64 * 1024;
/// A client must finish its TLS handshake this soon.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// memcached counts idle time in whole seconds: a connection idle for exactly the timeout
/// is kicked a moment later.
const IDLE_GRANULARITY: Duration = Duration::from_millis(500);

/// The answer to a write that too few of the key's owners acknowledged (`--write-acks`).
const NOT_REPLICATED: &str = "SERVER_ERROR not enough replicas acknowledged the write";

/// Accepts clients until `shutdown` turns true, then waits up to `drain` for open
/// connections to finish what they were doing.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    limits: Limits,
    max_connections: usize,
    tls: Option<Arc<Tls>>,
    shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let admin = node.engine.admin.clone();
    let _listed = listener
        .local_addr()
        .ok()
        .map(|addr| admin.conns.listener(addr, now_secs()));
    let service = Arc::new(ClientService { node, limits, tls });
    crate::listener::serve(listener, service, max_connections, shutdown, drain).await;
}

/// The memcached protocol served from a node.
struct ClientService {
    node: Arc<Node>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
}

impl Service for ClientService {
    fn rejected(&self) {
        let stats = &self.node.engine.stats;
        stats.rejected_connections.fetch_add(1, Ordering::Relaxed);
    }

    fn opened(&self) -> u64 {
        // Counted here, in accept order, so `curr_connections` never shows a connection
        // whose slot is not taken; on the way out the slot is freed before the count drops.
        let stats = &self.node.engine.stats;
        stats.curr_connections.fetch_add(1, Ordering::Relaxed);
        stats.total_connections.fetch_add(1, Ordering::Relaxed)
    }

    fn closed(&self) {
        let stats = &self.node.engine.stats;
        stats.curr_connections.fetch_sub(1, Ordering::Relaxed);
    }

    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        _number: u64,
        shutdown: watch::Receiver<bool>,
    ) {
        let node = &self.node;
        let limits = self.limits;
        let local = stream.local_addr().unwrap_or(peer);
        let listed = node.engine.admin.conns.client(peer, local, now_secs());
        let info = listed.info.clone();
        let result = match self.tls.as_ref().map(|t| t.acceptor()) {
            None => {
                Connection::new(stream, node, limits, info)
                    .run(shutdown)
                    .await
            }
            Some(acceptor) => {
                match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => {
                        Connection::new(stream, node, limits, info)
                            .run(shutdown)
                            .await
                    }
                    Ok(Err(error)) => Err(error),
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    )),
                }
            }
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
        drop(listed);
    }
}

/// Runs the crawler (the expiry sweeper, and `lru_crawler crawl`) on a thread of its own,
/// not a request worker, until `stop`.
pub fn spawn_sweeper(
    node: Arc<Node>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kache-sweeper".into())
        .spawn(move || {
            let engine = &node.engine;
            engine.admin.crawler.run(&engine.store, &stop)
        })
}

struct Connection<'a, S> {
    stream: S,
    node: &'a Node,
    engine: &'a Engine,
    limits: Limits,
    id: usize,
    /// This connection's line in `stats conns`.
    info: Arc<ConnInfo>,
    /// `-o idle_timeout`: close after this long without a command.
    idle_timeout: Option<Duration>,
    /// `-R`: requests served before other connections get a turn.
    reqs_per_event: usize,
    read: BytesMut,
    write: BytesMut,
    /// Bytes still to discard after a refused data block.
    swallow: usize,
    ctx: Context,
    /// The replies of this batch's writes, replaced if their replication falls short.
    writes: Vec<WriteReply>,
    /// False until the client authenticates, when the node requires it.
    authenticated: bool,
}

/// Where a write's reply sits in the write buffer, and which outbox records it made.
struct WriteReply {
    reply: std::ops::Range<usize>,
    records: std::ops::Range<usize>,
    /// Text `noreply`: even an error is not sent.
    silent: bool,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Connection<'a, S> {
    fn new(stream: S, node: &'a Node, limits: Limits, info: Arc<ConnInfo>) -> Self {
        let engine = &node.engine;
        let m = &engine.settings.memcached;
        let idle = m.options.extended.idle_timeout;
        let id = info.id;
        Connection {
            stream,
            node,
            engine,
            limits,
            id,
            idle_timeout: (idle > 0).then(|| Duration::from_secs(u64::from(idle))),
            reqs_per_event: m.reqs_per_event.max(1) as usize,
            info,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(READ_CHUNK),
            swallow: 0,
            writes: Vec::new(),
            authenticated: engine.auth.is_none(),
            ctx: Context {
                counters: Counters::default(),
                outbox: Outbox::new(engine.cluster.is_some()),
                conn_id: id,
            },
        }
    }

    async fn run(mut self, shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        let mut reader = RequestReader::new(shutdown.clone());
        let mut last_command = tokio::time::Instant::now();
        loop {
            let between_requests = self.read.is_empty() && self.swallow == 0;
            // memcached kicks only connections waiting for a new command, not those in the
            // middle of one (a data block still to come).
            let idle_deadline = self
                .idle_timeout
                .filter(|_| between_requests)
                .map(|t| last_command + t + IDLE_GRANULARITY);
            let n = match reader
                .read(
                    &mut self.stream,
                    &mut self.read,
                    between_requests,
                    idle_deadline,
                )
                .await?
            {
                Received::Bytes(n) => n,
                Received::Done => return Ok(()),
                Received::Idle => {
                    self.engine
                        .admin
                        .conns
                        .idle_kicks
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(conn = self.id, "closing idle connection");
                    return Ok(());
                }
            };
            last_command = tokio::time::Instant::now();
            self.ctx.counters.bytes_read += n as u64;
            self.info.set_state(ConnState::ParseCmd);
            self.info.touch(now_secs());
            let next = self.process().await?;
            self.replicate().await;
            self.info.set_state(ConnState::Write);
            self.flush().await?;
            match next {
                Next::Close => {
                    let _ = self.stream.shutdown().await;
                    return Ok(());
                }
                Next::Watch(flags) => match self.engine.admin.logger.add(flags) {
                    Some(watcher) => return self.watch(watcher, shutdown).await,
                    None => {
                        reply::line(
                            &mut self.write,
                            "WATCHER_TOO_MANY log watcher limit reached",
                        );
                        self.flush().await?;
                    }
                },
                _ => {}
            }
            self.info
                .set_state(if self.read.is_empty() && self.swallow == 0 {
                    ConnState::Waiting
                } else {
                    ConnState::Nread
                });
        }
    }

    /// A `watch` connection: sends the log lines it asked for until the client goes away
    /// or the node shuts down. What the client sends is ignored, as memcached does.
    async fn watch(
        &mut self,
        registration: WatchRegistration,
        mut shutdown: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        self.info.set_state(ConnState::Watch);
        let mut lines = BytesMut::new();
        let mut ignored = [0u8; 512];
        loop {
            tokio::select! {
                _ = registration.watcher.next(&mut lines) => {
                    self.stream.write_all(&lines).await?;
                    lines.clear();
                }
                n = self.stream.read(&mut ignored) => {
                    if n? == 0 {
                        return Ok(());
                    }
                }
                _ = shutdown.changed() => return Ok(()),
            }
        }
    }

    /// Streams `lru_crawler metadump` in chunks, then goes on with the requests after it.
    async fn metadump(
        &mut self,
        selection: crate::protocol::admin::ClassSelection,
    ) -> std::io::Result<()> {
        self.flush().await?;
        self.info.set_state(ConnState::Watch);
        let mut dump = Metadump::new(&self.engine.store, &self.engine.admin.crawler, selection);
        loop {
            let done = dump.fill(now_secs(), &mut self.write, DUMP_CHUNK);
            self.flush().await?;
            if done {
                return Ok(());
            }
        }
    }

    /// Handles what an unauthenticated client sent: only the auth `set` is accepted.
    /// Returns `None` to go on with normal requests, or what to do next.
    fn authenticate(&mut self) -> Option<Next> {
        let Some(auth) = &self.engine.auth else {
            self.authenticated = true;
            return None;
        };
        while !self.authenticated {
            let (reply, consumed) = match parse_auth(&self.read) {
                AuthStep::Incomplete => return Some(Next::Continue),
                AuthStep::Close => return Some(Next::Close),
                AuthStep::Reply { reply, consumed } => (reply, consumed),
                AuthStep::Credentials {
                    user,
                    password,
                    consumed,
                } => {
                    self.ctx.counters.auth_cmds += 1;
                    if auth.check(user, password) {
                        self.authenticated = true;
                        ("STORED", consumed)
                    } else {
                        self.ctx.counters.auth_errors += 1;
                        ("CLIENT_ERROR authentication failure", consumed)
                    }
                }
            };
            reply::line(&mut self.write, reply);
            self.read.advance(consumed);
        }
        None
    }

    /// Executes every complete request in the read buffer.
    async fn process(&mut self) -> std::io::Result<Next> {
        if !self.authenticated {
            if let Some(next) = self.authenticate() {
                return Ok(next);
            }
        }
        let now = now_secs();
        let mut served = 0;
        loop {
            if self.swallow > 0 {
                let n = self.swallow.min(self.read.len());
                self.read.advance(n);
                self.swallow -= n;
                if self.swallow > 0 {
                    return Ok(Next::Continue);
                }
            }
            let (next, consumed) = match parse(&self.read, &self.limits) {
                ParseOutcome::Request {
                    request,
                    consumed,
                    swallow,
                } => {
                    self.swallow = swallow;
                    self.node.read_through(&request, now).await;
                    let reply_start = self.write.len();
                    let first_record = self.ctx.outbox.records.len();
                    let silent = request.silences_errors();
                    let next = self
                        .engine
                        .execute(request, now, &mut self.write, &mut self.ctx);
                    let records = first_record..self.ctx.outbox.records.len();
                    if !records.is_empty() {
                        self.writes.push(WriteReply {
                            reply: reply_start..self.write.len(),
                            records,
                            silent,
                        });
                    }
                    (next, consumed)
                }
                ParseOutcome::Incomplete => return Ok(Next::Continue),
                ParseOutcome::Close => return Ok(Next::Close),
            };
            self.read.advance(consumed);
            match next {
                Next::Continue => {}
                Next::Metadump(selection) => self.metadump(selection).await?,
                Next::Close | Next::Watch(_) => return Ok(next),
            }
            if self.write.len() >= WRITE_HIGH_WATER {
                // Replies of writes go out only once their replication is decided.
                self.replicate().await;
                self.flush().await?;
            }
            served += 1;
            if served % self.reqs_per_event == 0 {
                // memcached's -R: let other connections run before serving more of this one.
                self.engine
                    .admin
                    .conns
                    .yields
                    .fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    }

    /// Sends this batch's changes to the keys' other owners and waits (bounded) for their
    /// acknowledgements; a write that too few owners acknowledged (`--write-acks`) is
    /// answered `SERVER_ERROR` instead of its success reply.
    async fn replicate(&mut self) {
        let writes = std::mem::take(&mut self.writes);
        if self.ctx.outbox.records.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.ctx.outbox.records);
        let acknowledged = self.node.replicate(records).await;
        let write = &self.write;
        let short = |w: &&WriteReply| {
            // A request already answered with an error (a value too large) keeps its reply.
            let answered_ok = !write[w.reply.clone()].starts_with(b"SERVER_ERROR");
            answered_ok
                && acknowledged
                    .get(w.records.clone())
                    .is_some_and(|acks| acks.contains(&false))
        };
        let failed: Vec<&WriteReply> = writes.iter().filter(short).collect();
        if failed.is_empty() {
            return;
        }
        self.node.count_write_ack_failures(failed.len());
        let mut patched = BytesMut::with_capacity(self.write.len());
        let mut at = 0;
        for w in failed {
            patched.extend_from_slice(&self.write[at..w.reply.start]);
            if !w.silent {
                reply::line(&mut patched, NOT_REPLICATED);
            }
            at = w.reply.end;
        }
        patched.extend_from_slice(&self.write[at..]);
        self.write = patched;
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        self.ctx.counters.bytes_written += self.write.len() as u64;
        // Counters become visible before the replies they describe.
        self.engine.stats.merge(self.id, &mut self.ctx.counters);
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
        }
        Ok(())
    }
}
