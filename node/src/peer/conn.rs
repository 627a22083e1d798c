//! Peer connections, plain TCP or TLS, behind one stream type, so the peer protocol is
//! written once for both. With TLS configured (`--tls-cert`), every connection to a peer
//! (links, refill pulls, read-through fetches over the links) is a TLS client verifying the
//! member's `host`, and the peer port accepts TLS only.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{self, Decoded, Frame};
use super::PeerError;

use crate::tls::{peer_server_name, Tls};

/// A TCP connection to a peer must be established this soon.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A TLS handshake with a peer, on either side, must finish this soon.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// First byte of every TLS connection: a record of content type "handshake".
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// What the peer protocol needs of a connection.
pub trait PeerIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> PeerIo for T {}

/// A connection to or from a peer: TCP, or TLS over TCP.
pub type PeerStream = Box<dyn PeerIo>;

/// Why a connection to a peer could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The peer cannot be reached (down, restarting, not resolvable yet).
    #[error("{0}")]
    Tcp(String),
    /// The peer was reached but TLS failed: a configuration problem worth a warning.
    #[error("{0}")]
    Tls(String),
    /// The peer did not accept this node's hello (a wrong peer secret, a refused client
    /// certificate, or not a kache peer port): also a configuration problem.
    #[error("{0}")]
    Refused(String),
}

/// How long a peer has to accept a hello.
pub const HELLO_ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Introduces this node on a fresh connection and waits for the peer to accept it (`Ack`
/// with sequence number 0), so a link is reported up only once it really works.
pub async fn greet(stream: &mut PeerStream, node: &str, secret: &[u8]) -> Result<(), ConnectError> {
    let mut out = BytesMut::new();
    wire::encode(
        &Frame::Hello {
            node: node.to_string(),
            ring_version: 0,
            secret: secret.to_vec(),
        },
        &mut out,
    );
    let accepted = async {
        send(stream, &out).await.map_err(|e| e.to_string())?;
        let mut buf = BytesMut::with_capacity(64);
        loop {
            match wire::decode(&buf).map_err(|e| e.to_string())? {
                Decoded::Frame(Frame::Ack { seq: 0 }, _) => return Ok(()),
                Decoded::Frame(other, _) => return Err(format!("unexpected answer {other:?}")),
                Decoded::Incomplete => {}
            }
            if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed the connection (wrong peer secret or certificate?)".into());
            }
        }
    };
    match tokio::time::timeout(HELLO_ACK_TIMEOUT, accepted).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(ConnectError::Refused(format!(
            "peer refused the hello: {error}"
        ))),
        Err(_) => Err(ConnectError::Refused(
            "peer did not answer the hello in time".into(),
        )),
    }
}

/// How long data sent to a peer may stay unacknowledged by its TCP stack before the
/// connection counts as broken. Without it a connection cut by a partition (no reset, just
/// silence) would keep retransmitting for many minutes, holding every replicated write.
pub const UNACKED_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle time after which the peer port probes a silent caller, and the probes' spacing: a
/// caller that vanished in a partition frees its connection within a minute.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_PROBES: u32 = 4;

/// Makes a peer connection notice a vanished peer: bounded unacknowledged data, keepalive
/// probes while idle. Best effort: a platform without these options keeps TCP's defaults.
fn watch_liveness(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_PROBES);
    let _ = socket.set_tcp_keepalive(&keepalive);
    let _ = socket.set_tcp_user_timeout(Some(UNACKED_TIMEOUT));
}

/// Opens a connection to `member`'s peer port and introduces this node (`connect`, then
/// `greet`): a session for exchanges outside the links (refill, anti-entropy).
pub async fn open(
    tls: Option<&Tls>,
    member: &kache_cluster::Member,
    node: &str,
    secret: &[u8],
) -> Result<PeerStream, ConnectError> {
    let mut stream = connect(tls, &member.host, member.peer_port).await?;
    greet(&mut stream, node, secret).await?;
    Ok(stream)
}

/// Reads the next frame of a session, buffering in `buf`. A closed connection is an error:
/// sessions end with a frame that says so.
pub async fn read_frame<R: AsyncRead + Unpin + ?Sized>(
    stream: &mut R,
    buf: &mut BytesMut,
) -> Result<Frame, PeerError> {
    loop {
        if let Decoded::Frame(frame, used) = wire::decode(buf)? {
            bytes::Buf::advance(buf, used);
            return Ok(frame);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(PeerError::Closed);
        }
    }
}

/// Opens a connection to a peer's port: TCP, then, when `tls` is set, a TLS handshake that
/// verifies the peer's certificate for `host` (the member's DNS name or IP).
pub async fn connect(tls: Option<&Tls>, host: &str, port: u16) -> Result<PeerStream, ConnectError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host, port)))
        .await
        .map_err(|_| ConnectError::Tcp(format!("connecting to {host}:{port} timed out")))?
        .map_err(|e| ConnectError::Tcp(format!("cannot connect to {host}:{port}: {e}")))?;
    watch_liveness(&stream);
    let Some(tls) = tls else {
        return Ok(Box::new(stream));
    };
    let name = peer_server_name(host).map_err(|e| ConnectError::Tls(e.to_string()))?;
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.connector().connect(name, stream))
        .await
        .map_err(|_| ConnectError::Tls(format!("TLS handshake with {host}:{port} timed out")))?
        .map_err(|e| ConnectError::Tls(format!("TLS handshake with {host}:{port} failed: {e}")))?;
    Ok(Box::new(stream))
}

/// Takes a connection accepted on the peer port: as it is, or, when `tls` is set, once its
/// TLS handshake has completed. A caller that does not open with a TLS handshake (a node
/// without TLS, or garbage) is refused at once. `Ok(None)`: closed before saying anything.
pub async fn accept(tls: Option<&Tls>, stream: TcpStream) -> Result<Option<PeerStream>, PeerError> {
    watch_liveness(&stream);
    let Some(tls) = tls else {
        return Ok(Some(Box::new(stream)));
    };
    let acceptor = tls.acceptor();
    let handshake = async move {
        let mut first = [0u8; 1];
        if stream.peek(&mut first).await? == 0 {
            return Ok(None);
        }
        if first[0] != TLS_HANDSHAKE_RECORD {
            return Err(PeerError::PlainOnTlsPort);
        }
        let stream = acceptor
            .accept(stream)
            .await
            .map_err(PeerError::TlsHandshake)?;
        Ok(Some(Box::new(stream) as PeerStream))
    };
    tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| PeerError::TlsHandshakeTimeout)?
}

/// Hangs up: over TLS, says so first (close_notify), for at most `CONNECT_TIMEOUT`.
pub async fn close<W: AsyncWrite + Unpin + ?Sized>(stream: &mut W) {
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, stream.shutdown()).await;
}

/// Writes `bytes` and flushes them: TLS may hold written data back until flushed.
pub async fn send<W: AsyncWrite + Unpin + ?Sized>(
    stream: &mut W,
    bytes: &[u8],
) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;
    use std::sync::Arc;

    use bytes::BytesMut;
    use kache_cluster::Member;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::{oneshot, watch};

    use crate::cluster::Cluster;
    use crate::peer::link::{LinkConfig, Links};
    use crate::peer::server;
    use crate::peer::wire::{self, Frame};
    use crate::peer::Replicator;
    use crate::record::{Op, Record};
    use crate::store::{Store, StoreConfig};
    use crate::tls::test_pki;

    const WAIT: Duration = Duration::from_secs(5);

    fn replicator() -> Arc<Replicator> {
        let store = Store::new(StoreConfig {
            memory_limit: 4 << 20,
            max_item_size: 1024,
            max_shards: 2,
            node_id: 2,
            ..StoreConfig::default()
        });
        let cluster = Arc::new(Cluster::new("b"));
        Arc::new(Replicator::new(
            Arc::new(store),
            cluster,
            1024,
            Default::default(),
        ))
    }

    /// A peer port on loopback, and the member that names it.
    async fn peer_port(tls: Option<Arc<Tls>>) -> (Arc<Replicator>, Member, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer_port = listener.local_addr().unwrap().port();
        let replicator = replicator();
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(server::serve(listener, replicator.clone(), tls, stopped));
        let member = Member {
            name: "b".into(),
            host: "127.0.0.1".into(),
            ip: "127.0.0.1".into(),
            port: 1,
            peer_port,
        };
        (replicator, member, stop)
    }

    fn tls(dir: &std::path::Path) -> Arc<Tls> {
        // --tls-client-ca: mutual TLS, the CA verifying both directions.
        Arc::new(Tls::load(test_pki::files(dir, false, true, false)).unwrap())
    }

    /// Links from `a` over TLS.
    fn tls_links(dir: &std::path::Path) -> Links {
        let config = LinkConfig::default();
        Links::with_config("a", Arc::from(Vec::new()), config, Some(tls(dir)))
    }

    fn record() -> Record {
        Record {
            op: Op::Set,
            key: b"k".to_vec(),
            version: 7,
            flags: 3,
            exptime: 0,
            value: b"value".to_vec(),
        }
    }

    async fn rejected_reaches(replicator: &Replicator, n: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while replicator.stats.rejected.load(Relaxed) < n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rejections not counted"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn links_replicate_and_fetch_over_mutual_tls() {
        let dir = tempfile::tempdir().unwrap();
        let (replicator, member, _stop) = peer_port(Some(tls(dir.path()))).await;
        let links = tls_links(dir.path());
        let (ack, acked) = oneshot::channel();
        assert!(links.send(&member, record(), Some(ack)));
        tokio::time::timeout(WAIT, acked).await.unwrap().unwrap();
        let stored = replicator
            .store
            .with_entry(b"k", crate::store::now_secs(), |e| {
                e.item().map(|i| i.value().to_vec())
            });
        assert_eq!(stored.as_deref(), Some(&b"value"[..]));
        // Read-through travels over the same TLS link.
        let fetched = tokio::time::timeout(WAIT, links.fetch(&member, b"k"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(fetched, Some(record()));
        // So does a refill pull's connection.
        let mut stream = links.connect(&member).await.unwrap();
        greet(&mut stream, "a", &[]).await.unwrap();
        let mut out = BytesMut::new();
        wire::encode(
            &Frame::Fetch {
                seq: 9,
                key: b"k".to_vec(),
            },
            &mut out,
        );
        send(&mut stream, &out).await.unwrap();
        let mut buf = BytesMut::new();
        let frame = loop {
            if let wire::Decoded::Frame(frame, _) = wire::decode(&buf).unwrap() {
                break frame;
            }
            let n = tokio::time::timeout(WAIT, stream.read_buf(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "peer closed");
        };
        assert_eq!(
            frame,
            Frame::Fetched {
                seq: 9,
                record: Some(record())
            }
        );
        // Hanging up without close_notify (a dropped connection) is no rejection.
        drop(stream);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(replicator.stats.rejected.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_tls_peer_port_refuses_plain_peers() {
        let dir = tempfile::tempdir().unwrap();
        let (replicator, member, _stop) = peer_port(Some(tls(dir.path()))).await;
        // A raw hello, as a node without TLS sends it: closed without an answer, counted.
        let mut plain = TcpStream::connect(("127.0.0.1", member.peer_port))
            .await
            .unwrap();
        let mut hello = BytesMut::new();
        wire::encode(
            &Frame::Hello {
                node: "plain".into(),
                ring_version: 0,
                secret: Vec::new(),
            },
            &mut hello,
        );
        plain.write_all(&hello).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut answer)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
        rejected_reaches(&replicator, 1).await;
        // A plain link gets no acknowledgement, is refused again, and is reported down.
        let links = Links::new("plain", Arc::from(Vec::new()));
        let (ack, acked) = oneshot::channel();
        assert!(links.send(&member, record(), Some(ack)));
        assert!(tokio::time::timeout(Duration::from_secs(1), acked)
            .await
            .map_or(true, |r| r.is_err()));
        rejected_reaches(&replicator, 2).await;
        assert!(links.is_down(&member));
        // Its retries stop with it.
        drop(links);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rejected = replicator.stats.rejected.load(Relaxed);
        // A connection that closes without a word is not a rejection.
        drop(
            TcpStream::connect(("127.0.0.1", member.peer_port))
                .await
                .unwrap(),
        );
        // The port still serves TLS peers.
        let links = tls_links(dir.path());
        let (ack, acked) = oneshot::channel();
        assert!(links.send(&member, record(), Some(ack)));
        tokio::time::timeout(WAIT, acked).await.unwrap().unwrap();
        assert_eq!(replicator.stats.rejected.load(Relaxed), rejected);
    }

    #[tokio::test]
    async fn a_link_whose_hello_is_refused_is_down_at_once() {
        let (replicator, member, _stop) = peer_port(None).await;
        let wrong = Links::new("a", Arc::from(b"not the secret".to_vec()));
        let (ack, acked) = oneshot::channel();
        assert!(wrong.send(&member, record(), Some(ack)));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !wrong.is_down(&member) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "link never marked down"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rejected_reaches(&replicator, 1).await;
        assert!(tokio::time::timeout(Duration::from_millis(500), acked)
            .await
            .map_or(true, |r| r.is_err()));
        let stored = replicator
            .store
            .with_entry(b"k", crate::store::now_secs(), |e| e.item().is_some());
        assert!(!stored, "a refused peer's record was applied");
        // The right secret gets through.
        let right = Links::new("a", Arc::from(Vec::new()));
        let (ack, acked) = oneshot::channel();
        assert!(right.send(&member, record(), Some(ack)));
        tokio::time::timeout(WAIT, acked).await.unwrap().unwrap();
        assert!(!right.is_down(&member));
    }

    #[tokio::test]
    async fn a_tls_link_to_a_plain_peer_port_is_down_not_stuck() {
        let dir = tempfile::tempdir().unwrap();
        let (replicator, member, _stop) = peer_port(None).await;
        let links = tls_links(dir.path());
        let (ack, acked) = oneshot::channel();
        assert!(links.send(&member, record(), Some(ack)));
        let deadline = tokio::time::Instant::now() + WAIT;
        while !links.is_down(&member) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "link never marked down"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The plain port saw a TLS hello as garbage and closed it.
        rejected_reaches(&replicator, 1).await;
        drop(acked);
        let refused = connect(Some(&tls(dir.path())), "127.0.0.1", member.peer_port).await;
        assert!(
            matches!(refused, Err(ConnectError::Tls(_))),
            "{:?}",
            refused.err()
        );
    }
}
