#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]
//! End-to-end tests against a real Kubernetes API server (1.28+).
//!
//! Runs only when `KACHE_E2E_KUBECONFIG` names a kubeconfig file (of a user
//! allowed to do everything, e.g. `cluster-admin`); otherwise every test
//! prints why it skipped and passes. Nothing here is faked: the CRD comes from
//! `crds/cachecluster.yaml`, the RBAC from the Helm chart, and the operator's
//! real controller (watches, reconcile loop, leader election) runs in-process
//! **as the chart's ServiceAccount** (the client impersonates it), so the
//! chart's ClusterRole is proven sufficient for everything exercised here.
//!
//! `make k8s-test` (tests/k8s/run.sh) runs it on the k8s kit's real cluster,
//! after the user journey (`tests/k8s/test_journey.py`); `make test` without a
//! cluster prints the skip. The pods are real: the StatefulSet controller
//! creates them, the scheduler places them (or, for a test that needs a pod
//! Pending, cannot: `support::pods::held`), the kubelet runs the
//! `kache-node:e2e` image run.sh loads and probes it, the nodes read their
//! member list with their ServiceAccount token, and the operator asks them for
//! their hand-off progress at their pod IPs, as it does in a cluster. Faults
//! are caused with real means on the node (a node's process stopped with
//! SIGSTOP so its probes fail and its hand-off stalls), which needs the
//! cluster's node to be this machine, as the kit's is.
//!
//! The chart is rendered with `helm template` (`$KACHE_E2E_HELM`, else `helm`
//! on `PATH`, else the copy `scripts/check-chart.sh` installs); without helm
//! the few template expressions of the RBAC templates are substituted directly.
//!
//! Every test works in its own namespace, which enforces the "restricted"
//! Pod Security Standard (so the pods the StatefulSet controller creates
//! from the operator's template must meet it), deleted at the end whatever
//! happens, together with the cluster-scoped ClusterRole and
//! ClusterRoleBinding it created. The CRD is left installed (other tests may
//! be using it). Every wait has a timeout and every test a time budget.
//!
//! ```sh
//! KACHE_E2E_KUBECONFIG=$HOME/.kube/config cargo test -p kache-operator --test e2e -- --nocapture
//! ```

mod support;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kache_cluster::{names, Member, MemberList};
use kache_operator::build;
use kache_operator::crd::{self, CacheCluster, MemberState};
use kache_operator::metrics::Metrics;
use kache_operator::reconcile::{run_controller, Context, Settings};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Api, Client, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use support::diagnostics::step;
use support::*;

/// Every request the operator makes (see `reconcile.rs` and `leader.rs`):
/// list+watch across all namespaces (the chart's default), writes in the
/// CacheCluster's namespace.
const OPERATOR_NEEDS: &[Access] = &[
    // Controller watches (all namespaces).
    access("list", "kache.dev", "cacheclusters", "", false),
    access("watch", "kache.dev", "cacheclusters", "", false),
    access("list", "apps", "statefulsets", "", false),
    access("watch", "apps", "statefulsets", "", false),
    access("list", "", "services", "", false),
    access("watch", "", "services", "", false),
    access("list", "", "configmaps", "", false),
    access("watch", "", "configmaps", "", false),
    access("list", "policy", "poddisruptionbudgets", "", false),
    access("watch", "policy", "poddisruptionbudgets", "", false),
    access("list", "", "pods", "", false),
    access("watch", "", "pods", "", false),
    access("list", "networking.k8s.io", "networkpolicies", "", false),
    access("watch", "networking.k8s.io", "networkpolicies", "", false),
    // Reconcile: server-side apply (create on first apply, then patch).
    access("patch", "kache.dev", "cacheclusters", "status", true),
    access("create", "", "serviceaccounts", "", true),
    access("patch", "", "serviceaccounts", "", true),
    access("create", "rbac.authorization.k8s.io", "roles", "", true),
    access("patch", "rbac.authorization.k8s.io", "roles", "", true),
    access(
        "create",
        "rbac.authorization.k8s.io",
        "rolebindings",
        "",
        true,
    ),
    access(
        "patch",
        "rbac.authorization.k8s.io",
        "rolebindings",
        "",
        true,
    ),
    access("create", "", "services", "", true),
    access("patch", "", "services", "", true),
    access("list", "", "pods", "", true),
    // Rolling updates: a node restarts by its pod being deleted; the one
    // drained first gets two annotations (server-side apply).
    access("delete", "", "pods", "", true),
    access("patch", "", "pods", "", true),
    // The StatefulSet is read with a list by name (scale-in state).
    access("list", "apps", "statefulsets", "", true),
    access("get", "", "configmaps", "", true),
    access("create", "", "configmaps", "", true),
    access("patch", "", "configmaps", "", true),
    access("create", "apps", "statefulsets", "", true),
    access("patch", "apps", "statefulsets", "", true),
    access("create", "policy", "poddisruptionbudgets", "", true),
    access("patch", "policy", "poddisruptionbudgets", "", true),
    // spec.networkPolicy: applied while enabled; when disabled, looked up
    // with a list by name and deleted.
    access("create", "networking.k8s.io", "networkpolicies", "", true),
    access("patch", "networking.k8s.io", "networkpolicies", "", true),
    access("list", "networking.k8s.io", "networkpolicies", "", true),
    access("delete", "networking.k8s.io", "networkpolicies", "", true),
    // The nodes' Role grants get/list/watch on a ConfigMap: RBAC only lets
    // the operator create it if it holds those permissions itself.
    access("list", "", "configmaps", "", true),
    access("watch", "", "configmaps", "", true),
    // Events (the recorder patches repeated events into a series).
    access("create", "events.k8s.io", "events", "", true),
    access("patch", "events.k8s.io", "events", "", true),
];

/// What the chart promises the operator cannot do.
const OPERATOR_MUST_NOT: &[Access] = &[
    // The TLS, auth and peer Secrets are mounted by name, never read.
    access("get", "", "secrets", "", true),
    access("list", "", "secrets", "", false),
    access("watch", "", "secrets", "", false),
    access("get", "", "secrets", "", false),
    access("update", "networking.k8s.io", "networkpolicies", "", true),
    access(
        "deletecollection",
        "networking.k8s.io",
        "networkpolicies",
        "",
        true,
    ),
    access("delete", "policy", "poddisruptionbudgets", "", true),
    access("delete", "apps", "statefulsets", "", true),
    access("delete", "", "services", "", true),
    access("delete", "", "configmaps", "", true),
    access("deletecollection", "", "pods", "", true),
    access("delete", "kache.dev", "cacheclusters", "", true),
    access("update", "kache.dev", "cacheclusters", "", true),
    access("patch", "kache.dev", "cacheclusters", "", true),
    access("create", "kache.dev", "cacheclusters", "", true),
    access("patch", "", "pods", "status", true),
    access("create", "", "pods", "", true),
    access("escalate", "rbac.authorization.k8s.io", "roles", "", true),
    access("bind", "rbac.authorization.k8s.io", "roles", "", true),
    access(
        "create",
        "rbac.authorization.k8s.io",
        "clusterroles",
        "",
        false,
    ),
    access("update", "coordination.k8s.io", "leases", "", true),
];

// ------------------------------------------------------------------ object checks

/// Asserts that everything in `want` (as JSON) is in `got` with the same
/// value: the API server kept every field the operator set (it may add
/// defaults). Lists must have the same length.
fn assert_subset(want: &Value, got: &Value, path: &str) {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                if wv.is_null() {
                    continue;
                }
                let gv = g
                    .get(k)
                    .unwrap_or_else(|| panic!("{path}.{k} is missing from the server's object"));
                assert_subset(wv, gv, &format!("{path}.{k}"));
            }
        }
        (Value::Array(w), Value::Array(g)) => {
            assert_eq!(w.len(), g.len(), "{path}: {want} vs {got}");
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                assert_subset(wv, gv, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(want, got, "{path}"),
    }
}

/// The spec (and metadata) the operator would build is what the server holds.
fn assert_built<K: Serialize>(want: &K, got: &K, what: &str) {
    let mut want = serde_json::to_value(want).unwrap();
    want.as_object_mut().unwrap().remove("status");
    assert_subset(&want, &serde_json::to_value(got).unwrap(), what);
}

/// Labels, the controller owner reference and the operator's field manager.
fn assert_owned(meta: &ObjectMeta, cc: &CacheCluster, what: &str) {
    let labels = meta.labels.clone().unwrap_or_default();
    for (k, v) in names::common_labels(&cc.name_any()) {
        assert_eq!(labels.get(&k), Some(&v), "{what}: label {k}");
    }
    let owners = meta.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{what}: exactly one owner: {owners:?}");
    let o = &owners[0];
    assert_eq!(o.api_version, "kache.dev/v1alpha1", "{what}");
    assert_eq!(o.kind, "CacheCluster", "{what}");
    assert_eq!(o.name, cc.name_any(), "{what}");
    assert_eq!(Some(&o.uid), cc.metadata.uid.as_ref(), "{what}");
    assert_eq!(o.controller, Some(true), "{what}: controller owner");
    // Not blocking: with blockOwnerDeletion the operator would need `update`
    // on cacheclusters/finalizers wherever the OwnerReferencesPermission-
    // Enforcement admission plugin runs, and the chart does not grant it.
    assert_ne!(o.block_owner_deletion, Some(true), "{what}");
    assert_applied_by_operator(meta, None, what);
}

/// `managedFields` shows a server-side apply by `kache-operator`.
fn assert_applied_by_operator(meta: &ObjectMeta, subresource: Option<&str>, what: &str) {
    let mf = meta.managed_fields.clone().unwrap_or_default();
    assert!(
        mf.iter()
            .any(|m| m.manager.as_deref() == Some(names::MANAGER)
                && m.operation.as_deref() == Some("Apply")
                && m.subresource.as_deref() == subresource),
        "{what}: no Apply entry of field manager {} (subresource {subresource:?}) in {:?}",
        names::MANAGER,
        mf.iter()
            .map(|m| (&m.manager, &m.operation, &m.subresource))
            .collect::<Vec<_>>()
    );
}

/// `kubectl get cacheclusters` as the server renders it (the Table API):
/// column names and the cells of the row of `e2e`.
async fn printed_columns(client: &Client, ns: &str) -> (Vec<String>, Vec<Value>) {
    let req = http::Request::get(format!(
        "/apis/kache.dev/v1alpha1/namespaces/{ns}/cacheclusters"
    ))
    .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
    .body(Vec::new())
    .unwrap();
    let table: Value = client.request(req).await.expect("table");
    assert_eq!(table["kind"], "Table", "{table}");
    let columns = table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let row = table["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == "e2e")
        .unwrap_or_else(|| panic!("no row for e2e in {table}"));
    (columns, row["cells"].as_array().unwrap().clone())
}

/// operator makes, and none of what the chart says it must not do. Checked
/// by the real RBAC authorizer (SubjectAccessReview).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_chart_rbac_grants_exactly_what_the_operator_uses() {
    let Some(path) = kubeconfig_path("e2e_chart_rbac_grants_exactly_what_the_operator_uses") else {
        return;
    };
    init_tracing();
    let client = admin_client(&path).await;
    install_crd(&client).await;
    in_namespace(&client, "kache-e2e-rbac", |ns| {
        check_chart_rbac(client.clone(), ns)
    })
    .await;
}

async fn check_chart_rbac(client: Client, ns: String) {
    let ns = ns.as_str();
    let cluster_role = install_chart_rbac(&client, ns).await;
    // Every permission the ClusterRole grants is one the operator uses.
    let mut unused = Vec::new();
    for rule in cluster_role.rules.clone().unwrap_or_default() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.clone().unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                let (res, sub) = resource.split_once('/').unwrap_or((&resource, ""));
                for verb in &rule.verbs {
                    let used = OPERATOR_NEEDS.iter().any(|a| {
                        a.group == group
                            && a.resource == res
                            && a.subresource == sub
                            && a.verb == verb
                    });
                    if !used {
                        unused.push(format!("{verb} {group}/{resource}"));
                    }
                }
            }
        }
    }
    assert!(
        unused.is_empty(),
        "the chart's ClusterRole grants what the operator never uses: {unused:?}"
    );
    let sa = service_account_user(ns, &operator_name(ns));
    // RBAC changes reach the authorizer through an informer: wait for it.
    wait_rbac_in_effect(&client, &sa, ns).await;
    let mut missing = Vec::new();
    for a in OPERATOR_NEEDS {
        if !allowed(&client, &sa, *a, ns, None).await {
            missing.push(*a);
        }
    }
    assert!(
        missing.is_empty(),
        "the chart's ClusterRole lacks {missing:#?}"
    );
    let mut excess = Vec::new();
    for a in OPERATOR_MUST_NOT {
        if allowed(&client, &sa, *a, ns, None).await {
            excess.push(*a);
        }
    }
    assert!(excess.is_empty(), "the chart's RBAC grants {excess:#?}");

    // Leader election: its own Lease only, in its own namespace only.
    let lease = operator_name(ns);
    for verb in ["get", "update"] {
        let a = access(verb, "coordination.k8s.io", "leases", "", true);
        assert!(
            allowed(&client, &sa, a, ns, Some(&lease)).await,
            "{verb} own Lease"
        );
        assert!(
            !allowed(&client, &sa, a, ns, Some("someone-else")).await,
            "{verb} another Lease"
        );
        assert!(
            !allowed(&client, &sa, a, "kube-system", Some(&lease)).await,
            "{verb} a Lease in another namespace"
        );
    }
    let create = access("create", "coordination.k8s.io", "leases", "", true);
    assert!(allowed(&client, &sa, create, ns, None).await);
    assert!(!allowed(&client, &sa, create, "kube-system", None).await);
    println!(
        "[{ns}] chart RBAC: {} required permissions granted, {} forbidden ones denied",
        OPERATOR_NEEDS.len(),
        OPERATOR_MUST_NOT.len()
    );
}

/// The whole life of a CacheCluster on real pods, with the operator running
/// as the chart's ServiceAccount: creation of every child, status, member
/// list and configVersion, printer columns, the scale subresource, a node
/// going NotReady, warm scale-in and its timeout, an invalid spec, deletion
/// and garbage collection. Each step is named (`support::diagnostics::step`):
/// a failure says which one it was in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_cachecluster_lifecycle() {
    let Some(path) = kubeconfig_path("e2e_cachecluster_lifecycle") else {
        return;
    };
    init_tracing();
    let client = admin_client(&path).await;
    let crd = install_crd(&client).await;
    // The served CRD keeps what the operator relies on.
    let v = &crd.spec.versions[0];
    let sub = v.subresources.as_ref().unwrap();
    assert!(sub.status.is_some());
    assert_eq!(
        sub.scale.as_ref().unwrap().label_selector_path.as_deref(),
        Some(".status.selector")
    );
    let _one_operator = ONE_OPERATOR.lock().await;
    in_namespace(&client, "kache-e2e-life", |ns| {
        lifecycle(client.clone(), path.clone(), ns)
    })
    .await;
}

/// The cluster under test and the operator reconciling it.
struct Life {
    client: Client,
    ns: String,
    op: OperatorProcess,
    ccs: Api<CacheCluster>,
    sts: Api<StatefulSet>,
    svcs: Api<Service>,
    cms: Api<ConfigMap>,
    pdbs: Api<PodDisruptionBudget>,
    sas: Api<ServiceAccount>,
    roles: Api<Role>,
    rbs: Api<RoleBinding>,
    pods: Api<Pod>,
}

impl Life {
    fn log(&self, msg: &str) {
        println!("[{}] {msg}", self.ns);
    }

    async fn patch_scale(&self, replicas: u32) {
        scale_to(&self.ccs, replicas).await;
    }

    async fn patch_spec(&self, spec: Value) {
        self.ccs
            .patch(
                "e2e",
                &PatchParams::default(),
                &Patch::Merge(&json!({ "spec": spec })),
            )
            .await
            .expect("patch spec");
    }

    /// Waits until pod `name` is Ready through the kubelet's readiness probe;
    /// returns it and the member it must be published as.
    async fn ready_member(&self, ordinal: u32) -> (Pod, Member) {
        let pod = pods::wait_ready(&self.pods, &format!("e2e-{ordinal}")).await;
        let ip = kache_operator::observe::pod_ip(&pod).unwrap();
        (pod, member(&self.ns, ordinal, &ip))
    }

    /// Waits until the StatefulSet has `replicas` and the status names
    /// `members` nodes (for the current generation).
    async fn wait_scaled(&self, replicas: i32, members: usize, what: &str) -> CacheCluster {
        eventually(what, || async move {
            let s = self.sts.get("e2e").await.map_err(|e| e.to_string())?;
            let cc = self.ccs.get("e2e").await.map_err(|e| e.to_string())?;
            let st = cc.status.clone().unwrap_or_default();
            let got = s.spec.and_then(|s| s.replicas);
            if got == Some(replicas)
                && st.members.len() == members
                && st.rebalance.is_none()
                && st.observed_generation == cc.metadata.generation
            {
                Ok(cc)
            } else {
                Err(format!(
                    "StatefulSet replicas {got:?}, status members {:?}, rebalance {:?}",
                    st.members.iter().map(|m| &m.name).collect::<Vec<_>>(),
                    st.rebalance
                ))
            }
        })
        .await
    }

    /// Waits until condition `type_` has `status` (and `reason`, if given).
    async fn wait_condition(
        &self,
        type_: &str,
        status: &str,
        reason: Option<&str>,
    ) -> CacheCluster {
        eventually(
            &format!("condition {type_}={status} (reason {reason:?})"),
            || async move {
                let cc = self.ccs.get("e2e").await.map_err(|e| e.to_string())?;
                let conds = cc.status.clone().unwrap_or_default().conditions;
                let ok = conds.iter().any(|c| {
                    c.type_ == type_ && c.status == status && reason.is_none_or(|r| c.reason == r)
                });
                if ok {
                    Ok(cc)
                } else {
                    Err(format!("{conds:?}"))
                }
            },
        )
        .await
    }

    async fn event(&self, type_: &str, reason: &str, note_has: &str) {
        wait_event(&self.client, &self.ns, type_, reason, note_has).await;
    }
}

async fn lifecycle(client: Client, path: String, ns: String) {
    let life = step(
        &ns,
        "1. the operator takes the Lease",
        start_operator(client, path, ns.clone()),
    )
    .await;
    let l = &life;
    step(
        &ns,
        "2. the CRD rejects invalid specs",
        crd_rejects_invalid_specs(l),
    )
    .await;
    let generation = step(
        &ns,
        "3. a minimal CacheCluster gets the schema's defaults",
        create_minimal(l),
    )
    .await;
    let cc = step(
        &ns,
        "4. status of a new cluster whose pod cannot be scheduled",
        new_cluster_status(l, generation),
    )
    .await;
    step(
        &ns,
        "5. every child exactly as built, owned by the CacheCluster",
        children_as_built(l, &cc),
    )
    .await;
    step(
        &ns,
        "6. printer columns",
        printer_columns_of_a_new_cluster(l),
    )
    .await;
    let m0 = step(
        &ns,
        "7. a Ready pod is published, and its node follows the list",
        first_pod_published(l),
    )
    .await;
    step(
        &ns,
        "8. reconciles that change nothing write nothing",
        no_op_reconciles(l),
    )
    .await;
    let m1 = step(
        &ns,
        "9. the scale subresource drives the StatefulSet",
        scale_subresource(l, &m0),
    )
    .await;
    let m1 = step(
        &ns,
        "10. a node that stops answering its probe leaves the list and comes back",
        not_ready_leaves_the_list(l, &m0, &m1),
    )
    .await;
    step(
        &ns,
        "11. warm scale-in waits for the real hand-off",
        warm_scale_in(l, &m0, &m1),
    )
    .await;
    step(
        &ns,
        "12. a hand-off that never finishes times out",
        scale_in_timeout(l, &m0),
    )
    .await;
    step(
        &ns,
        "13. an invalid spec degrades the cluster, a fixed one clears it",
        invalid_spec(l),
    )
    .await;
    step(
        &ns,
        "14. deletion garbage-collects every child",
        deletion(l),
    )
    .await;
    step(
        &ns,
        "15. the operator stops and releases the Lease",
        stop_operator(life),
    )
    .await;
}

async fn start_operator(client: Client, path: String, ns: String) -> Life {
    let operator_client = chart_operator_client(&client, &path, &ns).await;
    // Leader election first, as main.rs does: the chart's Role must allow it.
    // All namespaces, as the chart deploys it by default.
    let op = OperatorProcess::start_with(
        operator_client,
        &ns,
        "e2e-operator-0",
        LeaseTiming {
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        },
        Watch::AllNamespaces,
        &ns,
    )
    .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let lease = leases.get(&operator_name(&ns)).await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("e2e-operator-0"),
        "the operator holds the chart's Lease (leader-election Role)"
    );
    let life = Life {
        ccs: Api::namespaced(client.clone(), &ns),
        sts: Api::namespaced(client.clone(), &ns),
        svcs: Api::namespaced(client.clone(), &ns),
        cms: Api::namespaced(client.clone(), &ns),
        pdbs: Api::namespaced(client.clone(), &ns),
        sas: Api::namespaced(client.clone(), &ns),
        roles: Api::namespaced(client.clone(), &ns),
        rbs: Api::namespaced(client.clone(), &ns),
        pods: Api::namespaced(client.clone(), &ns),
        client,
        ns,
        op,
    };
    life.log("operator holds the leader Lease");
    life
}

async fn crd_rejects_invalid_specs(l: &Life) {
    // The CRD's CEL rule rejects replicationFactor > replicas.
    let bad: CacheCluster = serde_json::from_value(json!({
        "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
        "metadata": {"name": "bad"}, "spec": {"replicas": 1, "replicationFactor": 2}
    }))
    .unwrap();
    let err = l
        .ccs
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(r) if r.code == 422)
            && err
                .to_string()
                .contains("replicationFactor must not exceed replicas"),
        "CEL rule must reject it: {err}"
    );
    // The schema rejects out-of-range values and bad sizes, and the CEL rule an item larger
    // than half the memory.
    for (spec, needle) in [
        (json!({"replicas": -1}), "spec.replicas"),
        (json!({"maxItemSize": "4 MiB"}), "spec.maxItemSize"),
        (json!({"replicationFactor": 4}), "spec.replicationFactor"),
        (
            json!({"memoryMiB": 3, "maxItemSize": "2m"}),
            "maxItemSize must not exceed half of memoryMiB",
        ),
    ] {
        let bad: CacheCluster = serde_json::from_value(json!({
            "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
            "metadata": {"name": "bad"}, "spec": spec
        }))
        .unwrap();
        let err = l
            .ccs
            .create(&PostParams::default(), &bad)
            .await
            .unwrap_err();
        assert!(err.to_string().contains(needle), "{spec}: {err}");
    }
    l.log("CRD validation rejects invalid specs");
}

/// Creates `e2e` with one replica, its pods held back from scheduling
/// (`pods::held`) until step 7; returns its generation.
async fn create_minimal(l: &Life) -> Option<i64> {
    let cc: CacheCluster = serde_json::from_value(json!({
        "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
        "metadata": {"name": "e2e"}, "spec": pods::held(&l.ns, json!({"replicas": 1}))
    }))
    .unwrap();
    let created = l
        .ccs
        .create(&PostParams::default(), &cc)
        .await
        .expect("create CacheCluster");
    assert_eq!(
        created.spec,
        crd::CacheClusterSpec {
            replicas: 1,
            node_selector: Some(pods::held_selector(&l.ns)),
            ..Default::default()
        },
        "every default comes from the schema"
    );
    created.metadata.generation
}

async fn new_cluster_status(l: &Life, generation: Option<i64>) -> CacheCluster {
    // The scheduler really cannot place the pod (no node has the label yet):
    // the cluster says so, with the scheduler's reason.
    let cc = eventually("first status, with the unschedulable pod", || async move {
        let cc = l.ccs.get("e2e").await.map_err(|e| e.to_string())?;
        let st = cc.status.clone().unwrap_or_default();
        let unschedulable = st
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "Unschedulable");
        if st.observed_generation == generation && st.members.len() == 1 && unschedulable {
            Ok(cc)
        } else {
            Err(format!("{:?}", cc.status))
        }
    })
    .await;
    let st = cc.status.clone().unwrap();
    assert_eq!(st.selector, names::selector_string("e2e"));
    assert_eq!(
        st.selector,
        "app.kubernetes.io/component=cache-node,app.kubernetes.io/instance=e2e,app.kubernetes.io/name=kache"
    );
    assert_eq!(st.config_version, 1, "first list: version 1, no members");
    assert_eq!((st.replicas, st.ready_replicas), (1, 0));
    assert_eq!(st.members[0].name, "e2e-0");
    assert_eq!(st.members[0].host, format!("e2e-0.e2e-peers.{}.svc", l.ns));
    assert_eq!(st.members[0].state, MemberState::Pending);
    assert_eq!(st.members[0].port, 11211);
    let ready = condition(&st.conditions, "Ready");
    assert_eq!(
        (
            ready.status.as_str(),
            ready.reason.as_str(),
            ready.message.as_str()
        ),
        ("False", "NodesNotReady", "0/1 nodes ready")
    );
    assert_eq!(condition(&st.conditions, "Progressing").status, "True");
    let degraded = condition(&st.conditions, "Degraded");
    assert!(
        degraded
            .message
            .contains("didn't match Pod's node affinity/selector"),
        "the scheduler's reason: {}",
        degraded.message
    );
    for c in &st.conditions {
        assert_eq!(c.observed_generation, generation, "{c:?}");
    }
    assert_applied_by_operator(&cc.metadata, Some("status"), "CacheCluster status");
    l.event("Normal", "Created", "created StatefulSet e2e (1 nodes)")
        .await;
    l.log(&format!(
        "status: observedGeneration, selector, members, configVersion 1, Degraded: {}",
        degraded.message
    ));
    cc
}

/// What the builders take for `cc`, which must be valid.
fn desired(cc: &CacheCluster) -> build::ValidCluster {
    build::ValidCluster::new(cc, cc.spec.validate().unwrap()).unwrap()
}

async fn children_as_built(l: &Life, cc: &CacheCluster) {
    let s = l.sts.get("e2e").await.expect("StatefulSet");
    assert_owned(&s.metadata, cc, "StatefulSet");
    assert_built(
        &build::statefulset(&desired(cc), NODE_IMAGE),
        &s,
        "StatefulSet",
    );
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name, "e2e-peers");
    assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
    assert_eq!(
        spec.selector.match_labels.as_ref(),
        Some(&names::selector_labels("e2e"))
    );
    let pod_spec = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod_spec.service_account_name.as_deref(), Some("e2e-node"));
    assert_eq!(
        pod_spec.node_selector,
        Some(pods::held_selector(&l.ns)),
        "spec.nodeSelector reaches the pods"
    );
    // The kubelet's SIGKILL does not cut short the shutdown delay and grace.
    assert_eq!(pod_spec.termination_grace_period_seconds, Some(60));
    let psc = pod_spec.security_context.as_ref().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_eq!(psc.run_as_user, Some(65532));
    assert_eq!(
        psc.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let c = &pod_spec.containers[0];
    assert_eq!(c.name, "kache-node");
    assert_eq!(c.image.as_deref(), Some(NODE_IMAGE));
    assert_eq!(
        c.args.as_ref().unwrap().join(" "),
        "serve --listen 0.0.0.0 --port 11211 --memory-limit 64 --conn-limit 1024 --threads 4 \
         --max-item-size 1m --admin-port 11280 --peer-port 11212 --shutdown-delay 5 \
         --cluster e2e --memory-file /var/lib/kache/memory"
    );
    // spec.persistence (on by default): the memory file lives on a memory-backed emptyDir,
    // so a container that crashes restarts warm.
    let memory_file = pod_spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "memory-file")
        .and_then(|v| v.empty_dir.as_ref())
        .expect("an emptyDir volume for the memory file");
    assert_eq!(memory_file.medium.as_deref(), Some("Memory"));
    let mounts: Vec<_> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| (m.name.as_str(), m.mount_path.as_str(), m.read_only))
        .collect();
    assert_eq!(mounts, [("memory-file", "/var/lib/kache", None)]);
    let ports: Vec<_> = c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p.name.clone().unwrap(),
                p.container_port,
                p.protocol.clone().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("memcache".to_string(), 11211, "TCP".to_string()),
            ("peer".to_string(), 11212, "TCP".to_string()),
            ("admin".to_string(), 11280, "TCP".to_string())
        ]
    );
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let p = p.clone().unwrap();
        let h = p.http_get.unwrap();
        (
            h.path.unwrap(),
            serde_json::to_value(&h.port).unwrap(),
            p.period_seconds,
            p.failure_threshold,
            p.initial_delay_seconds,
        )
    };
    assert_eq!(
        probe(&c.readiness_probe),
        (
            "/readyz".to_string(),
            json!("admin"),
            Some(5),
            Some(2),
            None
        )
    );
    assert_eq!(
        probe(&c.liveness_probe),
        (
            "/healthz".to_string(),
            json!("admin"),
            Some(10),
            Some(3),
            Some(5)
        )
    );
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop,
        Some(vec!["ALL".into()])
    );
    let res = c.resources.as_ref().unwrap();
    // 64 MiB cache (in the memory file, with 1 MiB for its table) + 64 MiB headroom.
    assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "129Mi");
    assert_eq!(res.requests.as_ref().unwrap()["cpu"].0, "400m");

    let peers = l.svcs.get("e2e-peers").await.expect("peers Service");
    assert_owned(&peers.metadata, cc, "Service e2e-peers");
    assert_built(
        &build::peers_service(&desired(cc)),
        &peers,
        "Service e2e-peers",
    );
    let ps = peers.spec.as_ref().unwrap();
    assert_eq!(ps.cluster_ip.as_deref(), Some("None"), "headless");
    assert_eq!(ps.publish_not_ready_addresses, Some(true));
    let port_names: Vec<_> = ps
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| (p.name.clone().unwrap(), p.port))
        .collect();
    assert_eq!(
        port_names,
        [
            ("memcache".to_string(), 11211),
            ("peer".to_string(), 11212),
            ("admin".to_string(), 11280)
        ]
    );
    let client_svc = l.svcs.get("e2e").await.expect("client Service");
    assert_owned(&client_svc.metadata, cc, "Service e2e");
    assert_built(
        &build::client_service(&desired(cc)),
        &client_svc,
        "Service e2e",
    );
    let cs = client_svc.spec.as_ref().unwrap();
    assert_eq!(cs.type_.as_deref(), Some("ClusterIP"));
    assert!(cs.cluster_ip.as_deref().is_some_and(|ip| ip != "None"));
    assert_eq!(cs.selector, Some(names::selector_labels("e2e")));
    assert_eq!(cs.ports.as_ref().unwrap().len(), 1);

    let cm = l.cms.get("e2e-members").await.expect("members ConfigMap");
    assert_owned(&cm.metadata, cc, "ConfigMap e2e-members");
    assert_eq!(
        members_of(&cm),
        MemberList {
            version: 1,
            replication_factor: 1,
            members: vec![]
        }
    );
    assert_eq!(
        cm.data.as_ref().unwrap()[names::CLUSTER_CONFIG_KEY],
        "1\n\n"
    );
    assert_eq!(
        cm.metadata.annotations.as_ref().unwrap()[names::CONFIG_VERSION_ANNOTATION],
        "1"
    );

    let pdb = l.pdbs.get("e2e").await.expect("PodDisruptionBudget");
    assert_owned(&pdb.metadata, cc, "PodDisruptionBudget");
    assert_built(
        &build::pod_disruption_budget(&desired(cc)),
        &pdb,
        "PodDisruptionBudget",
    );
    assert_eq!(
        serde_json::to_value(&pdb.spec.as_ref().unwrap().max_unavailable).unwrap(),
        json!(1)
    );

    let sa = l.sas.get("e2e-node").await.expect("ServiceAccount");
    assert_owned(&sa.metadata, cc, "ServiceAccount");
    let role = l.roles.get("e2e-node").await.expect("Role");
    assert_owned(&role.metadata, cc, "Role");
    assert_built(&build::node_role(&desired(cc).cluster), &role, "Role");
    let rb = l.rbs.get("e2e-node").await.expect("RoleBinding");
    assert_owned(&rb.metadata, cc, "RoleBinding");
    assert_built(
        &build::node_role_binding(&desired(cc).cluster),
        &rb,
        "RoleBinding",
    );
    assert_eq!(rb.role_ref.name, "e2e-node");
    // The nodes may read their own member list, and nothing else.
    let node = service_account_user(&l.ns, "e2e-node");
    let get_cm = access("get", "", "configmaps", "", true);
    eventually("node Role in effect", || {
        let node = &node;
        async move {
            if allowed(&l.client, node, get_cm, &l.ns, Some("e2e-members")).await {
                Ok(())
            } else {
                Err("not yet allowed".into())
            }
        }
    })
    .await;
    assert!(!allowed(&l.client, &node, get_cm, &l.ns, Some("other")).await);
    let get_secrets = access("get", "", "secrets", "", true);
    assert!(!allowed(&l.client, &node, get_secrets, &l.ns, None).await);
    l.log("children: StatefulSet, 2 Services, ConfigMap, PDB, ServiceAccount, Role, RoleBinding");
}

async fn printer_columns_of_a_new_cluster(l: &Life) {
    let (columns, cells) = printed_columns(&l.client, &l.ns).await;
    assert_eq!(columns, ["Name", "Replicas", "Ready", "Config", "Age"]);
    assert_eq!(cells[..4], [json!("e2e"), json!(1), json!(0), json!(1)]);
    assert!(cells[4]
        .as_str()
        .is_some_and(|a| a.ends_with('s') || a.ends_with('m')));
}

/// Every node of `list` answers `config get cluster` with it: the nodes read
/// their member list through the API server (in-cluster ServiceAccount token,
/// the Role the operator made).
async fn nodes_follow(list: &MemberList) {
    let want = list.elasticache_config_reply();
    for m in &list.members {
        let want = &want;
        eventually(
            &format!("{} serves member list v{}", m.name, list.version),
            || async move {
                let got = memcache::config_get_cluster(&m.ip, m.port).await?;
                if got == *want {
                    Ok(())
                } else {
                    Err(format!("{got:?}"))
                }
            },
        )
        .await;
    }
}

async fn first_pod_published(l: &Life) -> Member {
    let pod = l
        .pods
        .get("e2e-0")
        .await
        .expect("pod e2e-0 from the StatefulSet controller");
    assert!(pod
        .owner_references()
        .iter()
        .any(|o| o.kind == "StatefulSet" && o.name == "e2e"));
    pods::allow_scheduling(&l.client, &l.ns, true).await;
    let (_, m0) = l.ready_member(0).await;
    let o = wait_members(&l.ccs, &l.cms, std::slice::from_ref(&m0), 2).await;
    let st = o.cc.status.clone().unwrap();
    assert_eq!(st.members[0].state, MemberState::Ready);
    assert_eq!(st.members[0].ip.as_deref(), Some(m0.ip.as_str()));
    assert_eq!(st.ready_replicas, 1);
    nodes_follow(&o.list).await;
    // Ready once the StatefulSet controller has counted the pod as well.
    let cc = l.wait_condition("Ready", "True", None).await;
    let st = cc.status.clone().unwrap();
    assert_eq!(condition(&st.conditions, "Ready").reason, "AllNodesReady");
    assert_eq!(condition(&st.conditions, "Progressing").status, "False");
    let degraded = condition(&st.conditions, "Degraded");
    assert_eq!(
        (degraded.status.as_str(), degraded.reason.as_str()),
        ("False", "AsExpected"),
        "the pod was scheduled: no longer degraded"
    );
    assert_eq!(st.config_version, 2);
    l.event(
        "Normal",
        "MembersChanged",
        "published member list version 2 with 1 member(s)",
    )
    .await;
    let (_, cells) = printed_columns(&l.client, &l.ns).await;
    assert_eq!(cells[1..4], [json!(1), json!(1), json!(2)]);
    l.log(&format!(
        "pod e2e-0 Ready at {}: member list version 2, served by the node; status Ready, printer columns 1/1/2",
        m0.ip
    ));
    m0
}

async fn no_op_reconciles(l: &Life) {
    let cm_rv = l.cms.get("e2e-members").await.unwrap().resource_version();
    let children_rvs = || async {
        vec![
            l.sts.get("e2e").await.unwrap().resource_version(),
            l.svcs.get("e2e").await.unwrap().resource_version(),
            l.svcs.get("e2e-peers").await.unwrap().resource_version(),
            l.pdbs.get("e2e").await.unwrap().resource_version(),
            l.sas.get("e2e-node").await.unwrap().resource_version(),
            l.roles.get("e2e-node").await.unwrap().resource_version(),
            l.rbs.get("e2e-node").await.unwrap().resource_version(),
        ]
    };
    let rvs = children_rvs().await;
    let before = l.op.finished_reconciles();
    // A metadata-only change of the CacheCluster and a pod label change both
    // trigger reconciles (CacheCluster and pod watches).
    let note = json!({"metadata": {"annotations": {"e2e.kache.dev/poke": "1"}}});
    l.ccs
        .patch("e2e", &PatchParams::default(), &Patch::Merge(&note))
        .await
        .unwrap();
    let cc_rv = l.ccs.get("e2e").await.unwrap().resource_version();
    let label = json!({"metadata": {"labels": {"e2e.kache.dev/poke": "1"}}});
    l.pods
        .patch("e2e-0", &PatchParams::default(), &Patch::Merge(&label))
        .await
        .unwrap();
    // Both reconciles finished: whatever they would write is written.
    l.op.wait_finished_reconciles(before, 2).await;
    let cc = l.ccs.get("e2e").await.unwrap();
    assert_eq!(
        cc.resource_version(),
        cc_rv,
        "no-op reconcile wrote the CacheCluster"
    );
    assert_eq!(cc.status.as_ref().unwrap().config_version, 2);
    assert_eq!(
        l.cms.get("e2e-members").await.unwrap().resource_version(),
        cm_rv,
        "no-op reconcile wrote the ConfigMap"
    );
    assert_eq!(
        children_rvs().await,
        rvs,
        "server-side applies of unchanged objects must not write them"
    );
    l.log(&format!(
        "{} no-op reconciles: configVersion, ConfigMap, status and children unchanged",
        l.op.finished_reconciles() - before
    ));
}

/// 1 → 2 through `/scale` while new pods cannot be scheduled (Pending pods
/// are not members), then the new pod runs and is published. Returns it.
async fn scale_subresource(l: &Life, m0: &Member) -> Member {
    let scale = l.ccs.get_scale("e2e").await.expect("get scale");
    assert_eq!(scale.spec.as_ref().unwrap().replicas, Some(1));
    let scale_status = scale.status.as_ref().unwrap();
    assert_eq!(scale_status.replicas, 1);
    assert_eq!(
        scale_status.selector.as_deref(),
        Some(names::selector_string("e2e").as_str())
    );
    pods::allow_scheduling(&l.client, &l.ns, false).await;
    l.patch_scale(2).await;
    l.wait_scaled(2, 2, "StatefulSet scaled to 2 and 2 members in status")
        .await;
    let st = l.ccs.get("e2e").await.unwrap().status.unwrap();
    assert_eq!(
        st.config_version, 2,
        "Pending pods are not members: the list did not change"
    );
    assert_eq!(
        st.members.iter().map(|m| m.state).collect::<Vec<_>>(),
        [MemberState::Ready, MemberState::Pending]
    );
    l.event("Normal", "SpecApplied", "StatefulSet e2e (2 nodes)")
        .await;
    let (_, cells) = printed_columns(&l.client, &l.ns).await;
    assert_eq!(cells[1..4], [json!(2), json!(1), json!(2)]);
    l.log("scaled to 2 through /scale: StatefulSet follows, Pending e2e-1 not published");

    pods::allow_scheduling(&l.client, &l.ns, true).await;
    let (_, m1) = l.ready_member(1).await;
    let o = wait_members(&l.ccs, &l.cms, &[m0.clone(), m1.clone()], 3).await;
    nodes_follow(&o.list).await;
    l.log("e2e-1 Ready: member list version 3, served by both nodes");
    m1
}

/// e2e-1's process is stopped (SIGSTOP): the kubelet's readiness probe
/// fails, the operator drops it (+1); continued, it is Ready again (+1).
async fn not_ready_leaves_the_list(l: &Life, m0: &Member, m1: &Member) -> Member {
    let pod = l.pods.get("e2e-1").await.unwrap();
    let frozen = pods::Frozen::freeze(&pod);
    let o = wait_members(&l.ccs, &l.cms, std::slice::from_ref(m0), 4).await;
    let states: Vec<_> =
        o.cc.status
            .unwrap()
            .members
            .iter()
            .map(|m| (m.name.clone(), m.state))
            .collect();
    assert_eq!(states[1], ("e2e-1".to_string(), MemberState::NotReady));
    l.event(
        "Normal",
        "MembersChanged",
        "published member list version 4 with 1 member(s)",
    )
    .await;
    frozen.thaw();
    let (pod, m1_again) = l.ready_member(1).await;
    assert_eq!(&m1_again, m1, "same pod, same address");
    assert_eq!(pods::restarts(&pod), 0, "continued, not restarted");
    let o = wait_members(&l.ccs, &l.cms, &[m0.clone(), m1.clone()], 5).await;
    nodes_follow(&o.list).await;
    l.log("e2e-1 stopped then continued: NotReady (v4), Ready again (v5)");
    m1_again
}

/// 2 → 3, data on the two highest nodes, then back to 1: the member list
/// drops them first while the StatefulSet keeps them (they are stopped, so
/// the hand-off cannot finish before the test has looked); continued, they
/// hand their data to e2e-0 and only then does the StatefulSet shrink.
async fn warm_scale_in(l: &Life, m0: &Member, m1: &Member) {
    l.patch_scale(3).await;
    let (_, m2) = l.ready_member(2).await;
    let o = wait_members(&l.ccs, &l.cms, &[m0.clone(), m1.clone(), m2.clone()], 6).await;
    nodes_follow(&o.list).await;
    let written = memcache::write_owned_keys(
        &m0.ip,
        &[("e2e-1", m1.ip.as_str()), ("e2e-2", m2.ip.as_str())],
        21,
        "warm",
    )
    .await;
    l.log(&format!(
        "3 nodes (v6); {} keys written to their owners e2e-1 and e2e-2",
        written.len()
    ));

    let departing: Vec<Pod> = [
        l.pods.get("e2e-1").await.unwrap(),
        l.pods.get("e2e-2").await.unwrap(),
    ]
    .into();
    let frozen: Vec<_> = departing.iter().map(pods::Frozen::freeze).collect();
    // Back to 1 through /scale: the member list drops e2e-1 and e2e-2 first,
    // while the StatefulSet keeps 3 pods and Rebalancing is True.
    l.patch_scale(1).await;
    let o = wait_members(&l.ccs, &l.cms, std::slice::from_ref(m0), 7).await;
    let st = eventually("Rebalancing True with status.rebalance", || async move {
        let st = status_of(&l.ccs).await?;
        let reb = st.conditions.iter().find(|c| c.type_ == "Rebalancing");
        if reb.is_some_and(|c| c.status == "True") && st.rebalance.is_some() {
            Ok(st)
        } else {
            Err(format!("{:?} {:?}", st.conditions, st.rebalance))
        }
    })
    .await;
    let reb = condition(&st.conditions, "Rebalancing");
    assert_eq!(reb.reason, "HandingOff");
    assert!(reb.message.contains("e2e-1, e2e-2"), "{}", reb.message);
    let r = st.rebalance.clone().unwrap();
    assert_eq!((r.target_replicas, r.current_replicas), (1, 3));
    assert_eq!(r.config_version, 7);
    assert_eq!(
        r.departing
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>(),
        ["e2e-1", "e2e-2"]
    );
    assert!(r.departing.iter().all(|d| !d.done));
    l.event("Normal", "RebalanceStarted", "without e2e-1, e2e-2")
        .await;
    // The operator keeps asking (it requeues) and keeps the pods meanwhile.
    let before = l.op.finished_reconciles();
    l.op.wait_finished_reconciles(before, 2).await;
    let s = l.sts.get("e2e").await.unwrap();
    assert_eq!(
        s.spec.unwrap().replicas,
        Some(3),
        "the StatefulSet keeps the departing pods while they hand off"
    );
    assert_eq!(
        l.pods
            .get("e2e-2")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp,
        None
    );
    assert_eq!(o.cc.status.unwrap().members.len(), 3);
    l.log(
        "scale to 1: member list v7 without e2e-1/e2e-2, StatefulSet held at 3, Rebalancing True",
    );

    // Continued, the departing nodes hand off their data: the StatefulSet shrinks.
    drop(frozen);
    l.wait_scaled(1, 1, "scaled down to 1 after the hand-off")
        .await;
    l.wait_condition("Rebalancing", "False", None).await;
    l.event(
        "Normal",
        "RebalanceFinished",
        "hand-off done (42 items sent, 42 acked, 0 failed); scaling StatefulSet from 3 to 1 nodes",
    )
    .await;
    for (key, value, _) in &written {
        assert_eq!(
            memcache::get(&m0.ip, m0.port, key)
                .await
                .unwrap()
                .as_deref(),
            Some(value.as_str()),
            "{key} handed off to e2e-0"
        );
    }
    let o = wait_members(&l.ccs, &l.cms, std::slice::from_ref(m0), 7).await;
    assert_eq!(o.cc.status.unwrap().ready_replicas, 1);
    l.log(&format!(
        "hand-off done: StatefulSet scaled to 1, RebalanceFinished; all {} keys on e2e-0",
        written.len()
    ));
}

/// Timeout path: 2 nodes, a 3 s timeout, and a departing node that never
/// finishes (stopped until the operator has given up on it).
async fn scale_in_timeout(l: &Life, m0: &Member) {
    l.patch_spec(json!({"replicas": 2, "scaleDownTimeoutSeconds": 3}))
        .await;
    let (pod, m1) = l.ready_member(1).await;
    wait_members(&l.ccs, &l.cms, &[m0.clone(), m1], 8).await;
    let frozen = pods::Frozen::freeze(&pod);
    l.patch_scale(1).await;
    wait_members(&l.ccs, &l.cms, std::slice::from_ref(m0), 9).await;
    l.event(
        "Warning",
        "HandoffTimeout",
        "e2e-1 did not finish handing off within 3s",
    )
    .await;
    l.event("Normal", "RebalanceFinished", "hand-off timed out on e2e-1")
        .await;
    // Continued, it takes the kubelet's SIGTERM at once.
    frozen.thaw();
    l.wait_scaled(1, 1, "scaled down to 1 after the timeout")
        .await;
    pods::wait_gone(&l.pods, "e2e-1").await;
    l.log("hand-off timeout: HandoffTimeout warning, StatefulSet scaled to 1 anyway");
}

async fn invalid_spec(l: &Life) {
    // The CEL rule also guards updates.
    let err = l
        .ccs
        .patch(
            "e2e",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"replicationFactor": 2}})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("replicationFactor must not exceed replicas"),
        "{err}"
    );
    // A spec the schema accepts but the operator rejects: Degraded and a
    // Warning event, nothing changed, no retry loop.
    let sts_before = l.sts.get("e2e").await.unwrap();
    let errors = reconcile_errors(&l.op.metrics);
    l.patch_spec(json!({"extraArgs": ["--port=1"]})).await;
    let bad_generation = l.ccs.get("e2e").await.unwrap().metadata.generation;
    let st = eventually("Degraded InvalidSpec", || async move {
        let st = status_of(&l.ccs).await?;
        let d = st.conditions.iter().find(|c| c.type_ == "Degraded");
        if d.is_some_and(|c| c.status == "True" && c.reason == "InvalidSpec")
            && st.observed_generation == bad_generation
        {
            Ok(st)
        } else {
            Err(format!("{:?}", st.conditions))
        }
    })
    .await;
    let d = condition(&st.conditions, "Degraded");
    assert!(d.message.contains("must not set --port"), "{}", d.message);
    assert_eq!(condition(&st.conditions, "Ready").status, "False");
    assert_eq!(condition(&st.conditions, "Ready").reason, "InvalidSpec");
    assert_eq!(condition(&st.conditions, "Progressing").status, "False");
    assert_eq!(st.config_version, 9, "the member list is kept");
    l.event("Warning", "InvalidSpec", "must not set --port")
        .await;
    // One more reconcile of the same invalid generation (a metadata-only change):
    // once it has finished, nothing may have been applied, failed or warned twice.
    let finished = l.op.finished_reconciles();
    let reconciles = l.op.metrics.reconciles.get();
    let poke = json!({"metadata": {"annotations": {"e2e.kache.dev/poke": "2"}}});
    l.ccs
        .patch("e2e", &PatchParams::default(), &Patch::Merge(&poke))
        .await
        .unwrap();
    l.op.wait_finished_reconciles(finished, 1).await;
    let sts_after = l.sts.get("e2e").await.unwrap();
    assert_eq!(
        sts_after.metadata.generation, sts_before.metadata.generation,
        "the invalid spec was not applied"
    );
    assert!(
        !sts_after.spec.unwrap().template.spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .contains(&"--port=1".to_string())
    );
    assert_eq!(
        reconcile_errors(&l.op.metrics),
        errors,
        "an invalid spec is reported, not retried as an error"
    );
    assert!(
        l.op.metrics.reconciles.get() - reconciles <= 2,
        "an invalid spec must not cause a retry loop ({} reconciles for one change)",
        l.op.metrics.reconciles.get() - reconciles
    );
    let warnings = events_of(&l.client, &l.ns, "e2e")
        .await
        .into_iter()
        .filter(|(t, r, _)| t == "Warning" && r == "InvalidSpec")
        .count();
    assert_eq!(warnings, 1, "one Warning per invalid generation");
    l.log("invalid extraArgs: Degraded/InvalidSpec, Warning event, StatefulSet untouched");

    // Fixing the spec clears Degraded.
    l.patch_spec(json!({"extraArgs": null})).await;
    eventually("Degraded cleared", || async move {
        let cc = l.ccs.get("e2e").await.map_err(|e| e.to_string())?;
        let st = cc.status.clone().unwrap_or_default();
        let ok = st.observed_generation == cc.metadata.generation
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == "Degraded" && c.status == "False")
            && st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        if ok {
            Ok(())
        } else {
            Err(format!("{:?}", st.conditions))
        }
    })
    .await;
    l.log("valid spec again: Degraded False, Ready True");
    // No reconcile failed so far (e.g. for lack of a permission).
    assert_eq!(
        reconcile_errors(&l.op.metrics),
        0,
        "{}",
        l.op.metrics.encode().unwrap()
    );
}

async fn deletion(l: &Life) {
    l.ccs.delete("e2e", &DeleteParams::default()).await.unwrap();
    async fn gone<K>(api: &Api<K>, name: &str, what: &str)
    where
        K: Clone + DeserializeOwned + Debug,
    {
        eventually(&format!("{what} {name} garbage-collected"), || async move {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still there".into()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }
    gone(&l.ccs, "e2e", "CacheCluster").await;
    gone(&l.sts, "e2e", "StatefulSet").await;
    gone(&l.svcs, "e2e", "Service").await;
    gone(&l.svcs, "e2e-peers", "Service").await;
    gone(&l.cms, "e2e-members", "ConfigMap").await;
    gone(&l.pdbs, "e2e", "PodDisruptionBudget").await;
    gone(&l.sas, "e2e-node", "ServiceAccount").await;
    gone(&l.roles, "e2e-node", "Role").await;
    gone(&l.rbs, "e2e-node", "RoleBinding").await;
    gone(&l.pods, "e2e-0", "Pod").await;
    l.log("CacheCluster deleted: every child garbage-collected");
}

async fn stop_operator(life: Life) {
    let leases: Api<Lease> = Api::namespaced(life.client.clone(), &life.ns);
    let reconciles = life.op.metrics.reconciles.get();
    let (ns, lease_name) = (life.ns.clone(), operator_name(&life.ns));
    life.op.stop().await;
    let lease = leases.get(&lease_name).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity, None, "Lease released");
    println!("[{ns}] operator stopped, Lease released; {reconciles} reconciles");
}

/// The security settings against a real API server: Secrets mounted by name
/// (the operator, as the chart's ServiceAccount, cannot read them), pods
/// admitted in a namespace enforcing the "restricted" Pod Security Standard,
/// and the NetworkPolicy created with the right rules, deleted when
/// disabled, recreated when enabled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_security_settings() {
    with_operator_namespace("e2e_security_settings", "kache-e2e-sec", security).await;
}

async fn security(client: Client, path: String, ns: String) {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let ns = ns.as_str();
    let log = |msg: &str| println!("[{ns}] {msg}");
    const OPERATOR_NS: &str = "kache-operator-home";

    // The namespace really enforces "restricted": a root pod is rejected.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let root_pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "root"},
        "spec": {"containers": [{"name": "c", "image": "busybox",
            "securityContext": {"runAsUser": 0}}]}
    }))
    .unwrap();
    let err = pods
        .create(&PostParams::default(), &root_pod)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(r) if r.code == 403)
            && err.to_string().contains("restricted"),
        "PodSecurity must reject a non-compliant pod: {err}"
    );
    log("namespace enforces the restricted Pod Security Standard");

    // ---- The operator, in-process, as the chart's ServiceAccount.
    install_chart_rbac(&client, ns).await;
    let sa_name = operator_name(ns);
    let sa_user = service_account_user(ns, &sa_name);
    wait_rbac_in_effect(&client, &sa_user, ns).await;
    let operator_client = impersonating_client(&path, ns, &sa_name).await;
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context::new(
        operator_client,
        Settings {
            node_image: NODE_IMAGE.into(),
            node_admin_port: names::ADMIN_PORT,
            operator_namespace: OPERATOR_NS.into(),
        },
        metrics.clone(),
        Reporter {
            controller: names::MANAGER.into(),
            instance: Some("e2e-operator-0".into()),
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = AbortOnDrop(Some(tokio::spawn(run_controller(ctx, None, async move {
        let _ = stop_rx.await;
    }))));

    // ---- The Secrets (placeholder data: the pods stay Pending, held back from
    // scheduling by `pods::held`: admission is what this test checks; the journey runs
    // examples/cachecluster-secure.yaml with real certificates on running pods).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (name, data) in [
        (
            "e2e-tls",
            json!({"tls.crt": "placeholder", "tls.key": "placeholder", "ca.crt": "placeholder"}),
        ),
        ("e2e-auth", json!({"auth-file": "app:placeholder\n"})),
        ("e2e-peer", json!({"secret": "placeholder"})),
    ] {
        let secret: Secret = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "stringData": data
        }))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }

    // ---- A CacheCluster with every security setting.
    let ccs: Api<CacheCluster> = Api::namespaced(client.clone(), ns);
    let cc: CacheCluster = serde_json::from_value(json!({
        "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
        "metadata": {"name": "e2e"},
        "spec": pods::held(ns, json!({
            "replicas": 2,
            "tls": {"secretName": "e2e-tls", "clientAuth": true},
            "auth": {"secretName": "e2e-auth"},
            "peerAuth": {"secretName": "e2e-peer"},
            "networkPolicy": {
                "enabled": true,
                "clientNamespaceSelector": {"matchLabels": {"team": "web"}},
                "clientPodSelector": {"matchLabels": {"app": "shop"}}
            }
        }))
    }))
    .unwrap();
    let created = ccs.create(&PostParams::default(), &cc).await.unwrap();
    assert!(
        !created.spec.tls.as_ref().unwrap().secret_name.is_empty()
            && created.spec.network_policy.as_ref().unwrap().enabled
    );
    // The schema rejects a bad Secret name.
    let bad: CacheCluster = serde_json::from_value(json!({
        "apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
        "metadata": {"name": "bad"}, "spec": {"auth": {"secretName": "Not_A_Name"}}
    }))
    .unwrap();
    let err = ccs.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(err.to_string().contains("spec.auth.secretName"), "{err}");

    // ---- The NetworkPolicy, exactly as built, owned by the CacheCluster.
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), ns);
    let np = eventually("NetworkPolicy e2e", || {
        let nps = nps.clone();
        async move {
            nps.get_opt("e2e")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not there yet".to_string())
        }
    })
    .await;
    let cc = ccs.get("e2e").await.unwrap();
    assert_owned(&np.metadata, &cc, "NetworkPolicy");
    assert_built(
        &build::network_policy(&desired(&cc), OPERATOR_NS).unwrap(),
        &np,
        "NetworkPolicy",
    );
    let spec = serde_json::to_value(np.spec.as_ref().unwrap()).unwrap();
    let own = json!({"matchLabels": names::selector_labels("e2e")});
    assert_eq!(spec["podSelector"], own);
    assert_eq!(spec["policyTypes"], json!(["Ingress"]));
    assert_eq!(
        spec["ingress"],
        json!([
            {"from": [{"podSelector": own}], "ports": [{"protocol": "TCP", "port": 11212}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "web"}},
                       "podSelector": {"matchLabels": {"app": "shop"}}}],
             "ports": [{"protocol": "TCP", "port": 11211}]},
            {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": OPERATOR_NS}}}],
             "ports": [{"protocol": "TCP", "port": 11280}]},
        ])
    );
    wait_event(&client, ns, "Normal", "Created", "NetworkPolicy").await;
    log("NetworkPolicy e2e: peers from own pods, clients by selector, admin from the operator's namespace");

    // ---- The pods: admitted under "restricted", Secrets mounted read-only.
    for name in ["e2e-0", "e2e-1"] {
        let pod = eventually(
            &format!("pod {name} created (PodSecurity admits it)"),
            || {
                let pods = pods.clone();
                async move {
                    pods.get_opt(name)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or_else(|| {
                            "not created (see the StatefulSet's FailedCreate events)".into()
                        })
                }
            },
        )
        .await;
        let spec = pod.spec.unwrap();
        let volumes: Vec<_> = spec
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref().map(|s| (v.name.clone(), s.clone())))
            .collect();
        let named: Vec<_> = volumes
            .iter()
            .map(|(v, s)| (v.as_str(), s.secret_name.as_deref().unwrap()))
            .collect();
        assert_eq!(
            named,
            [
                ("tls", "e2e-tls"),
                ("auth", "e2e-auth"),
                ("peer-secret", "e2e-peer")
            ]
        );
        for (_, s) in &volumes {
            assert_eq!(s.default_mode, Some(0o440));
        }
        let c = &spec.containers[0];
        let args = c.args.as_ref().unwrap().join(" ");
        for flag in [
            "--tls-cert /etc/kache/tls/tls.crt",
            "--tls-key /etc/kache/tls/tls.key",
            "--tls-client-ca /etc/kache/tls/ca.crt",
            "--auth-file /etc/kache/auth/auth-file",
            "--peer-secret-file /etc/kache/peer/secret",
        ] {
            assert!(args.contains(flag), "{name}: {flag} in {args}");
        }
        // Secrets are mounted read-only; only the memory file's volume is writable.
        for m in c.volume_mounts.iter().flatten() {
            let writable = m.read_only != Some(true);
            assert_eq!(
                writable,
                m.name == "memory-file",
                "{name}: mount {}",
                m.name
            );
        }
    }
    log("pods e2e-0 and e2e-1 admitted under restricted, Secrets mounted read-only");

    // ---- Disabling deletes the NetworkPolicy; enabling brings it back.
    async fn np_gone(nps: &Api<NetworkPolicy>, what: &str) {
        eventually(what, || async move {
            match nps.get_opt("e2e").await {
                Ok(None) => Ok(()),
                Ok(Some(_)) => Err("still there".into()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }
    let set_np = |np: Value| {
        let ccs = ccs.clone();
        async move {
            ccs.patch(
                "e2e",
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"networkPolicy": np}})),
            )
            .await
            .unwrap();
        }
    };
    set_np(json!({"enabled": false})).await;
    np_gone(&nps, "NetworkPolicy deleted after enabled: false").await;
    wait_event(
        &client,
        ns,
        "Normal",
        "NetworkPolicyDeleted",
        "deleted NetworkPolicy e2e",
    )
    .await;
    log("networkPolicy.enabled=false: NetworkPolicy deleted");

    set_np(json!({"enabled": true, "clientNamespaceSelector": null, "clientPodSelector": null}))
        .await;
    let np = eventually("NetworkPolicy recreated", || {
        let nps = nps.clone();
        async move {
            nps.get_opt("e2e")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not there yet".to_string())
        }
    })
    .await;
    let spec = serde_json::to_value(np.spec.unwrap()).unwrap();
    assert_eq!(
        spec["ingress"][1]["from"],
        json!([{"podSelector": {}}]),
        "no client selector: every pod of the namespace"
    );
    set_np(Value::Null).await;
    np_gone(
        &nps,
        "NetworkPolicy deleted after removing spec.networkPolicy",
    )
    .await;
    log("re-enabled (clients: same namespace), then removed: created, then deleted");

    // A NetworkPolicy the operator does not control is left alone.
    let foreign: NetworkPolicy = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "e2e"}, "spec": {"podSelector": {}}
    }))
    .unwrap();
    nps.create(&PostParams::default(), &foreign).await.unwrap();
    let before = ccs.get("e2e").await.unwrap().status.unwrap();
    // A spec change forces a reconcile; wait until it was observed.
    ccs.patch(
        "e2e",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": 1}})),
    )
    .await
    .unwrap();
    eventually("spec change observed", || {
        let ccs = ccs.clone();
        async move {
            let cc = ccs.get("e2e").await.map_err(|e| e.to_string())?;
            let st = cc.status.clone().unwrap_or_default();
            if st.observed_generation == cc.metadata.generation {
                Ok(())
            } else {
                Err(format!(
                    "{:?} vs {:?}",
                    st.observed_generation, cc.metadata.generation
                ))
            }
        }
    })
    .await;
    assert_ne!(before.observed_generation, None);
    assert!(
        nps.get_opt("e2e").await.unwrap().is_some(),
        "someone else's NetworkPolicy must survive"
    );
    log("a NetworkPolicy of someone else is left alone");

    // Nothing failed (e.g. for lack of a permission: the chart's ClusterRole
    // grants no access to Secrets at all).
    assert_eq!(
        reconcile_errors(&metrics),
        0,
        "{}",
        metrics.encode().unwrap()
    );
    let _ = stop_tx.send(());
    controller.join("controller").await;
}
