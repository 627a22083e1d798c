//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz`, `/readyz`.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cluster::ClusterView;
use crate::node::Node;
use crate::peer::anti_entropy::AntiEntropyStats;
use crate::peer::{PeerStats, Replicator};
use kache_cluster::{HandoffReport, NodeReport};

/// `GET /cluster`: this node's view of the ring (kache-cluster's [`NodeReport`], which the
/// operator reads).
fn cluster_report(node: &str, view: &ClusterView, replicator: &Replicator) -> NodeReport {
    let h = &replicator.handoff;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    NodeReport {
        node: node.to_string(),
        member: view.me.is_some(),
        version: view.list.version,
        replication_factor: view.list.replication_factor,
        members: view.list.members.iter().map(|m| m.name.clone()).collect(),
        handoff: HandoffReport {
            version: load(&h.version),
            running: h.running.load(Ordering::Relaxed),
            done: h.done.load(Ordering::Relaxed),
            sent: load(&h.sent),
            acked: load(&h.acked),
            failed: load(&h.failed),
            refilled: load(&h.refilled),
        },
        read_through_hits: load(&replicator.stats.read_through_hits),
        items: replicator.store.stats().curr_items,
    }
}

/// The percent-decoded value of `name` in a query string.
fn query_param(query: &str, name: &str) -> Vec<u8> {
    query_params(query, name).next().unwrap_or_default()
}

/// Every percent-decoded value of `name` in a query string, in order.
fn query_params<'a>(query: &'a str, name: &'a str) -> impl Iterator<Item = Vec<u8>> + 'a {
    query.split('&').filter_map(move |pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v.as_bytes()))
    })
}

/// Most keys one `GET /cluster/items` looks up.
const MAX_ITEMS_PER_REQUEST: usize = 1000;

/// `GET /cluster/items?key=K&key=...`: what this node's own store holds for each key (the
/// value, its version, or a delete's tombstone), with no read-through from peers, so
/// replicas can be compared. At most `MAX_ITEMS_PER_REQUEST` keys.
fn items_json(replicator: &Replicator, query: &str) -> serde_json::Value {
    let now = crate::store::now_secs();
    let items: Vec<serde_json::Value> = query_params(query, "key")
        .take(MAX_ITEMS_PER_REQUEST)
        .map(|key| {
            let held = replicator.store.with_entry(&key, now, |e| {
                e.current().map(|item| {
                    let deleted = item.has(crate::store::bits::TOMBSTONE);
                    (deleted, item.cas(), item.value().to_vec())
                })
            });
            let key = String::from_utf8_lossy(&key);
            match held {
                None => serde_json::json!({ "key": key, "found": false }),
                Some((deleted, version, value)) => serde_json::json!({
                    "key": key,
                    "found": true,
                    "deleted": deleted,
                    "version": version,
                    "value": String::from_utf8_lossy(&value),
                }),
            }
        })
        .collect();
    serde_json::json!({ "items": items })
}

fn percent_decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Whether the node should receive traffic: true once serving, false while shutting down.
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Exposes the node's counters to Prometheus, read at scrape time.
struct StatsCollector(Arc<Node>);

impl std::fmt::Debug for StatsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatsCollector")
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let metric = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(metric)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> std::fmt::Result {
    let metric = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(metric)
}

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let engine = &self.0.engine;
        let replicator = self.0.replicator.as_deref();
        let mut result = Ok(());
        engine.stats.snapshot().for_each(|name, help, value| {
            if result.is_ok() {
                result = counter(&mut enc, name, help, value);
            }
        });
        result?;
        let items = engine.store.stats();
        let s = &engine.stats;
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        gauge(
            &mut enc,
            "curr_items",
            "Items currently stored.",
            as_i64(items.curr_items),
        )?;
        gauge(
            &mut enc,
            "bytes",
            "Bytes used by items, overhead included.",
            as_i64(items.bytes),
        )?;
        gauge(
            &mut enc,
            "limit_maxbytes",
            "Memory limit for items.",
            as_i64(items.limit),
        )?;
        gauge(
            &mut enc,
            "curr_connections",
            "Open client connections.",
            as_i64(s.curr_connections.load(Ordering::Relaxed)),
        )?;
        counter(
            &mut enc,
            "total_items",
            "Items stored since start.",
            items.total_items,
        )?;
        counter(
            &mut enc,
            "evictions",
            "Items evicted to make room.",
            items.evictions,
        )?;
        counter(
            &mut enc,
            "reclaimed",
            "Expired items reclaimed.",
            items.reclaimed,
        )?;
        counter(
            &mut enc,
            "total_connections",
            "Client connections accepted.",
            s.total_connections.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "rejected_connections",
            "Client connections refused at the connection limit.",
            s.rejected_connections.load(Ordering::Relaxed),
        )?;
        let pool = &items.pool;
        for (name, help, value) in [
            (
                "store_segment_bytes",
                "Bytes per segment.",
                pool.segment_size,
            ),
            (
                "store_segments_in_use",
                "Segments holding items.",
                pool.segments_in_use,
            ),
            (
                "store_segments_free",
                "Allocated segments kept free for reuse.",
                pool.segments_free,
            ),
            (
                "store_segments_allowed",
                "Segments the memory limit allows after the hash tables' share.",
                pool.segments_allowed,
            ),
            (
                "store_index_bytes",
                "Bytes of the hash tables, charged to the memory limit.",
                pool.index_bytes,
            ),
        ] {
            gauge(&mut enc, name, help, as_i64(value as u64))?;
        }
        gauge(
            &mut enc,
            "tombstones",
            "Delete records kept to order late replicas.",
            as_i64(items.tombstones),
        )?;
        counter(
            &mut enc,
            "store_merges",
            "Segment merges done to make room.",
            items.merges,
        )?;
        counter(
            &mut enc,
            "store_expired_segments",
            "Segments dropped whole because every item in them had expired.",
            items.expired_segments,
        )?;
        // Outside a cluster the peer counters are there, at zero.
        let idle = (PeerStats::default(), AntiEntropyStats::default());
        let (p, ae) = match replicator {
            Some(r) => (&r.stats, &r.anti_entropy),
            None => (&idle.0, &idle.1),
        };
        counter(
            &mut enc,
            "peer_received",
            "Records applied from peers.",
            p.received.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "peer_rejected",
            "Peer connections closed for protocol errors.",
            p.rejected.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "read_through_hits",
            "Misses answered from a key's previous owner during a hand-off.",
            p.read_through_hits.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "read_through_skipped",
            "Read-throughs not tried because --read-through-bytes stayed in flight for the read-through timeout.",
            p.read_through_skipped.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "replication_timeouts",
            "Write batches answered before all replicas acknowledged.",
            p.replication_timeouts.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "write_ack_failures",
            "Writes answered SERVER_ERROR because too few owners acknowledged them (--write-acks).",
            p.write_ack_failures.load(Ordering::Relaxed),
        )?;
        for (name, help, value) in [
            (
                "anti_entropy_rounds",
                "Anti-entropy rounds completed with a peer.",
                &ae.rounds,
            ),
            (
                "anti_entropy_failed_rounds",
                "Anti-entropy rounds that failed (peer unreachable, broken connection, timeout).",
                &ae.failed_rounds,
            ),
            (
                "anti_entropy_arcs_differing",
                "Key-hash arcs whose digest differed from a peer's, summed over rounds.",
                &ae.arcs_differing,
            ),
            (
                "anti_entropy_items_pulled",
                "Items and tombstones pulled from peers by anti-entropy.",
                &ae.items_pulled,
            ),
            (
                "anti_entropy_bytes_pulled",
                "Bytes of items pulled from peers by anti-entropy.",
                &ae.bytes_pulled,
            ),
            (
                "anti_entropy_items_served",
                "Items and tombstones sent to peers' anti-entropy rounds.",
                &ae.items_served,
            ),
        ] {
            counter(&mut enc, name, help, value.load(Ordering::Relaxed))?;
        }
        if let Some(links) = replicator.map(|r| &r.links) {
            let m = &links.metrics;
            gauge(
                &mut enc,
                "peer_queued",
                "Records queued for peers.",
                as_i64(m.queued.load(Ordering::Relaxed)),
            )?;
            gauge(
                &mut enc,
                "peer_queued_bytes",
                "Bytes of records queued for peers (each peer's queue is bounded by --peer-queue-bytes).",
                as_i64(m.queued_bytes.load(Ordering::Relaxed)),
            )?;
            counter(
                &mut enc,
                "peer_stalls",
                "Times a peer acknowledged nothing for --peer-timeout-ms and was marked down, its queue dropped.",
                m.stalls.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "peer_sent",
                "Records sent to peers.",
                m.sent.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "peer_acked",
                "Records peers acknowledged.",
                m.acked.load(Ordering::Relaxed),
            )?;
            counter(
                &mut enc,
                "peer_dropped",
                "Records dropped: a peer queue was full, or a stalled peer's queue was dropped.",
                m.dropped.load(Ordering::Relaxed),
            )?;
            gauge(
                &mut enc,
                "peer_lag",
                "Records sent to peers and not yet acknowledged.",
                as_i64(
                    m.sent
                        .load(Ordering::Relaxed)
                        .saturating_sub(m.acked.load(Ordering::Relaxed)),
                ),
            )?;
        }
        Ok(())
    }
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    node: Arc<Node>,
    readiness: Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) {
    let mut registry = Registry::with_prefix("kache");
    registry.register_collector(Box::new(StatsCollector(node.clone())));
    serve_registry(listener, registry, Some(node), readiness, shutdown).await;
}

/// Serves the admin endpoint of the proxy: `/metrics` with its counters, health, readiness.
pub async fn serve_proxy(
    listener: TcpListener,
    proxy: Arc<crate::proxy::Proxy>,
    readiness: Arc<Readiness>,
    shutdown: watch::Receiver<bool>,
) {
    let mut registry = Registry::with_prefix("kache_proxy");
    registry.register_collector(Box::new(ProxyCollector(proxy)));
    serve_registry(listener, registry, None, readiness, shutdown).await;
}

/// Exposes the proxy's counters.
struct ProxyCollector(Arc<crate::proxy::Proxy>);

impl std::fmt::Debug for ProxyCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProxyCollector")
    }
}

impl Collector for ProxyCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let p = &self.0;
        let s = &p.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "requests",
            "Client requests handled.",
            load(&s.requests),
        )?;
        counter(
            &mut enc,
            "failovers",
            "Requests sent to a replica because the owner was unreachable.",
            load(&s.failovers),
        )?;
        counter(
            &mut enc,
            "backend_errors",
            "Failed connections and exchanges with cache nodes.",
            p.backend_errors(),
        )?;
        counter(
            &mut enc,
            "node_queue_full",
            "Requests refused (and failed over) because a node connection had --node-queue-bytes queued.",
            p.node_queue_full(),
        )?;
        gauge(
            &mut enc,
            "node_queued_bytes",
            "Bytes of requests queued for nodes.",
            i64::try_from(p.node_queued_bytes()).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut enc,
            "node_connections_opened",
            "Connections opened to the current members' nodes (persistent: a rising count means reconnects).",
            p.node_connections_opened(),
        )?;
        gauge(
            &mut enc,
            "nodes_down",
            "Members whose last connection attempt failed, within their retry backoff (their requests fail over to replicas).",
            i64::try_from(p.nodes_down()).unwrap_or(i64::MAX),
        )?;
        counter(
            &mut enc,
            "total_connections",
            "Client connections accepted.",
            load(&s.total_connections),
        )?;
        counter(
            &mut enc,
            "rejected_connections",
            "Client connections refused at the limit.",
            load(&s.rejected_connections),
        )?;
        gauge(
            &mut enc,
            "curr_connections",
            "Open client connections.",
            i64::try_from(load(&s.curr_connections)).unwrap_or(i64::MAX),
        )?;
        let view = p.cluster().view();
        gauge(
            &mut enc,
            "members",
            "Cache nodes in the member list.",
            view.list.members.len() as i64,
        )?;
        gauge(
            &mut enc,
            "config_version",
            "Version of the member list in use.",
            i64::try_from(view.list.version).unwrap_or(i64::MAX),
        )?;
        Ok(())
    }
}

async fn serve_registry(
    listener: TcpListener,
    registry: Registry,
    node: Option<Arc<Node>>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    let registry = Arc::new(registry);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(error) => {
                    tracing::warn!(%error, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        let registry = registry.clone();
        let readiness = readiness.clone();
        let node = node.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let registry = registry.clone();
                let readiness = readiness.clone();
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(&req, &registry, &readiness, node.as_deref())) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn route(
    req: &Request<Incoming>,
    registry: &Registry,
    readiness: &Readiness,
    node: Option<&Node>,
) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    };
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" if readiness.get() => text(StatusCode::OK, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into()),
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, registry) {
                Ok(()) => {
                    let mut response = text(StatusCode::OK, body);
                    if let Ok(value) =
                        "application/openmetrics-text; version=1.0.0; charset=utf-8".parse()
                    {
                        response
                            .headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, value);
                    }
                    response
                }
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "encoding failed\n".into(),
                ),
            }
        }
        "/cluster" | "/cluster/owners" | "/cluster/items" => {
            match node.and_then(|n| n.replicator.as_deref()) {
                None => text(StatusCode::NOT_FOUND, "not part of a cluster\n".into()),
                Some(replicator) => {
                    let cluster = &replicator.cluster;
                    let view = cluster.view();
                    let query = req.uri().query().unwrap_or("");
                    let body = if req.uri().path() == "/cluster" {
                        serde_json::to_value(cluster_report(cluster.node_name(), &view, replicator))
                    } else if req.uri().path() == "/cluster/items" {
                        Ok(items_json(replicator, query))
                    } else {
                        let key = query_param(query, "key");
                        let owners: Vec<&str> =
                            view.owners(&key).iter().map(|m| m.name.as_str()).collect();
                        Ok(
                            serde_json::json!({ "key": String::from_utf8_lossy(&key), "owners": owners }),
                        )
                    };
                    match body {
                        Ok(body) => text(StatusCode::OK, format!("{body}\n")),
                        Err(_) => text(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            "encoding failed\n".into(),
                        ),
                    }
                }
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
