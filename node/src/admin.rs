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

use crate::engine::Engine;

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

/// Exposes the engine's counters to Prometheus, read at scrape time.
struct StatsCollector(Arc<Engine>);

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
        let engine = &self.0;
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
        Ok(())
    }
}

/// Serves the admin endpoint until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    engine: Arc<Engine>,
    readiness: Arc<Readiness>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut registry = Registry::with_prefix("kache");
    registry.register_collector(Box::new(StatsCollector(engine)));
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
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let registry = registry.clone();
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(route(&req, &registry, &readiness)) }
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
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}
