//! The client-facing TCP server: accepting under a connection limit, one task per
//! connection, batched reads and writes, graceful shutdown.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::engine::{Context, Engine, Next, Outbox};
use crate::protocol::auth::{parse_auth, AuthStep};
use crate::protocol::{parse, reply, Limits, ParseOutcome};
use crate::stats::Counters;
use crate::store::now_secs;
use crate::tls::Tls;
use futures::future::join_all;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 16 * 1024;
/// Replies buffered before they are written out mid-batch, so a long pipeline of large
/// values cannot grow the write buffer without bound.
const WRITE_HIGH_WATER: usize = 1024 * 1024;
/// The expiry sweeper wakes this often and looks at this many slots per shard each time,
/// holding a shard's lock only for one small chunk.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
const SWEEP_BUDGET: usize = 512;
/// How long a read-through waits for one previous owner.
const READ_THROUGH_TIMEOUT: Duration = Duration::from_millis(250);
/// A client must finish its TLS handshake this soon.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer to a write that too few of the key's owners acknowledged (`--write-acks`).
const NOT_REPLICATED: &str = "SERVER_ERROR not enough replicas acknowledged the write";

/// Accepts clients until `shutdown` turns true, then waits up to `drain` for open
/// connections to finish what they were doing.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    limits: Limits,
    max_connections: usize,
    tls: Option<Arc<Tls>>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut next_id: usize = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Typically EMFILE: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            engine
                .stats
                .rejected_connections
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "connection limit reached");
            tokio::spawn(reject(stream));
            continue;
        };
        // Counted here, in accept order, so `curr_connections` never shows a connection
        // whose slot is not taken; on the way out the slot is freed before the count drops.
        engine
            .stats
            .curr_connections
            .fetch_add(1, Ordering::Relaxed);
        engine
            .stats
            .total_connections
            .fetch_add(1, Ordering::Relaxed);
        next_id = next_id.wrapping_add(1);
        let id = next_id;
        let engine = engine.clone();
        let shutdown = shutdown.clone();
        let tls = tls.as_ref().map(|t| t.acceptor());
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let result = match tls {
                None => {
                    Connection::new(stream, &engine, limits, id)
                        .run(shutdown)
                        .await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            Connection::new(stream, &engine, limits, id)
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
            drop(permit);
            engine
                .stats
                .curr_connections
                .fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    // Every connection holds a permit: having them all back means every connection is done.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(drain, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the drain period; closing them");
    }
}

/// Whether a connection opens with the binary protocol's request magic byte.
pub fn is_binary_protocol(first_bytes: &[u8]) -> bool {
    first_bytes.first() == Some(&0x80)
}

/// Fetches keys from their previous owners and stores what they return, so the request
/// that missed them is answered with a hit. Bounded by `READ_THROUGH_TIMEOUT` per source.
async fn read_through(engine: &Engine, candidates: Vec<(Vec<u8>, Vec<kache_cluster::Member>)>) {
    let Some(links) = &engine.links else {
        return;
    };
    let fetches = candidates.into_iter().map(|(key, sources)| async move {
        for source in sources {
            // A peer known to be down cannot answer: asking it would only add the timeout
            // to this miss (for every miss, while it stays down).
            if links.is_down(&source) {
                continue;
            }
            let reply =
                tokio::time::timeout(READ_THROUGH_TIMEOUT, links.fetch(&source, &key)).await;
            if let Ok(Ok(Some(record))) = reply {
                crate::peer::apply(&engine.store, &record, now_secs());
                engine
                    .peer_stats
                    .read_through_hits
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    });
    join_all(fetches).await;
}

/// Tells a client over the connection limit why it is being turned away, as memcached does.
async fn reject(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        stream.write_all(b"ERROR Too many open connections\r\n"),
    )
    .await;
}

/// Reclaims expired items on a thread of its own (not a request worker), until `stop`.
pub fn spawn_sweeper(
    engine: Arc<Engine>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("kache-sweeper".into())
        .spawn(move || {
            let mut cursors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(SWEEP_INTERVAL);
                engine.store.sweep(now_secs(), SWEEP_BUDGET, &mut cursors);
            }
        })
}

struct Connection<'a, S> {
    stream: S,
    engine: &'a Engine,
    limits: Limits,
    id: usize,
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
    fn new(stream: S, engine: &'a Engine, limits: Limits, id: usize) -> Self {
        Connection {
            stream,
            engine,
            limits,
            id,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: BytesMut::with_capacity(READ_CHUNK),
            swallow: 0,
            writes: Vec::new(),
            authenticated: engine.auth.is_none(),
            ctx: Context {
                counters: Counters::default(),
                outbox: Outbox::new(engine.cluster.is_some()),
            },
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> std::io::Result<()> {
        let mut draining = *shutdown.borrow();
        loop {
            if draining && self.read.is_empty() && self.swallow == 0 {
                return Ok(());
            }
            if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
                self.read.reserve(READ_CHUNK);
            }
            let n = tokio::select! {
                n = self.stream.read_buf(&mut self.read) => n?,
                _ = shutdown.changed(), if !draining => {
                    draining = true;
                    continue;
                }
            };
            if n == 0 {
                return Ok(());
            }
            if self.ctx.counters.bytes_read == 0 && is_binary_protocol(&self.read) {
                // memcached's binary protocol is not served: hang up at once rather than
                // leave a binary client waiting for its timeout.
                return Ok(());
            }
            self.ctx.counters.bytes_read += n as u64;
            let next = self.process().await?;
            self.replicate().await;
            self.flush().await?;
            if next == Next::Close {
                let _ = self.stream.shutdown().await;
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
                    let candidates = self.engine.read_through_candidates(&request, now);
                    if !candidates.is_empty() {
                        read_through(self.engine, candidates).await;
                    }
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
            if next == Next::Close {
                return Ok(Next::Close);
            }
            if self.write.len() >= WRITE_HIGH_WATER {
                // Replies of writes go out only once their replication is decided.
                self.replicate().await;
                self.flush().await?;
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
        let acknowledged = crate::peer::replicate::replicate(self.engine, records).await;
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
        self.engine
            .peer_stats
            .write_ack_failures
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
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
