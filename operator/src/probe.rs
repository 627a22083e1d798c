//! Asking a cache node for its view of the cluster: `GET http://<podIP>:<admin
//! port>/cluster` (member-list version, membership, hand-off progress). A
//! scale-in waits on the departing nodes' hand-off; a rolling update waits
//! until every member runs the published list with no hand-off under way.
//! Behind a trait so the reconciler's tests can script it.

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// How long one probe may take (connect, request and response).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/cluster` response read.
const MAX_BODY: usize = 1 << 20;

pub use kache_cluster::report::{HandoffReport, NodeReport};

/// Why a node's report could not be learnt. Cheap to clone (the sources are shared), as
/// probe results are.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ProbeError {
    /// The pod's IP is not an IP address.
    #[error("invalid pod IP {0:?}")]
    InvalidIp(String),
    /// Nothing accepted the connection.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The node's admin address.
        addr: SocketAddr,
        /// Why.
        source: Arc<std::io::Error>,
    },
    /// The HTTP exchange failed (handshake, request or response).
    #[error("GET http://{addr}/cluster: {source}")]
    Http {
        /// The node's admin address.
        addr: SocketAddr,
        /// Why.
        source: Arc<hyper::Error>,
    },
    /// The request could not be built.
    #[error("GET http://{addr}/cluster: {source}")]
    Request {
        /// The node's admin address.
        addr: SocketAddr,
        /// Why.
        source: Arc<http::Error>,
    },
    /// The body could not be read, or is larger than [`MAX_BODY`].
    #[error("GET http://{addr}/cluster: {source}")]
    Body {
        /// The node's admin address.
        addr: SocketAddr,
        /// Why.
        source: Arc<dyn std::error::Error + Send + Sync>,
    },
    /// The node answered with an error status.
    #[error("GET http://{addr}/cluster: HTTP {status}")]
    Status {
        /// The node's admin address.
        addr: SocketAddr,
        /// What it answered.
        status: http::StatusCode,
    },
    /// The answer is not a `/cluster` document.
    #[error("unexpected /cluster response: {0}")]
    Document(Arc<serde_json::Error>),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Parses a node's `GET /cluster` document.
pub fn parse_cluster_doc(body: &[u8]) -> Result<NodeReport, ProbeError> {
    serde_json::from_slice::<NodeReport>(body).map_err(|e| ProbeError::Document(Arc::new(e)))
}

/// A pod whose node the operator asks for its report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Pod name.
    pub name: String,
    /// Pod IP.
    pub ip: String,
}

/// Probe results by pod name: the node's report, or why there is none.
pub type ProbeResults = BTreeMap<String, Result<NodeReport, ProbeError>>;

/// Asks one node (by pod IP) for its report. An `Err` says why it could not
/// be learnt; the operator then keeps waiting (until a timeout, if any).
pub trait NodeProbe: Send + Sync {
    /// The node's `GET /cluster` report.
    fn report<'a>(&'a self, pod_ip: &'a str) -> BoxFuture<'a, Result<NodeReport, ProbeError>>;
}

/// The real probe: plain HTTP to the node's admin port.
#[derive(Clone, Debug)]
pub struct HttpProbe {
    /// Admin port of the nodes.
    pub port: u16,
    /// Time limit of one probe.
    pub timeout: Duration,
}

impl HttpProbe {
    /// A probe of `port` with the default time limit.
    pub fn new(port: u16) -> Self {
        Self {
            port,
            timeout: PROBE_TIMEOUT,
        }
    }

    async fn get(&self, pod_ip: &str) -> Result<NodeReport, ProbeError> {
        let ip: IpAddr = pod_ip
            .parse()
            .map_err(|_| ProbeError::InvalidIp(pod_ip.to_string()))?;
        let addr = SocketAddr::new(ip, self.port);
        let stream =
            tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|e| ProbeError::Connect {
                    addr,
                    source: Arc::new(e),
                })?;
        let http = |e| ProbeError::Http {
            addr,
            source: Arc::new(e),
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get("/cluster")
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ProbeError::Request {
                addr,
                source: Arc::new(e),
            })?;
        let result = async {
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| ProbeError::Body {
                    addr,
                    source: Arc::from(e),
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(ProbeError::Status { addr, status });
            }
            parse_cluster_doc(&body)
        }
        .await;
        conn.abort();
        result
    }
}

impl NodeProbe for HttpProbe {
    fn report<'a>(&'a self, pod_ip: &'a str) -> BoxFuture<'a, Result<NodeReport, ProbeError>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.get(pod_ip))
                .await
                .unwrap_or(Err(ProbeError::Timeout(self.timeout)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The document's fields are kache-cluster's (tested there); what is left here is
    /// refusing what is not one.
    #[test]
    fn a_body_that_is_no_report_is_an_error() {
        let body = br#"{"version":7,"handoff":{"version":7,"done":true,"sent":1234}}"#;
        assert_eq!(parse_cluster_doc(body).unwrap().handoff.sent, 1234);
        for bad in [&b"{}"[..], b"not json", b"{\"handoff\": 3}"] {
            assert!(
                matches!(parse_cluster_doc(bad), Err(ProbeError::Document(_))),
                "{bad:?}"
            );
        }
    }

    /// One HTTP exchange on a real socket: the probe sends `GET /cluster`
    /// and parses the answer.
    #[tokio::test]
    async fn http_probe_reads_cluster_endpoint() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let body =
                r#"{"handoff":{"version":3,"done":false,"running":true,"sent":5,"acked":2}}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(resp.as_bytes()).await.unwrap();
            req
        });
        let probe = HttpProbe::new(port);
        let r = probe.report("127.0.0.1").await.unwrap().handoff;
        assert_eq!((r.version, r.done, r.sent, r.acked), (3, false, 5, 2));
        let req = server.await.unwrap();
        assert!(req.starts_with("GET /cluster HTTP/1.1\r\n"), "{req}");

        // Nobody listening: an error, not a hang.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let err = HttpProbe::new(port).report("127.0.0.1").await.unwrap_err();
        assert!(matches!(err, ProbeError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("cannot connect"), "{err}");
        assert!(matches!(
            HttpProbe::new(port).report("nope").await,
            Err(ProbeError::InvalidIp(_))
        ));
    }
}
