//! Objects the unit tests share (as kube-rs controller-rs keeps them): a CacheCluster as the
//! API server returns it, its pods and StatefulSet, times, and the nodes' reports.

#![allow(clippy::unwrap_used)]

use crate::build::{ClusterRef, ValidCluster};
use crate::crd::{CacheCluster, CacheClusterSpec};
use crate::observe::ObservedCluster;
use crate::probe::{HandoffReport, NodeReport, ProbeError};
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::chrono::{TimeZone, Utc};
use std::time::Duration;

/// A CacheCluster `name` in namespace `prod`, as the API server would return it.
pub fn cluster(name: &str, spec: CacheClusterSpec) -> CacheCluster {
    let mut cc = CacheCluster::new(name, spec);
    cc.metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: Some("prod".into()),
        uid: Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427".into()),
        generation: Some(1),
        ..ObjectMeta::default()
    };
    cc
}

/// The CacheCluster [`cluster`] `name` as its objects refer to it.
pub fn owner(name: &str) -> ClusterRef {
    ClusterRef::of(&cluster(name, CacheClusterSpec::default())).unwrap()
}

/// What the builders take for `cc`: it must be valid.
pub fn validated(cc: &CacheCluster) -> ValidCluster {
    observed(cc).valid
}

/// What the decisions take for `cc`: it must be valid.
pub fn observed(cc: &CacheCluster) -> ObservedCluster {
    let spec = cc.spec.validate().unwrap_or_else(|e| panic!("{e}"));
    ObservedCluster::new(cc, spec).unwrap()
}

/// What the builders take for the CacheCluster [`cluster`] `name` with `spec`: it must be
/// valid.
pub fn valid_cluster(name: &str, spec: CacheClusterSpec) -> ValidCluster {
    validated(&cluster(name, spec))
}

/// What the builders would take for the CacheCluster `name` with `spec` were it valid
/// (see [`CacheClusterSpec::unchecked`]).
pub fn unchecked_cluster(name: &str, spec: &CacheClusterSpec) -> ValidCluster {
    ValidCluster {
        cluster: owner(name),
        spec: spec.unchecked(),
    }
}

/// `secs` seconds after a fixed instant.
pub fn t(secs: i64) -> Time {
    Time(Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap())
}

/// A pod `name` in `prod`: Running at `ip` (Pending without one), Ready or not.
pub fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("prod".into()),
            ..Default::default()
        },
        spec: None,
        status: Some(PodStatus {
            phase: Some(if ip.is_some() { "Running" } else { "Pending" }.into()),
            pod_ip: ip.map(Into::into),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }),
    }
}

/// A StatefulSet whose status has caught up: `replicas` Ready and updated, on revision `r1`.
pub fn settled_sts(replicas: i32) -> StatefulSet {
    StatefulSet {
        metadata: ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        spec: None,
        status: Some(StatefulSetStatus {
            observed_generation: Some(1),
            replicas,
            ready_replicas: Some(replicas),
            updated_replicas: Some(replicas),
            current_revision: Some("r1".into()),
            update_revision: Some("r1".into()),
            ..Default::default()
        }),
    }
}

/// A node's report: following list `version`, with `handoff` as its hand-off progress.
pub fn node_report(member: bool, version: u64, items: u64, handoff: HandoffReport) -> NodeReport {
    NodeReport {
        member,
        version,
        items,
        handoff,
        ..NodeReport::default()
    }
}

/// The probe result of a node that did not answer.
pub fn unanswered() -> ProbeError {
    ProbeError::Timeout(Duration::from_secs(2))
}

/// A spec with every security setting: TLS with client certificates, client and peer
/// authentication.
pub fn secure_spec() -> CacheClusterSpec {
    use crate::crd::{AuthConfig, PeerAuthConfig, TlsConfig};
    CacheClusterSpec {
        tls: Some(TlsConfig {
            secret_name: "web-tls".into(),
            client_auth: true,
        }),
        auth: Some(AuthConfig {
            secret_name: "web-auth".into(),
        }),
        peer_auth: Some(PeerAuthConfig {
            secret_name: "web-peer".into(),
        }),
        ..Default::default()
    }
}

/// CacheCluster specs that between them set every field the operator passes to kache-node:
/// the default, a tuned one, the secure one (TLS with client certificates, auth, peer
/// auth), one with every `replication` field, and a suspended one.
pub fn representative_specs() -> Vec<(&'static str, CacheClusterSpec)> {
    use crate::crd::{PersistenceConfig, ReplicationConfig, WriteAcks};
    vec![
        ("default", CacheClusterSpec::default()),
        (
            "tuned",
            CacheClusterSpec {
                memory_mib: 1024,
                max_item_size: "8m".into(),
                threads: 8,
                max_connections: 4096,
                port: 11300,
                replication_factor: 2,
                extra_args: vec!["-v".into(), "-o".into(), "modern".into()],
                ..Default::default()
            },
        ),
        (
            "secure",
            CacheClusterSpec {
                persistence: PersistenceConfig { enabled: false },
                ..secure_spec()
            },
        ),
        (
            "replication",
            CacheClusterSpec {
                replication_factor: 3,
                replication: Some(ReplicationConfig {
                    write_acks: Some(WriteAcks::Quorum),
                    write_timeout_ms: Some(250),
                    tombstone_ttl_seconds: Some(3600),
                    anti_entropy_interval_seconds: Some(0),
                    anti_entropy_rate: Some("64M".into()),
                    peer_queue_bytes: Some("1g".into()),
                    peer_timeout_ms: Some(10),
                }),
                ..Default::default()
            },
        ),
        (
            "suspended",
            CacheClusterSpec {
                replicas: 0,
                memory_mib: 1,
                max_item_size: "512k".into(),
                ..Default::default()
            },
        ),
    ]
}
