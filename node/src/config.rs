//! Command line of `kache-node`, memcached-compatible where memcached has the flag: every
//! flag of `memcached -h` (1.6.18) is read, applied where it has a meaning in kache and
//! otherwise accepted with a one-line notice or refused with memcached's own words.

pub mod extended;

use clap::{Args, Parser, Subcommand};
use kache_cluster::size::{self, SizeError};

use crate::peer::replicate::WriteAcks;
use crate::store::classes::{ClassConfig, PAGE_SIZE};
pub use extended::{Extended, FlagError};

/// kache-node: a memcached-compatible cache node.
#[derive(Debug, Parser)]
#[command(name = "kache-node", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, the default command.
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start-up: the size of the serve options does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the memcached protocol (the default).
    Serve(ServeArgs),
    /// Run as a cluster-aware proxy in front of the cluster's nodes.
    Proxy(ProxyArgs),
}

/// Options of `kache-node proxy`.
#[derive(Clone, Debug, Args)]
#[command(group(clap::ArgGroup::new("member_source").required(true).args(["cluster", "members_file"])))]
pub struct ProxyArgs {
    /// TCP port the application connects to.
    #[arg(short = 'p', long = "port", default_value_t = 11211)]
    pub port: u16,

    /// Interface to listen on (a sidecar listens on loopback only).
    #[arg(short = 'l', long = "listen", default_value = "127.0.0.1")]
    pub listen: String,

    /// Maximum simultaneous client connections.
    #[arg(short = 'c', long = "conn-limit", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub conn_limit: u64,

    /// Worker threads (default: the number of CPUs).
    #[arg(short = 't', long = "threads", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,

    /// Largest item accepted (as the nodes' -I); larger values are refused by the proxy.
    #[arg(short = 'I', long = "max-item-size", default_value = "1m", value_parser = parse_size)]
    pub max_item_size: usize,

    /// Persistent connections per cache node, shared by all clients.
    #[arg(long = "pool-size", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub pool_size: u64,

    /// Port of the proxy's admin HTTP endpoint (/metrics, /healthz, /readyz); 0 disables it.
    #[arg(long = "admin-port", default_value_t = 11290)]
    pub admin_port: u16,

    /// Interface of the admin endpoint. Every interface by default, even when `--listen`
    /// is loopback: the kubelet probes a sidecar from the node, at the pod's IP.
    #[arg(long = "admin-listen", default_value = "0.0.0.0")]
    pub admin_listen: String,

    /// More logging; repeat for more.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Seconds to let open connections finish after SIGTERM before exiting.
    #[arg(long = "shutdown-grace", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Where the member list comes from: one of `--cluster` and `--members-file` is required.
    #[command(flatten)]
    pub membership: MembershipArgs,

    /// Log in to nodes that require authentication (their `--auth-file`) with the first
    /// `user:password` line of this file: memcached's `-Y` format, so the CacheCluster's
    /// auth Secret can be mounted as is. Re-read when it changes; used on new connections.
    #[arg(long = "node-auth-file")]
    pub node_auth_file: Option<std::path::PathBuf>,

    /// Connect to the nodes over TLS (clusters with `spec.tls`), verifying each node's
    /// certificate against this PEM CA bundle for the member's host
    /// (`<pod>.<cluster>-peers.<namespace>.svc`). Re-read on every new node connection.
    #[arg(long = "node-tls-ca")]
    pub node_tls_ca: Option<std::path::PathBuf>,

    /// PEM certificate the proxy presents to nodes that require client certificates
    /// (`spec.tls.clientAuth`).
    #[arg(
        long = "node-tls-cert",
        requires = "node_tls_key",
        requires = "node_tls_ca"
    )]
    pub node_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--node-tls-cert`.
    #[arg(long = "node-tls-key", requires = "node_tls_cert")]
    pub node_tls_key: Option<std::path::PathBuf>,

    /// Milliseconds a node may take to answer before the proxy counts it as down: its
    /// pending reads and plain sets go to the key's next owner (with replicationFactor
    /// >= 2), other writes get `SERVER_ERROR` (their outcome is unknown).
    #[arg(long = "node-timeout-ms", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub node_timeout_ms: u64,

    /// Bytes of requests queued per node connection (k/m/g suffixes); beyond, requests
    /// are refused at once and fail over like those to an unreachable node.
    #[arg(long = "node-queue-bytes", default_value = "4m", value_parser = parse_size)]
    pub node_queue_bytes: usize,
}

/// What to run.
#[allow(clippy::large_enum_variant)]
pub enum Mode {
    Serve(ServeArgs),
    Proxy(ProxyArgs),
}

impl Cli {
    /// The command to run (`serve` when none is named).
    pub fn into_mode(self) -> Mode {
        match self.command {
            Some(Command::Serve(args)) => Mode::Serve(args),
            Some(Command::Proxy(args)) => Mode::Proxy(args),
            None => Mode::Serve(self.serve),
        }
    }

    /// The serve options, whether given with or without the `serve` subcommand.
    #[cfg(test)]
    fn into_serve_args(self) -> ServeArgs {
        match self.into_mode() {
            Mode::Serve(args) => args,
            Mode::Proxy(_) => panic!("not serve"),
        }
    }
}

#[derive(Clone, Debug, Args)]
pub struct ServeArgs {
    /// TCP port to listen on.
    #[arg(short = 'p', long = "port", default_value_t = 11211)]
    pub port: u16,

    /// Interface to listen on.
    #[arg(short = 'l', long = "listen", default_value = "0.0.0.0")]
    pub listen: String,

    /// Item memory in megabytes (per-item overhead included).
    #[arg(short = 'm', long = "memory-limit", default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub memory_limit_mb: u64,

    /// Maximum simultaneous client connections.
    #[arg(short = 'c', long = "conn-limit", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub conn_limit: u64,

    /// Worker threads (default: the number of CPUs).
    #[arg(short = 't', long = "threads", value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub threads: Option<u64>,

    /// Largest item, with an optional k or m suffix (1k to 1g).
    #[arg(short = 'I', long = "max-item-size", default_value = "1m", value_parser = parse_any_size)]
    pub max_item_size: usize,

    /// More logging; repeat for more.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    pub verbose: u8,

    #[command(flatten)]
    pub memcached: MemcachedArgs,

    /// Port of the admin HTTP endpoint (/metrics, /healthz, /readyz); 0 disables it.
    #[arg(long = "admin-port", default_value_t = 11280)]
    pub admin_port: u16,

    /// UDP port: kache serves TCP only, so only 0 (memcached's default) is accepted.
    #[arg(short = 'U', long = "udp-port", default_value_t = 0, value_parser = parse_udp_port)]
    pub udp_port: u16,

    /// Seconds to let open connections finish after SIGTERM before exiting.
    #[arg(long = "shutdown-grace", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Seconds between SIGTERM and the end of accepting: the node reports not ready at once
    /// but keeps accepting and serving meanwhile, so that load balancers (kube-proxy) stop
    /// sending it new connections before it refuses them. 0 (memcached's behaviour): stop
    /// accepting at once.
    #[arg(long = "shutdown-delay", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_delay_secs: u64,

    /// Require clients to authenticate with memcached's text-protocol auth; the file holds
    /// `user:password` lines and is re-read when it changes.
    #[arg(short = 'Y', long = "auth-file")]
    pub auth_file: Option<std::path::PathBuf>,

    /// Serve TLS with this PEM certificate (chain); re-read on change. In a cluster it also
    /// covers the peer port: the peer port then accepts TLS only, and the node connects to
    /// its peers over TLS, verifying each for its member `host` (see --peer-tls-ca).
    #[arg(long = "tls-cert", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long = "tls-key", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Require client certificates signed by the CAs in this PEM file, on the client port
    /// and the peer port (mutual TLS between nodes: each presents its --tls-cert, which must
    /// then allow client authentication). Also verifies peers when --peer-tls-ca is not in
    /// force.
    #[arg(long = "tls-client-ca", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// CAs (PEM) that peers' certificates must chain to when this node connects to them,
    /// re-read on change. Used while the file exists; otherwise --tls-client-ca; with
    /// neither, a peer must present this node's own certificate (the nodes of one cluster
    /// share a Secret). The name verified is the member's `host` (DNS name or IP).
    #[arg(long = "peer-tls-ca", requires = "tls_cert")]
    pub peer_tls_ca: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub cluster: ClusterArgs,
}

/// The rest of `memcached -h` (1.6.18). README's flag table says what kache does with each.
#[derive(Clone, Debug, Default, Args)]
pub struct MemcachedArgs {
    /// UNIX socket to listen on (not served: kache listens on TCP).
    #[arg(short = 's', long = "unix-socket")]
    pub unix_socket: Option<std::path::PathBuf>,

    /// Access mask of the UNIX socket, in octal (only with -s).
    #[arg(short = 'a', long = "unix-mask")]
    pub unix_mask: Option<String>,

    /// Enable the ASCII `shutdown` command (and `shutdown graceful`).
    #[arg(short = 'A', long = "enable-shutdown")]
    pub enable_shutdown: bool,

    /// Run as a daemon (detach from the terminal).
    #[arg(short = 'd', long = "daemon")]
    pub daemon: bool,

    /// Maximize the core file limit.
    #[arg(short = 'r', long = "enable-coredumps")]
    pub enable_coredumps: bool,

    /// Assume the identity of this user (only when started as root).
    #[arg(short = 'u', long = "user")]
    pub user: Option<String>,

    /// Return an error when memory is exhausted instead of evicting.
    #[arg(short = 'M', long = "disable-evictions")]
    pub disable_evictions: bool,

    /// Lock down all paged memory.
    #[arg(short = 'k', long = "lock-memory")]
    pub lock_memory: bool,

    /// Print the license and exit.
    #[arg(short = 'i', long = "license")]
    pub license: bool,

    /// Save the PID in this file.
    #[arg(short = 'P', long = "pidfile")]
    pub pidfile: Option<std::path::PathBuf>,

    /// Chunk size growth factor of the slab classes items are reported under.
    #[arg(short = 'f', long = "slab-growth-factor", default_value_t = 1.25)]
    pub growth_factor: f64,

    /// Minimum space for key, value and flags of the smallest class.
    #[arg(short = 'n', long = "slab-min-size", default_value_t = 48)]
    pub slab_min_size: i64,

    /// Try to use large memory pages (accepted; left to the kernel).
    #[arg(short = 'L', long = "enable-largepages")]
    pub large_pages: bool,

    /// Delimiter between key prefixes and ids in `stats detail`; turns detail on.
    #[arg(short = 'D')]
    pub prefix_delimiter: Option<String>,

    /// Most requests served from one connection before others get a turn.
    #[arg(short = 'R', long = "max-reqs-per-event", default_value_t = 20)]
    pub reqs_per_event: i64,

    /// Disable CAS (accepted; kache keeps CAS, its replicas order writes by it).
    #[arg(short = 'C', long = "disable-cas")]
    pub disable_cas: bool,

    /// Backlog of the listening socket.
    #[arg(short = 'b', long = "listen-backlog", default_value_t = 1024)]
    pub backlog: i32,

    /// Protocol: ascii, or auto (kache speaks ASCII; binary-protocol clients are closed).
    #[arg(short = 'B', long = "protocol")]
    pub protocol: Option<String>,

    /// SASL authentication (binary protocol only: refused, use -Y).
    #[arg(short = 'S', long = "enable-sasl")]
    pub sasl: bool,

    /// Disable the flush_all command.
    #[arg(short = 'F', long = "disable-flush-all")]
    pub disable_flush_all: bool,

    /// Disable `stats cachedump` and `lru_crawler metadump`.
    #[arg(short = 'X', long = "disable-dumping")]
    pub disable_dumping: bool,

    /// Disable `watch` commands.
    #[arg(short = 'W', long = "disable-watch")]
    pub disable_watch: bool,

    /// Keep the item memory in this file (memcached's -e; e.g. on tmpfs) so that a
    /// restarted node serves what it held: after SIGTERM everything, after a crash what was
    /// written. A file that is truncated, corrupt, not kache's or made for another -m/-I is
    /// discarded (logged) and the node starts empty.
    #[arg(short = 'e', long = "memory-file")]
    pub memory_file: Option<std::path::PathBuf>,

    /// Enable TLS with `-o ssl_chain_cert=...,ssl_key=...` (as --tls-cert/--tls-key).
    #[arg(short = 'Z', long = "enable-ssl")]
    pub enable_ssl: bool,

    /// Extended options, comma separated (memcached's `-o`).
    #[arg(short = 'o', long = "extended", action = clap::ArgAction::Append)]
    pub extended: Vec<String>,

    /// Number of NAPI ids (accepted; kache does not pin connections by NAPI id).
    #[arg(short = 'N', long = "napi-ids", alias = "napi_ids")]
    pub napi_ids: Option<i64>,
}

/// What memcached's flags resolve to, once checked as memcached checks them.
#[derive(Clone, Debug)]
pub struct MemcachedOptions {
    pub extended: Extended,
    pub classes: ClassConfig,
    /// `binding_protocol` as `stats settings` reports it.
    pub protocol: &'static str,
    /// One line per flag accepted without effect.
    pub notices: Vec<String>,
}

impl Default for MemcachedOptions {
    fn default() -> Self {
        MemcachedOptions {
            extended: Extended::default(),
            classes: ClassConfig::default(),
            protocol: "auto-negotiate",
            notices: Vec::new(),
        }
    }
}

/// Where a node or a proxy reads its cluster's member list from.
#[derive(Clone, Debug, Args)]
pub struct MembershipArgs {
    /// Name of the CacheCluster: follow the `<name>-members` ConfigMap in `--namespace`
    /// through the Kubernetes API.
    #[arg(
        long = "cluster",
        env = "KACHE_CLUSTER",
        conflicts_with = "members_file"
    )]
    pub cluster: Option<String>,

    /// Namespace of the cluster's ConfigMap.
    #[arg(long = "namespace", env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Read the member-list JSON document from this file and follow its changes
    /// (for runs without Kubernetes).
    #[arg(long = "members-file")]
    pub members_file: Option<std::path::PathBuf>,
}

impl MembershipArgs {
    /// Whether a member list is configured.
    pub fn enabled(&self) -> bool {
        self.cluster.is_some() || self.members_file.is_some()
    }
}

/// How a node takes part in its cluster.
#[derive(Clone, Debug, Args)]
pub struct ClusterArgs {
    #[command(flatten)]
    pub membership: MembershipArgs,

    /// Which member this node is (default: $POD_NAME, else the host name).
    #[arg(long = "node-name", env = "POD_NAME")]
    pub node_name: Option<String>,

    /// Port for node-to-node traffic (replication and hand-off).
    #[arg(long = "peer-port", default_value_t = kache_cluster::names::PEER_PORT)]
    pub peer_port: u16,

    /// File holding a secret every peer must present on the peer port (re-read at start).
    #[arg(long = "peer-secret-file")]
    pub peer_secret_file: Option<std::path::PathBuf>,

    /// Most items per second a hand-off sends, so client traffic keeps its latency.
    #[arg(long = "handoff-rate", default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub handoff_rate: u64,

    /// Bytes of records queued for each peer (k/m/g suffixes); beyond, new records for
    /// that peer are dropped and counted (kache_peer_dropped_total).
    #[arg(long = "peer-queue-bytes", default_value = "16m", value_parser = parse_size)]
    pub peer_queue_bytes: usize,

    /// A peer that acknowledges nothing for this long while records wait is marked down:
    /// its queue is dropped and writes stop waiting for it until it answers again.
    #[arg(long = "peer-timeout-ms", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub peer_timeout_ms: u64,

    /// Bytes of records per hand-off or refill chunk.
    #[arg(long = "handoff-batch-bytes", default_value = "4m", value_parser = parse_size)]
    pub handoff_batch_bytes: usize,

    /// Bytes of values read-throughs may fetch at once (one largest item each); a miss
    /// that finds no room within the read-through timeout is not fetched.
    #[arg(long = "read-through-bytes", default_value = "16m", value_parser = parse_size)]
    pub read_through_bytes: usize,

    /// When a write is acknowledged: `one` (once applied here; the reply still waits for
    /// the other owners that are up), `quorum` (a majority of the key's owners) or `all`
    /// (every owner). A write that falls short is answered `SERVER_ERROR`.
    #[arg(long = "write-acks", default_value = "one")]
    pub write_acks: WriteAcks,

    /// Longest wait, in milliseconds, for the other owners to acknowledge a write.
    #[arg(long = "write-timeout-ms", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub write_timeout_ms: u64,

    /// Seconds a delete's tombstone is kept. A delete survives a partition (or a replica's
    /// absence) shorter than this less one anti-entropy interval; after that an older copy
    /// on the replica that missed it can bring the key back.
    #[arg(long = "tombstone-ttl", default_value_t = crate::record::DEFAULT_TOMBSTONE_TTL, value_parser = clap::value_parser!(u32).range(1..=30 * 24 * 3600))]
    pub tombstone_ttl: u32,

    /// Seconds between anti-entropy rounds, in which the node compares what it holds with
    /// each peer that owns the same keys and pulls the newer versions it misses. A round
    /// also starts whenever a link to a peer comes back up. 0 turns anti-entropy off.
    #[arg(long = "anti-entropy-interval", default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    pub anti_entropy_interval_secs: u64,

    /// Most bytes of items per second anti-entropy pulls (k/m/g suffixes).
    #[arg(long = "anti-entropy-rate", default_value = "8m", value_parser = parse_size)]
    pub anti_entropy_rate: usize,
}

impl ClusterArgs {
    /// The byte bounds of peer traffic these flags set.
    pub fn peer_limits(&self) -> crate::peer::PeerLimits {
        crate::peer::PeerLimits {
            link: crate::peer::link::LinkConfig {
                queue_bytes: self.peer_queue_bytes,
                stall_timeout: std::time::Duration::from_millis(self.peer_timeout_ms),
            },
            handoff_batch_bytes: self.handoff_batch_bytes,
            read_through_bytes: self.read_through_bytes,
        }
    }

    /// Whether the node runs as part of a cluster.
    pub fn enabled(&self) -> bool {
        self.membership.enabled()
    }

    /// This node's member name.
    pub fn node_name(&self) -> String {
        if let Some(name) = &self.node_name {
            return name.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "kache-node".into())
    }
}

/// Parses sizes like memcached's `-I`: bytes, or a number with a k/m/g suffix (range
/// checked as memcached checks it, after the whole command line is read). The grammar is
/// kache-cluster's, which the CacheCluster spec shares.
fn parse_any_size(text: &str) -> Result<usize, SizeError> {
    let bytes = size::parse_size(text.trim())?;
    usize::try_from(bytes).map_err(|_| SizeError::TooLarge(text.trim().to_string()))
}

/// Parses the byte bounds (and the proxy's `-I`): a size from 1k to 1g.
pub fn parse_size(text: &str) -> Result<usize, SizeError> {
    let bytes = size::parse_byte_limit(text.trim())?;
    usize::try_from(bytes).map_err(|_| SizeError::TooLarge(text.trim().to_string()))
}

/// Why `-U` was refused.
#[derive(Debug, thiserror::Error)]
pub enum UdpPortError {
    /// Not a port number.
    #[error(transparent)]
    NotAPort(#[from] std::num::ParseIntError),
    /// A UDP port: kache serves TCP only.
    #[error("UDP is not supported by kache; use -U 0 (the default)")]
    Unsupported,
}

fn parse_udp_port(text: &str) -> Result<u16, UdpPortError> {
    match text.parse::<u16>()? {
        0 => Ok(0),
        _ => Err(UdpPortError::Unsupported),
    }
}

impl ServeArgs {
    pub fn memory_limit_bytes(&self) -> usize {
        usize::try_from(self.memory_limit_mb)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024 * 1024)
    }

    /// Checks the command line as memcached checks it (its messages and exit codes), then
    /// what kache adds (a cluster's items must fit a peer frame), and resolves the `-o`
    /// options.
    pub fn validate(&self) -> Result<MemcachedOptions, FlagError> {
        let m = &self.memcached;
        let usage = |text: String| Err(FlagError::Usage(text));
        let option = |text: &str| Err(FlagError::Option(text.to_string()));
        let mut notices = Vec::new();
        if m.reqs_per_event <= 0 {
            return option("Number of requests per event must be greater than 0");
        }
        if m.growth_factor <= 1.0 {
            return option("Factor must be greater than 1");
        }
        if m.slab_min_size <= 0 {
            return option("Chunk size must be greater than 0");
        }
        if m.prefix_delimiter.as_deref() == Some("") {
            return option("No delimiter specified");
        }
        if let Some(n) = m.napi_ids {
            if n <= 0 {
                return option("Maximum number of NAPI IDs must be greater than 0");
            }
            let threads = self.threads.unwrap_or(4);
            if n as u64 > threads {
                return usage(format!(
                    "Number of napi_ids({n}) cannot be greater than number of threads({threads})"
                ));
            }
            notices.push("-N accepted, not applied: kache does not pick threads by NAPI id".into());
        }
        let extended = Extended::parse(m.extended.iter().map(String::as_str))?;
        let item_size_max = self.max_item_size;
        if item_size_max < 1024 {
            return usage("Item max size cannot be less than 1024 bytes.".into());
        }
        if item_size_max > self.memory_limit_bytes() / 2 {
            return usage("Cannot set item size limit higher than 1/2 of memory max.".into());
        }
        if item_size_max > 1024 * 1024 * 1024 {
            return usage("Cannot set item size limit higher than a gigabyte.".into());
        }
        let mut chunk_max = extended.slab_chunk_max.unwrap_or(PAGE_SIZE / 2);
        if item_size_max > PAGE_SIZE && !extended.slab_chunk_max_set {
            chunk_max = PAGE_SIZE / 2;
        }
        let min_size = m.slab_min_size as usize;
        let sizes = match &extended.slab_sizes {
            Some(text) => Some(extended::parse_slab_sizes(text, min_size, chunk_max)?),
            None => None,
        };
        let classes = ClassConfig {
            min_size,
            factor: m.growth_factor,
            chunk_max,
            item_size_max,
            cas: true,
            sizes,
        };
        classes
            .validate()
            .map_err(|e| FlagError::Usage(e.to_string()))?;
        if extended.hot_lru_pct + extended.warm_lru_pct > 80 {
            return usage("hot_lru_pct + warm_lru_pct cannot be more than 80% combined".into());
        }
        if extended.temp_lru && !extended.lru_maintainer {
            return usage("temporary_ttl requires lru_maintainer to be enabled".into());
        }
        let protocol = match m.protocol.as_deref() {
            None if self.auth_file.is_some() => "ascii",
            None | Some("auto") => "auto-negotiate",
            Some("ascii") => "ascii",
            Some("binary") => {
                return usage(
                    "kache-node serves the ASCII protocol only: -B binary is not supported \
                     (use -B ascii or -B auto)"
                        .into(),
                )
            }
            Some(other) => {
                return usage(format!(
                    "Invalid value for binding protocol: {other}\n -- should be one of auto, binary, or ascii"
                ))
            }
        };
        if self.auth_file.is_some() && protocol != "ascii" && m.protocol.is_some() {
            return usage("ERROR: You cannot allow the BINARY protocol while using ascii authentication tokens.".into());
        }
        if m.sasl {
            return usage(
                "SASL (-S) needs memcached's binary protocol, which kache does not serve: \
                 use -Y (ASCII authentication)"
                    .into(),
            );
        }
        if m.unix_socket.is_some() {
            return usage(
                "kache-node listens on TCP only: -s (UNIX socket) is not supported; use -l and -p"
                    .into(),
            );
        }
        if m.enable_ssl {
            if self.port == 0 {
                return usage("ERROR: You cannot enable SSL without a TCP port.".into());
            }
            if extended.ssl_chain_cert.is_none() && self.tls_cert.is_none() {
                return usage(
                    "Error loading the certificate chain: (null) (-Z needs -o ssl_chain_cert=FILE)"
                        .into(),
                );
            }
            if extended.ssl_verify_mode == 1 {
                notices.push("-o ssl_verify_mode=1 accepted as 0: kache either requires a client certificate (2, 3) or does not ask for one".into());
            }
            if extended.ssl_min_version < 2 {
                notices.push(
                    "-o ssl_min_version accepted as 2: kache serves TLS 1.2 and 1.3 only".into(),
                );
            }
        }
        if self.cluster.enabled() && item_size_max > crate::peer::wire::MAX_PEER_ITEM {
            return usage(format!(
                "in a cluster the max item size is at most {} bytes (items must fit a peer frame)",
                crate::peer::wire::MAX_PEER_ITEM
            ));
        }
        if m.unix_mask.is_some() {
            notices.push("-a accepted, not applied: there is no UNIX socket (-s)".into());
        }
        if m.large_pages {
            notices.push("-L accepted, not applied: segments are allocated as they are first needed; huge pages are left to the kernel".into());
        }
        if m.disable_cas {
            notices.push(
                "-C accepted, not applied: kache keeps CAS values (replicas order writes by them)"
                    .into(),
            );
        }
        notices.extend(extended.notices.iter().cloned());
        Ok(MemcachedOptions {
            extended,
            classes,
            protocol,
            notices,
        })
    }

    /// The TLS certificate, key and client CA: kache's flags, else memcached's `-Z` options.
    pub fn tls_files(
        &self,
        extended: &Extended,
    ) -> (
        Option<std::path::PathBuf>,
        Option<std::path::PathBuf>,
        Option<std::path::PathBuf>,
    ) {
        if self.tls_cert.is_some() || !self.memcached.enable_ssl {
            return (
                self.tls_cert.clone(),
                self.tls_key.clone(),
                self.tls_client_ca.clone(),
            );
        }
        let cert = extended.ssl_chain_cert.clone().map(Into::into);
        // memcached reads the key from the chain file when ssl_key is not given.
        let key = extended
            .ssl_key
            .clone()
            .or_else(|| extended.ssl_chain_cert.clone())
            .map(Into::into);
        let client_ca = extended
            .ssl_ca_cert
            .clone()
            .filter(|_| extended.ssl_verify_mode >= 2)
            .map(Into::into);
        (cert, key, client_ca)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_memcached_suffixes() {
        assert_eq!(parse_size("1m"), Ok(1024 * 1024));
        assert_eq!(parse_size(" 1m "), Ok(1024 * 1024));
        assert_eq!(parse_any_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 * 1024));
        assert_eq!(parse_size("2M"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("1x").is_err());
        assert!(parse_size("12").is_err());
        assert!(parse_size("2g").is_err());
    }

    #[test]
    fn serve_is_the_default_command() {
        let cli = Cli::try_parse_from(["kache-node", "-p", "1234", "-m", "128", "-vv"]).unwrap();
        let args = cli.into_serve_args();
        assert_eq!(
            (args.port, args.memory_limit_mb, args.verbose),
            (1234, 128, 2)
        );
        let cli = Cli::try_parse_from(["kache-node", "serve", "-I", "2m"]).unwrap();
        assert_eq!(cli.into_serve_args().max_item_size, 2 * 1024 * 1024);
    }

    #[test]
    fn shutdown_delay_is_off_unless_asked_for() {
        let args = Cli::try_parse_from(["kache-node"])
            .unwrap()
            .into_serve_args();
        assert_eq!(
            args.shutdown_delay_secs, 0,
            "memcached stops accepting at once"
        );
        let cli = Cli::try_parse_from(["kache-node", "--shutdown-delay", "5"]).unwrap();
        assert_eq!(cli.into_serve_args().shutdown_delay_secs, 5);
        assert!(Cli::try_parse_from(["kache-node", "--shutdown-delay", "3601"]).is_err());
    }

    #[test]
    fn cluster_flags() {
        let cli = Cli::try_parse_from([
            "kache-node",
            "--members-file",
            "/tmp/m.json",
            "--node-name",
            "n1",
            "--peer-port",
            "4000",
        ])
        .unwrap();
        let args = cli.into_serve_args();
        assert!(args.cluster.enabled());
        assert_eq!(args.cluster.node_name(), "n1");
        assert_eq!(args.cluster.peer_port, 4000);
        assert_eq!(args.cluster.write_acks, WriteAcks::One);
        let cli = Cli::try_parse_from([
            "kache-node",
            "--members-file",
            "/tmp/m.json",
            "--write-acks",
            "all",
            "--tombstone-ttl",
            "900",
            "--anti-entropy-rate",
            "1m",
        ])
        .unwrap();
        let args = cli.into_serve_args();
        assert_eq!(args.cluster.write_acks, WriteAcks::All);
        assert_eq!(args.cluster.tombstone_ttl, 900);
        assert_eq!(args.cluster.anti_entropy_rate, 1 << 20);
        assert!(Cli::try_parse_from(["kache-node", "--write-acks", "most"]).is_err());
        assert!(Cli::try_parse_from([
            "kache-node",
            "--members-file",
            "/tmp/m.json",
            "--cluster",
            "c"
        ])
        .is_err());
    }

    #[test]
    fn proxy_needs_a_member_list_source() {
        let cli =
            Cli::try_parse_from(["kache-node", "proxy", "--members-file", "/m.json"]).unwrap();
        match cli.into_mode() {
            Mode::Proxy(args) => {
                assert_eq!((args.port, args.listen.as_str()), (11211, "127.0.0.1"))
            }
            Mode::Serve(_) => panic!("expected proxy"),
        }
        assert!(Cli::try_parse_from(["kache-node", "proxy"]).is_err());
    }

    #[test]
    fn unknown_and_unsupported_flags_are_errors() {
        assert!(Cli::try_parse_from(["kache-node", "-Q"]).is_err());
        assert!(Cli::try_parse_from(["kache-node", "-U", "0"]).is_ok());
        let refusal = |port: &str| match Cli::try_parse_from(["kache-node", "-U", port]) {
            Ok(_) => panic!("-U {port} accepted"),
            Err(e) => e.to_string(),
        };
        let udp = refusal("11211");
        assert!(
            udp.contains("UDP is not supported by kache; use -U 0 (the default)"),
            "{udp}"
        );
        let junk = refusal("x");
        assert!(junk.contains("invalid digit found in string"), "{junk}");
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["kache-node"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().into_serve_args()
    }

    #[test]
    fn memcacheds_own_command_line_is_accepted() {
        let args = serve(&[
            "-p",
            "11211",
            "-u",
            "memcached",
            "-l",
            "127.0.0.1",
            "-m",
            "64",
        ]);
        assert_eq!(args.memcached.user.as_deref(), Some("memcached"));
        assert!(args.validate().is_ok());
        let args = serve(&[
            "-vv",
            "-A",
            "-M",
            "-R",
            "5",
            "-B",
            "ascii",
            "-o",
            "modern,idle_timeout=3",
            "-o",
            "lru_crawler_sleep=50",
        ]);
        let options = args.validate().unwrap();
        assert_eq!(options.extended.idle_timeout, 3);
        assert_eq!(options.extended.lru_crawler_sleep, 50);
        assert_eq!(options.protocol, "ascii");
        assert!(options.notices.iter().any(|n| n.contains("-o modern")));
    }

    #[test]
    fn refusals_use_memcacheds_messages_and_exit_codes() {
        let refused = |args: &[&str]| serve(args).validate().unwrap_err();
        let e = refused(&["-o", "bogus=1"]);
        assert_eq!(
            (e.to_string(), e.exit_code()),
            ("Illegal suboption \"bogus=1\"".into(), 1)
        );
        let e = refused(&["-o", "hashpower=5"]);
        assert_eq!(
            e.to_string(),
            "Initial hashtable multiplier of 5 is too low"
        );
        let e = refused(&["-I", "1000"]);
        assert_eq!(
            (e.to_string(), e.exit_code()),
            ("Item max size cannot be less than 1024 bytes.".into(), 64)
        );
        let e = refused(&["-I", "1024"]);
        assert!(e
            .to_string()
            .starts_with("slab_chunk_max (bytes: 524288) cannot be larger than -I"));
        assert!(serve(&["-I", "1024", "-o", "slab_chunk_max=1024"])
            .validate()
            .is_ok());
        let e = refused(&["-R", "0"]);
        assert_eq!(
            e.to_string(),
            "Number of requests per event must be greater than 0"
        );
        let e = refused(&["-B", "foo"]);
        assert_eq!(e.exit_code(), 64);
        assert!(refused(&["-B", "binary"])
            .to_string()
            .contains("ASCII protocol only"));
        let e = refused(&["-o", "no_lru_maintainer,temporary_ttl=10"]);
        assert_eq!(
            e.to_string(),
            "temporary_ttl requires lru_maintainer to be enabled"
        );
    }

    #[test]
    fn slab_options_shape_the_classes() {
        let options = serve(&["-I", "2m", "-f", "2", "-n", "16"])
            .validate()
            .unwrap();
        assert_eq!(options.classes.chunk_max, PAGE_SIZE / 2);
        assert_eq!(
            (options.classes.factor, options.classes.min_size),
            (2.0, 16)
        );
        let options = serve(&["-o", "no_modern"]).validate().unwrap();
        assert_eq!(options.classes.chunk_max, PAGE_SIZE);
        assert!(!options.extended.lru_crawler);
        let options = serve(&["-o", "slab_sizes=100-200-400"]).validate().unwrap();
        assert_eq!(options.classes.sizes, Some(vec![100, 200, 400]));
        let e = serve(&["-o", "slab_sizes=100-104"]).validate().unwrap_err();
        assert_eq!(
            e.to_string(),
            "slab size 104 must be at least 8 bytes larger than previous class"
        );
    }
}
