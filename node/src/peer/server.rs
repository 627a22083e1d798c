//! The peer port: applies what peers send (replication, hand-off, refill) and answers
//! read-through fetches, refill pulls and anti-entropy rounds. Garbage closes the connection
//! that sent it. With TLS configured the port speaks TLS only: a peer that connects in plain
//! TCP is refused, logged and counted (`kache_peer_rejected_total`).

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use super::conn::{self, send};
use super::wire::{self, Decoded, Frame};
use super::{anti_entropy, handoff};
use super::{PeerError, Replicator};
use crate::record::{apply, Record};
use crate::store::now_secs;
use crate::tls::Tls;

/// Simultaneous peer connections accepted.
const MAX_PEER_CONNECTIONS: usize = 256;
/// A peer must say hello this soon after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts peers until `shutdown`; with `tls`, only over TLS (the client port's certificate,
/// and its client-certificate requirement when `--tls-client-ca` is set).
pub async fn serve(
    listener: TcpListener,
    replicator: Arc<Replicator>,
    tls: Option<Arc<Tls>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "peer accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "too many peer connections");
            continue;
        };
        let replicator = replicator.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match conn::accept(tls.as_deref(), stream).await {
                Ok(Some(stream)) => handle(stream, &replicator).await,
                Ok(None) => Ok(()),
                Err(error) => Err(error),
            };
            if let Err(error) = result {
                replicator
                    .stats
                    .rejected
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(%peer, %error, "peer connection closed");
            }
            drop(permit);
        });
    }
}

/// Serves one peer connection, plain or TLS.
async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    replicator: &Replicator,
) -> Result<(), PeerError> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(4096);
    let mut caller: Option<String> = None;
    // Whether this connection turned out to be a peer's link (its first records or fetch).
    let mut link = false;
    loop {
        loop {
            let decoded = wire::decode(&buf)?;
            let Decoded::Frame(frame, used) = decoded else {
                break;
            };
            buf.advance(used);
            let now = now_secs();
            let link_frame = matches!(frame, Frame::Records { .. } | Frame::Fetch { .. });
            if link_frame && !link && caller.is_some() {
                // A peer's link (re)connected: it may have dropped records for this node
                // while it could not reach it, and only this node's anti-entropy pulls them.
                link = true;
                replicator.links.metrics.came_up.notify_one();
            }
            match frame {
                Frame::Hello { node, secret, .. } => {
                    if !crate::auth::same_secret(&secret, &replicator.secret) {
                        return Err(PeerError::WrongSecret(node));
                    }
                    caller = Some(node);
                    wire::encode(&Frame::Ack { seq: 0 }, &mut out);
                }
                _ if caller.is_none() => return Err(PeerError::SpokeBeforeHello),
                Frame::Records { seq, records } => {
                    for record in &records {
                        apply(&replicator.store, record, now);
                    }
                    replicator
                        .stats
                        .received
                        .fetch_add(records.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    wire::encode(&Frame::Ack { seq }, &mut out);
                }
                Frame::Fetch { seq, key } => {
                    let record = replicator
                        .store
                        .with_entry(&key, now, |e| e.item().map(Record::of));
                    wire::encode(&Frame::Fetched { seq, record }, &mut out);
                }
                Frame::Pull { seq, .. } => {
                    // Refill: stream what this node holds for the caller, then say done.
                    send(&mut stream, &out).await?;
                    out.clear();
                    let name = caller.clone().unwrap_or_default();
                    let sent =
                        handoff::stream_owned_by(replicator, &mut stream, seq, &name).await?;
                    wire::encode(&Frame::PullDone { seq, sent }, &mut out);
                }
                Frame::Digests { seq, digests } => {
                    let name = caller.as_deref().unwrap_or_default();
                    let arcs = anti_entropy::answer_digests(replicator, name, &digests).await?;
                    wire::encode(&Frame::DigestDiff { seq, arcs }, &mut out);
                }
                Frame::Versions {
                    seq,
                    max_bytes,
                    arcs,
                    entries,
                } => {
                    send(&mut stream, &out).await?;
                    out.clear();
                    let name = caller.clone().unwrap_or_default();
                    let budget = usize::try_from(max_bytes).unwrap_or(usize::MAX);
                    let sent = anti_entropy::answer_versions(
                        replicator,
                        &mut stream,
                        seq,
                        &name,
                        budget,
                        &arcs,
                        &entries,
                    )
                    .await?;
                    wire::encode(&Frame::PullDone { seq, sent }, &mut out);
                }
                other => return Err(PeerError::UnexpectedFrame(Box::new(other))),
            }
        }
        if !out.is_empty() {
            send(&mut stream, &out).await?;
            out.clear();
        }
        let read = if caller.is_some() {
            stream.read_buf(&mut buf).await
        } else {
            tokio::time::timeout(HELLO_TIMEOUT, stream.read_buf(&mut buf))
                .await
                .map_err(|_| PeerError::NoHello)?
        };
        match read {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // A TLS peer that hangs up without close_notify (a dropped link) has closed,
            // as a plain one whose read returns 0.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}
