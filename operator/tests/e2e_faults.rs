#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]
//! Fault tests against a real Kubernetes cluster (1.28+): the operator
//! restarted in the middle of a scale-in of real pods, and the API server
//! going away under running nodes and a proxy.
//!
//! The scale-in tests run real cache pods (the `kache-node:e2e` image
//! `tests/k8s/run.sh` loads); a departing node whose hand-off must not finish
//! yet has its process stopped with SIGSTOP on the cluster's node, which must
//! be this machine (as the k8s kit's is).
//!
//! Like `e2e.rs` (whose helpers live in `support/`), every test runs only
//! when `KACHE_E2E_KUBECONFIG` names the kubeconfig of a cluster-admin, and
//! otherwise prints why it skipped and passes. Every test works in its own
//! namespace, deleted at the end whatever happens.
//!
//! The outage test runs the real `kache-node` binary (`$KACHE_NODE_BIN`, else
//! `$CARGO_TARGET_DIR/release/kache-node`, else `target/release/kache-node`;
//! build it with `cargo build --release -p kache-node`): two nodes and a proxy
//! reach the API server through a TCP relay this test owns, which it kills
//! and brings back.
//!
//! ```sh
//! cargo build --release -p kache-node
//! KACHE_E2E_KUBECONFIG=$HOME/.kube/config cargo test -p kache-operator --test e2e_faults -- --nocapture --test-threads 1
//! ```

mod support;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::chrono::{Duration as ChronoDuration, Utc};
use kache_cluster::{names, Member, MemberList};
use kache_operator::crd::{CacheCluster, RebalanceStatus};
use kache_operator::probe::PROBE_TIMEOUT;
use kache_operator::reconcile::REQUEUE_REBALANCING;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::Kubeconfig;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::diagnostics::step;
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// Lease timing of the operators here: short, so a crashed leader's Lease
/// expires within seconds.
const LEASE: LeaseTiming = LeaseTiming {
    duration: Duration::from_secs(5),
    renew: Duration::from_secs(1),
};

// ------------------------------------------------------------------ scale-in helpers

fn rebalance_of(cc: &CacheCluster) -> Option<RebalanceStatus> {
    cc.status.as_ref().and_then(|s| s.rebalance.clone())
}

async fn sts_replicas(sts: &Api<StatefulSet>) -> Option<i32> {
    try_sts_replicas(sts).await.unwrap()
}

async fn try_sts_replicas(sts: &Api<StatefulSet>) -> Result<Option<i32>, String> {
    Ok(sts
        .get("e2e")
        .await
        .map_err(|e| e.to_string())?
        .spec
        .and_then(|s| s.replicas))
}

/// How many of the operator's events about `e2e` have this reason.
async fn count_events(client: &Client, ns: &str, reason: &str) -> usize {
    events_of(client, ns, "e2e")
        .await
        .iter()
        .filter(|(_, r, _)| r == reason)
        .count()
}

/// Every distinct state (by resourceVersion) of the ConfigMap `e2e-members`
/// seen by a watch, in order: a write the test would miss by polling shows
/// up here.
struct MembersLog {
    seen: Arc<Mutex<Vec<(String, MemberList)>>>,
    _task: AbortOnDrop<()>,
}

impl MembersLog {
    async fn start(cms: Api<ConfigMap>) -> Self {
        let seen = Arc::new(Mutex::new(Vec::<(String, MemberList)>::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            let config = watcher::Config::default().fields("metadata.name=e2e-members");
            let mut events = std::pin::pin!(watcher::watcher(cms, config));
            while let Some(event) = events.next().await {
                if let Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) = event {
                    let rv = cm.resource_version().unwrap_or_default();
                    let mut log = log.lock().unwrap();
                    if !log.iter().any(|(r, _)| *r == rv) {
                        log.push((rv, members_of(&cm)));
                    }
                }
            }
        });
        let log = Self {
            seen,
            _task: AbortOnDrop(Some(task)),
        };
        eventually("the member-list watch has the ConfigMap", || {
            let n = log.seen.lock().unwrap().len();
            async move {
                if n > 0 {
                    Ok(())
                } else {
                    Err("nothing seen yet".into())
                }
            }
        })
        .await;
        log
    }

    /// (version, member names) of every state seen.
    fn versions(&self) -> Vec<(u64, Vec<String>)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| {
                (
                    l.version,
                    l.members.iter().map(|m| m.name.clone()).collect(),
                )
            })
            .collect()
    }
}

/// A CacheCluster `e2e` of `replicas` real nodes, all Ready and published,
/// with the given scale-down timeout. It grows one pod at a time (created
/// with 1 replica, then scaled by one each time the newest pod is published),
/// so the version rises by exactly one per node. Returns the published member
/// list (version `replicas + 1`).
async fn ready_cluster(
    ccs: &Api<CacheCluster>,
    cms: &Api<ConfigMap>,
    pods: &Api<Pod>,
    ns: &str,
    replicas: u32,
    timeout_seconds: u32,
) -> MemberList {
    let cc: CacheCluster = serde_json::from_value(json!({
        "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
        "metadata": {"name": "e2e"},
        "spec": {"replicas": 1, "scaleDownTimeoutSeconds": timeout_seconds, "threads": 1}
    }))
    .unwrap();
    ccs.create(&PostParams::default(), &cc).await.unwrap();
    let mut want = Vec::new();
    let mut last = None;
    for ordinal in 0..replicas {
        if ordinal > 0 {
            scale_to(ccs, ordinal + 1).await;
        }
        let pod = pods::wait_ready(pods, &format!("e2e-{ordinal}")).await;
        want.push(member(
            ns,
            ordinal,
            &kache_operator::observe::pod_ip(&pod).unwrap(),
        ));
        last = Some(wait_members(ccs, cms, &want, u64::from(ordinal) + 2).await);
    }
    last.unwrap().list
}

/// Pods `names`, as they are now.
async fn pods_named(pods: &Api<Pod>, names: &[&str]) -> Vec<Pod> {
    let mut out = Vec::new();
    for name in names {
        out.push(pods.get(name).await.unwrap());
    }
    out
}

/// What a restarted operator must keep of a scale-in: when it started, its
/// deadline, its target, and which nodes depart (with whether they are done).
fn scale_in_identity(r: &RebalanceStatus) -> impl PartialEq + std::fmt::Debug {
    (
        r.started_at.clone(),
        r.deadline.clone(),
        r.config_version,
        r.target_replicas,
        r.current_replicas,
        r.departing
            .iter()
            .map(|d| (d.name.clone(), d.done))
            .collect::<Vec<_>>(),
    )
}

/// Waits until the status shows the scale-in to `target` with every
/// departing node's report satisfying `pred`.
async fn wait_rebalance(
    ccs: &Api<CacheCluster>,
    what: &str,
    pred: impl Fn(&RebalanceStatus) -> bool,
) -> (CacheCluster, RebalanceStatus) {
    let pred = &pred;
    eventually(what, || async move {
        let cc = ccs.get("e2e").await.map_err(|e| e.to_string())?;
        let st = cc.status.clone().unwrap_or_default();
        let rebalancing = st
            .conditions
            .iter()
            .any(|c| c.type_ == "Rebalancing" && c.status == "True");
        match st.rebalance.clone() {
            Some(r) if rebalancing && pred(&r) => Ok((cc, r)),
            r => Err(format!("rebalance {r:?}, conditions {:?}", st.conditions)),
        }
    })
    .await
}

// ------------------------------------------------------------------ restart mid scale-in

/// An operator killed (no clean shutdown, Lease not released) while the
/// departing nodes of a 3 → 1 scale-in are still handing off: a new
/// instance takes the Lease once it expires, carries on with the scale-in
/// from the cluster's state without republishing anything, and shrinks the
/// StatefulSet when the nodes report their hand-off done. The departing
/// nodes are real pods holding data; their processes are stopped (SIGSTOP)
/// across the restart, so their hand-off cannot finish before the new
/// operator has taken over, and continued afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_operator_restart_mid_scale_in() {
    with_operator_namespace(
        "e2e_operator_restart_mid_scale_in",
        "kache-e2e-restart",
        restart_mid_scale_in,
    )
    .await;
}

async fn restart_mid_scale_in(client: Client, path: String, ns: String) {
    let ns = ns.as_str();
    let log = |msg: &str| println!("[{ns}] {msg}");
    let operator_client = chart_operator_client(&client, &path, ns).await;
    let ccs: Api<CacheCluster> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    let lease_name = operator_name(ns);

    let a = OperatorProcess::start(operator_client.clone(), ns, "e2e-operator-a", LEASE).await;
    let (m0, written, members_log) =
        step(ns, "3 Ready nodes, data on the two that depart", async {
            // A long timeout: only the hand-off may end this scale-in.
            let list = ready_cluster(&ccs, &cms, &pods, ns, 3, 600).await;
            assert_eq!(list.version, 4);
            let ip = |i: usize| list.members[i].ip.as_str();
            let written = memcache::write_owned_keys(
                ip(0),
                &[("e2e-1", ip(1)), ("e2e-2", ip(2))],
                30,
                "restart",
            )
            .await;
            let members_log = MembersLog::start(cms.clone()).await;
            log("3 Ready nodes, member list v4, 60 keys on e2e-1 and e2e-2; operator a leads");
            (list.members[0].clone(), written, members_log)
        })
        .await;

    // The departing nodes stop (SIGSTOP): their hand-off waits for the test.
    let frozen: Vec<_> = pods_named(&pods, &["e2e-1", "e2e-2"])
        .await
        .iter()
        .map(pods::Frozen::freeze)
        .collect();
    let (before, cm_rv, members_changed) = step(
        ns,
        "scale in to 1: v5 without e2e-1/e2e-2, StatefulSet held at 3",
        async {
            scale_to(&ccs, 1).await;
            wait_members(&ccs, &cms, std::slice::from_ref(&m0), 5).await;
            let (_, before) = wait_rebalance(&ccs, "a waits for the departing nodes", |r| {
                r.departing.len() == 2 && r.departing.iter().all(|d| !d.done)
            })
            .await;
            assert_eq!((before.target_replicas, before.current_replicas), (1, 3));
            assert_eq!(before.config_version, 5);
            assert_eq!(sts_replicas(&sts_api).await, Some(3));
            assert_eq!(count_events(&client, ns, "RebalanceStarted").await, 1);
            let cm_rv = cms.get("e2e-members").await.unwrap().resource_version();
            let members_changed = count_events(&client, ns, "MembersChanged").await;
            assert_eq!(
                reconcile_errors(&a.metrics),
                0,
                "{}",
                a.metrics.encode().unwrap()
            );
            log(&format!(
                "scale to 1: v5 published, StatefulSet held at 3; started at {}",
                before.started_at.0.to_rfc3339()
            ));
            (before, cm_rv, members_changed)
        },
    )
    .await;

    let held = leases.get(&lease_name).await.unwrap().spec.unwrap();
    assert_eq!(held.holder_identity.as_deref(), Some("e2e-operator-a"));
    let transitions = held.lease_transitions.unwrap_or(0);
    // Operator a dies: nothing stops cleanly, the Lease stays held.
    a.crash();
    let crashed_at = Instant::now();
    log("operator a killed (Lease not released)");

    let b = step(ns, "operator b takes the expired Lease", async {
        let b = OperatorProcess::start(operator_client.clone(), ns, "e2e-operator-b", LEASE).await;
        let took = crashed_at.elapsed();
        let lease = leases.get(&lease_name).await.unwrap().spec.unwrap();
        assert_eq!(lease.holder_identity.as_deref(), Some("e2e-operator-b"));
        assert_eq!(lease.lease_transitions, Some(transitions + 1));
        // a renewed at most one renew interval before it died.
        assert!(
            took + LEASE.renew >= LEASE.duration - Duration::from_millis(500),
            "b took a Lease that had not expired yet ({took:?} after a died)"
        );
        // Nobody touched the StatefulSet meanwhile.
        assert_eq!(sts_replicas(&sts_api).await, Some(3));
        log(&format!(
            "operator b took the expired Lease {:.1}s after a died",
            took.as_secs_f64()
        ));
        b
    })
    .await;

    step(ns, "b carries on: same scale-in, nothing republished", async {
        b.wait_finished_reconciles(0, 3).await;
        let cc = ccs.get("e2e").await.unwrap();
        let after = rebalance_of(&cc).expect("still rebalancing after the restart");
        assert_eq!(
            scale_in_identity(&after),
            scale_in_identity(&before),
            "the new operator keeps the scale-in exactly as it was (start, deadline, departing nodes)"
        );
        assert_eq!(cc.status.as_ref().unwrap().config_version, 5);
        assert_eq!(
            cms.get("e2e-members").await.unwrap().resource_version(),
            cm_rv,
            "the restart must not rewrite the member list"
        );
        assert_eq!(sts_replicas(&sts_api).await, Some(3));
        for name in ["e2e-1", "e2e-2"] {
            assert_eq!(
                pods.get(name).await.unwrap().metadata.deletion_timestamp,
                None,
                "{name} keeps running while it hands off"
            );
        }
        assert_eq!(count_events(&client, ns, "RebalanceStarted").await, 1);
        assert_eq!(
            count_events(&client, ns, "MembersChanged").await,
            members_changed
        );
        log(&format!(
            "b: {} reconciles; same scale-in, ConfigMap untouched, v5",
            b.metrics.reconciles.get()
        ));
    })
    .await;

    // The departing nodes go on: they see v5 and hand their data to e2e-0.
    drop(frozen);
    step(ns, "the hand-off completes: b shrinks the StatefulSet", async {
        eventually("b scales down to 1 after the hand-off", || {
            let (sts_api, ccs) = (sts_api.clone(), ccs.clone());
            async move {
                let replicas = try_sts_replicas(&sts_api).await?;
                let st = status_of(&ccs).await?;
                let idle = st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Rebalancing" && c.status == "False");
                if replicas == Some(1) && idle && st.rebalance.is_none() {
                    Ok(())
                } else {
                    Err(format!(
                        "StatefulSet replicas {replicas:?}, rebalance {:?}",
                        st.rebalance
                    ))
                }
            }
        })
        .await;
        wait_event(
            &client,
            ns,
            "Normal",
            "RebalanceFinished",
            "hand-off done (60 items sent, 60 acked, 0 failed); scaling StatefulSet from 3 to 1 nodes",
        )
        .await;
        for (key, value, _) in &written {
            assert_eq!(
                memcache::get(&m0.ip, m0.port, key).await.unwrap().as_deref(),
                Some(value.as_str()),
                "{key} handed off to e2e-0"
            );
        }
        // The departed pods go; what follows must not bring them back.
        for name in ["e2e-1", "e2e-2"] {
            pods::wait_gone(&pods, name).await;
        }
    })
    .await;

    step(ns, "the settled cluster stays as it is", async {
        // Make b look again at the settled cluster (a metadata-only change of
        // the CacheCluster triggers a reconcile that has nothing to do).
        let settled = b.finished_reconciles();
        let poke = json!({"metadata": {"annotations": {"e2e.kache.dev/poke": "1"}}});
        ccs.patch("e2e", &PatchParams::default(), &Patch::Merge(&poke))
            .await
            .unwrap();
        b.wait_finished_reconciles(settled, 1).await;
        let o = wait_members(&ccs, &cms, std::slice::from_ref(&m0), 5).await;
        let st = o.cc.status.unwrap();
        assert_eq!(st.members.len(), 1, "{:?}", st.members);
        assert_eq!(st.ready_replicas, 1);
        assert_eq!(count_events(&client, ns, "RebalanceStarted").await, 1);
        assert_eq!(count_events(&client, ns, "RebalanceFinished").await, 1);
        assert_eq!(count_events(&client, ns, "HandoffTimeout").await, 0);
        assert_eq!(
            count_events(&client, ns, "MembersChanged").await,
            members_changed
        );
        // Every state the member list went through, as a watch saw it.
        let m = |n: &[&str]| n.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            members_log.versions(),
            [
                (4, m(&["e2e-0", "e2e-1", "e2e-2"])),
                (5, m(&["e2e-0"]))
            ],
            "the member list is written once for the scale-in, never again, and the departed nodes never come back"
        );
        assert_eq!(
            reconcile_errors(&b.metrics),
            0,
            "{}",
            b.metrics.encode().unwrap()
        );
        log("hand-off done: b scaled the StatefulSet to 1; member list written once (v4 -> v5); 60 keys on e2e-0");
    })
    .await;

    b.stop().await;
    let lease = leases.get(&lease_name).await.unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity, None, "b released the Lease");
}

/// The scale-down timeout counts from when the scale-in started, as
/// recorded in `status.rebalance`, not from when the current operator
/// instance started: an operator stopped for a while during a scale-in whose
/// node never finishes removes the node at the original deadline. The node
/// that never finishes is a real pod whose connections to peer ports are
/// refused (iptables in its network namespace): its hand-off sends again and
/// again, never done, while the pod stays alive and Ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_operator_restart_keeps_scale_in_deadline() {
    with_operator_namespace(
        "e2e_operator_restart_keeps_scale_in_deadline",
        "kache-e2e-deadline",
        restart_keeps_deadline,
    )
    .await;
}

async fn restart_keeps_deadline(client: Client, path: String, ns: String) {
    const TIMEOUT_SECONDS: u32 = 15;
    const DOWN: Duration = Duration::from_secs(6);
    let ns = ns.as_str();
    let log = |msg: &str| println!("[{ns}] {msg}");
    let operator_client = chart_operator_client(&client, &path, ns).await;
    let ccs: Api<CacheCluster> = Api::namespaced(client.clone(), ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);

    let a = OperatorProcess::start(operator_client.clone(), ns, "e2e-operator-a", LEASE).await;
    let m0 = step(ns, "2 Ready nodes, data on e2e-1", async {
        let list = ready_cluster(&ccs, &cms, &pods, ns, 2, TIMEOUT_SECONDS).await;
        assert_eq!(list.version, 3);
        let ip = |i: usize| list.members[i].ip.as_str();
        memcache::write_owned_keys(ip(0), &[("e2e-1", ip(1))], 20, "deadline").await;
        list.members[0].clone()
    })
    .await;

    // e2e-1 cannot reach its peers: it never finishes the hand-off for v4 (its 20 items).
    let blocked = pods::PeerTrafficBlocked::block(&pods.get("e2e-1").await.unwrap());
    let (started, deadline) = step(ns, "scale 2 -> 1: a waits for e2e-1", async {
        scale_to(&ccs, 1).await;
        wait_members(&ccs, &cms, std::slice::from_ref(&m0), 4).await;
        let (_, before) = wait_rebalance(&ccs, "a waits for e2e-1", |r| {
            r.departing.len() == 1 && !r.departing[0].done
        })
        .await;
        let (started, deadline) = (before.started_at.0, before.deadline.0);
        assert_eq!(
            deadline - started,
            ChronoDuration::seconds(i64::from(TIMEOUT_SECONDS))
        );
        log(&format!(
            "scale 2 -> 1 started at {}, deadline {}",
            started.to_rfc3339(),
            deadline.to_rfc3339()
        ));
        (started, deadline)
    })
    .await;

    let (b, stopped_at, restarted) = step(
        ns,
        "a stops cleanly; b starts later and keeps the deadline",
        async {
            a.stop().await;
            let lease = leases.get(&operator_name(ns)).await.unwrap().spec.unwrap();
            assert_eq!(lease.holder_identity, None, "a released the Lease");
            let stopped_at = Instant::now();
            tokio::time::sleep(DOWN).await;
            assert_eq!(sts_replicas(&sts_api).await, Some(2));
            // b starts DOWN later; it takes the released Lease without waiting for it to expire.
            let starting = Instant::now();
            let b =
                OperatorProcess::start(operator_client.clone(), ns, "e2e-operator-b", LEASE).await;
            let restarted = Utc::now();
            assert!(
                starting.elapsed() < LEASE.duration,
                "b took {:?} to take a released Lease",
                starting.elapsed()
            );
            b.wait_finished_reconciles(0, 1).await;
            // Well before the deadline: b still waits, with a's start and deadline.
            let after = rebalance_of(&ccs.get("e2e").await.unwrap())
                .expect("b still waits for e2e-1 after the restart");
            assert_eq!(
                (after.started_at.0, after.deadline.0),
                (started, deadline),
                "b keeps the scale-in's start and deadline"
            );
            assert_eq!(sts_replicas(&sts_api).await, Some(2));
            (b, stopped_at, restarted)
        },
    )
    .await;
    log(&format!(
        "operator b started {:.1}s after a stopped ({:.1}s after the scale-in started)",
        stopped_at.elapsed().as_secs_f64(),
        (restarted - started).num_milliseconds() as f64 / 1000.0
    ));

    step(ns, "the StatefulSet shrinks at the original deadline", async {
        let shrunk_at = eventually("b scales down to 1 at the deadline", || {
            let sts_api = sts_api.clone();
            async move {
                let replicas = try_sts_replicas(&sts_api).await?;
                if replicas == Some(1) {
                    Ok(Utc::now())
                } else {
                    Err(format!("StatefulSet replicas {replicas:?}"))
                }
            }
        })
        .await;
        let late = shrunk_at - deadline;
        let from_restart = restarted + ChronoDuration::seconds(i64::from(TIMEOUT_SECONDS));
        assert!(
            late >= ChronoDuration::zero(),
            "shrunk {}ms before the deadline",
            -late.num_milliseconds()
        );
        // The operator notices the deadline at its next reconcile: it requeues every
        // REQUEUE_REBALANCING and asks the stopped node first (PROBE_TIMEOUT).
        let notice = 2 * PROBE_TIMEOUT + REQUEUE_REBALANCING + Duration::from_secs(2);
        assert!(
            late < ChronoDuration::from_std(notice).unwrap() && shrunk_at < from_restart,
            "shrunk {}ms after the original deadline: the timeout restarted with the operator \
             (restart + timeout = {})",
            late.num_milliseconds(),
            from_restart.to_rfc3339()
        );
        log(&format!(
            "StatefulSet shrunk {:.1}s after the original deadline ({:.1}s before restart + timeout)",
            late.num_milliseconds() as f64 / 1000.0,
            (from_restart - shrunk_at).num_milliseconds() as f64 / 1000.0
        ));
    })
    .await;
    // e2e-1, still trying, takes the kubelet's SIGTERM and goes.
    blocked.unblock();
    step(ns, "the timeout is reported and the node removed", async {
        wait_event(
            &client,
            ns,
            "Warning",
            "HandoffTimeout",
            &format!("e2e-1 did not finish handing off within {TIMEOUT_SECONDS}s"),
        )
        .await;
        wait_event(
            &client,
            ns,
            "Normal",
            "RebalanceFinished",
            "hand-off timed out on e2e-1",
        )
        .await;
        assert_eq!(count_events(&client, ns, "RebalanceStarted").await, 1);
        let o = wait_members(&ccs, &cms, std::slice::from_ref(&m0), 4).await;
        assert_eq!(o.cc.status.unwrap().rebalance, None);
        pods::wait_gone(&pods, "e2e-1").await;
        assert_eq!(
            reconcile_errors(&b.metrics),
            0,
            "{}",
            b.metrics.encode().unwrap()
        );
    })
    .await;
    b.stop().await;
}

// ------------------------------------------------------------------ API server outage

/// A TCP relay between the nodes and the API server that the test can cut:
/// [`Relay::kill`] closes the listening port and every forwarded connection.
struct Relay {
    port: u16,
    accepted: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    _accept: AbortOnDrop<()>,
}

impl Relay {
    /// Listens on 127.0.0.1:`port` (0: any) and forwards to `upstream`.
    async fn start(port: u16, upstream: String) -> Self {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 50, "cannot listen on 127.0.0.1:{port}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let mut stop = stop_rx.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    // Ends when either side closes, or when the relay is
                    // killed (or dropped): both sockets close then.
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = stop.wait_for(|s| *s) => {}
                    }
                });
            }
        });
        Self {
            port,
            accepted,
            stop,
            _accept: AbortOnDrop(Some(task)),
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// The API server "goes away": the port refuses connections and every
    /// open connection is closed.
    fn kill(self) {
        self.stop.send_replace(true);
        // Dropping the accept task drops the listener.
    }
}

/// `host:port` of the API server in the kubeconfig's current context, and
/// the name of that context's cluster entry.
fn api_server(kubeconfig: &Kubeconfig) -> (String, String, String) {
    let context = kubeconfig
        .current_context
        .as_deref()
        .expect("kubeconfig has a current context");
    let cluster = kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.clone())
        .expect("current context");
    let server = kubeconfig
        .clusters
        .iter()
        .find(|c| c.name == cluster)
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .expect("server of the current cluster");
    let uri: http::Uri = server.parse().expect("server URL");
    let host = uri.host().expect("server host").to_string();
    let port = uri.port_u16().unwrap_or(443);
    (cluster, host, port.to_string())
}

/// A copy of the kubeconfig at `path` whose current cluster is reached
/// through 127.0.0.1:`relay_port`; TLS still verifies the API server's
/// certificate (for its original host name). Returns the upstream address.
fn relay_kubeconfig(path: &str, relay_port: u16, out: &Path) -> String {
    let mut kubeconfig = Kubeconfig::read_from(path).unwrap();
    let (cluster, host, port) = api_server(&kubeconfig);
    for named in &mut kubeconfig.clusters {
        if named.name != cluster {
            continue;
        }
        let c = named.cluster.as_mut().unwrap();
        c.server = Some(format!("https://127.0.0.1:{relay_port}"));
        if host != "127.0.0.1" && c.tls_server_name.is_none() {
            c.tls_server_name = Some(host.trim_matches(['[', ']']).to_string());
        }
    }
    std::fs::write(out, serde_yaml::to_string(&kubeconfig).unwrap()).unwrap();
    format!("{host}:{port}")
}

/// The `kache-node` binary to run, or a panic saying how to get one.
fn node_binary() -> PathBuf {
    let path = std::env::var_os("KACHE_NODE_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(|d| PathBuf::from(d).join("release/kache-node"))
        })
        .unwrap_or_else(|| repo_root().join("target/release/kache-node"));
    assert!(
        path.is_file(),
        "the e2e outage test runs the real kache-node binary and found none at {}: build it with \
         `cargo build --release -p kache-node`, or point KACHE_NODE_BIN at one",
        path.display()
    );
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `kache-node` process (node or proxy), killed when dropped; its log
/// (stderr, `-v`) goes to a file.
struct Process {
    name: String,
    child: std::process::Child,
    port: u16,
    admin_port: u16,
    peer_port: u16,
    log: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Process {
    /// Starts a node (`--node-name name`) or a proxy on free ports,
    /// following the members ConfigMap of cluster "outage" in `ns` through
    /// the API server of `kubeconfig` (the `KUBECONFIG` variable), and waits
    /// until its admin port answers. A process that lost its "free" port to
    /// someone else exits at once: then it tries other ports.
    async fn start(
        bin: &Path,
        name: &str,
        proxy: bool,
        kubeconfig: &Path,
        dir: &Path,
        ns: &str,
    ) -> Self {
        for _ in 0..5 {
            let (port, admin_port, peer_port) = (free_port(), free_port(), free_port());
            let log = dir.join(format!("{name}.log"));
            let mut cmd = std::process::Command::new(bin);
            if proxy {
                cmd.arg("proxy");
            } else {
                cmd.args(["serve", "--node-name", name, "-m", "16"])
                    .args(["--peer-port", &peer_port.to_string()]);
            }
            cmd.args(["--cluster", "outage", "--namespace", ns])
                .args(["-l", "127.0.0.1", "-t", "1", "-v"])
                .args(["-p", &port.to_string()])
                .args(["--admin-port", &admin_port.to_string()])
                .env("KUBECONFIG", kubeconfig)
                .env_remove("POD_NAME")
                .env_remove("POD_NAMESPACE")
                .env_remove("KACHE_CLUSTER")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap());
            let child = cmd.spawn().expect("start kache-node");
            let mut p = Self {
                name: name.to_string(),
                child,
                port,
                admin_port,
                peer_port,
                log,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if p.child.try_wait().unwrap().is_some() {
                    break;
                }
                if http_get(admin_port, "/healthz")
                    .await
                    .is_ok_and(|(s, _)| s == 200)
                {
                    return p;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} did not answer on its admin port; log:\n{}",
                    p.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            println!(
                "{name} exited at start, retrying on other ports:\n{}",
                p.log_text()
            );
            p.log = PathBuf::new();
        }
        panic!("could not start {name} on free ports");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            host: "127.0.0.1".into(),
            ip: "127.0.0.1".into(),
            port: self.port,
            peer_port: self.peer_port,
        }
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("{} exited ({status}); log:\n{}", self.name, self.log_text());
        }
    }
}

/// One HTTP/1.1 GET of a process's admin port on loopback: (status, body).
async fn http_get(port: u16, path: &str) -> Result<(u16, String), String> {
    memcache::http_get("127.0.0.1", port, path).await
}

async fn config_get_cluster(port: u16) -> Result<String, String> {
    memcache::config_get_cluster("127.0.0.1", port).await
}

async fn set(port: u16, key: &str, value: &str) -> Result<(), String> {
    memcache::set("127.0.0.1", port, key, value).await
}

async fn get(port: u16, key: &str) -> Result<Option<String>, String> {
    memcache::get("127.0.0.1", port, key).await
}

/// The members ConfigMap as the operator writes it (`members.json`,
/// `cluster-config` and the version annotation).
async fn publish_members(cms: &Api<ConfigMap>, list: &MemberList) {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::members_configmap_name("outage")),
            annotations: Some(BTreeMap::from([(
                names::CONFIG_VERSION_ANNOTATION.to_string(),
                list.version.to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([
            (names::MEMBERS_JSON_KEY.to_string(), list.to_json().unwrap()),
            (
                names::CLUSTER_CONFIG_KEY.to_string(),
                list.elasticache_payload(),
            ),
        ])),
        ..Default::default()
    };
    let value = serde_json::to_value(&cm).unwrap();
    let mut doc = value.as_object().unwrap().clone();
    doc.insert("apiVersion".into(), json!("v1"));
    doc.insert("kind".into(), json!("ConfigMap"));
    cms.patch(
        &names::members_configmap_name("outage"),
        &PatchParams::apply(E2E_MANAGER).force(),
        &Patch::Apply(&serde_json::Value::Object(doc)),
    )
    .await
    .unwrap();
}

/// Every process answers `config get cluster` with `list`.
async fn wait_all_on(procs: &[&Process], list: &MemberList, what: &str) {
    let want = list.elasticache_config_reply();
    for p in procs {
        let want = want.clone();
        eventually(
            &format!("{} serves member list v{} ({what})", p.name, list.version),
            || {
                let want = want.clone();
                async move {
                    let got = config_get_cluster(p.port).await?;
                    if got == want {
                        Ok(())
                    } else {
                        Err(format!("{got:?}"))
                    }
                }
            },
        )
        .await;
    }
}

/// Removes a directory when dropped, unless the test failed (its logs help).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            println!("kept {} (node logs)", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Two nodes and a proxy follow the member list through a relay to the API
/// server. The relay is killed for a while (port closed, connections cut):
/// they keep answering `config get cluster` with the list they had, keep
/// serving gets and sets, and their admin endpoints stay healthy; a list
/// written meanwhile does not reach them. The relay comes back on the same
/// port: they reconnect on their own and pick up the list written during the
/// outage, then follow the next change live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_api_server_outage_nodes_keep_serving() {
    let Some(path) = kubeconfig_path("e2e_api_server_outage_nodes_keep_serving") else {
        return;
    };
    let bin = node_binary();
    init_tracing();
    let client = admin_client(&path).await;
    in_namespace(&client, "kache-e2e-outage", |ns| {
        api_server_outage(client.clone(), path.clone(), bin.clone(), ns)
    })
    .await;
}

async fn api_server_outage(client: Client, path: String, bin: PathBuf, ns: String) {
    const OUTAGE: Duration = Duration::from_secs(10);
    let ns = ns.as_str();
    let log = |msg: &str| println!("[{ns}] {msg}");
    let dir =
        TempDir(std::env::temp_dir().join(format!("kache-e2e-outage-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);

    // ---- The relay, and a kubeconfig that goes through it.
    let (_, host, port) = api_server(&Kubeconfig::read_from(&path).unwrap());
    let relay = Relay::start(0, format!("{host}:{port}")).await;
    let relay_port = relay.port;
    let kubeconfig = dir.0.join("kubeconfig");
    let upstream = relay_kubeconfig(&path, relay_port, &kubeconfig);
    log(&format!("relay 127.0.0.1:{relay_port} -> {upstream}"));

    // ---- Two nodes and a proxy of cluster "outage"; the list names node 0.
    let n0 = Process::start(&bin, "outage-0", false, &kubeconfig, &dir.0, ns).await;
    let n1 = Process::start(&bin, "outage-1", false, &kubeconfig, &dir.0, ns).await;
    let proxy = Process::start(&bin, "proxy", true, &kubeconfig, &dir.0, ns).await;
    let v1 = MemberList {
        version: 1,
        replication_factor: 1,
        members: vec![n0.member()],
    };
    v1.validate().unwrap();
    publish_members(&cms, &v1).await;
    let all = [&n0, &n1, &proxy];
    wait_all_on(&all, &v1, "through the relay").await;
    for p in &all {
        eventually(&format!("{} ready", p.name), || async move {
            match http_get(p.admin_port, "/readyz").await? {
                (200, _) => Ok(()),
                (s, b) => Err(format!("{s} {b}")),
            }
        })
        .await;
    }
    let mut keys = Vec::new();
    for i in 0..20 {
        let key = format!("before-{i}");
        set(proxy.port, &key, &format!("value-{i}")).await.unwrap();
        keys.push((key, format!("value-{i}")));
    }
    for (k, v) in &keys {
        assert_eq!(
            get(proxy.port, k).await.unwrap().as_deref(),
            Some(v.as_str())
        );
        assert_eq!(get(n0.port, k).await.unwrap().as_deref(), Some(v.as_str()));
    }
    let connections = relay.accepted();
    assert!(
        connections >= 3,
        "the nodes and the proxy reach the API server through the relay ({connections} connections)"
    );
    log(&format!(
        "outage-0, outage-1 and proxy serve member list v1 ({connections} connections through the relay)"
    ));

    // ---- The API server goes away.
    relay.kill();
    let outage_started = Instant::now();
    eventually("the relay port refuses connections", || async move {
        match TcpStream::connect(("127.0.0.1", relay_port)).await {
            Err(_) => Ok(()),
            Ok(_) => Err("still accepting".into()),
        }
    })
    .await;
    let v2 = MemberList {
        version: 2,
        replication_factor: 1,
        members: vec![n0.member(), n1.member()],
    };
    v2.validate().unwrap();
    let v1_reply = v1.elasticache_config_reply();
    let mut rounds = 0;
    let mut written_during = false;
    while outage_started.elapsed() < OUTAGE {
        if !written_during && outage_started.elapsed() >= OUTAGE / 2 {
            // Written while the nodes cannot see it (the test's own client
            // goes to the API server directly).
            publish_members(&cms, &v2).await;
            written_during = true;
        }
        for p in &all {
            assert_eq!(
                config_get_cluster(p.port).await.unwrap(),
                v1_reply,
                "{} keeps the last member list during the outage",
                p.name
            );
            let (status, body) = http_get(p.admin_port, "/readyz").await.unwrap();
            assert_eq!(status, 200, "{} /readyz during the outage: {body}", p.name);
        }
        for n in [&n0, &n1] {
            let (status, body) = http_get(n.admin_port, "/cluster").await.unwrap();
            assert_eq!(status, 200, "{} /cluster: {body}", n.name);
            let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(cluster["version"], 1, "{} /cluster: {body}", n.name);
        }
        let (key, value) = (format!("during-{rounds}"), format!("value-{rounds}"));
        set(proxy.port, &key, &value).await.unwrap();
        assert_eq!(get(proxy.port, &key).await.unwrap(), Some(value.clone()));
        assert_eq!(get(n0.port, &key).await.unwrap(), Some(value.clone()));
        // A node also serves clients that reach it directly.
        let direct = format!("direct-{rounds}");
        set(n1.port, &direct, "x").await.unwrap();
        assert_eq!(get(n1.port, &direct).await.unwrap().as_deref(), Some("x"));
        keys.push((key, value));
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Each noticed: its watch failed (and was retried) while the relay was gone.
    let mut procs = [n0, n1, proxy];
    let mut failures = Vec::new();
    for p in &mut procs {
        p.assert_running();
        let n = p.log_text().matches("member list watch failed").count();
        assert!(
            n > 0,
            "{} did not notice the outage; log:\n{}",
            p.name,
            p.log_text()
        );
        failures.push(format!("{} {n}", p.name));
    }
    let [n0, n1, proxy] = procs;
    let all = [&n0, &n1, &proxy];
    log(&format!(
        "API server unreachable for {:.1}s: {rounds} rounds of config get, get/set, /readyz and /cluster \
         on every process, all on v1; v2 written meanwhile; failed watch attempts: {}",
        outage_started.elapsed().as_secs_f64(),
        failures.join(", ")
    ));

    // ---- The relay comes back on the same port: they reconnect by themselves.
    let relay = Relay::start(relay_port, upstream).await;
    let restored = Instant::now();
    wait_all_on(&all, &v2, "after the relay came back").await;
    let reconnect = restored.elapsed();
    assert!(relay.accepted() >= 3, "they reconnected through the relay");
    log(&format!(
        "relay back: all three picked up v2 (written during the outage) within {:.1}s",
        reconnect.as_secs_f64()
    ));

    // ---- And follow the next change live.
    let v3 = MemberList {
        version: 3,
        replication_factor: 2,
        ..v2.clone()
    };
    let changed = Instant::now();
    publish_members(&cms, &v3).await;
    wait_all_on(&all, &v3, "a change after the outage").await;
    log(&format!(
        "v3 (replicationFactor 2) picked up within {:.1}s",
        changed.elapsed().as_secs_f64()
    ));
    for (k, v) in &keys {
        eventually(&format!("{k} readable through the proxy"), || async move {
            match get(proxy.port, k).await? {
                Some(got) if got == *v => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    for i in 0..20 {
        let (key, value) = (format!("after-{i}"), format!("value-{i}"));
        set(proxy.port, &key, &value).await.unwrap();
        assert_eq!(get(proxy.port, &key).await.unwrap(), Some(value));
    }
    for n in [&n0, &n1] {
        let (status, body) = http_get(n.admin_port, "/cluster").await.unwrap();
        assert_eq!(status, 200);
        let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(cluster["version"], 3, "{} /cluster: {body}", n.name);
    }
    log(&format!(
        "{} keys written before and during the outage read back through the proxy; \
         20 more written and read on v3",
        keys.len()
    ));
}
