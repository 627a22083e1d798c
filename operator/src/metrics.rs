//! Prometheus metrics of the operator: reconciles, errors, duration, leadership.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Label set of the error counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Short error kind, e.g. `kube` or `build`.
    pub error: String,
}

/// All operator metrics, registered in their own registry.
pub struct Metrics {
    /// `kache_operator_reconciles_total`.
    pub reconciles: Counter,
    /// `kache_operator_reconcile_errors_total{error}`.
    pub errors: Family<ErrorLabels, Counter>,
    /// `kache_operator_reconcile_duration_seconds`.
    pub duration: Histogram,
    /// `kache_operator_leader`: 1 while this replica holds the lease.
    pub leader: Gauge,
    /// `kache_operator_invalid_specs_total`.
    pub invalid_specs: Counter,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        let reconciles = Counter::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        let leader = Gauge::default();
        let invalid_specs = Counter::default();
        let mut registry = Registry::with_prefix("kache_operator");
        registry.register("reconciles", "Reconciliations started", reconciles.clone());
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by error kind",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Duration of reconciliations",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        registry.register(
            "invalid_specs",
            "Reconciliations that found an invalid spec",
            invalid_specs.clone(),
        );
        Self {
            reconciles,
            errors,
            duration,
            leader,
            invalid_specs,
            registry,
        }
    }
}

impl Metrics {
    /// Records a finished reconciliation.
    pub fn observe(&self, elapsed: Duration, error: Option<&str>) {
        self.duration.observe(elapsed.as_secs_f64());
        if let Some(kind) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    error: kind.to_string(),
                })
                .inc();
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed() {
        let m = Metrics::default();
        m.reconciles.inc();
        m.observe(Duration::from_millis(20), Some("kube"));
        m.leader.set(1);
        let text = m.encode().unwrap();
        assert!(text.contains("kache_operator_reconciles_total 1"), "{text}");
        assert!(
            text.contains("kache_operator_reconcile_errors_total{error=\"kube\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kache_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(text.contains("kache_operator_leader 1"), "{text}");
    }
}
