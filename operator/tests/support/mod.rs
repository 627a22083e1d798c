//! Helpers shared by the end-to-end suites (`e2e.rs`, `e2e_faults.rs`) that
//! run against a real Kubernetes cluster named by `KACHE_E2E_KUBECONFIG`: its
//! API server, and its node's kubelet running the cache pods (`pods`), whose
//! processes the fault tests reach on this machine.
//! Each test binary uses a different subset of them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod diagnostics;
pub mod memcache;
pub mod pods;

use futures::FutureExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kache_cluster::{names, Member, MemberList};
use kache_operator::crd::{self, CacheCluster};
use kache_operator::metrics::{ErrorLabels, Metrics};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize as _, Serialize};
use serde_json::{json, Value};
use std::fmt::Debug;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const ENV: &str = "KACHE_E2E_KUBECONFIG";
pub const HELM_ENV: &str = "KACHE_E2E_HELM";
/// Longest wait for any one condition.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a whole test may run (cleanup not included): real pods start, stop
/// (after their shutdown delay) and hand off at a crawl where a test needs it.
pub const TEST_BUDGET: Duration = Duration::from_secs(420);
/// Longest the cleanup may wait for the namespace to disappear.
pub const CLEANUP_TIMEOUT: Duration = Duration::from_secs(90);
/// Image the in-process operator gives CacheClusters that set none.
pub const NODE_IMAGE: &str = "ghcr.io/kache-dev/kache-node:e2e";
/// Field manager of objects this suite writes itself.
pub const E2E_MANAGER: &str = "kache-e2e";

/// Held by every test that runs an in-process operator: each watches all
/// namespaces (as the chart deploys it), so two at once would both reconcile
/// every CacheCluster, with different settings.
pub static ONE_OPERATOR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ------------------------------------------------------------------ plumbing

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The kubeconfig path, or `None` (after printing why) when the suite is off.
pub fn kubeconfig_path(test: &str) -> Option<String> {
    match std::env::var(ENV) {
        Ok(p) if !p.is_empty() => Some(p),
        _ => {
            println!(
                "skipping e2e test {test}: {ENV} is not set (`make k8s-test` runs it on the \
                 k8s kit's cluster; or point it at the kubeconfig of a Kubernetes 1.28+ \
                 cluster-admin)"
            );
            None
        }
    }
}

pub fn init_tracing() {
    // Operator logs, only when asked for with RUST_LOG.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub async fn config_from(path: &str) -> Config {
    let kubeconfig =
        Kubeconfig::read_from(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("valid kubeconfig")
}

pub async fn admin_client(path: &str) -> Client {
    Client::try_from(config_from(path).await).expect("client")
}

pub fn service_account_user(ns: &str, sa: &str) -> (String, Vec<String>) {
    (
        format!("system:serviceaccount:{ns}:{sa}"),
        vec![
            "system:serviceaccounts".into(),
            format!("system:serviceaccounts:{ns}"),
            "system:authenticated".into(),
        ],
    )
}

/// A client that acts as ServiceAccount `ns/sa` (user and groups exactly as
/// the API server authenticates a ServiceAccount token).
pub async fn impersonating_client(path: &str, ns: &str, sa: &str) -> Client {
    let mut config = config_from(path).await;
    let (user, groups) = service_account_user(ns, sa);
    config.auth_info.impersonate = Some(user);
    config.auth_info.impersonate_groups = Some(groups);
    Client::try_from(config).expect("impersonating client")
}

/// Polls `f` every 250ms until it yields `Ok`, or panics after `TIMEOUT`
/// with the last reason it gave for not being there yet.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let last = match f().await {
            Ok(v) => return v,
            Err(e) => e,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {TIMEOUT:?} waiting for {what}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Aborts a spawned task when dropped (also when a test panics).
pub struct AbortOnDrop<T>(pub Option<tokio::task::JoinHandle<T>>);

impl<T> AbortOnDrop<T> {
    pub async fn join(mut self, what: &str) -> T {
        let handle = self.0.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .unwrap_or_else(|_| panic!("{what} did not stop within 30s"))
            .unwrap_or_else(|e| panic!("{what} failed: {e}"))
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
        }
    }
}

pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(r) if r.code == 404)
}

/// Name of the chart's operator objects (ClusterRole, ClusterRoleBinding,
/// ServiceAccount, Lease) when the Helm release is named after the namespace.
pub fn operator_name(ns: &str) -> String {
    // The namespace contains "kache", so the chart's fullname is the release name.
    format!("{ns}-operator")
}

/// Labels of every test namespace: the API server's PodSecurity admission
/// enforces the "restricted" Pod Security Standard there, so the
/// StatefulSet controller's pod creations fail unless the operator's pod
/// template meets it.
pub fn namespace_labels() -> std::collections::BTreeMap<String, String> {
    [
        ("kache.dev/e2e", "true"),
        ("pod-security.kubernetes.io/enforce", "restricted"),
        ("pod-security.kubernetes.io/enforce-version", "latest"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The start every operator e2e test shares: skipped, with the reason printed, when no
/// cluster is configured; otherwise the CRD installed, the one-operator lock held, and
/// `body(client, kubeconfig path, namespace)` run by `in_namespace`.
pub async fn with_operator_namespace<F, Fut>(test: &str, prefix: &str, body: F)
where
    F: FnOnce(Client, String, String) -> Fut,
    Fut: Future<Output = ()>,
{
    let Some(path) = kubeconfig_path(test) else {
        return;
    };
    init_tracing();
    let client = admin_client(&path).await;
    install_crd(&client).await;
    let _one_operator = ONE_OPERATOR.lock().await;
    in_namespace(&client, prefix, |ns| body(client.clone(), path.clone(), ns)).await;
}

/// Runs `body` in a fresh namespace `<prefix>-<pid>` within `TEST_BUDGET`,
/// then deletes the namespace and the chart's cluster-scoped objects named
/// after it, whether `body` passed, failed or timed out. On a failure the
/// namespace's state (objects, descriptions, events, pod logs) is printed
/// first, and the step that was running is named.
pub async fn in_namespace<F, Fut>(client: &Client, prefix: &str, body: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let ns = format!("{prefix}-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if namespaces.get_opt(&ns).await.unwrap().is_some() {
        // Left over from a killed run with the same pid: start clean.
        cleanup(client, &ns).await;
    }
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    labels: Some(namespace_labels()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("create namespace");
    println!("[{ns}] namespace created");
    let outcome = tokio::time::timeout(
        TEST_BUDGET,
        AssertUnwindSafe(body(ns.clone())).catch_unwind(),
    )
    .await;
    if !matches!(outcome, Ok(Ok(()))) {
        diagnostics::print(&ns);
    }
    let gone = cleanup(client, &ns).await;
    match outcome {
        Err(_) => panic!(
            "test in namespace {ns} exceeded its budget of {TEST_BUDGET:?} in step {:?}",
            diagnostics::current_step()
        ),
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Ok(Ok(())) => assert!(
            gone,
            "namespace {ns} was not deleted within {CLEANUP_TIMEOUT:?}"
        ),
    }
}

/// Deletes the namespace and the chart's cluster-scoped objects; returns
/// whether the namespace was gone within `CLEANUP_TIMEOUT`.
pub async fn cleanup(client: &Client, ns: &str) -> bool {
    pods::release_scheduling(client, ns).await;
    let name = operator_name(ns);
    let dp = DeleteParams::default();
    let crbs: Api<ClusterRoleBinding> = Api::all(client.clone());
    let crs: Api<ClusterRole> = Api::all(client.clone());
    for r in [
        crbs.delete(&name, &dp).await.err(),
        crs.delete(&name, &dp).await.err(),
    ]
    .into_iter()
    .flatten()
    {
        if !is_not_found(&r) {
            println!("[{ns}] cleanup: {r}");
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    if let Err(e) = namespaces.delete(ns, &dp).await {
        if !is_not_found(&e) {
            println!("[{ns}] cleanup: cannot delete namespace: {e}");
        }
    }
    let deadline = tokio::time::Instant::now() + CLEANUP_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        match namespaces.get_opt(ns).await {
            Ok(None) => {
                println!("[{ns}] namespace deleted");
                return true;
            }
            Ok(Some(_)) | Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    println!("[{ns}] cleanup: namespace still there after {CLEANUP_TIMEOUT:?}");
    false
}

// ------------------------------------------------------------------ CRD

/// Installs the CRD exactly as committed in `crds/cachecluster.yaml` and
/// waits until it is Established.
pub async fn install_crd(client: &Client) -> CustomResourceDefinition {
    let path = repo_root().join("crds/cachecluster.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let committed: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD YAML");
    assert_eq!(
        serde_json::to_value(&committed).unwrap(),
        serde_json::to_value(crd::crd()).unwrap(),
        "crds/cachecluster.yaml is out of date with operator/src/crd.rs"
    );
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = committed.name_any();
    crds.patch(
        &name,
        &PatchParams::apply(E2E_MANAGER).force(),
        &Patch::Apply(&committed),
    )
    .await
    .expect("apply CRD");
    eventually("CRD established", || {
        let crds = crds.clone();
        let name = name.clone();
        async move {
            let c = crds.get(&name).await.map_err(|e| e.to_string())?;
            let conditions = c
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default();
            let established = conditions
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            // The new schema must also be in effect (a previous run may have
            // installed an older one).
            let current = c.metadata.generation.is_some()
                && c.status
                    .as_ref()
                    .and_then(|s| s.accepted_names.as_ref())
                    .is_some_and(|n| n.kind == "CacheCluster");
            if established && current {
                Ok(c)
            } else {
                Err(format!("{conditions:?}"))
            }
        }
    })
    .await
}

// ------------------------------------------------------------------ Helm chart RBAC

pub const CHART_RBAC_TEMPLATES: &[&str] = &[
    "templates/serviceaccount.yaml",
    "templates/clusterrole.yaml",
    "templates/clusterrolebinding.yaml",
    "templates/leader-election-rbac.yaml",
];

pub fn find_helm() -> Option<PathBuf> {
    let works = |p: &Path| {
        std::process::Command::new(p)
            .arg("version")
            .arg("--short")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var(HELM_ENV) {
        candidates.push(PathBuf::from(p));
    }
    candidates.push(PathBuf::from("helm"));
    let tools = std::env::var("KACHE_TOOLS_DIR")
        .map(PathBuf::from)
        .ok()
        .or_else(|| {
            std::env::var("HOME")
                .ok()
                .map(|h| PathBuf::from(h).join(".cache/kache"))
        });
    if let Some(t) = tools {
        candidates.push(t.join("helm/helm"));
    }
    candidates.into_iter().find(|p| works(p))
}

/// The chart's operator RBAC (ServiceAccount, ClusterRole,
/// ClusterRoleBinding, leader-election Role and RoleBinding) for a release
/// named `ns` installed in namespace `ns`, with the chart's default values.
pub fn render_chart_rbac(ns: &str) -> Vec<Value> {
    let chart = repo_root().join("charts/kache");
    let yaml = if let Some(helm) = find_helm() {
        let home = std::env::temp_dir().join(format!("kache-e2e-helm-{}", std::process::id()));
        let mut cmd = std::process::Command::new(&helm);
        cmd.arg("template")
            .arg(ns)
            .arg(&chart)
            .arg("--namespace")
            .arg(ns)
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"));
        for t in CHART_RBAC_TEMPLATES {
            cmd.arg("--show-only").arg(t);
        }
        let out = cmd.output().expect("run helm template");
        assert!(
            out.status.success(),
            "helm template failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("[{ns}] chart RBAC rendered with {}", helm.display());
        String::from_utf8(out.stdout).unwrap()
    } else {
        // No helm: substitute the few expressions these templates use (with
        // the chart's defaults: rbac.create, serviceAccount.create and
        // operator.leaderElection are all true) and drop the control lines.
        println!(
            "[{ns}] helm not found (set {HELM_ENV}): rendering the chart RBAC templates directly"
        );
        let name = operator_name(ns);
        let mut docs = Vec::new();
        for t in CHART_RBAC_TEMPLATES {
            let text = std::fs::read_to_string(chart.join(t)).unwrap();
            let text = text
                .replace(
                    r#"{{ include "kache.operatorName" . | quote }}"#,
                    &format!("{name:?}"),
                )
                .replace(r#"{{ include "kache.operatorName" . }}"#, &name)
                .replace(r#"{{ include "kache.serviceAccountName" . }}"#, &name)
                .replace("{{ .Release.Namespace }}", ns);
            let kept: Vec<&str> = text.lines().filter(|l| !l.contains("{{")).collect();
            docs.push(kept.join("\n"));
        }
        docs.join("\n---\n")
    };
    serde_yaml::Deserializer::from_str(&yaml)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Creates the chart's operator RBAC in `ns`; returns the ClusterRole.
pub async fn install_chart_rbac(client: &Client, ns: &str) -> ClusterRole {
    let docs = render_chart_rbac(ns);
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding"
        ],
        "rendered chart RBAC"
    );
    async fn create<K>(api: Api<K>, doc: &Value) -> K
    where
        K: Clone + DeserializeOwned + Serialize + Debug,
    {
        let obj: K = serde_json::from_value(doc.clone()).expect("chart object");
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("create {}: {e}", doc["kind"]))
    }
    let mut cluster_role = None;
    for doc in &docs {
        match doc["kind"].as_str().unwrap() {
            "ServiceAccount" => {
                create::<ServiceAccount>(Api::namespaced(client.clone(), ns), doc).await;
            }
            "ClusterRole" => {
                cluster_role = Some(create::<ClusterRole>(Api::all(client.clone()), doc).await);
            }
            "ClusterRoleBinding" => {
                create::<ClusterRoleBinding>(Api::all(client.clone()), doc).await;
            }
            "Role" => {
                create::<Role>(Api::namespaced(client.clone(), ns), doc).await;
            }
            "RoleBinding" => {
                create::<RoleBinding>(Api::namespaced(client.clone(), ns), doc).await;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let cluster_role = cluster_role.unwrap();
    assert_eq!(cluster_role.name_any(), operator_name(ns));
    cluster_role
}

/// One access check: may `user` do `verb` on `resource` (`group`,
/// optional `subresource`, `namespace` ("" = all namespaces), `name`)?
#[derive(Clone, Copy, Debug)]
pub struct Access {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
    pub subresource: &'static str,
    pub namespaced: bool,
}

pub const fn access(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    subresource: &'static str,
    namespaced: bool,
) -> Access {
    Access {
        verb,
        group,
        resource,
        subresource,
        namespaced,
    }
}

pub async fn allowed(
    client: &Client,
    (user, groups): &(String, Vec<String>),
    a: Access,
    ns: &str,
    name: Option<&str>,
) -> bool {
    let sar = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.clone()),
            groups: Some(groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                namespace: a.namespaced.then(|| ns.to_string()),
                verb: Some(a.verb.into()),
                group: Some(a.group.into()),
                resource: Some(a.resource.into()),
                subresource: (!a.subresource.is_empty()).then(|| a.subresource.into()),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(client.clone());
    let r = api
        .create(&PostParams::default(), &sar)
        .await
        .expect("SubjectAccessReview");
    r.status.is_some_and(|s| s.allowed)
}

/// Sets the replicas of CacheCluster `e2e` through its scale subresource, as
/// `kubectl scale` does.
pub async fn scale_to(ccs: &Api<CacheCluster>, replicas: u32) {
    ccs.patch_scale(
        "e2e",
        &PatchParams::default(),
        &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("patch /scale");
}

/// The status of CacheCluster `e2e` (empty before the operator wrote one).
pub async fn status_of(ccs: &Api<CacheCluster>) -> Result<crd::CacheClusterStatus, String> {
    Ok(ccs
        .get("e2e")
        .await
        .map_err(|e| e.to_string())?
        .status
        .unwrap_or_default())
}

pub fn condition<'a>(conds: &'a [Condition], type_: &str) -> &'a Condition {
    conds
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conds:?}"))
}

pub fn members_of(cm: &ConfigMap) -> MemberList {
    MemberList::from_json(&cm.data.as_ref().unwrap()[names::MEMBERS_JSON_KEY]).unwrap()
}

pub fn member(ns: &str, ordinal: u32, ip: &str) -> Member {
    Member {
        name: format!("e2e-{ordinal}"),
        host: format!("e2e-{ordinal}.e2e-peers.{ns}.svc"),
        ip: ip.into(),
        port: 11211,
        peer_port: 11212,
    }
}

/// The operator's events about CacheCluster `name`: (type, reason, note).
pub async fn events_of(client: &Client, ns: &str, name: &str) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut out: Vec<_> = api
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reporting_controller.as_deref() == Some(names::MANAGER)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("CacheCluster")
        })
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.note.unwrap_or_default(),
            )
        })
        .collect();
    out.sort();
    out
}

pub async fn wait_event(client: &Client, ns: &str, type_: &str, reason: &str, note_has: &str) {
    eventually(
        &format!("{type_} event {reason} with note containing {note_has:?}"),
        || async move {
            let evs = events_of(client, ns, "e2e").await;
            if evs
                .iter()
                .any(|(t, r, n)| t == type_ && r == reason && n.contains(note_has))
            {
                Ok(())
            } else {
                Err(format!("{evs:?}"))
            }
        },
    )
    .await;
}

/// Reconciles that finished, from `/metrics` (the duration histogram's count).
pub fn finished_reconciles(metrics: &Metrics) -> u64 {
    let text = metrics.encode().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("kache_operator_reconcile_duration_seconds_count "))
        .unwrap_or_else(|| panic!("no reconcile duration count in {text}"))
        .trim()
        .parse()
        .unwrap()
}

pub fn reconcile_errors(metrics: &Metrics) -> u64 {
    ["kube", "build"]
        .iter()
        .map(|e| {
            metrics
                .errors
                .get_or_create(&ErrorLabels {
                    error: (*e).to_string(),
                })
                .get()
        })
        .sum()
}

pub struct Observed {
    pub cc: CacheCluster,
    pub cm: ConfigMap,
    pub list: MemberList,
}

/// Waits until the operator has published a member list with exactly
/// `want` (and status agrees with the ConfigMap), and checks its version.
pub async fn wait_members(
    ccs: &Api<CacheCluster>,
    cms: &Api<ConfigMap>,
    want: &[Member],
    version: u64,
) -> Observed {
    let names_wanted: Vec<&str> = want.iter().map(|m| m.name.as_str()).collect();
    let o = eventually(
        &format!("member list {names_wanted:?} published in ConfigMap and status"),
        || async move {
            let cm = cms.get("e2e-members").await.map_err(|e| e.to_string())?;
            let list = members_of(&cm);
            let cc = ccs.get("e2e").await.map_err(|e| e.to_string())?;
            let st = cc.status.clone().unwrap_or_default();
            if list.members == want
                && st.config_version == i64::try_from(list.version).unwrap()
                && st.observed_generation == cc.metadata.generation
            {
                Ok(Observed { cc, cm, list })
            } else {
                Err(format!(
                    "ConfigMap v{} {:?}; status configVersion {}",
                    list.version,
                    list.members.iter().map(|m| &m.name).collect::<Vec<_>>(),
                    st.config_version
                ))
            }
        },
    )
    .await;
    assert_eq!(
        o.list.version, version,
        "configVersion rises by exactly one per member-list change"
    );
    let data = o.cm.data.as_ref().unwrap();
    assert_eq!(
        data[names::CLUSTER_CONFIG_KEY],
        o.list.elasticache_payload()
    );
    let nodes: Vec<String> = want
        .iter()
        .map(|m| format!("{}|{}|{}", m.host, m.ip, m.port))
        .collect();
    assert_eq!(
        data[names::CLUSTER_CONFIG_KEY],
        format!("{version}\n{}\n", nodes.join(" ")),
        "ElastiCache payload"
    );
    assert_eq!(
        o.cm.metadata.annotations.as_ref().unwrap()[names::CONFIG_VERSION_ANNOTATION],
        version.to_string()
    );
    o
}

/// Waits until the RBAC authorizer lets `user` list CacheClusters across all
/// namespaces: RBAC objects reach it through an informer, a moment after
/// they are created.
pub async fn wait_rbac_in_effect(client: &Client, user: &(String, Vec<String>), ns: &str) {
    let list = access("list", "kache.dev", "cacheclusters", "", false);
    eventually("chart RBAC in effect", || async move {
        if allowed(client, user, list, ns, None).await {
            Ok(())
        } else {
            Err("not yet allowed".into())
        }
    })
    .await;
}

/// Installs the chart's operator RBAC in `ns` and returns a client acting as
/// its ServiceAccount once the authorizer lets it work.
pub async fn chart_operator_client(client: &Client, path: &str, ns: &str) -> Client {
    install_chart_rbac(client, ns).await;
    let sa_name = operator_name(ns);
    wait_rbac_in_effect(client, &service_account_user(ns, &sa_name), ns).await;
    impersonating_client(path, ns, &sa_name).await
}

/// One in-process operator "process", started as `main.rs` starts one: it
/// campaigns for the chart's Lease (`operator_name(ns)`) and, once it leads,
/// runs the controller until it is stopped or loses the Lease.
pub struct OperatorProcess {
    pub identity: String,
    pub metrics: Arc<Metrics>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    elector: Option<AbortOnDrop<()>>,
    controller: Option<AbortOnDrop<()>>,
}

/// Lease timing of an [`OperatorProcess`].
#[derive(Clone, Copy, Debug)]
pub struct LeaseTiming {
    pub duration: Duration,
    pub renew: Duration,
}

/// Which CacheClusters an [`OperatorProcess`] watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Those of the test's namespace only, so an operator of another suite
    /// running against the same API server cannot be disturbed by this one.
    Namespace,
    /// All namespaces, as the chart deploys it by default (hold [`ONE_OPERATOR`]).
    AllNamespaces,
}

impl OperatorProcess {
    /// Campaigns for the Lease with `client` (the chart's ServiceAccount)
    /// and returns once this instance leads and its controller runs,
    /// watching `ns` only. It reaches the nodes' admin port at their pod IPs.
    pub async fn start(client: Client, ns: &str, identity: &str, lease: LeaseTiming) -> Self {
        Self::start_with(client, ns, identity, lease, Watch::Namespace, ns).await
    }

    /// [`OperatorProcess::start`], watching `watch`, as if deployed in
    /// `operator_namespace` (which the NetworkPolicy lets reach the admin port).
    pub async fn start_with(
        client: Client,
        ns: &str,
        identity: &str,
        lease: LeaseTiming,
        watch: Watch,
        operator_namespace: &str,
    ) -> Self {
        use kache_operator::leader::{LeaderElector, LeaseConfig};
        use kache_operator::reconcile::{run_controller, Context, Settings};
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let (leader_tx, mut leader_rx) = tokio::sync::watch::channel(false);
        let elector = LeaderElector::new(
            client.clone(),
            LeaseConfig {
                name: operator_name(ns),
                namespace: ns.to_string(),
                identity: identity.to_string(),
                lease_duration: lease.duration,
                renew_interval: lease.renew,
            },
        );
        let elector = AbortOnDrop(Some(tokio::spawn(elector.run(leader_tx, shutdown_rx))));
        tokio::time::timeout(TIMEOUT, leader_rx.wait_for(|l| *l))
            .await
            .unwrap_or_else(|_| panic!("{identity} did not become leader within {TIMEOUT:?}"))
            .unwrap();
        let metrics = Arc::new(Metrics::default());
        let ctx = Arc::new(Context::new(
            client,
            Settings {
                node_image: NODE_IMAGE.into(),
                node_admin_port: names::ADMIN_PORT,
                operator_namespace: operator_namespace.to_string(),
            },
            metrics.clone(),
            kube::runtime::events::Reporter {
                controller: names::MANAGER.into(),
                instance: Some(identity.to_string()),
            },
        ));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        // As main.rs: the controller stops when told to or when the Lease is lost.
        let stop = async move {
            tokio::select! {
                _ = stop_rx => {}
                _ = leader_rx.wait_for(|l| !*l) => {}
            }
        };
        let scope = (watch == Watch::Namespace).then(|| ns.to_string());
        let controller = AbortOnDrop(Some(tokio::spawn(run_controller(ctx, scope, stop))));
        Self {
            identity: identity.to_string(),
            metrics,
            shutdown_tx,
            stop_tx: Some(stop_tx),
            elector: Some(elector),
            controller: Some(controller),
        }
    }

    /// Reconciles that finished (the duration histogram's count; the
    /// `reconciles` counter counts them as they start).
    pub fn finished_reconciles(&self) -> u64 {
        finished_reconciles(&self.metrics)
    }

    /// Waits until `n` more reconciles than `before` have finished.
    pub async fn wait_finished_reconciles(&self, before: u64, n: u64) {
        eventually(
            &format!("{} finishes {n} more reconciles", self.identity),
            || {
                let now = self.finished_reconciles();
                async move {
                    if now >= before + n {
                        Ok(())
                    } else {
                        Err(format!("{} finished", now - before))
                    }
                }
            },
        )
        .await;
    }

    /// A clean shutdown (SIGTERM): in-flight reconciles finish, the
    /// controller stops, the Lease is released.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(c) = self.controller.take() {
            c.join("controller").await;
        }
        self.shutdown_tx.send_replace(true);
        if let Some(e) = self.elector.take() {
            e.join("leader elector").await;
        }
    }

    /// The process dies (SIGKILL, OOM, node loss): every task stops where it
    /// is, nothing is released; the Lease stays held until it expires.
    pub fn crash(mut self) {
        drop(self.controller.take());
        drop(self.elector.take());
    }
}
