//! What the client server and the proxy share about client connections: one accept loop
//! under a connection limit (turning the excess away as memcached does), one task per
//! connection, graceful shutdown; and one reader of request bytes that knows about
//! shutdown, idle clients and binary-protocol clients.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

/// Bytes asked of the socket per read.
pub const READ_CHUNK: usize = 16 * 1024;
/// How long a client turned away at the limit has to take the reason.
const REJECT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a listener serves: its connection counters and one connection's life.
pub trait Service: Send + Sync + 'static {
    /// A client was turned away at the connection limit.
    fn rejected(&self);
    /// A client took a connection slot (counted in accept order, before it runs). Returns
    /// the connection's number, handed to `handle`.
    fn opened(&self) -> u64;
    /// A connection ended; its slot is already free.
    fn closed(&self);
    /// Serves one connection until it ends or, after `shutdown`, finishes what it was doing.
    fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        number: u64,
        shutdown: watch::Receiver<bool>,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// Accepts clients until `shutdown` turns true, at most `max_connections` at once, then
/// waits up to `drain` for open connections to finish.
pub async fn serve<S: Service>(
    listener: TcpListener,
    service: Arc<S>,
    max_connections: usize,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
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
            service.rejected();
            tracing::debug!(%peer, "connection limit reached");
            tokio::spawn(reject(stream));
            continue;
        };
        let number = service.opened();
        let service = service.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            service.clone().handle(stream, peer, number, shutdown).await;
            drop(permit);
            service.closed();
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

/// Tells a client over the connection limit why it is being turned away, as memcached does.
async fn reject(mut stream: TcpStream) {
    let _ = tokio::time::timeout(
        REJECT_TIMEOUT,
        stream.write_all(b"ERROR Too many open connections\r\n"),
    )
    .await;
}

/// Whether a connection opens with the binary protocol's request magic byte.
pub fn is_binary_protocol(first_bytes: &[u8]) -> bool {
    first_bytes.first() == Some(&0x80)
}

/// What waiting for a client's next bytes gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// This many more bytes are in the buffer.
    Bytes(usize),
    /// The connection is done: the client closed it, spoke the binary protocol (not
    /// served: hanging up at once beats leaving it waiting for its timeout), or the server
    /// is shutting down and the client is between requests.
    Done,
    /// The idle deadline passed.
    Idle,
}

/// Reads a client's request bytes, watching for shutdown.
pub struct RequestReader {
    shutdown: watch::Receiver<bool>,
    draining: bool,
    first: bool,
}

impl RequestReader {
    pub fn new(shutdown: watch::Receiver<bool>) -> RequestReader {
        let draining = *shutdown.borrow();
        RequestReader {
            shutdown,
            draining,
            first: true,
        }
    }

    /// Waits for more bytes into `buf`. `between_requests`: nothing is pending (no partial
    /// request, no data left to discard), so a shutdown may end the connection now.
    pub async fn read<S: AsyncRead + Unpin>(
        &mut self,
        stream: &mut S,
        buf: &mut BytesMut,
        between_requests: bool,
        idle_deadline: Option<tokio::time::Instant>,
    ) -> std::io::Result<Received> {
        loop {
            if self.draining && between_requests {
                return Ok(Received::Done);
            }
            if buf.capacity() - buf.len() < READ_CHUNK / 4 {
                buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                n = stream.read_buf(buf) => {
                    let n = n?;
                    if n == 0 || (self.first && is_binary_protocol(buf)) {
                        return Ok(Received::Done);
                    }
                    self.first = false;
                    return Ok(Received::Bytes(n));
                }
                _ = self.shutdown.changed(), if !self.draining => self.draining = true,
                _ = sleep_until(idle_deadline), if idle_deadline.is_some() => {
                    return Ok(Received::Idle);
                }
            }
        }
    }
}

/// Sleeps until `deadline` (forever without one).
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A port on loopback that accepts connections and holds them, never reading or answering:
/// a peer or node that hangs.
#[cfg(test)]
pub async fn silent_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    port
}
