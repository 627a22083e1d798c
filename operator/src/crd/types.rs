//! The `CacheCluster` resource's types and defaults.
//!
//! Every field is documented: the doc comments become the OpenAPI descriptions
//! that `kubectl explain cachecluster.spec` shows. Defaults are declared with
//! serde so they appear in the schema (and so the API server fills them in);
//! [`super::validate`] repeats every rule the schema cannot express.

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kache_cluster::names;
use kube::CustomResource;
use schemars::gen::SchemaGenerator;
use schemars::schema::Schema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// API group of the CacheCluster resource.
pub const GROUP: &str = "kache.dev";
/// API version of the CacheCluster resource.
pub const VERSION: &str = "v1alpha1";

/// Default number of cache nodes.
pub const DEFAULT_REPLICAS: i32 = 3;
/// Default cache memory per node, in MiB (memcached's default).
pub const DEFAULT_MEMORY_MIB: i32 = 64;
/// Default largest item size.
pub const DEFAULT_MAX_ITEM_SIZE: &str = "1m";
/// Default worker threads per node.
pub const DEFAULT_THREADS: i32 = 4;
/// Default maximum simultaneous client connections per node.
pub const DEFAULT_MAX_CONNECTIONS: i32 = 1024;
/// Default replication factor.
pub const DEFAULT_REPLICATION_FACTOR: i32 = 1;
/// Highest replication factor.
pub const MAX_REPLICATION_FACTOR: i32 = kache_cluster::member_list::MAX_REPLICATION_FACTOR as i32;
/// Default PodDisruptionBudget `maxUnavailable`.
pub const DEFAULT_PDB_MAX_UNAVAILABLE: i32 = 1;

/// Default seconds a scale-in waits for departing nodes to hand their data off.
pub const DEFAULT_SCALE_DOWN_TIMEOUT_SECONDS: i32 = 300;
/// Longest `scaleDownTimeoutSeconds` (one day).
pub const MAX_SCALE_DOWN_TIMEOUT_SECONDS: i32 = 86_400;

/// Most nodes one CacheCluster may have.
pub const MAX_REPLICAS: i32 = 1000;
/// Most cache memory per node, in MiB (1 TiB).
pub const MAX_MEMORY_MIB: i32 = 1024 * 1024;
/// Most worker threads per node.
pub const MAX_THREADS: i32 = 256;
/// Most client connections per node.
pub const MAX_CONNECTIONS: i32 = 1_000_000;

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}
fn default_memory_mib() -> i32 {
    DEFAULT_MEMORY_MIB
}
fn default_max_item_size() -> String {
    DEFAULT_MAX_ITEM_SIZE.to_string()
}
fn default_threads() -> i32 {
    DEFAULT_THREADS
}
fn default_max_connections() -> i32 {
    DEFAULT_MAX_CONNECTIONS
}
fn default_replication_factor() -> i32 {
    DEFAULT_REPLICATION_FACTOR
}
fn default_port() -> i32 {
    i32::from(names::MEMCACHE_PORT)
}
fn default_pdb_max_unavailable() -> i32 {
    DEFAULT_PDB_MAX_UNAVAILABLE
}
fn default_scale_down_timeout_seconds() -> i32 {
    DEFAULT_SCALE_DOWN_TIMEOUT_SECONDS
}

/// Desired state of a CacheCluster. Every field is optional and has a default,
/// so `spec: {}` gives a working 3-node cluster.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kache.dev",
    version = "v1alpha1",
    kind = "CacheCluster",
    plural = "cacheclusters",
    singular = "cachecluster",
    shortname = "kc",
    category = "kache",
    namespaced,
    doc = "A memcached-compatible distributed cache: a set of kache-node pods, their Services, and a published member list.",
    status = "CacheClusterStatus",
    scale = r#"{"specReplicasPath":".spec.replicas","statusReplicasPath":".status.replicas","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","description":"Desired cache nodes","jsonPath":".spec.replicas"}"#,
    printcolumn = r#"{"name":"Ready","type":"integer","description":"Ready cache nodes","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Config","type":"integer","description":"Member-list version","jsonPath":".status.configVersion"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CacheClusterSpec {
    /// Number of cache nodes (pods). Scalable with `kubectl scale` and a
    /// HorizontalPodAutoscaler. 0 suspends the cluster.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Container image of the cache nodes. Defaults to the kache-node image
    /// matching the operator's version (operator flag `--node-image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub image: Option<String>,

    /// Cache memory per node in MiB, passed to kache-node as `-m`. The pod's
    /// memory request and limit default to this plus headroom.
    #[serde(rename = "memoryMiB", default = "default_memory_mib")]
    #[schemars(range(min = 1, max = 1048576))]
    pub memory_mib: i32,

    /// Largest storable item, passed as `-I`: a byte count with an optional
    /// `k`, `m` or `g` suffix (e.g. `1m`, `512k`, `1048576`), up to 8m (an item
    /// must fit a peer frame) and half of `memoryMiB`, and a multiple of 512k
    /// (kache-node's `slab_chunk_max`, as memcached's; with `-o
    /// slab_chunk_max=...` in `extraArgs`, a multiple of that, at least 1k).
    #[serde(default = "default_max_item_size")]
    #[schemars(regex = "kache_cluster::size::SIZE_PATTERN", length(max = 32))]
    pub max_item_size: String,

    /// Worker threads per node, passed as `-t`.
    #[serde(default = "default_threads")]
    #[schemars(range(min = 1, max = 256))]
    pub threads: i32,

    /// Maximum simultaneous client connections per node, passed as `-c`.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 1000000))]
    pub max_connections: i32,

    /// How many nodes hold each key (1-3). Must not exceed `replicas` (unless
    /// `replicas` is 0).
    #[serde(default = "default_replication_factor")]
    #[schemars(range(min = 1, max = 3))]
    pub replication_factor: i32,

    /// Memcache port the nodes listen on and the client Service exposes.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Compute resources of the cache container. Defaults to a memory request
    /// and limit of `memoryMiB` plus 25% (at least 64Mi) headroom (plus the
    /// memory file's segment table, about 1Mi, with `persistence`), and a CPU
    /// request of 100m per thread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels the pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Scheduling affinity of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Topology spread of the pods. Defaults to a soft spread across nodes
    /// (`kubernetes.io/hostname`, maxSkew 1, ScheduleAnyway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// Extra annotations on the pods (e.g. for scraping or service meshes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,

    /// The PodDisruptionBudget the operator keeps for the pods.
    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetConfig,

    /// Longest wait, in seconds, for departing nodes to hand their data off
    /// when `replicas` is lowered. The operator first publishes the member
    /// list without the departing nodes (the highest ordinals) while their
    /// pods keep running, waits until each reports on its admin port that it
    /// handed everything to the new owners, and only then shrinks the
    /// StatefulSet. When this timeout passes first it shrinks anyway (Warning
    /// event `HandoffTimeout`); items not yet moved are lost. 0 does not wait.
    #[serde(default = "default_scale_down_timeout_seconds")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_timeout_seconds: i32,

    /// Extra command-line arguments appended to kache-node's. Must not repeat a
    /// flag the operator sets from this spec.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_args: Vec<String>,

    /// TLS on the memcache (client) port and the peer port. Unset: both are
    /// plain TCP. The admin port (probes, `/metrics`) stays plain HTTP. Set:
    /// both ports accept TLS only, and the nodes connect to each other over
    /// TLS, each verifying the other's certificate for its pod DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,

    /// Client authentication on the memcache port (memcached's text-protocol
    /// authentication). Unset: clients need no credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,

    /// A shared secret the nodes present to each other on the peer port.
    /// Unset: the peer port accepts any node that can reach it (restrict it
    /// with `networkPolicy`, or require client certificates with
    /// `tls.clientAuth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_auth: Option<PeerAuthConfig>,

    /// A NetworkPolicy `<name>` the operator keeps for the pods. Unset or
    /// `enabled: false`: none (an existing one is deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_policy: Option<NetworkPolicyConfig>,

    /// A restartable cache: each node keeps its items in a file on an
    /// in-memory `emptyDir` (kache-node `--memory-file`), so a node container
    /// that crashes or is OOM-killed restarts with what it held. The file's
    /// pages are the cache memory itself, charged to the pod's memory like
    /// heap memory (not in addition to it). A new pod (rollout, rescheduling)
    /// starts empty and refills from its peers. Default: enabled.
    #[serde(default)]
    pub persistence: PersistenceConfig,

    /// How the nodes replicate to each other: write acknowledgements, delete
    /// tombstones, anti-entropy and the bounds of peer traffic (kache-node's
    /// peer flags). An unset field keeps kache-node's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationConfig>,
}

/// When a write is acknowledged to the client (kache-node `--write-acks`).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum WriteAcks {
    /// Once applied by the node the client wrote to (the reply still waits,
    /// up to `writeTimeoutMs`, for the key's other owners that are up).
    One,
    /// Once a majority of the key's owners have it.
    Quorum,
    /// Once every owner of the key has it.
    All,
}

impl WriteAcks {
    /// The value of `--write-acks`.
    pub fn flag_value(self) -> &'static str {
        match self {
            WriteAcks::One => "one",
            WriteAcks::Quorum => "quorum",
            WriteAcks::All => "all",
        }
    }
}

/// Replication settings; each is passed to kache-node as the flag it names.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicationConfig {
    /// When a write is acknowledged (`--write-acks`): `one` (default),
    /// `quorum` or `all` of the key's owners. A write that falls short within
    /// `writeTimeoutMs` is answered `SERVER_ERROR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_acks: Option<WriteAcks>,

    /// Longest wait, in milliseconds, for the other owners to acknowledge a
    /// write (`--write-timeout-ms`, default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub write_timeout_ms: Option<i32>,

    /// Seconds a delete's tombstone is kept (`--tombstone-ttl`, default 300):
    /// a delete survives a partition shorter than this less one anti-entropy
    /// interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 2592000))]
    pub tombstone_ttl_seconds: Option<i32>,

    /// Seconds between anti-entropy rounds, in which each node pulls the
    /// newer versions it misses from the peers owning the same keys
    /// (`--anti-entropy-interval`, default 10). 0 turns anti-entropy off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 86400))]
    pub anti_entropy_interval_seconds: Option<i32>,

    /// Most bytes of items per second anti-entropy pulls
    /// (`--anti-entropy-rate`, default `8m`): a size from 1k to 1g.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "kache_cluster::size::SIZE_PATTERN")]
    pub anti_entropy_rate: Option<String>,

    /// Bytes of records queued for each peer (`--peer-queue-bytes`, default
    /// `16m`): a size from 1k to 1g. Beyond it new records for that peer are
    /// dropped and counted; anti-entropy repairs them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex = "kache_cluster::size::SIZE_PATTERN")]
    pub peer_queue_bytes: Option<String>,

    /// A peer that acknowledges nothing for this many milliseconds while
    /// records wait is marked down (`--peer-timeout-ms`, default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 600000))]
    pub peer_timeout_ms: Option<i32>,
}

impl ReplicationConfig {
    /// The kache-node flags the set fields stand for, with their values.
    pub fn node_flags(&self) -> Vec<(&'static str, String)> {
        let number = |flag, v: Option<i32>| v.map(|v| (flag, v.to_string()));
        let text = |flag, v: &Option<String>| v.clone().map(|v| (flag, v));
        [
            self.write_acks
                .map(|a| ("--write-acks", a.flag_value().to_string())),
            number("--write-timeout-ms", self.write_timeout_ms),
            number("--tombstone-ttl", self.tombstone_ttl_seconds),
            number(
                "--anti-entropy-interval",
                self.anti_entropy_interval_seconds,
            ),
            text("--anti-entropy-rate", &self.anti_entropy_rate),
            text("--peer-queue-bytes", &self.peer_queue_bytes),
            number("--peer-timeout-ms", self.peer_timeout_ms),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

/// Restartable-cache settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PersistenceConfig {
    /// Keep the items in a memory-backed `emptyDir` file across container
    /// restarts. false: items live in the process only.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_true() -> bool {
    true
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// TLS settings. The Secret is mounted into the pods by name (the operator
/// never reads it); kache-node reloads the files when the Secret changes, so
/// certificates rotate (e.g. by cert-manager) without restarting the pods.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsConfig {
    /// Secret in the CacheCluster's namespace (type `kubernetes.io/tls`, e.g.
    /// one cert-manager issues) with the keys `tls.crt` (PEM certificate
    /// chain) and `tls.key` (PEM private key), and `ca.crt` (PEM CA bundle):
    /// required when `clientAuth` is true, optional otherwise. The
    /// certificate must name the client Service (`<name>.<namespace>.svc`)
    /// and the pods (`*.<name>-peers.<namespace>.svc`), which the nodes
    /// verify when they connect to each other: against `ca.crt`, or, when
    /// the Secret has none, by requiring the peer to present this same
    /// certificate (rotation is smoother with a CA). Pods do not start until
    /// the Secret exists.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: String,

    /// Require client certificates signed by the Secret's `ca.crt` on both
    /// ports (mutual TLS). The nodes present their own certificate to each
    /// other, so it must also be valid for client authentication.
    #[serde(default)]
    pub client_auth: bool,
}

/// Client authentication settings. The Secret is mounted into the pods by
/// name (the operator never reads it). The kubelet updates the mounted file
/// within about a minute of a change to the Secret and kache-node reloads
/// it; `kubectl rollout restart statefulset/<name>` applies a change at once.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthConfig {
    /// Secret in the CacheCluster's namespace with the key `auth-file`:
    /// memcached's format, one `user:password` per line. A client
    /// authenticates by sending `set <any key> 0 0 <length>` with the data
    /// `<user> <password>`; until then nothing else is accepted.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: String,
}

/// Peer authentication settings. The Secret is mounted into the pods by name
/// (the operator never reads it).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthConfig {
    /// Secret in the CacheCluster's namespace with the key `secret`: the
    /// shared secret every node presents on the peer port. While the pods
    /// hold different secrets they cannot replicate to each other;
    /// `kubectl rollout restart statefulset/<name>` makes every pod pick up
    /// a change.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub secret_name: String,
}

/// NetworkPolicy settings. The policy selects the cluster's pods and allows
/// ingress (egress is not restricted) only: on the peer port from the
/// cluster's own pods; on the memcache port from the clients selected below;
/// on the admin port from every pod in the operator's namespace (the
/// operator asks departing nodes for their hand-off progress there; run
/// Prometheus there too, or allow it with a NetworkPolicy of your own:
/// policies add up). Kubelet health probes are not affected.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicyConfig {
    /// Keep the NetworkPolicy `<name>`. false: none (an existing one is
    /// deleted).
    #[serde(default)]
    pub enabled: bool,

    /// Namespaces whose pods may connect to the memcache port. With
    /// `clientPodSelector` too: only the pods matching it in these
    /// namespaces. Neither set: every pod in the CacheCluster's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_namespace_selector: Option<LabelSelector>,

    /// Pods that may connect to the memcache port: in the CacheCluster's
    /// namespace, or in the namespaces `clientNamespaceSelector` selects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_pod_selector: Option<LabelSelector>,
}

impl NetworkPolicyConfig {
    /// The settings, when the NetworkPolicy is enabled.
    pub fn enabled(spec: &CacheClusterSpec) -> Option<&Self> {
        spec.network_policy.as_ref().filter(|n| n.enabled)
    }
}

/// PodDisruptionBudget settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetConfig {
    /// How many cache nodes a voluntary disruption (drain, eviction) may take
    /// down at once.
    #[serde(default = "default_pdb_max_unavailable")]
    #[schemars(range(min = 0))]
    pub max_unavailable: i32,
}

impl Default for PodDisruptionBudgetConfig {
    fn default() -> Self {
        Self {
            max_unavailable: DEFAULT_PDB_MAX_UNAVAILABLE,
        }
    }
}

impl Default for CacheClusterSpec {
    fn default() -> Self {
        Self {
            replicas: DEFAULT_REPLICAS,
            image: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            max_item_size: default_max_item_size(),
            threads: DEFAULT_THREADS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            replication_factor: DEFAULT_REPLICATION_FACTOR,
            port: default_port(),
            resources: None,
            node_selector: None,
            tolerations: None,
            affinity: None,
            topology_spread_constraints: None,
            pod_annotations: None,
            priority_class_name: None,
            pod_disruption_budget: PodDisruptionBudgetConfig::default(),
            scale_down_timeout_seconds: DEFAULT_SCALE_DOWN_TIMEOUT_SECONDS,
            extra_args: Vec::new(),
            tls: None,
            auth: None,
            peer_auth: None,
            network_policy: None,
            persistence: PersistenceConfig::default(),
            replication: None,
        }
    }
}

/// Observed state of a CacheCluster.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CacheClusterStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Current number of cache-node pods.
    #[serde(default)]
    pub replicas: i32,
    /// Number of Ready cache-node pods.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Label selector of the pods (for the scale subresource and HPAs).
    #[serde(default)]
    pub selector: String,
    /// Every cache-node pod and its state, in ordinal order.
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Version of the published member list (the `<name>-members` ConfigMap).
    /// Rises by one on every change of the member list, never on a no-op.
    #[serde(default)]
    pub config_version: i64,
    /// `Ready`, `Progressing`, `Degraded` and `Rebalancing`.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The scale-in under way, if any: the departing nodes hand their data
    /// to the remaining ones before the StatefulSet shrinks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalance: Option<RebalanceStatus>,
    /// The StatefulSet revision (pod template) every node runs once a rolling
    /// update is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Cache-node pods that run `revision`.
    #[serde(default)]
    pub updated_replicas: i32,
    /// The rolling update under way, if any. The operator restarts the nodes
    /// one at a time, highest ordinal first, each only once the one before
    /// it holds its share again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// One step of a rolling update: the node being restarted.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// The revision the nodes move to.
    pub revision: String,
    /// The pod of this step.
    pub pod: String,
    /// What the step waits for.
    pub phase: RolloutPhase,
    /// When this step started.
    pub started_at: Time,
}

/// The phase of a rolling-update step.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutPhase {
    /// With `replicationFactor` 1 the node's data has no copy: the member
    /// list leaves it out first and the pod is restarted once it has handed
    /// its data to the other nodes (or `scaleDownTimeoutSeconds` passed).
    Draining,
    /// The pod was deleted; its replacement starts, refills what it owns
    /// (with `replicationFactor` 2 or more it stays in the member list, so
    /// its replacement pulls its share back from the replicas) and becomes
    /// Ready; the step ends once every member runs the published member list
    /// with no hand-off under way.
    Restarting,
}

/// Progress of a scale-in: which nodes are leaving and how far their
/// hand-off got.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceStatus {
    /// Replicas the StatefulSet shrinks to once the hand-off is done.
    pub target_replicas: i32,
    /// Replicas the StatefulSet keeps until then.
    pub current_replicas: i32,
    /// Member-list version (without the departing nodes) they hand off for.
    pub config_version: i64,
    /// When the scale-in started.
    pub started_at: Time,
    /// When the operator stops waiting and shrinks the StatefulSet anyway
    /// (`startedAt` + `spec.scaleDownTimeoutSeconds`).
    pub deadline: Time,
    /// The departing nodes, in ordinal order.
    pub departing: Vec<DepartingMember>,
}

/// One departing node's hand-off, as its admin port reported it.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DepartingMember {
    /// Pod name.
    pub name: String,
    /// True once the node finished handing off for `configVersion` (or
    /// holds nothing: no running pod).
    pub done: bool,
    /// Member-list version of the node's latest hand-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff_version: Option<i64>,
    /// Items sent to their new owners.
    #[serde(default)]
    pub sent: i64,
    /// Items the new owners acknowledged.
    #[serde(default)]
    pub acked: i64,
    /// Items that could not be handed off.
    #[serde(default)]
    pub failed: i64,
    /// Why the node's progress is unknown (e.g. its admin port did not answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One cache-node pod as seen by the operator.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Pod name.
    pub name: String,
    /// Stable DNS name (`<pod>.<name>-peers.<namespace>.svc`).
    pub host: String,
    /// Pod IP, once assigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    /// Memcache port.
    pub port: i32,
    /// Pending, Ready, NotReady or Terminating. Only Ready members are published.
    pub state: MemberState,
}

/// Lifecycle state of one cache node.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum MemberState {
    /// Scheduled or starting, no IP or not yet running.
    Pending,
    /// Running and passing its readiness probe: listed in the member list.
    Ready,
    /// Running but not ready.
    NotReady,
    /// Being deleted.
    Terminating,
}

fn conditions_schema(gen: &mut SchemaGenerator) -> Schema {
    let mut schema = gen.subschema_for::<Vec<Condition>>().into_object();
    schema
        .extensions
        .insert("x-kubernetes-list-type".into(), "map".into());
    schema.extensions.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    Schema::Object(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_spec_gets_documented_defaults() {
        let spec: CacheClusterSpec = serde_json::from_str("{}").unwrap();
        assert_eq!(spec, CacheClusterSpec::default());
        assert_eq!(spec.replicas, 3);
        assert_eq!(spec.memory_mib, 64);
        assert_eq!(spec.max_item_size, "1m");
        assert_eq!(spec.replication_factor, 1);
        assert_eq!(spec.port, 11211);
        assert_eq!(spec.pod_disruption_budget.max_unavailable, 1);
        assert_eq!(spec.scale_down_timeout_seconds, 300);
        assert!(spec.validate().is_ok());
    }

    #[test]
    fn spec_is_camel_case() {
        let spec: CacheClusterSpec = serde_json::from_value(serde_json::json!({
            "replicas": 5, "memoryMiB": 256, "maxItemSize": "2m", "threads": 2,
            "maxConnections": 10, "replicationFactor": 2, "port": 11300,
            "podDisruptionBudget": {"maxUnavailable": 2}, "extraArgs": ["-v"],
            "priorityClassName": "high", "podAnnotations": {"a": "b"}
        }))
        .unwrap();
        assert_eq!(spec.memory_mib, 256);
        assert_eq!(spec.pod_disruption_budget.max_unavailable, 2);
        assert!(spec.validate().is_ok(), "{:?}", spec.validate());
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["memoryMiB"], 256);
        assert_eq!(back["replicationFactor"], 2);
    }

    #[test]
    fn security_settings_parse_and_validate() {
        let spec: CacheClusterSpec = serde_json::from_value(serde_json::json!({
            "tls": {"secretName": "web-tls"},
            "auth": {"secretName": "web-auth"},
            "peerAuth": {"secretName": "web-peer"},
            "networkPolicy": {
                "enabled": true,
                "clientNamespaceSelector": {"matchLabels": {"team": "web"}},
                "clientPodSelector": {"matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["shop"]}]}
            }
        }))
        .unwrap();
        assert!(spec.validate().is_ok(), "{:?}", spec.validate());
        assert!(
            !spec.tls.as_ref().unwrap().client_auth,
            "clientAuth defaults to false"
        );
        assert!(NetworkPolicyConfig::enabled(&spec).is_some());
        let off: CacheClusterSpec =
            serde_json::from_value(serde_json::json!({"networkPolicy": {}})).unwrap();
        assert!(!off.network_policy.as_ref().unwrap().enabled);
        assert!(NetworkPolicyConfig::enabled(&off).is_none());
        let back = serde_json::to_value(&spec).unwrap();
        assert_eq!(back["peerAuth"]["secretName"], "web-peer");
        assert_eq!(back["tls"]["clientAuth"], false);
    }
}
