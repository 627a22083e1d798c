//! Connections from the proxy to one cache node.
//!
//! A few persistent connections per node are shared by every client: requests from all
//! clients are queued to a connection's task, which writes whatever has gathered in one
//! write and hands the replies back, in order, through one channel per request. This keeps
//! the number of node connections (and the node's syscalls per request) small however many
//! clients the proxy has, as twemproxy does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
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
/// Bytes of requests queued per node connection by default (`--node-queue-bytes`).
pub const DEFAULT_QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// Bytes a queued request accounts for beyond its own: its bookkeeping and reply channel.
const REQUEST_OVERHEAD: usize = 128;
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
    /// Bytes of requests queued per node connection; `None`: `DEFAULT_QUEUE_BYTES`.
    pub queue_bytes: Option<usize>,
    /// Requests refused because their connection's queue was full.
    pub queue_full: AtomicU64,
    /// Bytes queued over every connection.
    pub queued_bytes: AtomicU64,
}

impl NodeAccess {
    fn reply_timeout(&self) -> Duration {
        self.reply_timeout.unwrap_or(DEFAULT_REPLY_TIMEOUT)
    }

    fn queue_bytes(&self) -> usize {
        self.queue_bytes.unwrap_or(DEFAULT_QUEUE_BYTES)
    }
}

/// The sending side of one connection's queue, and the bytes waiting in it.
struct Lane {
    tx: mpsc::UnboundedSender<Request>,
    bytes: Arc<AtomicUsize>,
}

/// The receiving side, releasing each request's bytes as it is taken.
struct LaneRx {
    rx: mpsc::UnboundedReceiver<Request>,
    bytes: Arc<AtomicUsize>,
    access: Arc<NodeAccess>,
}

impl LaneRx {
    fn taken(&self, request: Request) -> Request {
        let size = request.bytes.len() + REQUEST_OVERHEAD;
        self.bytes.fetch_sub(size, Relaxed);
        self.access.queued_bytes.fetch_sub(size as u64, Relaxed);
        request
    }

    async fn recv(&mut self) -> Option<Request> {
        let request = self.rx.recv().await?;
        Some(self.taken(request))
    }

    fn try_recv(&mut self) -> Option<Request> {
        let request = self.rx.try_recv().ok()?;
        Some(self.taken(request))
    }
}

pub struct Backend {
    /// `host:port`, for logs.
    pub addr: String,
    host: String,
    port: u16,
    access: Arc<NodeAccess>,
    lanes: Vec<Lane>,
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
                let (tx, rx) = mpsc::unbounded_channel();
                let bytes = Arc::new(AtomicUsize::new(0));
                receivers.push(LaneRx {
                    rx,
                    bytes: bytes.clone(),
                    access: access.clone(),
                });
                Lane { tx, bytes }
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
    /// a number of their own, so their requests keep their order). A full queue (more than
    /// `--node-queue-bytes` waiting on one connection; a lone request always fits) means the
    /// node is not keeping up: the request is refused at once, unwritten. The receiver
    /// yields the reply: the connection answers every request it takes, within about the
    /// reply timeout.
    pub fn enqueue(
        &self,
        lane: usize,
        bytes: Bytes,
        kind: ReplyKind,
        retry_safe: bool,
    ) -> Result<oneshot::Receiver<Result<Bytes, ExchangeError>>, ExchangeError> {
        let (tx, rx) = oneshot::channel();
        let size = bytes.len() + REQUEST_OVERHEAD;
        let request = Request {
            bytes,
            kind,
            retry_safe,
            reply: tx,
        };
        let lane = &self.lanes[lane % self.lanes.len()];
        let before = lane.bytes.fetch_add(size, Relaxed);
        if before > 0 && before + size > self.access.queue_bytes() {
            lane.bytes.fetch_sub(size, Relaxed);
            self.access.queue_full.fetch_add(1, Relaxed);
            self.count_error();
            return Err(ExchangeError::Unreachable);
        }
        if lane.tx.send(request).is_err() {
            lane.bytes.fetch_sub(size, Relaxed);
            self.count_error();
            return Err(ExchangeError::Unreachable);
        }
        self.access.queued_bytes.fetch_add(size as u64, Relaxed);
        Ok(rx)
    }

    /// Sends one request on connection `lane` and waits for its reply.
    pub async fn exchange(
        &self,
        lane: usize,
        bytes: Bytes,
        kind: ReplyKind,
        retry_safe: bool,
    ) -> Result<Bytes, ExchangeError> {
        let reply = self.enqueue(lane, bytes, kind, retry_safe)?;
        await_reply(reply, retry_safe).await
    }

    /// Counts a failed connection or request (for metrics).
    fn count_error(&self) {
        self.access.errors.fetch_add(1, Relaxed);
    }
}

/// The reply to a queued request, or, if its connection dropped it, why there is none.
pub async fn await_reply(
    reply: oneshot::Receiver<Result<Bytes, ExchangeError>>,
    retry_safe: bool,
) -> Result<Bytes, ExchangeError> {
    match reply.await {
        Ok(outcome) => outcome,
        Err(_) if retry_safe => Err(ExchangeError::Unreachable),
        Err(_) => Err(ExchangeError::Broken),
    }
}

/// Fails every request still queued on a connection, unwritten: they may go to a replica.
fn fail_queued(rx: &mut LaneRx) {
    while let Some(r) = rx.try_recv() {
        let _ = r.reply.send(Err(ExchangeError::Unreachable));
    }
}

/// One persistent connection: writes queued requests in batches and matches replies to
/// them in order. Reconnects on demand. When the node cannot be reached, or stops
/// answering, written requests fail as their `retry_safe` allows and queued ones as
/// `Unreachable`, so the proxy can fail over (in order: nothing queued behind a failed
/// request runs on the node before it), and the node counts as down for a backoff period
/// that grows until a new connection gets a reply.
async fn lane(backend: std::sync::Weak<Backend>, mut rx: LaneRx) {
    loop {
        let Some(request) = rx.recv().await else {
            return;
        };
        let Some(b) = backend.upgrade() else { return };
        let timeout = b.access.reply_timeout();
        // Connecting (TCP, TLS, login) is bounded by the reply timeout too.
        let connected = match tokio::time::timeout(timeout, connect(&b)).await {
            Ok(result) => result,
            Err(_) => Err(ConnectError::Timeout),
        };
        let stream = match connected {
            Ok(stream) => {
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
                fail_queued(&mut rx);
                continue;
            }
        };
        drop(b);
        let ended = serve_connection(stream, request, &mut rx, timeout, &backend).await;
        match ended {
            Ended::Idle => {}
            Ended::Failed => fail_queued(&mut rx),
            Ended::Stalled => {
                if let Some(b) = backend.upgrade() {
                    tracing::warn!(node = %b.addr, ?timeout, "cache node stopped answering; failing over");
                    b.mark_down();
                }
                fail_queued(&mut rx);
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

/// Why the proxy could not open a usable connection to a node.
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error("{0}")]
    Tcp(std::io::Error),
    #[error("connect timed out")]
    TcpTimeout,
    #[error("connecting timed out")]
    Timeout,
    /// The TLS files, or the node's name as a TLS server name.
    #[error("{0}")]
    TlsSetup(#[from] crate::tls::TlsSetupError),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("TLS handshake timed out")]
    TlsHandshakeTimeout,
    #[error("login refused: {0}")]
    LoginRefused(String),
    #[error("login failed: {0}")]
    Login(std::io::Error),
    #[error("login timed out")]
    LoginTimeout,
}

/// Opens a connection to the node (over TLS when configured) and, when the node requires
/// authentication, logs in.
async fn connect(backend: &Backend) -> Result<NodeStream, ConnectError> {
    let tcp = match tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((backend.host.as_str(), backend.port)),
    )
    .await
    {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(ConnectError::Tcp(error)),
        Err(_) => return Err(ConnectError::TcpTimeout),
    };
    let _ = tcp.set_nodelay(true);
    let mut stream = match &backend.access.tls {
        None => NodeStream::Plain(tcp),
        Some(files) => {
            let connector = files.connector()?;
            let name = peer_server_name(&backend.host)?;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp)).await {
                Ok(Ok(tls)) => NodeStream::Tls(Box::new(tls)),
                Ok(Err(error)) => return Err(ConnectError::TlsHandshake(error)),
                Err(_) => return Err(ConnectError::TlsHandshakeTimeout),
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
                return Err(ConnectError::LoginRefused(
                    String::from_utf8_lossy(&line).trim_end().to_string(),
                ))
            }
            Ok(Err(error)) => return Err(ConnectError::Login(error)),
            Err(_) => return Err(ConnectError::LoginTimeout),
        }
    }
    Ok(stream)
}

/// How a connection ended.
enum Ended {
    /// The node closed it with nothing in flight (e.g. it restarted): reconnect when needed.
    Idle,
    /// It broke, or the stream went out of step, with requests in flight.
    Failed,
    /// The node sent nothing for the reply timeout while requests waited.
    Stalled,
}

/// Drives one connection until it ends.
async fn serve_connection(
    stream: NodeStream,
    first: Request,
    rx: &mut LaneRx,
    timeout: Duration,
    backend: &std::sync::Weak<Backend>,
) -> Ended {
    match stream {
        NodeStream::Plain(tcp) => {
            let (reader, writer) = tcp.into_split();
            drive(reader, writer, first, rx, timeout, backend).await
        }
        NodeStream::Tls(tls) => {
            let (reader, writer) = tokio::io::split(tls);
            drive(reader, writer, first, rx, timeout, backend).await
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
    });
}

/// The request/reply loop of `serve_connection` over either kind of stream. It reads
/// while it writes and while idle (a node answering a large pipeline never waits on the
/// proxy, and a node that closes an idle connection is noticed), gathers the queued
/// requests into one write, and gives up on a node that sends nothing for `timeout` while
/// requests wait (a node that is merely slow, e.g. waiting on its own replica, keeps
/// sending). The node counts as up again once it answers on a new connection.
async fn drive<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut writer: W,
    first: Request,
    rx: &mut LaneRx,
    timeout: Duration,
    backend: &std::sync::Weak<Backend>,
) -> Ended {
    let mut inflight: VecDeque<Inflight> = VecDeque::new();
    let mut out = BytesMut::with_capacity(64 * 1024);
    // Bytes of `out` already written; then whether they still need a flush (TLS).
    let mut written = 0usize;
    let mut unflushed = false;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut answered = false;
    queue_write(first, &mut out, &mut inflight);
    // When the node last sent something (or, idle until then, was last given work).
    let mut progress = Instant::now();
    let timer = tokio::time::sleep(timeout);
    tokio::pin!(timer);
    let failed = |inflight: &mut VecDeque<Inflight>, how: Ended| {
        inflight.drain(..).for_each(Inflight::fail);
        how
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
                    if !answered {
                        answered = true;
                        if let Some(b) = backend.upgrade() {
                            b.mark_up();
                        }
                    }
                }
                Ok(None) => break,
                // A reply that is not one: the stream is out of step.
                Err(_) => return failed(&mut inflight, Ended::Failed),
            }
        }
        if inflight.is_empty() && buf.has_remaining() {
            // Bytes nobody asked for: the stream is out of step.
            return failed(&mut inflight, Ended::Failed);
        }
        if buf.len() > MAX_REPLY_BUFFER {
            return failed(&mut inflight, Ended::Failed);
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        let writing = written < out.len();
        tokio::select! {
            // Write, then flush (TLS may hold written records back), within the select so
            // that reading and the timer go on meanwhile. Either step may be cancelled and
            // resumed: neither takes bytes it does not report.
            result = async {
                if written < out.len() {
                    writer.write(&out[written..]).await.map(Some)
                } else {
                    writer.flush().await.map(|()| None)
                }
            }, if writing || unflushed => match result {
                Ok(Some(0)) | Err(_) => return failed(&mut inflight, Ended::Failed),
                Ok(Some(n)) => {
                    written += n;
                    if written == out.len() {
                        unflushed = true;
                    }
                }
                Ok(None) => {
                    unflushed = false;
                    out.clear();
                    written = 0;
                }
            },
            read = reader.read_buf(&mut buf) => match read {
                Ok(0) | Err(_) if inflight.is_empty() => return Ended::Idle,
                Ok(0) | Err(_) => return failed(&mut inflight, Ended::Failed),
                Ok(_) => progress = Instant::now(),
            },
            next = rx.recv(), if !writing && !unflushed => match next {
                Some(request) => {
                    if inflight.is_empty() {
                        progress = Instant::now();
                    }
                    // Let the other ready tasks (clients whose requests arrived in the same
                    // turn of the event loop) queue theirs first, as an event loop that
                    // writes on the next turn does; then gather everything queued.
                    tokio::task::yield_now().await;
                    queue_write(request, &mut out, &mut inflight);
                    while out.len() < MAX_WRITE {
                        match rx.try_recv() {
                            Some(r) => queue_write(r, &mut out, &mut inflight),
                            None => break,
                        }
                    }
                }
                None => return failed(&mut inflight, Ended::Failed),
            },
            () = &mut timer, if !inflight.is_empty() => {
                let due = progress + timeout;
                if due <= Instant::now() {
                    return failed(&mut inflight, Ended::Stalled);
                }
                timer.as_mut().reset(tokio::time::Instant::from_std(due));
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_node_queue_is_bounded_in_bytes() {
        // A node that accepts and then never reads: what the proxy queues for it is bounded.
        let port = crate::listener::silent_port().await;
        let access = Arc::new(NodeAccess {
            queue_bytes: Some(4 * 1024 * 1024),
            reply_timeout: Some(Duration::from_secs(30)),
            ..NodeAccess::default()
        });
        let backend = Backend::new("127.0.0.1", port, 1, access.clone());
        let value = Bytes::from(vec![b'v'; 1024 * 1024]);
        let mut refused = 0;
        let mut replies = Vec::new();
        for _ in 0..16 {
            match backend.enqueue(0, value.clone(), ReplyKind::Line, true) {
                Ok(rx) => replies.push(rx),
                Err(e) => {
                    assert_eq!(e, ExchangeError::Unreachable);
                    refused += 1;
                }
            }
        }
        assert!(refused >= 12, "only {refused} of 16 refused");
        assert_eq!(access.queue_full.load(Relaxed), refused);
        assert!(access.queued_bytes.load(Relaxed) <= 4 * 1024 * 1024 + 2 * REQUEST_OVERHEAD as u64);
    }

    /// A node on loopback that answers each request line with `reply(line)`, or, when that
    /// gives `None`, reads on and never answers.
    async fn fake_node(reply: fn(&[u8]) -> Option<Vec<u8>>) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let n = match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = buf.drain(..=end).collect();
                            if let Some(answer) = reply(&line) {
                                if stream.write_all(&answer).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        port
    }

    fn access(reply_timeout: Duration) -> Arc<NodeAccess> {
        Arc::new(NodeAccess {
            reply_timeout: Some(reply_timeout),
            ..NodeAccess::default()
        })
    }

    #[tokio::test]
    async fn pipelined_requests_get_their_own_replies_in_order() {
        let port = fake_node(|line| {
            let mut answer = b"ECHO ".to_vec();
            answer.extend_from_slice(line);
            Some(answer)
        })
        .await;
        let access = access(Duration::from_secs(5));
        let backend = Backend::new("127.0.0.1", port, 1, access.clone());
        let requests = ["get a\r\n", "get b\r\n", "get c\r\n"];
        let replies: Vec<_> = requests
            .iter()
            .map(|r| {
                let bytes = Bytes::from_static(r.as_bytes());
                backend.enqueue(0, bytes, ReplyKind::Line, true).unwrap()
            })
            .collect();
        for (request, reply) in requests.iter().zip(replies) {
            let answer = await_reply(reply, true).await.unwrap();
            assert_eq!(answer, format!("ECHO {request}").as_bytes());
        }
        assert_eq!(
            access.connects.load(Relaxed),
            1,
            "one connection for the batch"
        );
        assert!(!backend.is_down());
    }

    #[tokio::test]
    async fn an_unreachable_node_is_down_and_its_requests_may_go_elsewhere() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let access = access(Duration::from_secs(5));
        let backend = Backend::new("127.0.0.1", port, 1, access.clone());
        // Even a request unsafe to repeat: it was never written.
        let bytes = Bytes::from_static(b"incr n 1\r\n");
        let outcome = backend.exchange(0, bytes, ReplyKind::Line, false).await;
        assert_eq!(outcome, Err(ExchangeError::Unreachable));
        assert!(backend.is_down());
        assert!(access.errors.load(Relaxed) >= 1);
        assert_eq!(access.connects.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_node_that_stops_answering_fails_requests_by_whether_they_may_be_repeated() {
        let port = fake_node(|_| None).await;
        let backend = Backend::new("127.0.0.1", port, 1, access(Duration::from_millis(200)));
        let incr = Bytes::from_static(b"incr n 1\r\n");
        let outcome = backend.exchange(0, incr, ReplyKind::Line, false).await;
        assert_eq!(
            outcome,
            Err(ExchangeError::Broken),
            "its outcome is unknown"
        );
        assert!(backend.is_down(), "a stalled node counts as down");
        let get = Bytes::from_static(b"get k\r\n");
        let outcome = backend.exchange(0, get, ReplyKind::Retrieval, true).await;
        assert_eq!(
            outcome,
            Err(ExchangeError::Unreachable),
            "a read may go to a replica"
        );
    }
}
