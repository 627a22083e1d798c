//! Command line of `kache-node`, memcached-compatible where memcached has the flag.

use clap::{Args, Parser, Subcommand};

use crate::peer::replicate::WriteAcks;

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the memcached protocol (the default).
    Serve(ServeArgs),
    /// Run as a cluster-aware proxy in front of the cluster's nodes.
    Proxy(ProxyArgs),
}

/// Options of `kache-node proxy`.
#[derive(Clone, Debug, Args)]
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

    /// More logging; repeat for more.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Seconds to let open connections finish after SIGTERM before exiting.
    #[arg(long = "shutdown-grace", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

    /// Name of the CacheCluster whose `<name>-members` ConfigMap lists the nodes.
    #[arg(
        long = "cluster",
        env = "KACHE_CLUSTER",
        conflicts_with = "members_file",
        required_unless_present = "members_file"
    )]
    pub cluster: Option<String>,

    /// Namespace of the cluster's ConfigMap.
    #[arg(long = "namespace", env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Read the member-list document from this file and follow its changes.
    #[arg(long = "members-file")]
    pub members_file: Option<std::path::PathBuf>,

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
}

/// What to run.
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
    #[arg(short = 'I', long = "max-item-size", default_value = "1m", value_parser = parse_size)]
    pub max_item_size: usize,

    /// More logging; repeat for more.
    #[arg(short = 'v', action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Port of the admin HTTP endpoint (/metrics, /healthz, /readyz); 0 disables it.
    #[arg(long = "admin-port", default_value_t = 11280)]
    pub admin_port: u16,

    /// UDP port: kache serves TCP only, so only 0 (memcached's default) is accepted.
    #[arg(short = 'U', long = "udp-port", default_value_t = 0, value_parser = parse_udp_port)]
    pub udp_port: u16,

    /// Seconds to let open connections finish after SIGTERM before exiting.
    #[arg(long = "shutdown-grace", default_value_t = 10)]
    pub shutdown_grace_secs: u64,

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

/// How a node finds its cluster's member list.
#[derive(Clone, Debug, Args)]
pub struct ClusterArgs {
    /// Name of the CacheCluster: the node follows the `<name>-members` ConfigMap in
    /// `--namespace` through the Kubernetes API.
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
    #[arg(long = "tombstone-ttl", default_value_t = crate::peer::DEFAULT_TOMBSTONE_TTL, value_parser = clap::value_parser!(u32).range(1..=30 * 24 * 3600))]
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
    /// Whether the node runs as part of a cluster.
    pub fn enabled(&self) -> bool {
        self.cluster.is_some() || self.members_file.is_some()
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

/// Parses sizes like memcached's `-I`: bytes, or a number with a k/m/g suffix.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&text[..i], c.to_ascii_lowercase()),
        _ => (text, 'b'),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a number with optional k, m or g"))?;
    let bytes = match unit {
        'b' => Some(n),
        'k' => n.checked_mul(1024),
        'm' => n.checked_mul(1024 * 1024),
        'g' => n.checked_mul(1024 * 1024 * 1024),
        _ => return Err(format!("invalid size unit in {text:?}: use k, m or g")),
    }
    .ok_or_else(|| format!("size {text:?} is too large"))?;
    if !(1024..=1024 * 1024 * 1024).contains(&bytes) {
        return Err(format!("item size {text:?} must be between 1k and 1g"));
    }
    Ok(bytes)
}

fn parse_udp_port(text: &str) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) => Ok(0),
        Ok(_) => Err("UDP is not supported by kache; use -U 0 (the default)".into()),
        Err(e) => Err(e.to_string()),
    }
}

impl ServeArgs {
    pub fn memory_limit_bytes(&self) -> usize {
        usize::try_from(self.memory_limit_mb)
            .unwrap_or(usize::MAX)
            .saturating_mul(1024 * 1024)
    }

    /// Checks combinations clap cannot: memcached refuses items larger than half the memory.
    pub fn validate(&self) -> Result<(), String> {
        if self.cluster.enabled() && self.max_item_size > crate::peer::wire::MAX_PEER_ITEM {
            return Err(format!(
                "in a cluster the max item size is at most {} bytes (items must fit a peer frame)",
                crate::peer::wire::MAX_PEER_ITEM
            ));
        }
        if self.max_item_size > self.memory_limit_bytes() / 2 {
            return Err(format!(
                "max item size ({} bytes) must be at most half the memory limit ({} MiB)",
                self.max_item_size, self.memory_limit_mb
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_memcached_suffixes() {
        assert_eq!(parse_size("1m"), Ok(1024 * 1024));
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
        assert!(Cli::try_parse_from(["kache-node", "-Z"]).is_err());
        assert!(Cli::try_parse_from(["kache-node", "-U", "11211"]).is_err());
        assert!(Cli::try_parse_from(["kache-node", "-U", "0"]).is_ok());
    }
}
