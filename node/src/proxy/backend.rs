//! Connections from the proxy to one cache node.
//!
//! A few persistent connections per node are shared by every client: requests from all
//! clients are queued to a connection's task, which writes whatever has gathered in one
//! write and hands the replies back, in order, through one channel per request. This keeps
//! the number of node connections (and the node's syscalls per request) small however many
//! clients the proxy has, as twemproxy does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use crate::auth::AuthFile;
use crate::protocol::forward::{reply_len, ReplyKind};
use crate::tls::{peer_server_name, NodeTlsFiles};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a TLS handshake with a node may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a node may take to answer the login.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node may take to answer before the proxy gives up on it, by default
/// (`--node-timeout-ms`).
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(2);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest reply buffered from a node (values are bounded by the item size limit).
const MAX_REPLY_BUFFER: usize = 64 * 1024 * 1024;
/// Requests queued per connection before senders wait.
const QUEUE: usize = 4096;
/// Bytes gathered into one write.
const MAX_WRITE: usize = 256 * 1024;

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeError {
    /// The request did not take effect, or repeating it is harmless (a read, a plain `set`):
    /// it may go to a replica.
    Unreachable,
    /// The request was written to a node that then failed or stalled, and repeating it
    /// could apply it twice (`incr`, `add`, `append`, …): its outcome is unknown.
    Broken,
}

struct Request {
    bytes: Bytes,
    kind: ReplyKind,
    /// Whether sending it again, to a replica, is harmless even if the node applied it.
    retry_safe: bool,
    reply: oneshot::Sender<Result<Bytes, ExchangeError>>,
}

/// A request written (or being written) to a node, waiting for its reply.
struct Inflight {
    kind: ReplyKind,
    retry_safe: bool,
    reply: oneshot::Sender<Result<Bytes, ExchangeError>>,
    since: Instant,
}

impl Inflight {
    /// Tells the caller the connection failed before this reply arrived.
    fn fail(self) {
        let error = if self.retry_safe {
            ExchangeError::Unreachable
        } else {
            ExchangeError::Broken
        };
        let _ = self.reply.send(Err(error));
    }
}

/// How the proxy connects to nodes: the same for every node.
#[derive(Default)]
pub struct NodeAccess {
    /// Credentials to log in with on every new connection, for nodes that require them.
    pub login: Option<Arc<AuthFile>>,
    /// TLS, for nodes whose client port speaks it.
    pub tls: Option<NodeTlsFiles>,
    /// Failed connections and requests, over every node the proxy has used (a counter that
    /// survives member-list changes).
    pub errors: AtomicU64,
    /// Connections opened to nodes, likewise.
    pub connects: AtomicU64,
    /// How long a node may take to answer a request before the proxy counts it as down
    /// (its requests then fail over); `None`: `DEFAULT_REPLY_TIMEOUT`.
    pub reply_timeout: Option<Duration>,
}

impl NodeAccess {
    fn reply_timeout(&self) -> Duration {
        self.reply_timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT)
    }
}

pub struct Backend {
    /// `host:port`, for logs.
    pub addr: String,
    host: String,
    port: u16,
    access: Arc<NodeAccess>,
    lanes: Vec<mpsc::Sender<Request>>,
    down_until: Mutex<Option<Instant>>,
    backoff: Mutex<Duration>,
}

impl Backend {
    /// A backend with `connections` persistent connections (opened on first use).
    pub fn new(
        host: &str,
        port: u16,
        connections: usize,
        access: Arc<NodeAccess>,
    ) -> std::sync::Arc<Backend> {
        let mut receivers = Vec::new();
        let lanes = (0..connections.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                receivers.push(rx);
                tx
            })
            .collect();
        let backend = std::sync::Arc::new(Backend {
            addr: format!("{host}:{port}"),
            host: host.to_string(),
            port,
            access,
            lanes,
            down_until: Mutex::new(None),
            backoff: Mutex::new(MIN_BACKOFF),
        });
        for rx in receivers {
            // The lane task holds only a weak reference: it ends with the backend.
            tokio::spawn(lane(std::sync::Arc::downgrade(&backend), rx));
        }
        backend
    }

    /// Whether a recent connection attempt failed and the backoff has not passed yet.
    pub fn is_down(&self) -> bool {
        self.down_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
    }

    fn mark_down(&self) {
        let mut backoff = self.backoff.lock();
        *self.down_until.lock() = Some(Instant::now() + *backoff);
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        self.count_error();
    }

    fn mark_up(&self) {
        *self.down_until.lock() = None;
        *self.backoff.lock() = MIN_BACKOFF;
    }

    /// Queues one request on connection `lane` (taken modulo the pool size: callers pass
    /// a number of their own, so their requests keep their order). Waits, at most
    /// the reply timeout, while that connection's queue is full. The receiver yields the reply.
    pub async fn enqueue(
        &self,
        lane: usize,
        bytes: Bytes,
        kind: ReplyKind,
        retry_safe: bool,
    ) -> Result<oneshot::Receiver<Result<Bytes, ExchangeError>>, ExchangeError> {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            bytes,
            kind,
            retry_safe,
            reply: tx,
        };
        let queue = &self.lanes[lane % self.lanes.len()];
        match tokio::time::timeout(self.access.reply_timeout(), queue.send(request)).await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(_)) => Err(ExchangeError::Unreachable),
            Err(_) => {
                // A queue that stays full belongs to a node that stopped answering; the
                // request was never written.
                self.count_error();
                Err(ExchangeError::Unreachable)
            }
        }
    }

    /// Sends one request on connection `lane` and waits for its reply (the connection gives
    /// up on a node after the reply timeout; this waits a little longer as a backstop).
    pub async fn exchange(
        &self,
        lane: usize,
        bytes: Bytes,
        kind: ReplyKind,
        retry_safe: bool,
    ) -> Result<Bytes, ExchangeError> {
        let reply = self.enqueue(lane, bytes, kind, retry_safe).await?;
        self.await_reply(reply).await
    }

    /// The reply to a queued request, or why there is none.
    pub async fn await_reply(
        &self,
        reply: oneshot::Receiver<Result<Bytes, ExchangeError>>,
    ) -> Result<Bytes, ExchangeError> {
        match tokio::time::timeout(self.access.reply_timeout() * 2, reply).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) | Err(_) => Err(ExchangeError::Broken),
        }
    }

    /// Counts a failed connection or request (for metrics).
    pub fn count_error(&self) {
        self.access.errors.fetch_add(1, Relaxed);
    }
}

/// One persistent connection: writes queued requests in batches and matches replies to
/// them in order. Reconnects on demand; when the node cannot be reached, or stops
/// answering, queued requests fail as `Unreachable` (and written ones as their
/// `retry_safe` allows) so the proxy can fail over, and the node counts as down for a
/// backoff period.
async fn lane(backend: std::sync::Weak<Backend>, mut rx: mpsc::Receiver<Request>) {
    let mut first: Option<Request> = None;
    loop {
        let request = match first.take() {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => r,
                None => return,
            },
        };
        let Some(b) = backend.upgrade() else { return };
        let stream = match connect(&b).await {
            Ok(stream) => {
                b.mark_up();
                b.access.connects.fetch_add(1, Relaxed);
                stream
            }
            Err(error) => {
                if !b.is_down() {
                    tracing::warn!(node = %b.addr, %error, "cannot use cache node");
                }
                b.mark_down();
                let _ = request.reply.send(Err(ExchangeError::Unreachable));
                // Everything already queued would meet the same fate.
                while let Ok(r) = rx.try_recv() {
                    let _ = r.reply.send(Err(ExchangeError::Unreachable));
                }
                continue;
            }
        };
        let timeout = b.access.reply_timeout();
        drop(b);
        let ended = serve_connection(stream, request, &mut rx, timeout).await;
        first = ended.carry;
        if ended.stalled {
            if let Some(b) = backend.upgrade() {
                tracing::warn!(node = %b.addr, timeout = ?b.access.reply_timeout(), "cache node stopped answering; failing over");
                b.mark_down();
            }
        }
    }
}

/// A connection to a node: plain TCP (split without locking) or TLS.
enum NodeStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl NodeStream {
    async fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            NodeStream::Plain(s) => s.write_all(bytes).await,
            NodeStream::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
        }
    }

    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            NodeStream::Plain(s) => s.read(buf).await,
            NodeStream::Tls(s) => s.read(buf).await,
        }
    }
}

/// Opens a connection to the node (over TLS when configured) and, when the node requires
/// authentication, logs in.
async fn connect(backend: &Backend) -> Result<NodeStream, String> {
    let tcp = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((backend.host.as_str(), backend.port)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(error.to_string()),
        Err(_) => return Err("connect timed out".into()),
    };
    let _ = tcp.set_nodelay(true);
    let mut stream = match &backend.access.tls {
        None => NodeStream::Plain(tcp),
        Some(files) => {
            let connector = files.connector()?;
            let name = peer_server_name(&backend.host)?;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => NodeStream::Tls(Box::new(tls)),
                Ok(Err(error)) => return Err(format!("TLS handshake failed: {error}")),
                Err(_) => return Err("TLS handshake timed out".into()),
            }
        }
    };
    if let Some(login) = &backend.access.login {
        let reply = tokio::time::timeout(LOGIN_TIMEOUT, async {
            stream.write_all(&login.login_request()).await?;
            // The reply is one short line; read it without taking bytes beyond it.
            let mut line = Vec::with_capacity(64);
            while !line.ends_with(b"\r\n") && line.len() < 1024 {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await? == 0 {
                    break;
                }
                line.push(byte[0]);
            }
            Ok::<_, std::io::Error>(line)
        })
        .await;
        match reply {
            Ok(Ok(line)) if line == b"STORED\r\n" => {}
            Ok(Ok(line)) => {
                return Err(format!(
                    "login refused: {}",
                    String::from_utf8_lossy(&line).trim_end()
                ))
            }
            Ok(Err(error)) => return Err(format!("login failed: {error}")),
            Err(_) => return Err("login timed out".into()),
        }
    }
    Ok(stream)
}

/// How a connection ended.
struct Ended {
    /// A request taken from the queue but not written, for the next connection.
    carry: Option<Request>,
    /// The node stopped answering within the reply timeout.
    stalled: bool,
}

/// Drives one connection until it breaks or stalls.
async fn serve_connection(
    stream: NodeStream,
    first: Request,
    rx: &mut mpsc::Receiver<Request>,
    timeout: Duration,
) -> Ended {
    match stream {
        NodeStream::Plain(tcp) => {
            let (reader, writer) = tcp.into_split();
            drive(reader, writer, first, rx, timeout).await
        }
        NodeStream::Tls(tls) => {
            let (reader, writer) = tokio::io::split(tls);
            drive(reader, writer, first, rx, timeout).await
        }
    }
}

/// Adds `request` to the write buffer and to the requests awaiting replies.
fn queue_write(request: Request, out: &mut BytesMut, inflight: &mut VecDeque<Inflight>) {
    out.extend_from_slice(&request.bytes);
    inflight.push_back(Inflight {
        kind: request.kind,
        retry_safe: request.retry_safe,
        reply: request.reply,
        since: Instant::now(),
    });
}

/// The request/reply loop of `serve_connection` over either kind of stream. It reads
/// while it writes (a node answering a large pipeline never waits on the proxy), gathers
/// the queued requests into one write, and gives up on a node whose oldest request has
/// waited `timeout`.
async fn drive<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut writer: W,
    first: Request,
    rx: &mut mpsc::Receiver<Request>,
    timeout: Duration,
) -> Ended {
    let mut inflight: VecDeque<Inflight> = VecDeque::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    // Bytes of `out` already written.
    let mut written = 0usize;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    queue_write(first, &mut out, &mut inflight);
    // Checked against the oldest request now and then, rather than re-armed per request.
    let timer = tokio::time::sleep(timeout);
    tokio::pin!(timer);
    let ended = |inflight: &mut VecDeque<Inflight>, stalled: bool| {
        inflight.drain(..).for_each(Inflight::fail);
        Ended {
            carry: None,
            stalled,
        }
    };
    loop {
        // Deliver complete replies.
        while let Some(front) = inflight.front() {
            match reply_len(&buf, front.kind) {
                Ok(Some(n)) => {
                    let reply = buf.split_to(n).freeze();
                    if let Some(done) = inflight.pop_front() {
                        let _ = done.reply.send(Ok(reply));
                    }
                }
                Ok(None) => break,
                // A reply that is not one: the stream is out of step.
                Err(_) => return ended(&mut inflight, false),
            }
        }
        if inflight.is_empty() && buf.has_remaining() {
            // Bytes nobody asked for: the stream is out of step.
            return ended(&mut inflight, false);
        }
        if buf.len() > MAX_REPLY_BUFFER {
            return ended(&mut inflight, false);
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let writing = written < out.len();
        tokio::select! {
            result = writer.write(&out[written..]), if writing => match result {
                Ok(0) | Err(_) => return ended(&mut inflight, false),
                Ok(n) => {
                    written += n;
                    if written == out.len() {
                        // The flush matters for TLS, which may hold written records back.
                        if writer.flush().await.is_err() {
                            return ended(&mut inflight, false);
                        }
                        out.clear();
                        written = 0;
                    }
                }
            },
            read = reader.read_buf(&mut buf), if !inflight.is_empty() => match read {
                Ok(0) | Err(_) => return ended(&mut inflight, false),
                Ok(_) => {}
            },
            next = rx.recv(), if !writing => match next {
                Some(request) => {
                    if inflight.is_empty() {
                        timer.as_mut().reset(tokio::time::Instant::now() + timeout);
                    }
                    // Let the other ready tasks (clients whose requests arrived in the same
                    // turn of the event loop) queue theirs first, as an event loop that
                    // writes on the next turn does; then gather everything queued.
                    tokio::task::yield_now().await;
                    queue_write(request, &mut out, &mut inflight);
                    while out.len() < MAX_WRITE {
                        match rx.try_recv() {
                            Ok(r) => queue_write(r, &mut out, &mut inflight),
                            Err(_) => break,
                        }
                    }
                }
                None => return ended(&mut inflight, false),
            },
            () = &mut timer, if !inflight.is_empty() => {
                let oldest = inflight.front().map(|f| f.since + timeout);
                match oldest {
                    Some(due) if due <= Instant::now() => return ended(&mut inflight, true),
                    Some(due) => timer.as_mut().reset(tokio::time::Instant::from_std(due)),
                    None => {}
                }
            },
        }
    }
}
