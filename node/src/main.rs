//! `kache-node`: start-up and shutdown around the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;

use kache_node::admin::{self, Readiness};
use kache_node::admin_commands::{MemcachedSettings, ShutdownKind};
use kache_node::auth::AuthFile;
use kache_node::cluster::{membership, Cluster};
use kache_node::config::{Cli, FlagError, MemcachedOptions, Mode, ProxyArgs, ServeArgs};
use kache_node::engine::{Engine, Settings};
use kache_node::node::Node;
use kache_node::peer::replicate::{Durability, WriteAcks};
use kache_node::peer::{PeerConfig, Replicator};
use kache_node::protocol::Limits;
use kache_node::proxy::{NodeAccess, Proxy};
use kache_node::store::{Store, StoreConfig};
use kache_node::tls::{NodeTlsFiles, Tls, TlsFiles};
use kache_node::{peer, server};

mod startup;
use startup::StartupError;

fn main() -> ExitCode {
    let mode = Cli::parse().into_mode();
    let mut options = None;
    let (verbose, threads) = match &mode {
        Mode::Serve(args) => {
            if args.memcached.license {
                println!("{LICENSE}");
                return ExitCode::SUCCESS;
            }
            match args
                .validate()
                .and_then(|o| process_flags(args).map(|()| o))
            {
                Ok(o) => {
                    for notice in &o.notices {
                        eprintln!("kache-node: {notice}");
                    }
                    options = Some(o);
                }
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::from(error.exit_code());
                }
            }
            (args.verbose, args.threads)
        }
        Mode::Proxy(args) => (args.verbose, args.threads),
    };
    init_logging(verbose);
    let threads = threads.map_or_else(
        || std::thread::available_parallelism().map_or(4, |n| n.get()),
        |t| t as usize,
    );
    // One thread: run every task on it (as twemproxy's event loop does). A task woken by
    // another then runs after the rest of the ready tasks, so a connection to a node
    // gathers the requests of every client served in that turn into one write.
    let built = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("kache-node: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match mode {
            Mode::Serve(args) => run(args, options.unwrap_or_default(), threads).await,
            Mode::Proxy(args) => run_proxy(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("kache-node: {message}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// What kache-node prints for `-i` (memcached prints its and libevent's licenses).
const LICENSE: &str = "kache-node is licensed under the Apache License, Version 2.0:\n\
    https://www.apache.org/licenses/LICENSE-2.0";

/// memcached's process flags, applied before any thread starts: `-r` (core limit), `-u`
/// (switch user when root), `-d` (detach), `-k` (lock memory).
fn process_flags(args: &ServeArgs) -> Result<(), FlagError> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource, RLIM_INFINITY};
    let m = &args.memcached;
    if m.enable_coredumps {
        if setrlimit(Resource::RLIMIT_CORE, RLIM_INFINITY, RLIM_INFINITY).is_err() {
            if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_CORE) {
                let _ = setrlimit(Resource::RLIMIT_CORE, hard, hard);
            }
        }
        if getrlimit(Resource::RLIMIT_CORE).map_or(true, |(soft, _)| soft == 0) {
            return Err(FlagError::Os("failed to ensure corefile creation".into()));
        }
    }
    if nix::unistd::geteuid().is_root() {
        if let Some(name) = m.user.as_deref().filter(|u| !u.is_empty()) {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .ok_or_else(|| {
                    FlagError::NoUser(format!("can't find the user {name} to switch to"))
                })?;
            if let Err(error) = nix::unistd::setgroups(&[]) {
                eprintln!("failed to drop supplementary groups: {error}");
                if error != nix::errno::Errno::EPERM {
                    return Err(FlagError::Os(String::new()));
                }
            }
            if nix::unistd::setgid(user.gid).is_err() || nix::unistd::setuid(user.uid).is_err() {
                return Err(FlagError::Os(
                    "failed to assume identity of user ".to_string() + name,
                ));
            }
        }
    }
    if m.daemon {
        nix::unistd::daemon(false, false)
            .map_err(|_| FlagError::Option("failed to daemon() in order to daemonize".into()))?;
    }
    if m.lock_memory {
        use nix::sys::mman::{mlockall, MlockAllFlags};
        if let Err(error) = mlockall(MlockAllFlags::MCL_CURRENT | MlockAllFlags::MCL_FUTURE) {
            eprintln!("warning: -k invalid, mlockall() failed: {}", error.desc());
        }
    }
    Ok(())
}

async fn bind(host: &str, port: u16) -> Result<TcpListener, StartupError> {
    bind_with_backlog(host, port, 1024).await
}

/// Listens on `host:port` with the given backlog (memcached's `-b`).
async fn bind_with_backlog(
    host: &str,
    port: u16,
    backlog: i32,
) -> Result<TcpListener, StartupError> {
    let addr = format!("{host}:{port}");
    let resolved = match addr.parse::<SocketAddr>() {
        Ok(sa) => Ok(sa),
        Err(_) => tokio::net::lookup_host(addr.as_str())
            .await
            .and_then(|mut all| {
                all.next()
                    .ok_or_else(|| std::io::Error::other("no address"))
            }),
    };
    let listen = |sa: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = if sa.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(sa)?;
        socket.listen(u32::try_from(backlog).unwrap_or(1024).max(1))
    };
    resolved
        .and_then(listen)
        .map_err(|source| StartupError::Listen { addr, source })
}

/// What `stats settings` reports of memcached's flags, from the command line.
fn memcached_settings(args: &ServeArgs, options: MemcachedOptions) -> MemcachedSettings {
    let m = &args.memcached;
    MemcachedSettings {
        shutdown_command: m.enable_shutdown,
        flush_enabled: !m.disable_flush_all,
        dump_enabled: !m.disable_dumping,
        watch_enabled: !m.disable_watch,
        reqs_per_event: u32::try_from(m.reqs_per_event).unwrap_or(u32::MAX),
        backlog: m.backlog,
        prefix_delimiter: m
            .prefix_delimiter
            .as_deref()
            .and_then(|d| d.bytes().next())
            .unwrap_or(b':'),
        detail_enabled: m.prefix_delimiter.is_some(),
        evictions: !m.disable_evictions,
        auth_file: args.auth_file.as_ref().map(|p| p.display().to_string()),
        ssl_enabled: args.tls_files(&options.extended).0.is_some(),
        umask: m.unix_mask.clone().unwrap_or_else(|| "700".into()),
        memory_file: m.memory_file.as_ref().map(|p| p.display().to_string()),
        napi_ids: m.napi_ids,
        options,
    }
}

async fn run(
    args: ServeArgs,
    options: MemcachedOptions,
    threads: usize,
) -> Result<(), StartupError> {
    let listener = bind_with_backlog(&args.listen, args.port, args.memcached.backlog).await?;
    let admin_listener = if args.admin_port != 0 {
        Some(bind(&args.listen, args.admin_port).await?)
    } else {
        None
    };
    let peer_listener = if args.cluster.enabled() {
        Some(bind(&args.listen, args.cluster.peer_port).await?)
    } else {
        None
    };
    let store_config = StoreConfig {
        memory_limit: args.memory_limit_bytes(),
        max_item_size: args.max_item_size,
        max_shards: (threads * 4).next_power_of_two(),
        node_id: kache_node::store::node_id(&args.cluster.node_name()),
        evict: !args.memcached.disable_evictions,
        classes: options.classes.clone(),
    };
    let store = match &args.memcached.memory_file {
        Some(path) => Store::open(store_config, path)?,
        None => Store::new(store_config),
    };
    let hashpower = options.extended.hashpower_init;
    if hashpower > 0 {
        store.reserve(1usize << hashpower.min(usize::BITS - 1));
    }
    let (tls_cert, tls_key, tls_client_ca) = args.tls_files(&options.extended);
    let settings = Settings {
        port: args.port,
        listen: args.listen.clone(),
        memory_limit: args.memory_limit_bytes(),
        max_connections: args.conn_limit as usize,
        threads,
        max_item_size: args.max_item_size,
        memcached: memcached_settings(&args, options),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let cluster = if args.cluster.enabled() {
        Some(
            start_membership(
                args.cluster.membership.cluster.as_deref(),
                &args.cluster.membership.namespace,
                args.cluster.membership.members_file.as_deref(),
                args.cluster.node_name(),
                &shutdown_rx,
            )
            .await?,
        )
    } else {
        None
    };
    let peer_secret: Arc<[u8]> = match &args.cluster.peer_secret_file {
        Some(path) => {
            let text = std::fs::read(path).map_err(|source| StartupError::PeerSecretRead {
                path: path.clone(),
                source,
            })?;
            let secret = text.trim_ascii().to_vec();
            let max = kache_node::peer::wire::MAX_SECRET;
            if secret.is_empty() || secret.len() > max {
                return Err(StartupError::PeerSecretSize {
                    path: path.clone(),
                    max,
                });
            }
            Arc::from(secret)
        }
        None => Arc::from(Vec::new()),
    };
    let auth = followed_auth_file(args.auth_file.as_deref(), &shutdown_rx)?;
    let tls = match (&tls_cert, &tls_key) {
        (Some(cert), Some(key)) => {
            let tls = Arc::new(Tls::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: tls_client_ca.clone(),
                peer_ca: args.peer_tls_ca.clone(),
            })?);
            tokio::spawn(tls.clone().follow(shutdown_rx.clone()));
            Some(tls)
        }
        _ => None,
    };
    let engine = Engine::new(store, settings, u32::from(args.verbose), cluster.clone())
        .with_auth(auth)
        .with_tombstones(
            args.cluster.tombstone_ttl,
            args.cluster.write_acks != WriteAcks::One,
        );
    let replicator = cluster.map(|cluster| {
        // The certificate covers the peer port too: links, refills and read-through use TLS.
        if let Some(tls) = &tls {
            tracing::info!(peer_trust = %tls.peer_trust(), "TLS on the peer port");
        }
        let config = PeerConfig {
            secret: peer_secret,
            limits: args.cluster.peer_limits(),
            durability: Durability {
                write_acks: args.cluster.write_acks,
                write_timeout: Duration::from_millis(args.cluster.write_timeout_ms),
            },
            tls: tls.clone(),
        };
        let store = engine.store.clone();
        Arc::new(Replicator::new(store, cluster, args.max_item_size, config))
    });
    let node = Arc::new(Node::new(engine, replicator));
    let limits = Limits {
        max_item_size: args.max_item_size,
        ..Limits::default()
    };
    let readiness = Arc::new(Readiness::default());

    if let Some(listener) = admin_listener {
        tokio::spawn(admin::serve(
            listener,
            node.clone(),
            readiness.clone(),
            shutdown_rx.clone(),
        ));
    }
    let sweeper_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sweeper =
        server::spawn_sweeper(node.clone(), sweeper_stop.clone()).map_err(StartupError::Sweeper)?;
    {
        let readiness = readiness.clone();
        let shutdown_delay = Duration::from_secs(args.shutdown_delay_secs);
        let mut requests = node.engine.admin.shutdown_requests();
        tokio::spawn(async move {
            let kind = tokio::select! {
                _ = wait_for_signal() => ShutdownKind::Graceful,
                kind = requests.wait_for(Option::is_some) => {
                    kind.ok().and_then(|k| *k).unwrap_or(ShutdownKind::Graceful)
                }
            };
            readiness.set(false);
            if kind == ShutdownKind::Graceful && shutdown_delay > Duration::ZERO {
                // Not ready, still accepting: kube-proxy drops the endpoint meanwhile, so
                // clients going through a Service are not refused in the gap.
                tracing::info!(
                    delay_secs = shutdown_delay.as_secs(),
                    "shutting down: not ready, still serving for the shutdown delay"
                );
                tokio::time::sleep(shutdown_delay).await;
            }
            tracing::info!("shutting down: no new connections, finishing open ones");
            let _ = shutdown_tx.send(true);
            if kind == ShutdownKind::Now {
                // memcached's `shutdown` exits at once, without waiting for connections.
                tokio::time::sleep(Duration::from_millis(20)).await;
                std::process::exit(0);
            }
        });
    }
    if let Some(path) = &args.memcached.pidfile {
        write_pidfile(path)?;
    }
    tracing::info!(
        port = args.port,
        listen = %args.listen,
        memory_mib = args.memory_limit_mb,
        threads,
        shards = node.engine.store.shard_count(),
        "kache-node serving"
    );
    match (peer_listener, node.replicator.clone()) {
        (Some(peer_listener), Some(replicator)) => {
            tokio::spawn(peer::server::serve(
                peer_listener,
                replicator.clone(),
                tls.clone(),
                shutdown_rx.clone(),
            ));
            tokio::spawn(peer::handoff::run(
                replicator.clone(),
                args.cluster.handoff_rate,
                shutdown_rx.clone(),
            ));
            tokio::spawn(peer::anti_entropy::run(
                replicator.clone(),
                peer::anti_entropy::Settings {
                    interval: Duration::from_secs(args.cluster.anti_entropy_interval_secs),
                    rate: args.cluster.anti_entropy_rate,
                },
                shutdown_rx.clone(),
            ));
            // Ready once the node holds what it owns: a node that restarts empty while
            // still listed pulls its share back from its peers first.
            let readiness = readiness.clone();
            tokio::spawn(async move {
                let cluster = &replicator.cluster;
                // Subscribe before looking, so a list that arrives in between still wakes us;
                // a list that arrived earlier must not make us wait for the next change
                // (which, for a joining node, is the list that adds it: no refill is due).
                let mut changes = cluster.subscribe();
                if cluster.view().list.members.is_empty() {
                    let _ = tokio::time::timeout(FIRST_LIST_WAIT, changes.changed()).await;
                }
                if cluster.view().me.is_some() {
                    peer::handoff::refill(&replicator).await;
                }
                readiness.set(true);
            });
        }
        _ => readiness.set(true),
    }
    let store = node.engine.store.clone();
    server::serve(
        listener,
        node,
        limits,
        args.conn_limit as usize,
        tls,
        shutdown_rx,
        Duration::from_secs(args.shutdown_grace_secs),
    )
    .await;
    sweeper_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sweeper.join();
    if store.is_persistent() {
        // The file is sealed with every shard locked, and the process ends before anything
        // (a peer's record, a late task) could change it again.
        store.persist_then(|result| {
            match result {
                Ok(_) => tracing::info!("memory file closed cleanly: a restart serves every item"),
                Err(error) => tracing::error!(%error, "memory file could not be closed cleanly"),
            }
            std::process::exit(0)
        });
    }
    Ok(())
}

/// Starts following the member list when the node is part of a cluster.
async fn start_membership(
    cluster_name: Option<&str>,
    namespace: &str,
    members_file: Option<&std::path::Path>,
    node_name: String,
    shutdown: &watch::Receiver<bool>,
) -> Result<Arc<Cluster>, StartupError> {
    let cluster = Arc::new(Cluster::new(node_name));
    if let Some(path) = members_file {
        tokio::spawn(membership::follow_file(
            cluster.clone(),
            path.to_path_buf(),
            shutdown.clone(),
        ));
    } else if let Some(name) = cluster_name {
        let client =
            membership::api_client()
                .await
                .map_err(|source| StartupError::KubernetesApi {
                    cluster: name.to_string(),
                    source: Box::new(source),
                })?;
        tokio::spawn(membership::follow_configmap(
            cluster.clone(),
            client,
            namespace.to_string(),
            kache_cluster::names::members_configmap_name(name),
            shutdown.clone(),
        ));
    }
    tracing::info!(
        node = cluster.node_name(),
        "following the cluster member list"
    );
    Ok(cluster)
}

/// `kache-node proxy`: route a local endpoint over the cluster's ring.
async fn run_proxy(args: ProxyArgs) -> Result<(), StartupError> {
    let listener = bind(&args.listen, args.port).await?;
    let admin_listener = if args.admin_port != 0 {
        Some(bind(&args.admin_listen, args.admin_port).await?)
    } else {
        None
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let cluster = start_membership(
        args.membership.cluster.as_deref(),
        &args.membership.namespace,
        args.membership.members_file.as_deref(),
        "kache-proxy".to_string(),
        &shutdown_rx,
    )
    .await?;
    let limits = Limits {
        max_item_size: args.max_item_size,
        ..Limits::default()
    };
    let login = followed_auth_file(args.node_auth_file.as_deref(), &shutdown_rx)?;
    let tls = args.node_tls_ca.clone().map(|ca| NodeTlsFiles {
        ca,
        identity: args.node_tls_cert.clone().zip(args.node_tls_key.clone()),
    });
    if let Some(files) = &tls {
        // Bad files are a start-up error, not a string of failed connections.
        files.connector()?;
    }
    let proxy = Arc::new(Proxy::new(
        cluster.clone(),
        limits,
        args.pool_size as usize,
        NodeAccess {
            login,
            tls,
            reply_timeout: Some(Duration::from_millis(args.node_timeout_ms)),
            queue_bytes: Some(args.node_queue_bytes),
            ..NodeAccess::default()
        },
    ));
    let readiness = Arc::new(Readiness::default());
    if let Some(listener) = admin_listener {
        tokio::spawn(admin::serve_proxy(
            listener,
            proxy.clone(),
            readiness.clone(),
            shutdown_rx.clone(),
        ));
    }
    {
        let readiness = readiness.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            readiness.set(false);
            let _ = shutdown_tx.send(true);
        });
    }
    {
        // Ready once there is a member list to route over.
        let readiness = readiness.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut changes = cluster.subscribe();
            while cluster.view().list.members.is_empty() {
                if changes.changed().await.is_err() {
                    return;
                }
            }
            readiness.set(true);
        });
    }
    tracing::info!(port = args.port, listen = %args.listen, "kache proxy serving");
    proxy
        .serve(
            listener,
            args.conn_limit as usize,
            shutdown_rx,
            Duration::from_secs(args.shutdown_grace_secs),
        )
        .await;
    Ok(())
}

/// The auth file at `path`, if any, loaded and re-read when it changes until shutdown.
fn followed_auth_file(
    path: Option<&std::path::Path>,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<Arc<AuthFile>>, StartupError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let file = Arc::new(AuthFile::load(path)?);
    tokio::spawn(file.clone().follow(shutdown.clone()));
    Ok(Some(file))
}

/// memcached's `save_pid`: written through a temporary file once the sockets are bound.
fn write_pidfile(path: &std::path::Path) -> Result<(), StartupError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| StartupError::PidFile {
            path: path.to_path_buf(),
            source,
        })
}

/// How long a cluster node waits for its first member list before declaring itself ready.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
