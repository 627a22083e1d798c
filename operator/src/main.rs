//! `kache-operator`: the operator process. Connects to the API server, serves
//! `/metrics`, `/healthz` and `/readyz`, campaigns for the leader Lease, and
//! runs the CacheCluster controller while it leads. SIGTERM or Ctrl-C stops
//! it gracefully: in-flight reconciles finish and the Lease is released.

use anyhow::Context as _;
use clap::{ArgAction, Parser, ValueEnum};
use kache_operator::admin::{self, AdminState};
use kache_operator::build::DEFAULT_NODE_IMAGE;
use kache_operator::leader::{LeaderElector, LeaseConfig};
use kache_operator::metrics::Metrics;
use kache_operator::reconcile::{run_controller, Context, Settings};
use kube::runtime::events::Reporter;
use kube::Client;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Kubernetes operator for kache CacheClusters.
#[derive(Parser, Debug)]
#[command(name = "kache-operator", version, about)]
struct Args {
    /// Address of the admin endpoint (/metrics, /healthz, /readyz).
    #[arg(long, env = "KACHE_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,

    /// Log format.
    #[arg(long, env = "KACHE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    /// Log filter (tracing EnvFilter syntax).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_filter: String,

    /// kache-node image for CacheClusters that do not set spec.image.
    #[arg(long, env = "KACHE_NODE_IMAGE", default_value = DEFAULT_NODE_IMAGE)]
    node_image: String,

    /// Admin port of the kache nodes; a scale-in asks departing nodes for their
    /// hand-off progress at `http://<pod IP>:<port>/cluster`.
    #[arg(long, env = "KACHE_NODE_ADMIN_PORT", default_value_t = kache_cluster::names::ADMIN_PORT)]
    node_admin_port: u16,

    /// Only watch CacheClusters in this namespace (default: all namespaces).
    #[arg(long, env = "KACHE_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// Campaign for a Lease before reconciling (needed when running more than one replica).
    #[arg(long, env = "KACHE_LEADER_ELECT", default_value_t = true, action = ArgAction::Set)]
    leader_elect: bool,

    /// Name of the leader-election Lease.
    #[arg(long, env = "KACHE_LEASE_NAME", default_value = "kache-operator")]
    lease_name: String,

    /// The operator's own namespace: a CacheCluster's NetworkPolicy admits
    /// every pod of it to the nodes' admin port (default: the namespace of
    /// the in-cluster configuration or kubeconfig).
    #[arg(long, env = "POD_NAMESPACE")]
    operator_namespace: Option<String>,

    /// Namespace of the Lease (default: the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,

    /// This replica's identity in the Lease (default: the pod name or hostname).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,

    /// Seconds a Lease stays valid without renewal.
    #[arg(long, env = "KACHE_LEASE_DURATION_SECONDS", default_value_t = 15)]
    lease_duration_seconds: u64,

    /// Seconds between Lease renewals.
    #[arg(long, env = "KACHE_LEASE_RENEW_SECONDS", default_value_t = 5)]
    lease_renew_seconds: u64,
}

fn init_logging(args: &Args) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&args.log_filter).context("invalid --log-filter")?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot initialise logging: {e}"))
}

/// Resolves on SIGTERM or Ctrl-C.
async fn termination_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn identity(args: &Args) -> String {
    args.identity
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("kache-operator-{}", std::process::id()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args)?;
    let identity = identity(&args);
    tracing::info!(version = env!("CARGO_PKG_VERSION"), %identity, node_image = %args.node_image, "starting kache-operator");

    let metrics = Arc::new(Metrics::default());
    let admin_state = Arc::new(AdminState::new(metrics.clone()));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let listener = admin::bind(args.metrics_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.metrics_addr))?;
    let admin_task = tokio::spawn(admin::serve(
        listener,
        admin_state.clone(),
        shutdown_rx.clone(),
    ));

    let client = Client::try_default()
        .await
        .context("cannot configure a Kubernetes client")?;
    let operator_namespace = args
        .operator_namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string());
    let lease_namespace = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| operator_namespace.clone());

    // Signals flip the shared shutdown flag.
    {
        let tx = shutdown_tx.clone();
        tokio::spawn(async move {
            termination_signal().await;
            tracing::info!("termination signal received, shutting down");
            tx.send_replace(true);
        });
    }

    let (leader_tx, mut leader_rx) = watch::channel(!args.leader_elect);
    let elector_task = if args.leader_elect {
        let elector = LeaderElector::new(
            client.clone(),
            LeaseConfig {
                name: args.lease_name.clone(),
                namespace: lease_namespace,
                identity: identity.clone(),
                lease_duration: Duration::from_secs(args.lease_duration_seconds.max(2)),
                renew_interval: Duration::from_secs(args.lease_renew_seconds.max(1)),
            },
        );
        Some(tokio::spawn(elector.run(leader_tx, shutdown_rx.clone())))
    } else {
        None
    };
    admin_state.ready.store(true, Ordering::Relaxed);

    // Wait to lead (or to be told to stop).
    let mut shutdown = shutdown_rx.clone();
    let leading = tokio::select! {
        r = leader_rx.wait_for(|l| *l) => r.is_ok(),
        _ = shutdown.wait_for(|s| *s) => false,
    };
    let mut lost_leadership = false;
    if leading {
        tracing::info!("leading: starting the CacheCluster controller");
        metrics.leader.set(1);
        let ctx = Arc::new(Context::new(
            client.clone(),
            Settings {
                node_image: args.node_image.clone(),
                node_admin_port: args.node_admin_port,
                operator_namespace: operator_namespace.clone(),
            },
            metrics.clone(),
            Reporter {
                controller: kache_cluster::names::MANAGER.into(),
                instance: Some(identity.clone()),
            },
        ));
        let mut stop_shutdown = shutdown_rx.clone();
        let mut stop_leader = leader_rx.clone();
        let (lost_tx, lost_rx) = watch::channel(false);
        let stop = async move {
            tokio::select! {
                _ = stop_shutdown.wait_for(|s| *s) => {}
                _ = stop_leader.wait_for(|l| !*l) => { lost_tx.send_replace(true); }
            }
        };
        run_controller(ctx, args.watch_namespace.clone(), stop).await;
        lost_leadership = *lost_rx.borrow();
        metrics.leader.set(0);
    }

    // Stop everything else and release the lease.
    shutdown_tx.send_replace(true);
    if let Some(task) = elector_task {
        let _ = task.await;
    }
    let _ = admin_task.await;
    if lost_leadership {
        // Exit non-zero so the pod restarts as a clean standby.
        anyhow::bail!("lost the leader lease");
    }
    tracing::info!("kache-operator stopped");
    Ok(())
}
