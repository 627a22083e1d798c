#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]
//! Fault tests against a real Kubernetes cluster (1.28+): the operator
//! restarted in the middle of a scale-in of real pods, and the API server
//! going away under running nodes and a proxy.
//!
//! Every test runs real cache pods (the `kache-node:e2e` image
//! `tests/k8s/run.sh` loads). Faults are caused on the cluster's node, which
//! must be this machine (as the k8s kit's is): a departing node whose hand-off
//! must not finish yet has its process stopped with SIGSTOP, or its
//! connections to peers refused by iptables in its network namespace; the API
//! server is cut off from pods the same way.
//!
//! Like `e2e.rs` (whose helpers live in `support/`), every test runs only
//! when `KACHE_E2E_KUBECONFIG` names the kubeconfig of a cluster-admin, and
//! otherwise prints why it skipped and passes. Every test works in its own
//! namespace, deleted at the end whatever happens.
//!
//! ```sh
//! KACHE_E2E_KUBECONFIG=$HOME/.kube/config cargo test -p kache-operator --test e2e_faults -- --nocapture --test-threads 1
//! ```

mod support;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::chrono::{Duration as ChronoDuration, Utc};
use kache_cluster::{names, Member, MemberList};
use kache_operator::crd::{CacheCluster, RebalanceStatus};
use kache_operator::observe::pod_ip;
use kache_operator::probe::PROBE_TIMEOUT;
use kache_operator::reconcile::REQUEUE_REBALANCING;
use kube::api::{LogParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::diagnostics::step;
use support::*;

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
    let blocked = pods::Refused::peer_ports(&pods.get("e2e-1").await.unwrap());
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
    blocked.lift();
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

/// A kache-node pod of cluster "outage" (a node, or a proxy), following the members
/// ConfigMap through the API server with its ServiceAccount, as in a real cluster.
struct OutagePod {
    name: String,
    ip: String,
    port: u16,
    admin_port: u16,
    pod: Pod,
}

impl OutagePod {
    fn member(&self) -> Member {
        Member {
            name: self.name.clone(),
            host: self.ip.clone(),
            ip: self.ip.clone(),
            port: self.port,
            peer_port: names::PEER_PORT,
        }
    }

    async fn log_text(&self, pods: &Api<Pod>) -> String {
        pods.logs(&self.name, &LogParams::default())
            .await
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

/// The cluster the outage pods belong to (no CacheCluster: the test writes its member list).
const OUTAGE_CLUSTER: &str = "outage";

/// The nodes' identity exactly as the operator builds it (ServiceAccount `outage-node`,
/// allowed only to read the `outage-members` ConfigMap), without the owner reference: there
/// is no CacheCluster to own it, and the garbage collector would delete it.
async fn outage_rbac(client: &Client, ns: &str) {
    use kache_operator::build::{node_role, node_role_binding, node_service_account, ClusterRef};
    use kube::api::ObjectMeta;
    let cluster = ClusterRef {
        name: OUTAGE_CLUSTER.into(),
        namespace: ns.into(),
        owner: Default::default(),
    };
    fn unowned(meta: &mut ObjectMeta) {
        meta.owner_references = None;
    }
    let mut sa = node_service_account(&cluster);
    unowned(&mut sa.metadata);
    let mut role = node_role(&cluster);
    unowned(&mut role.metadata);
    let mut binding = node_role_binding(&cluster);
    unowned(&mut binding.metadata);
    let pp = PostParams::default();
    Api::namespaced(client.clone(), ns)
        .create(&pp, &sa)
        .await
        .unwrap();
    Api::namespaced(client.clone(), ns)
        .create(&pp, &role)
        .await
        .unwrap();
    Api::namespaced(client.clone(), ns)
        .create(&pp, &binding)
        .await
        .unwrap();
}

/// Starts pod `name` running `kache-node <args>` (restricted Pod Security Standard) and
/// waits until it runs with an IP and its admin port answers.
async fn outage_pod(
    pods: &Api<Pod>,
    name: &str,
    args: &[&str],
    port: u16,
    admin: u16,
) -> OutagePod {
    let doc = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "kache-e2e-outage"}},
        "spec": {
            "serviceAccountName": names::node_service_account_name(OUTAGE_CLUSTER),
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "kache-node", "image": NODE_IMAGE, "imagePullPolicy": "IfNotPresent",
                "args": args,
                "securityContext": {"allowPrivilegeEscalation": false,
                                    "readOnlyRootFilesystem": true,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    });
    let pod: Pod = serde_json::from_value(doc).unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let pod = pods::wait_pod(pods, name, "running with an IP", |p| {
        pod_ip(p).is_some()
            && p.status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Running")
    })
    .await;
    let ip = pod_ip(&pod).unwrap().to_string();
    let ip = ip.as_str();
    eventually(
        &format!("{name} answers on its admin port"),
        || async move {
            match memcache::http_get(ip, admin, "/healthz").await? {
                (200, _) => Ok(()),
                (s, b) => Err(format!("{s} {b}")),
            }
        },
    )
    .await;
    OutagePod {
        name: name.to_string(),
        ip: ip.to_string(),
        port,
        admin_port: admin,
        pod,
    }
}

/// The members ConfigMap as the operator writes it (`members.json`,
/// `cluster-config` and the version annotation).
async fn publish_members(cms: &Api<ConfigMap>, list: &MemberList) {
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(names::members_configmap_name(OUTAGE_CLUSTER)),
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
        &names::members_configmap_name(OUTAGE_CLUSTER),
        &PatchParams::apply(E2E_MANAGER).force(),
        &Patch::Apply(&serde_json::Value::Object(doc)),
    )
    .await
    .unwrap();
}

/// Every pod answers `config get cluster` with `list`.
async fn wait_all_on(all: &[&OutagePod], list: &MemberList, what: &str) {
    let want = list.elasticache_config_reply();
    for p in all {
        let want = want.clone();
        eventually(
            &format!("{} serves member list v{} ({what})", p.name, list.version),
            || {
                let want = want.clone();
                async move {
                    let got = memcache::config_get_cluster(&p.ip, p.port).await?;
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

/// Two node pods and a proxy pod follow the member list through the API server (the
/// `kubernetes` Service, with their ServiceAccount's token). Then the API server is cut off
/// from them for a while (iptables in each pod's network namespace refuses new
/// connections and `ss -K` aborts the open ones): they keep answering `config get
/// cluster` with the list they had, keep serving gets and sets, and their admin endpoints
/// stay healthy; a list written meanwhile does not reach them. Once the API server is
/// reachable again they reconnect on their own and pick up the list written during the
/// outage, then follow the next change live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_api_server_outage_nodes_keep_serving() {
    let Some(path) = kubeconfig_path("e2e_api_server_outage_nodes_keep_serving") else {
        return;
    };
    init_tracing();
    let client = admin_client(&path).await;
    in_namespace(&client, "kache-e2e-outage", |ns| {
        api_server_outage(client.clone(), ns)
    })
    .await;
}

async fn api_server_outage(client: Client, ns: String) {
    const OUTAGE: Duration = Duration::from_secs(10);
    let ns = ns.as_str();
    let log = |msg: &str| println!("[{ns}] {msg}");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);

    // ---- Where the pods reach the API server: the `kubernetes` Service.
    let kubernetes = Api::<Service>::namespaced(client.clone(), "default")
        .get("kubernetes")
        .await
        .unwrap();
    let spec = kubernetes.spec.unwrap();
    let api_ip = spec.cluster_ip.unwrap();
    let api_port = u16::try_from(spec.ports.unwrap()[0].port).unwrap();
    let api_ip = api_ip.as_str();

    // ---- Two nodes and a proxy of cluster "outage"; the list names node 0.
    outage_rbac(&client, ns).await;
    let node_args = |name: &'static str| {
        [
            "serve",
            "--node-name",
            name,
            "--cluster",
            OUTAGE_CLUSTER,
            "--namespace",
            ns,
            "-m",
            "16",
            "-t",
            "1",
            "-v",
        ]
    };
    let admin = names::ADMIN_PORT;
    let n0 = outage_pod(&pods, "outage-0", &node_args("outage-0"), 11211, admin).await;
    let n1 = outage_pod(&pods, "outage-1", &node_args("outage-1"), 11211, admin).await;
    let proxy_args = [
        "proxy",
        "--cluster",
        OUTAGE_CLUSTER,
        "--namespace",
        ns,
        "-l",
        "0.0.0.0",
        "-t",
        "1",
        "-v",
    ];
    let proxy = outage_pod(&pods, "proxy", &proxy_args, 11211, 11290).await;
    let v1 = MemberList {
        version: 1,
        replication_factor: 1,
        members: vec![n0.member()],
    };
    v1.validate().unwrap();
    publish_members(&cms, &v1).await;
    let all = [&n0, &n1, &proxy];
    wait_all_on(&all, &v1, "through the API server").await;
    for p in &all {
        eventually(&format!("{} ready", p.name), || async move {
            match memcache::http_get(&p.ip, p.admin_port, "/readyz").await? {
                (200, _) => Ok(()),
                (s, b) => Err(format!("{s} {b}")),
            }
        })
        .await;
    }
    let mut keys = Vec::new();
    for i in 0..20 {
        let key = format!("before-{i}");
        memcache::set(&proxy.ip, proxy.port, &key, &format!("value-{i}"))
            .await
            .unwrap();
        keys.push((key, format!("value-{i}")));
    }
    for (k, v) in &keys {
        let through_proxy = memcache::get(&proxy.ip, proxy.port, k).await.unwrap();
        assert_eq!(through_proxy.as_deref(), Some(v.as_str()));
        let on_n0 = memcache::get(&n0.ip, n0.port, k).await.unwrap();
        assert_eq!(on_n0.as_deref(), Some(v.as_str()));
    }
    for p in &all {
        let open = pods::Refused::established(&p.pod, api_ip, api_port);
        assert!(
            open > 0,
            "{} has no connection to the API server at {api_ip}:{api_port}",
            p.name
        );
    }
    log(&format!(
        "outage-0, outage-1 and proxy serve member list v1, each connected to the API server at \
         {api_ip}:{api_port}"
    ));

    // ---- The API server goes away (for these pods).
    let cut: Vec<pods::Refused> = all
        .iter()
        .map(|p| pods::Refused::api_server(&p.pod, api_ip, api_port))
        .collect();
    let outage_started = Instant::now();
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
            // Written while the pods cannot see it (the test's own client reaches the
            // API server from the host).
            publish_members(&cms, &v2).await;
            written_during = true;
        }
        for p in &all {
            assert_eq!(
                memcache::config_get_cluster(&p.ip, p.port).await.unwrap(),
                v1_reply,
                "{} keeps the last member list during the outage",
                p.name
            );
            let (status, body) = memcache::http_get(&p.ip, p.admin_port, "/readyz")
                .await
                .unwrap();
            assert_eq!(status, 200, "{} /readyz during the outage: {body}", p.name);
        }
        for n in [&n0, &n1] {
            let (status, body) = memcache::http_get(&n.ip, n.admin_port, "/cluster")
                .await
                .unwrap();
            assert_eq!(status, 200, "{} /cluster: {body}", n.name);
            let cluster: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(cluster["version"], 1, "{} /cluster: {body}", n.name);
        }
        let (key, value) = (format!("during-{rounds}"), format!("value-{rounds}"));
        memcache::set(&proxy.ip, proxy.port, &key, &value)
            .await
            .unwrap();
        let got = memcache::get(&proxy.ip, proxy.port, &key).await.unwrap();
        assert_eq!(got, Some(value.clone()));
        let got = memcache::get(&n0.ip, n0.port, &key).await.unwrap();
        assert_eq!(got, Some(value.clone()));
        // A node also serves clients that reach it directly.
        let direct = format!("direct-{rounds}");
        memcache::set(&n1.ip, n1.port, &direct, "x").await.unwrap();
        let got = memcache::get(&n1.ip, n1.port, &direct).await.unwrap();
        assert_eq!(got.as_deref(), Some("x"));
        keys.push((key, value));
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Each noticed: its watch failed (and was retried) while the API server was away.
    let mut failures = Vec::new();
    for p in &all {
        let text = p.log_text(&pods).await;
        let n = text.matches("member list watch failed").count();
        assert!(n > 0, "{} did not notice the outage; log:\n{text}", p.name);
        failures.push(format!("{} {n}", p.name));
        assert_eq!(
            pods::restarts(&pods.get(&p.name).await.unwrap()),
            0,
            "{}",
            p.name
        );
    }
    log(&format!(
        "API server unreachable for {:.1}s: {rounds} rounds of config get, get/set, /readyz and \
         /cluster on every pod, all on v1; v2 written meanwhile; failed watch attempts: {}",
        outage_started.elapsed().as_secs_f64(),
        failures.join(", ")
    ));

    // ---- The API server is reachable again: they reconnect by themselves.
    drop(cut);
    let restored = Instant::now();
    wait_all_on(&all, &v2, "after the API server came back").await;
    let reconnect = restored.elapsed();
    log(&format!(
        "API server back: all three picked up v2 (written during the outage) within {:.1}s",
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
    let proxy = &proxy;
    for (k, v) in &keys {
        eventually(&format!("{k} readable through the proxy"), || async move {
            match memcache::get(&proxy.ip, proxy.port, k).await? {
                Some(got) if got == *v => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }
    for i in 0..20 {
        let (key, value) = (format!("after-{i}"), format!("value-{i}"));
        memcache::set(&proxy.ip, proxy.port, &key, &value)
            .await
            .unwrap();
        let got = memcache::get(&proxy.ip, proxy.port, &key).await.unwrap();
        assert_eq!(got, Some(value));
    }
    for n in [&n0, &n1] {
        let (status, body) = memcache::http_get(&n.ip, n.admin_port, "/cluster")
            .await
            .unwrap();
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
