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
/// How long a node may take to answer before the proxy gives up on a request.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
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
    /// The node could not be reached, or went away before answering anything on the
    /// connection: the request may go to a replica.
    Unreachable,
    /// The connection failed after the node had answered part of the traffic: the outcome
    /// of this request is unknown.
    Broken,
}

struct Request {
    bytes: Bytes,
    kind: ReplyKind,
    reply: oneshot::Sender<Result<Bytes, ExchangeError>>,
}

/// How the proxy connects to nodes: the same for every node.
#[derive(Default)]
pub struct NodeAccess {
    /// Credentials to log in with on every new connection, for nodes that require them.
    pub login: Option<Arc<AuthFile>>,
    /// TLS, for nodes whose client port speaks it.
    pub tls: Option<NodeTlsFiles>,
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
    pub errors: AtomicU64,
    pub connects: AtomicU64,
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
            errors: AtomicU64::new(0),
            connects: AtomicU64::new(0),
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
        self.errors.fetch_add(1, Relaxed);
    }

    fn mark_up(&self) {
        *self.down_until.lock() = None;
        *self.backoff.lock() = MIN_BACKOFF;
    }

    /// Queues one request on connection `lane` (taken modulo the pool size: callers pass
    /// a number of their own, so their requests keep their order). Waits while that
    /// connection's queue is full. The receiver yields the reply.
    pub async fn enqueue(
        &self,
        lane: usize,
        bytes: Bytes,
        kind: ReplyKind,
    ) -> Result<oneshot::Receiver<Result<Bytes, ExchangeError>>, ExchangeError> {
        let (tx, rx) = oneshot::channel();
        let request = Request {
            bytes,
            kind,
            reply: tx,
        };
        self.lanes[lane % self.lanes.len()]
            .send(request)
            .await
            .map_err(|_| ExchangeError::Unreachable)?;
        Ok(rx)
    }

    /// Sends one request on connection `lane` and waits (up to `REPLY_TIMEOUT`) for its reply.
    pub async fn exchange(
        &self,
        lane: usize,
        bytes: Bytes,
        kind: ReplyKind,
    ) -> Result<Bytes, ExchangeError> {
        let reply = self.enqueue(lane, bytes, kind).await?;
        match tokio::time::timeout(REPLY_TIMEOUT, reply).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err(ExchangeError::Broken),
            Err(_) => {
                self.count_error();
                Err(ExchangeError::Broken)
            }
        }
    }

    /// Counts a failed request (for metrics).
    pub fn count_error(&self) {
        self.errors.fetch_add(1, Relaxed);
    }
}

/// One persistent connection: writes queued requests in batches and matches replies to
/// them in order. Reconnects on demand; when the node cannot be reached, queued requests
/// fail as `Unreachable` so the proxy can fail over.
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
                b.connects.fetch_add(1, Relaxed);
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
        drop(b);
        first = serve_connection(stream, request, &mut rx).await;
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

/// Drives one connection until it breaks. Returns a request taken from the queue but not
/// yet written, if any, for the next connection.
async fn serve_connection(
    stream: NodeStream,
    first: Request,
    rx: &mut mpsc::Receiver<Request>,
) -> Option<Request> {
    match stream {
        NodeStream::Plain(tcp) => {
            let (reader, writer) = tcp.into_split();
            drive(reader, writer, first, rx).await
        }
        NodeStream::Tls(tls) => {
            let (reader, writer) = tokio::io::split(tls);
            drive(reader, writer, first, rx).await
        }
    }
}

/// The request/reply loop of `serve_connection` over either kind of stream.
async fn drive<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut writer: W,
    first: Request,
    rx: &mut mpsc::Receiver<Request>,
) -> Option<Request> {
    let mut inflight: VecDeque<(ReplyKind, oneshot::Sender<Result<Bytes, ExchangeError>>)> =
        VecDeque::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut pending = Some(first);
    // When the connection breaks, requests that got no byte of their reply may go to a
    // replica; the one whose reply was cut off midway has an unknown outcome.
    let fail = |inflight: &mut VecDeque<(ReplyKind, oneshot::Sender<_>)>, partial: bool| {
        for (i, (_, reply)) in inflight.drain(..).enumerate() {
            let error = if i == 0 && partial {
                ExchangeError::Broken
            } else {
                ExchangeError::Unreachable
            };
            let _ = reply.send(Err(error));
        }
    };
    loop {
        // Gather what is queued into one write.
        if let Some(request) = pending.take() {
            // Let the other ready tasks (clients whose requests arrived in the same turn
            // of the event loop) queue theirs first, as an event loop that writes on the
            // next turn does.
            tokio::task::yield_now().await;
            out.clear();
            out.extend_from_slice(&request.bytes);
            inflight.push_back((request.kind, request.reply));
            while out.len() < MAX_WRITE {
                match rx.try_recv() {
                    Ok(r) => {
                        out.extend_from_slice(&r.bytes);
                        inflight.push_back((r.kind, r.reply));
                    }
                    Err(_) => break,
                }
            }
            // The flush matters for TLS, which may hold written records back.
            if writer.write_all(&out).await.is_err() || writer.flush().await.is_err() {
                fail(&mut inflight, !buf.is_empty());
                return None;
            }
        }
        // Deliver complete replies.
        while let Some((kind, _)) = inflight.front() {
            match reply_len(&buf, *kind) {
                Ok(Some(n)) => {
                    let reply = buf.split_to(n).freeze();
                    if let Some((_, tx)) = inflight.pop_front() {
                        let _ = tx.send(Ok(reply));
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    fail(&mut inflight, true);
                    return None;
                }
            }
        }
        if inflight.is_empty() && buf.has_remaining() {
            // Bytes nobody asked for: the stream is out of step.
            return None;
        }
        if buf.len() > MAX_REPLY_BUFFER {
            fail(&mut inflight, true);
            return None;
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        tokio::select! {
            read = reader.read_buf(&mut buf), if !inflight.is_empty() => match read {
                Ok(0) | Err(_) => {
                    fail(&mut inflight, !buf.is_empty());
                    return None;
                }
                Ok(_) => {}
            },
            next = rx.recv() => match next {
                Some(r) => pending = Some(r),
                None => {
                    fail(&mut inflight, !buf.is_empty());
                    return None;
                }
            },
        }
    }
}
