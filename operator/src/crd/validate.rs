//! Every rule a CacheCluster spec must follow, including those the OpenAPI schema cannot
//! express, so an invalid object that slipped past an older CRD still gets a clear
//! `Degraded` condition instead of a retry loop. [`CacheClusterSpec::validate`] turns a spec
//! into a [`ValidSpec`] (its values in the types kache-node takes) or every [`SpecError`].
//!
//! What the spec passes to kache-node on its command line is held to what kache-node
//! accepts: sizes use kache-cluster's grammar, and the ranges are the node's (a test feeds
//! the built command lines to kache-node's own parser).

use super::defaults::{default_resources, termination_grace_period_seconds};
use super::types::*;
use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, Time};
use k8s_openapi::chrono::Duration as ChronoDuration;
use kache_cluster::names;
use kache_cluster::size::{self, SizeError};
use std::collections::BTreeMap;

/// Flags the operator derives from the spec, long and short (`""`: none); `extraArgs`
/// must not repeat them.
pub const MANAGED_FLAGS: &[(&str, &str)] = &[
    ("--port", "-p"),
    ("--listen", "-l"),
    ("--memory-limit", "-m"),
    ("--conn-limit", "-c"),
    ("--threads", "-t"),
    ("--max-item-size", "-I"),
    ("--admin-port", ""),
    ("--peer-port", ""),
    ("--shutdown-delay", ""),
    ("--cluster", ""),
    ("--tls-cert", ""),
    ("--tls-key", ""),
    ("--tls-client-ca", ""),
    ("--peer-tls-ca", ""),
    ("--auth-file", "-Y"),
    ("--peer-secret-file", ""),
    ("--memory-file", "-e"),
];

/// A spec that passed [`CacheClusterSpec::validate`]: what the builders make the cluster's
/// objects of, with every default resolved and the values it was checked for in the types
/// kache-node, the member list and the Kubernetes objects take.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// Cache nodes wanted.
    pub replicas: u32,
    /// How many nodes hold each key.
    pub replication_factor: u8,
    /// How long departing nodes (a scale-in) or a drained node (a rolling update) may hand
    /// their data off before their pods go anyway, in seconds; 0: do not wait.
    pub scale_down_timeout_seconds: u32,
    /// The memcache port.
    pub port: u16,
    /// Cache memory per node, in MiB (`-m`).
    pub memory_mib: u32,
    /// Largest item, in bytes.
    pub max_item_size: u64,
    /// `maxItemSize` as written, which is what `-I` gets (rewriting it would change the pod
    /// template, and so restart every node, on an operator upgrade).
    pub max_item_size_text: String,
    /// Worker threads per node (`-t`).
    pub threads: u32,
    /// Client connections per node (`-c`).
    pub max_connections: u32,
    /// The node image the spec names (`None`: the operator's).
    pub image: Option<String>,
    /// The cache container's resources: the spec's, else [`default_resources`].
    pub resources: ResourceRequirements,
    /// The pods' `terminationGracePeriodSeconds`: [`termination_grace_period_seconds`].
    pub termination_grace_period_seconds: i64,
    /// Where and how the pods are scheduled, as the spec says (a topology spread unset here
    /// gets the default, which names the cluster).
    pub scheduling: Scheduling,
    /// `podDisruptionBudget.maxUnavailable`.
    pub pdb_max_unavailable: i32,
    /// TLS on the memcache and peer ports.
    pub tls: Option<TlsConfig>,
    /// The Secret of the client credentials (`auth.secretName`).
    pub auth_secret: Option<String>,
    /// The Secret of the peer secret (`peerAuth.secretName`).
    pub peer_secret: Option<String>,
    /// The NetworkPolicy's settings, when it is enabled.
    pub network_policy: Option<NetworkPolicyConfig>,
    /// Whether the nodes keep their items in a memory file.
    pub memory_file: bool,
    /// The replication flags the spec sets, with their values.
    pub replication_flags: Vec<(&'static str, String)>,
    /// `extraArgs`.
    pub extra_args: Vec<String>,
}

impl ValidSpec {
    /// `replicas` as the Kubernetes objects count them: [`CacheClusterSpec::validate`] holds
    /// it to [`MAX_REPLICAS`], which an `i32` holds.
    pub fn replicas_i32(&self) -> i32 {
        i32::try_from(self.replicas).unwrap_or(i32::MAX)
    }

    /// When a hand-off that started at `since` stops being waited for:
    /// `scaleDownTimeoutSeconds` later.
    pub fn handoff_deadline(&self, since: &Time) -> Time {
        Time(since.0 + ChronoDuration::seconds(i64::from(self.scale_down_timeout_seconds)))
    }
}

/// The pods' scheduling settings, passed through from the spec.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scheduling {
    /// `nodeSelector`.
    pub node_selector: Option<BTreeMap<String, String>>,
    /// `tolerations`.
    pub tolerations: Option<Vec<Toleration>>,
    /// `affinity`.
    pub affinity: Option<Affinity>,
    /// `topologySpreadConstraints`.
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// `podAnnotations`.
    pub pod_annotations: Option<BTreeMap<String, String>>,
    /// `priorityClassName`.
    pub priority_class_name: Option<String>,
}

/// One way a spec is invalid. The messages name the spec's fields as `kubectl` shows them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A number outside its field's range.
    #[error("{field} must be between {min} and {max}, got {value}")]
    OutOfRange {
        /// The field.
        field: &'static str,
        /// Its value.
        value: i64,
        /// The smallest allowed.
        min: i64,
        /// The largest allowed.
        max: i64,
    },
    /// More copies than nodes.
    #[error("replicationFactor ({replication_factor}) must not exceed replicas ({replicas})")]
    ReplicationAboveReplicas {
        /// `replicationFactor`.
        replication_factor: i32,
        /// `replicas`.
        replicas: i32,
    },
    /// The memcache port is one the node uses for something else.
    #[error(
        "port {0} is reserved (peer port {peer}, admin port {admin})",
        peer = names::PEER_PORT,
        admin = names::ADMIN_PORT
    )]
    ReservedPort(i32),
    /// `maxItemSize` is not a size, or not in the range kache-node allows.
    #[error("maxItemSize: {source}")]
    MaxItemSize {
        /// `maxItemSize` as written.
        text: String,
        /// Why.
        source: SizeError,
    },
    /// A byte bound that is not a size from 1k to 1g.
    #[error("{field}: {source}")]
    Size {
        /// The field.
        field: &'static str,
        /// Its value as written.
        text: String,
        /// Why.
        source: SizeError,
    },
    /// `maxItemSize` is more than half the cache memory (memcached's rule, which
    /// kache-node keeps).
    #[error("maxItemSize {text:?} must not exceed half of memoryMiB ({memory_mib} MiB)")]
    MaxItemSizeAboveHalfMemory {
        /// `maxItemSize` as written.
        text: String,
        /// `memoryMiB`.
        memory_mib: i32,
    },
    /// `maxItemSize` is not a multiple of kache-node's slab chunk size.
    #[error(
        "maxItemSize {0:?} must be a multiple of {chunk} (kache-node's slab_chunk_max; \
         other sizes need `-o slab_chunk_max=...` in extraArgs)",
        chunk = size::show(size::DEFAULT_SLAB_CHUNK_MAX)
    )]
    MaxItemSizeNotChunkMultiple(String),
    /// `image` is blank.
    #[error("image must not be empty")]
    EmptyImage,
    /// A Secret name that is not an object name.
    #[error("{field} {name:?} is not a valid Secret name")]
    SecretName {
        /// The field.
        field: &'static str,
        /// Its value.
        name: String,
    },
    /// A label selector expression the API server would reject.
    #[error("{field}.matchExpressions[{index}]: {problem}")]
    Selector {
        /// The selector's field.
        field: &'static str,
        /// Which expression.
        index: usize,
        /// What is wrong with it.
        problem: SelectorProblem,
    },
    /// `extraArgs` sets a flag the operator sets.
    #[error("extraArgs must not set {0}: the operator sets it from the spec")]
    ManagedFlag(&'static str),
}

/// What is wrong with a label selector expression.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorProblem {
    /// `In`/`NotIn` without values.
    #[error("operator {0} needs values")]
    NeedsValues(String),
    /// `Exists`/`DoesNotExist` with values.
    #[error("operator {0} takes no values")]
    TakesNoValues(String),
    /// Not an operator.
    #[error("operator {0:?} is not In, NotIn, Exists or DoesNotExist")]
    UnknownOperator(String),
    /// No key.
    #[error("key must not be empty")]
    EmptyKey,
}

/// Every problem of an invalid spec, in the order of its fields.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    /// Whether `needle` is in one of the messages.
    pub fn mention(&self, needle: &str) -> bool {
        self.0.iter().any(|e| e.to_string().contains(needle))
    }
}

/// Whether `s` is a valid object name (an RFC 1123 DNS subdomain), as Secret names must be.
pub fn is_dns_subdomain(s: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !s.is_empty() && s.len() <= 253 && s.split('.').all(label_ok)
}

/// Problems with a label selector the API server would reject in the NetworkPolicy
/// (operators and their values).
fn selector_errors(field: &'static str, sel: &LabelSelector, errs: &mut Vec<SpecError>) {
    for (index, e) in sel.match_expressions.iter().flatten().enumerate() {
        let values = e.values.as_ref().map_or(0, Vec::len);
        let op = || e.operator.clone();
        let problem = match e.operator.as_str() {
            "In" | "NotIn" if values == 0 => Some(SelectorProblem::NeedsValues(op())),
            "Exists" | "DoesNotExist" if values > 0 => Some(SelectorProblem::TakesNoValues(op())),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => None,
            _ => Some(SelectorProblem::UnknownOperator(op())),
        };
        let empty_key = e.key.is_empty().then_some(SelectorProblem::EmptyKey);
        errs.extend(
            problem
                .into_iter()
                .chain(empty_key)
                .map(|problem| SpecError::Selector {
                    field,
                    index,
                    problem,
                }),
        );
    }
}

/// Longest `replication.tombstoneTtlSeconds` (30 days).
pub const MAX_TOMBSTONE_TTL_SECONDS: i32 = 30 * 24 * 3600;

/// kache-node's short flags that take no value, so that more short flags may follow them
/// in one argument (`-vp1` is `-v -p 1`). A test holds this to kache-node's parser.
pub const NODE_SWITCHES: &str = "vAdrMkiLCFXWSZhV";

/// The flags `spec` sets, long and short (`""`: none): [`MANAGED_FLAGS`], and those of
/// the `replication` fields it sets (unset, `extraArgs` may pass them).
pub fn managed_flags(spec: &CacheClusterSpec) -> Vec<(&'static str, &'static str)> {
    let replication = spec.replication.iter().flat_map(|r| r.node_flags());
    MANAGED_FLAGS
        .iter()
        .copied()
        .chain(replication.map(|(flag, _)| (flag, "")))
        .collect()
}

/// The flag of `managed` that `arg` (one element of `extraArgs`) sets, if any: as
/// `--long`, `--long=value`, or a short flag alone, with its value attached, or after
/// switches (`-vvp1`).
fn managed_flag(arg: &str, managed: &[(&'static str, &'static str)]) -> Option<&'static str> {
    if arg.starts_with("--") {
        let flag = arg.split('=').next().unwrap_or(arg);
        return managed.iter().find(|(long, _)| *long == flag).map(|m| m.0);
    }
    let shorts = arg.strip_prefix('-')?;
    for c in shorts.chars() {
        let clash = managed
            .iter()
            .find(|(_, short)| short.strip_prefix('-') == Some(c.encode_utf8(&mut [0; 4])));
        if let Some((long, _)) = clash {
            return Some(long);
        }
        if !NODE_SWITCHES.contains(c) {
            // A flag that takes a value: the rest of the argument is that value.
            return None;
        }
    }
    None
}

/// Problems of the `replication` settings: kache-node's ranges.
fn replication_errors(r: &ReplicationConfig, errs: &mut Vec<SpecError>) {
    let ranges = [
        ("replication.writeTimeoutMs", r.write_timeout_ms, 1, 600_000),
        (
            "replication.tombstoneTtlSeconds",
            r.tombstone_ttl_seconds,
            1,
            MAX_TOMBSTONE_TTL_SECONDS,
        ),
        (
            "replication.antiEntropyIntervalSeconds",
            r.anti_entropy_interval_seconds,
            0,
            86_400,
        ),
        ("replication.peerTimeoutMs", r.peer_timeout_ms, 10, 600_000),
    ];
    for (field, value, min, max) in ranges {
        if let Some(v) = value.filter(|v| !(min..=max).contains(v)) {
            errs.push(SpecError::OutOfRange {
                field,
                value: v.into(),
                min: min.into(),
                max: max.into(),
            });
        }
    }
    let sizes = [
        ("replication.antiEntropyRate", &r.anti_entropy_rate),
        ("replication.peerQueueBytes", &r.peer_queue_bytes),
    ];
    for (field, text) in sizes {
        if let Some(text) = text {
            if let Err(source) = size::parse_byte_limit(text) {
                errs.push(SpecError::Size {
                    field,
                    text: text.clone(),
                    source,
                });
            }
        }
    }
}

/// The largest item a node with `memory_mib` MiB takes, by kache-node's rules: at most half
/// its memory, and (the operator runs every node in a cluster) what fits a peer frame.
fn max_item_size_range(memory_mib: i32) -> std::ops::RangeInclusive<u64> {
    let half_memory = u64::from(memory_mib.unsigned_abs()) * size::MIB / 2;
    size::KIB..=half_memory.min(size::MAX_CLUSTER_ITEM_SIZE)
}

impl CacheClusterSpec {
    /// The spec's values, or every problem with it as messages fit for a condition.
    pub fn validate(&self) -> Result<ValidSpec, SpecErrors> {
        let mut errs = Vec::new();
        let mut range = |field: &'static str, v: i32, min: i32, max: i32| {
            if v < min || v > max {
                errs.push(SpecError::OutOfRange {
                    field,
                    value: v.into(),
                    min: min.into(),
                    max: max.into(),
                });
            }
        };
        range("replicas", self.replicas, 0, MAX_REPLICAS);
        range("memoryMiB", self.memory_mib, 1, MAX_MEMORY_MIB);
        range("threads", self.threads, 1, MAX_THREADS);
        range("maxConnections", self.max_connections, 1, MAX_CONNECTIONS);
        range(
            "replicationFactor",
            self.replication_factor,
            1,
            MAX_REPLICATION_FACTOR,
        );
        range("port", self.port, 1, 65535);
        range(
            "scaleDownTimeoutSeconds",
            self.scale_down_timeout_seconds,
            0,
            MAX_SCALE_DOWN_TIMEOUT_SECONDS,
        );
        range(
            "podDisruptionBudget.maxUnavailable",
            self.pod_disruption_budget.max_unavailable,
            0,
            i32::MAX,
        );
        if self.replicas > 0 && self.replication_factor > self.replicas {
            errs.push(SpecError::ReplicationAboveReplicas {
                replication_factor: self.replication_factor,
                replicas: self.replicas,
            });
        }
        if self.port == i32::from(names::PEER_PORT) || self.port == i32::from(names::ADMIN_PORT) {
            errs.push(SpecError::ReservedPort(self.port));
        }
        let max_item_size = self.valid_max_item_size(&mut errs);
        if matches!(&self.image, Some(i) if i.trim().is_empty()) {
            errs.push(SpecError::EmptyImage);
        }
        let secrets = [
            ("tls.secretName", self.tls.as_ref().map(|t| &t.secret_name)),
            (
                "auth.secretName",
                self.auth.as_ref().map(|a| &a.secret_name),
            ),
            (
                "peerAuth.secretName",
                self.peer_auth.as_ref().map(|p| &p.secret_name),
            ),
        ];
        for (field, name) in secrets {
            if let Some(name) = name.filter(|n| !is_dns_subdomain(n)) {
                errs.push(SpecError::SecretName {
                    field,
                    name: name.clone(),
                });
            }
        }
        if let Some(np) = &self.network_policy {
            if let Some(sel) = &np.client_namespace_selector {
                selector_errors("networkPolicy.clientNamespaceSelector", sel, &mut errs);
            }
            if let Some(sel) = &np.client_pod_selector {
                selector_errors("networkPolicy.clientPodSelector", sel, &mut errs);
            }
        }
        if let Some(r) = &self.replication {
            replication_errors(r, &mut errs);
        }
        let managed = managed_flags(self);
        errs.extend(
            self.extra_args
                .iter()
                .filter_map(|a| managed_flag(a, &managed))
                .map(SpecError::ManagedFlag),
        );
        match (max_item_size, errs.is_empty()) {
            (Some(max_item_size), true) => self.resolve(max_item_size).ok_or(SpecErrors(errs)),
            _ => Err(SpecErrors(errs)),
        }
    }

    /// The spec as the builders take it, with `max_item_size` bytes; `None` when a number
    /// is out of its type (which the ranges [`Self::validate`] checks rule out).
    fn resolve(&self, max_item_size: u64) -> Option<ValidSpec> {
        let memory_mib = u32::try_from(self.memory_mib).ok()?;
        let threads = u32::try_from(self.threads).ok()?;
        Some(ValidSpec {
            replicas: u32::try_from(self.replicas).ok()?,
            replication_factor: u8::try_from(self.replication_factor).ok()?,
            scale_down_timeout_seconds: u32::try_from(self.scale_down_timeout_seconds).ok()?,
            port: u16::try_from(self.port).ok()?,
            memory_mib,
            max_item_size,
            max_item_size_text: self.max_item_size.clone(),
            threads,
            max_connections: u32::try_from(self.max_connections).ok()?,
            image: self.image.clone(),
            resources: self.resources.clone().unwrap_or_else(|| {
                default_resources(memory_mib, threads, self.persistence.enabled)
            }),
            termination_grace_period_seconds: termination_grace_period_seconds(&self.extra_args),
            scheduling: Scheduling {
                node_selector: self.node_selector.clone(),
                tolerations: self.tolerations.clone(),
                affinity: self.affinity.clone(),
                topology_spread_constraints: self.topology_spread_constraints.clone(),
                pod_annotations: self.pod_annotations.clone(),
                priority_class_name: self.priority_class_name.clone(),
            },
            pdb_max_unavailable: self.pod_disruption_budget.max_unavailable,
            tls: self.tls.clone(),
            auth_secret: self.auth.as_ref().map(|a| a.secret_name.clone()),
            peer_secret: self.peer_auth.as_ref().map(|p| p.secret_name.clone()),
            network_policy: NetworkPolicyConfig::enabled(self).cloned(),
            memory_file: self.persistence.enabled,
            replication_flags: self
                .replication
                .iter()
                .flat_map(ReplicationConfig::node_flags)
                .collect(),
            extra_args: self.extra_args.clone(),
        })
    }

    /// The spec as the builders would take it were it valid: for tests that hold what
    /// the operator refuses to what kache-node refuses (an unparsable `maxItemSize` counts
    /// as 0 bytes; `-I` still gets it as written).
    #[cfg(test)]
    pub(crate) fn unchecked(&self) -> ValidSpec {
        let bytes = size::parse_size(&self.max_item_size).unwrap_or(0);
        self.resolve(bytes)
            .unwrap_or_else(|| panic!("a number of {self:?} is out of its type"))
    }

    /// Whether `extraArgs` set kache-node's slab chunk size (which then checks `-I`
    /// against it itself).
    fn sets_slab_chunk_max(&self) -> bool {
        let options = ["slab_chunk_max", "no_chunked_items", "no_modern"];
        self.extra_args
            .iter()
            .any(|a| options.iter().any(|o| a.contains(o)))
    }

    /// `maxItemSize` in bytes, when kache-node takes it with `memoryMiB`.
    fn valid_max_item_size(&self, errs: &mut Vec<SpecError>) -> Option<u64> {
        let text = &self.max_item_size;
        let range = max_item_size_range(self.memory_mib);
        let bytes = match size::parse_size(text) {
            Err(source) => Err(source),
            Ok(b) if b < *range.start() || b > size::MAX_CLUSTER_ITEM_SIZE => {
                Err(SizeError::OutOfRange {
                    text: text.clone(),
                    range: size::KIB..=size::MAX_CLUSTER_ITEM_SIZE,
                })
            }
            Ok(b) if b > *range.end() => {
                errs.push(SpecError::MaxItemSizeAboveHalfMemory {
                    text: text.clone(),
                    memory_mib: self.memory_mib,
                });
                return None;
            }
            Ok(b) if b % size::DEFAULT_SLAB_CHUNK_MAX != 0 && !self.sets_slab_chunk_max() => {
                errs.push(SpecError::MaxItemSizeNotChunkMultiple(text.clone()));
                return None;
            }
            Ok(b) => Ok(b),
        };
        bytes
            .map_err(|source| {
                errs.push(SpecError::MaxItemSize {
                    text: text.clone(),
                    source,
                })
            })
            .ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn errors(spec: &CacheClusterSpec) -> SpecErrors {
        spec.validate().unwrap_err()
    }

    #[test]
    fn the_default_spec_is_valid() {
        let spec = CacheClusterSpec::default();
        assert_eq!(
            spec.validate(),
            Ok(ValidSpec {
                replicas: 3,
                replication_factor: 1,
                scale_down_timeout_seconds: 300,
                port: 11211,
                memory_mib: 64,
                max_item_size: size::MIB,
                max_item_size_text: "1m".into(),
                threads: 4,
                max_connections: 1024,
                image: None,
                resources: default_resources(64, 4, true),
                termination_grace_period_seconds: 60,
                scheduling: Scheduling::default(),
                pdb_max_unavailable: 1,
                tls: None,
                auth_secret: None,
                peer_secret: None,
                network_policy: None,
                memory_file: true,
                replication_flags: vec![],
                extra_args: vec![],
            })
        );
    }

    #[test]
    fn defaults_are_resolved_once_here() {
        let spec = CacheClusterSpec {
            memory_mib: 4096,
            threads: 2,
            persistence: PersistenceConfig { enabled: false },
            extra_args: vec!["--shutdown-grace=70".into()],
            network_policy: Some(NetworkPolicyConfig::default()),
            replication: Some(ReplicationConfig {
                write_acks: Some(WriteAcks::All),
                ..Default::default()
            }),
            ..Default::default()
        };
        let valid = spec.validate().unwrap();
        assert_eq!(valid.resources, default_resources(4096, 2, false));
        assert_eq!(valid.termination_grace_period_seconds, 80);
        assert_eq!(
            valid.network_policy, None,
            "a disabled NetworkPolicy is none"
        );
        assert_eq!(
            valid.replication_flags,
            [("--write-acks", "all".to_string())]
        );
        let own = ResourceRequirements::default();
        let with_own = CacheClusterSpec {
            resources: Some(own.clone()),
            ..spec
        };
        assert_eq!(with_own.validate().unwrap().resources, own);
    }

    /// `status`, `scale` and `roll` read these fields off the [`ValidSpec`] with no clamp
    /// of their own (they once clamped the raw spec: `replicas.max(0)`, a port falling back
    /// to 11211, ...): the values a clamp would have changed never get past validation, and
    /// the edges of the ranges reach them unchanged.
    #[test]
    fn the_decisions_get_no_value_a_clamp_would_change() {
        type Set = fn(&mut CacheClusterSpec, i32);
        type Get = fn(&ValidSpec) -> i64;
        let fields: [(&str, Set, Get, [i32; 2], i32); 4] = [
            (
                "replicas",
                |s, v| s.replicas = v,
                |v| v.replicas.into(),
                [-1, i32::MIN],
                0,
            ),
            (
                "scaleDownTimeoutSeconds",
                |s, v| s.scale_down_timeout_seconds = v,
                |v| v.scale_down_timeout_seconds.into(),
                [-1, i32::MIN],
                0,
            ),
            (
                "port",
                |s, v| s.port = v,
                |v| v.port.into(),
                [0, 65536],
                65535,
            ),
            (
                "replicationFactor",
                |s, v| s.replication_factor = v,
                |v| v.replication_factor.into(),
                [0, 256],
                1,
            ),
        ];
        for (field, set, get, rejected, edge) in fields {
            let with = |v| {
                let mut spec = CacheClusterSpec::default();
                set(&mut spec, v);
                spec
            };
            for v in rejected {
                let errs = errors(&with(v));
                assert!(errs.mention(&format!("{field} must be between")), "{errs}");
            }
            let valid = with(edge).validate().unwrap();
            assert_eq!(get(&valid), i64::from(edge), "{field}");
        }
    }

    #[test]
    fn invalid_specs_are_explained() {
        let check = |spec: CacheClusterSpec, needle: &str| {
            let errs = errors(&spec);
            assert!(errs.mention(needle), "expected {needle:?} in {errs}");
        };
        check(
            CacheClusterSpec {
                replication_factor: 3,
                replicas: 2,
                ..Default::default()
            },
            "replicationFactor (3) must not exceed replicas (2)",
        );
        check(
            CacheClusterSpec {
                replication_factor: 4,
                ..Default::default()
            },
            "replicationFactor must be between 1 and 3",
        );
        check(
            CacheClusterSpec {
                replicas: -1,
                ..Default::default()
            },
            "replicas must be between",
        );
        check(
            CacheClusterSpec {
                memory_mib: 0,
                ..Default::default()
            },
            "memoryMiB",
        );
        check(
            CacheClusterSpec {
                threads: 0,
                ..Default::default()
            },
            "threads",
        );
        check(
            CacheClusterSpec {
                port: 70000,
                ..Default::default()
            },
            "port must be between",
        );
        check(
            CacheClusterSpec {
                port: 11212,
                ..Default::default()
            },
            "reserved",
        );
        check(
            CacheClusterSpec {
                scale_down_timeout_seconds: -1,
                ..Default::default()
            },
            "scaleDownTimeoutSeconds must be between 0 and 86400",
        );
        check(
            CacheClusterSpec {
                max_item_size: "lots".into(),
                ..Default::default()
            },
            "expected a number with optional k, m or g",
        );
        check(
            CacheClusterSpec {
                max_item_size: "10".into(),
                ..Default::default()
            },
            "must be between 1k and 8m",
        );
        check(
            CacheClusterSpec {
                max_item_size: "128m".into(),
                ..Default::default()
            },
            "must be between 1k and 8m",
        );
        check(
            CacheClusterSpec {
                extra_args: vec!["--port=1".into()],
                ..Default::default()
            },
            "must not set --port",
        );
        check(
            CacheClusterSpec {
                extra_args: vec!["-m1024".into()],
                ..Default::default()
            },
            "must not set --memory-limit",
        );
        check(
            CacheClusterSpec {
                image: Some(" ".into()),
                ..Default::default()
            },
            "image must not be empty",
        );
        check(
            CacheClusterSpec {
                extra_args: vec!["--auth-file=/x".into()],
                ..Default::default()
            },
            "must not set --auth-file",
        );
        check(
            CacheClusterSpec {
                extra_args: vec!["-Y".into(), "/x".into()],
                ..Default::default()
            },
            "must not set --auth-file",
        );
        check(
            CacheClusterSpec {
                extra_args: vec!["--peer-tls-ca=/x".into()],
                ..Default::default()
            },
            "must not set --peer-tls-ca",
        );
        check(
            CacheClusterSpec {
                tls: Some(TlsConfig {
                    secret_name: "Bad_Name".into(),
                    client_auth: false,
                }),
                ..Default::default()
            },
            "tls.secretName \"Bad_Name\" is not a valid Secret name",
        );
        check(
            CacheClusterSpec {
                peer_auth: Some(PeerAuthConfig {
                    secret_name: "-x".into(),
                }),
                ..Default::default()
            },
            "peerAuth.secretName",
        );
        let bad_selector: LabelSelector = serde_json::from_value(serde_json::json!({
            "matchExpressions": [
                {"key": "team", "operator": "In"},
                {"key": "app", "operator": "Exists", "values": ["x"]},
                {"key": "tier", "operator": "Equals", "values": ["x"]},
            ]
        }))
        .unwrap();
        let errs = errors(&CacheClusterSpec {
            network_policy: Some(NetworkPolicyConfig {
                enabled: true,
                client_namespace_selector: Some(bad_selector.clone()),
                client_pod_selector: Some(bad_selector),
            }),
            ..Default::default()
        })
        .0
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>();
        assert_eq!(errs.len(), 6, "{errs:?}");
        assert!(errs[0].contains(
            "networkPolicy.clientNamespaceSelector.matchExpressions[0]: operator In needs values"
        ));
        assert!(errs[1].contains("operator Exists takes no values"));
        assert!(errs[2].contains("\"Equals\" is not In, NotIn, Exists or DoesNotExist"));
        assert!(errs[3].starts_with("networkPolicy.clientPodSelector"));
        // Scaled to zero is fine whatever the replication factor.
        let zero = CacheClusterSpec {
            replicas: 0,
            replication_factor: 3,
            ..Default::default()
        };
        assert!(zero.validate().is_ok());
        // Harmless extra args pass.
        let ok = CacheClusterSpec {
            extra_args: vec!["-v".into(), "--verbose".into()],
            ..Default::default()
        };
        assert!(ok.validate().is_ok(), "{:?}", ok.validate());
    }

    #[test]
    fn max_item_size_is_what_kache_node_takes_in_a_cluster() {
        let with = |max_item_size: &str, memory_mib: i32| CacheClusterSpec {
            max_item_size: max_item_size.into(),
            memory_mib,
            ..Default::default()
        };
        for (text, mib, bytes) in [
            ("512k", 64, 512 * size::KIB),
            ("1536k", 64, 1536 * size::KIB),
            ("2M", 64, 2 * size::MIB),
            ("8m", 64, 8 * size::MIB),
            ("1m", 2, size::MIB),
        ] {
            assert_eq!(
                with(text, mib).validate().map(|v| v.max_item_size),
                Ok(bytes),
                "{text}"
            );
        }
        for (text, mib, needle) in [
            ("1023", 64, "must be between 1k and 8m"),
            ("9m", 64, "must be between 1k and 8m"),
            ("1g", 4096, "must be between 1k and 8m"),
            ("2m", 3, "must not exceed half of memoryMiB (3 MiB)"),
            ("1k", 64, "must be a multiple of 512k"),
            ("1000k", 64, "must be a multiple of 512k"),
            ("1.5m", 64, "expected a number"),
            ("1x", 64, "invalid size unit"),
        ] {
            let errs = errors(&with(text, mib));
            assert!(errs.mention(needle), "{text}: {errs}");
        }
        assert_eq!(
            errors(&with("1x", 64)).to_string(),
            "maxItemSize: invalid size unit in \"1x\": use k, m or g"
        );
        let mut small_chunks = with("1000k", 64);
        small_chunks.extra_args = vec!["-o".into(), "slab_chunk_max=8k".into()];
        assert!(
            small_chunks.validate().is_ok(),
            "kache-node checks -I against its -o"
        );
    }

    #[test]
    fn secret_names_are_dns_subdomains() {
        for ok in ["a", "web-tls", "web.tls", "0abc", &"a".repeat(253)] {
            assert!(is_dns_subdomain(ok), "{ok}");
        }
        for bad in ["", "A", "a_b", "-a", "a-", "a..b", ".a", &"a".repeat(254)] {
            assert!(!is_dns_subdomain(bad), "{bad}");
        }
    }
}
