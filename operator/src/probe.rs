//! Asking a cache node for its view of the cluster: `GET http://<podIP>:<admin
//! port>/cluster` (member-list version, membership, hand-off progress). A
//! scale-in waits on the departing nodes' hand-off; a rolling update waits
//! until every member runs the published list with no hand-off under way.
//! Behind a trait so the reconciler's tests can script it.

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// How long one probe may take (connect, request and response).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/cluster` response read.
const MAX_BODY: usize = 1 << 20;

/// The `handoff` object of a node's `GET /cluster`.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(default)]
pub struct HandoffReport {
    /// Member-list version of the hand-off under way or last finished.
    pub version: u64,
    /// A hand-off is running.
    pub running: bool,
    /// The hand-off for `version` has finished.
    pub done: bool,
    /// Items sent to new owners.
    pub sent: u64,
    /// Items the new owners acknowledged.
    pub acked: u64,
    /// Items that could not be handed off.
    pub failed: u64,
    /// Items received by refills.
    pub refilled: u64,
}

/// A node's `GET /cluster` document, the parts the operator reads.
#[derive(Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeReport {
    /// The node is in the member list it follows.
    #[serde(default)]
    pub member: bool,
    /// Version of the member list the node follows.
    #[serde(default)]
    pub version: u64,
    /// Items the node holds.
    #[serde(default)]
    pub items: u64,
    /// Its hand-off progress.
    pub handoff: HandoffReport,
}

impl NodeReport {
    /// The node follows member list `version` (or a newer one) and moves no
    /// data: nothing it should hold is still on its way.
    pub fn settled_on(&self, version: u64) -> bool {
        self.version >= version && !self.handoff.running
    }
}

/// Parses a node's `GET /cluster` document.
pub fn parse_cluster_doc(body: &[u8]) -> Result<NodeReport, String> {
    serde_json::from_slice::<NodeReport>(body)
        .map_err(|e| format!("unexpected /cluster response: {e}"))
}

/// Asks one node (by pod IP) for its report. An `Err` says why it could not
/// be learnt; the operator then keeps waiting (until a timeout, if any).
pub trait NodeProbe: Send + Sync {
    /// The node's `GET /cluster` report.
    fn report<'a>(&'a self, pod_ip: &'a str) -> BoxFuture<'a, Result<NodeReport, String>>;
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

    async fn get(&self, pod_ip: &str) -> Result<NodeReport, String> {
        let ip: IpAddr = pod_ip
            .parse()
            .map_err(|_| format!("invalid pod IP {pod_ip:?}"))?;
        let addr = SocketAddr::new(ip, self.port);
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        let conn = tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = http::Request::get("/cluster")
            .header(http::header::HOST, addr.to_string())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let result = async {
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| format!("GET http://{addr}/cluster: {e}"))?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("GET http://{addr}/cluster: {e}"))?
                .to_bytes();
            if !status.is_success() {
                return Err(format!("GET http://{addr}/cluster: HTTP {status}"));
            }
            parse_cluster_doc(&body)
        }
        .await;
        conn.abort();
        result
    }
}

impl NodeProbe for HttpProbe {
    fn report<'a>(&'a self, pod_ip: &'a str) -> BoxFuture<'a, Result<NodeReport, String>> {
        Box::pin(async move {
            tokio::time::timeout(self.timeout, self.get(pod_ip))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn parses_the_nodes_document() {
        let body = br#"{"node":"c-2","member":false,"version":7,"replicationFactor":1,
            "members":["c-0","c-1"],"handoff":{"version":7,"running":false,"done":true,
            "sent":1234,"acked":1230,"failed":4,"refilled":0},"items":0}"#;
        assert_eq!(
            parse_cluster_doc(body).unwrap(),
            NodeReport {
                member: false,
                version: 7,
                items: 0,
                handoff: HandoffReport {
                    version: 7,
                    running: false,
                    done: true,
                    sent: 1234,
                    acked: 1230,
                    failed: 4,
                    refilled: 0
                }
            }
        );
        assert!(parse_cluster_doc(b"{}").is_err());
        assert!(parse_cluster_doc(b"not json").is_err());
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
        assert!(err.contains("cannot connect"), "{err}");
        assert!(HttpProbe::new(port).report("nope").await.is_err());
    }
}
