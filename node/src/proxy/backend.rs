//! Connections from the proxy to one cache node: a small pool, reconnection with backoff,
//! and pipelined exchange of a batch of requests framed by `protocol::forward`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::forward::{reply_len, ReplyKind};

const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a node may take to answer a batch before the proxy gives up on it.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Largest reply buffered from a node (values are bounded by the item size limit).
const MAX_REPLY_BUFFER: usize = 64 * 1024 * 1024;

/// How one attempt on one connection failed.
#[derive(Debug)]
enum Attempt {
    /// Nothing came back (not even part of a reply): the connection may have been stale.
    NothingReceived,
    Failed,
}

/// Why a batch failed.
#[derive(Debug)]
pub enum ExchangeError {
    /// The node could not be reached: nothing was sent, the batch may go elsewhere.
    Unreachable,
    /// The connection failed after sending: the outcome is unknown.
    Broken,
}

pub struct Backend {
    pub addr: String,
    idle: Mutex<Vec<TcpStream>>,
    max_idle: usize,
    down_until: Mutex<Option<Instant>>,
    backoff: Mutex<Duration>,
    pub errors: AtomicU64,
}

impl Backend {
    pub fn new(addr: String, max_idle: usize) -> Backend {
        Backend {
            addr,
            idle: Mutex::new(Vec::new()),
            max_idle,
            down_until: Mutex::new(None),
            backoff: Mutex::new(MIN_BACKOFF),
            errors: AtomicU64::new(0),
        }
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

    /// A pooled connection, or a new one.
    async fn checkout(&self) -> Result<TcpStream, ExchangeError> {
        if let Some(stream) = self.idle.lock().pop() {
            return Ok(stream);
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<TcpStream, ExchangeError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr.as_str())).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                self.mark_up();
                Ok(stream)
            }
            _ => {
                self.mark_down();
                Err(ExchangeError::Unreachable)
            }
        }
    }

    fn checkin(&self, stream: TcpStream) {
        let mut idle = self.idle.lock();
        if idle.len() < self.max_idle {
            idle.push(stream);
        }
    }

    /// Sends `requests` in one write and reads one reply per request, in order.
    ///
    /// A connection that fails before any reply byte arrives is taken to be stale (the node
    /// restarted or died): the pool is emptied and the batch goes once more over a new
    /// connection, which reports the node unreachable if it is down, so the caller can fail
    /// over to a replica.
    pub async fn exchange(
        &self,
        requests: &[(Bytes, ReplyKind)],
    ) -> Result<Vec<Bytes>, ExchangeError> {
        let stream = self.checkout().await?;
        match self.exchange_on(stream, requests).await {
            Err(Attempt::NothingReceived) => {
                self.idle.lock().clear();
                let stream = self.connect().await?;
                match self.exchange_on(stream, requests).await {
                    Ok(replies) => Ok(replies),
                    // Silent twice, on a fresh connection too: the node is going away (a
                    // dying process can still complete a handshake). Treat it as down.
                    Err(Attempt::NothingReceived) => {
                        tracing::debug!(addr = %self.addr, "node accepts but does not answer");
                        self.mark_down();
                        Err(ExchangeError::Unreachable)
                    }
                    Err(Attempt::Failed) => {
                        self.errors.fetch_add(1, Relaxed);
                        Err(ExchangeError::Broken)
                    }
                }
            }
            Err(e) => {
                tracing::debug!(addr = %self.addr, failure = ?e, "exchange failed");
                self.errors.fetch_add(1, Relaxed);
                Err(ExchangeError::Broken)
            }
            Ok(replies) => Ok(replies),
        }
    }

    async fn exchange_on(
        &self,
        mut stream: TcpStream,
        requests: &[(Bytes, ReplyKind)],
    ) -> Result<Vec<Bytes>, Attempt> {
        let mut out = BytesMut::with_capacity(requests.iter().map(|(b, _)| b.len()).sum());
        for (bytes, _) in requests {
            out.extend_from_slice(bytes);
        }
        let mut received = false;
        let result = tokio::time::timeout(REPLY_TIMEOUT, async {
            stream
                .write_all(&out)
                .await
                .map_err(|_| Attempt::NothingReceived)?;
            let mut buf = BytesMut::with_capacity(16 * 1024);
            let mut replies = Vec::with_capacity(requests.len());
            for (_, kind) in requests {
                loop {
                    match reply_len(&buf, *kind) {
                        Ok(Some(n)) => {
                            replies.push(buf.split_to(n).freeze());
                            break;
                        }
                        Ok(None) => {}
                        Err(_) => return Err(Attempt::Failed),
                    }
                    if buf.len() > MAX_REPLY_BUFFER {
                        return Err(Attempt::Failed);
                    }
                    buf.reserve(16 * 1024);
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) if !received && replies.is_empty() => {
                            return Err(Attempt::NothingReceived)
                        }
                        Ok(0) | Err(_) => return Err(Attempt::Failed),
                        Ok(_) => received = true,
                    }
                }
            }
            if buf.has_remaining() {
                return Err(Attempt::Failed);
            }
            Ok(replies)
        })
        .await;
        match result {
            Ok(Ok(replies)) => {
                self.checkin(stream);
                Ok(replies)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Attempt::Failed),
        }
    }
}
