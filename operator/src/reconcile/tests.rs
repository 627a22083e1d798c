//! `reconcile()` against a scripted mock API server (`tower_test`): every test
//! lists the exact requests the reconciler must make, in order, and what the
//! "API server" answers.

use super::*;
use crate::crd::{CacheClusterSpec, CacheClusterStatus};
use crate::fixtures::{cluster, observed, validated};
use crate::fixtures::{node_report, pod, settled_sts, t, unanswered};
use crate::probe::{HandoffReport, NodeReport, ProbeError, ProbeResults};
use http::{Method, Request, Response, StatusCode};
use kache_cluster::MemberList;
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock;

type Handle = mock::Handle<Request<Body>, Response<Body>>;

const APPLY_QS: &str = "?&force=true&fieldManager=kache-operator";

fn fixed_now() -> Time {
    t(0)
}

fn test_context() -> (Arc<Context>, Handle) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let reporter = Reporter {
        controller: "kache-operator".into(),
        instance: Some("kache-operator-0".into()),
    };
    let mut ctx = Context::new(
        client,
        Settings::default(),
        Arc::new(Metrics::default()),
        reporter,
    );
    ctx.now = fixed_now;
    ctx.settings.node_image = "kache-node:test".into();
    (Arc::new(ctx), handle)
}

/// One expected request and the answer to it.
struct Exchange {
    method: Method,
    uri: String,
    /// Checks the request body (parsed as JSON; `Null` when empty).
    check: Box<dyn Fn(&Value) + Send>,
    status: StatusCode,
    /// Builds the response body from the request body (default: echo it).
    response: Box<dyn Fn(&Value) -> Value + Send>,
}

fn expect(method: Method, uri: impl Into<String>) -> Exchange {
    Exchange {
        method,
        uri: uri.into(),
        check: Box::new(|_| {}),
        status: StatusCode::OK,
        response: Box::new(Value::clone),
    }
}

impl Exchange {
    fn body_eq(mut self, expected: Value) -> Self {
        self.check = Box::new(move |actual| assert_eq!(actual, &expected, "request body"));
        self
    }
    fn check(mut self, f: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Box::new(f);
        self
    }
    fn respond(mut self, status: StatusCode, body: Value) -> Self {
        self.status = status;
        self.response = Box::new(move |_| body.clone());
        self
    }
    fn respond_with(mut self, f: impl Fn(&Value) -> Value + Send + 'static) -> Self {
        self.response = Box::new(f);
        self
    }
}

/// An apply (server-side apply PATCH) whose body must be exactly `obj`.
fn apply_of<T: Serialize>(path: &str, obj: &T) -> Exchange {
    expect(Method::PATCH, format!("{path}{APPLY_QS}")).body_eq(serde_json::to_value(obj).unwrap())
}

fn not_found() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": "NotFound", "message": "not found", "code": 404})
}

fn pod_list(pods: &[Pod]) -> Value {
    json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": pods})
}

fn event(reason: &'static str, type_: &'static str) -> Exchange {
    expect(
        Method::POST,
        "/apis/events.k8s.io/v1/namespaces/prod/events?",
    )
    .check(move |body| {
        assert_eq!(body["reason"], reason, "event reason in {body}");
        assert_eq!(body["type"], type_, "event type in {body}");
        assert_eq!(body["regarding"]["kind"], "CacheCluster");
        assert_eq!(body["regarding"]["name"], "web");
        assert_eq!(body["reportingController"], "kache-operator");
    })
}

/// Hand-off probe answers by pod IP; every call is logged.
#[derive(Default)]
struct ScriptedProbe {
    answers: HashMap<String, Result<NodeReport, ProbeError>>,
    log: Arc<Mutex<Vec<String>>>,
}

impl ScriptedProbe {
    fn answer(mut self, ip: &str, r: Result<NodeReport, ProbeError>) -> Self {
        self.answers.insert(ip.into(), r);
        self
    }
}

impl NodeProbe for ScriptedProbe {
    fn report<'a>(
        &'a self,
        pod_ip: &'a str,
    ) -> futures::future::BoxFuture<'a, Result<NodeReport, ProbeError>> {
        self.log.lock().unwrap().push(format!("probe {pod_ip}"));
        let r = self
            .answers
            .get(pod_ip)
            .cloned()
            .unwrap_or_else(|| panic!("unscripted probe of {pod_ip}"));
        Box::pin(async move { r })
    }
}

/// Plays the script against the reconciler, then checks it made no more requests.
async fn run(cc: CacheCluster, script: Vec<Exchange>) -> Result<Action, Error> {
    run_probed(cc, script, ScriptedProbe::default()).await.0
}

/// As [`run`], with a scripted hand-off probe. Also returns every API
/// request ("METHOD path") and probe ("probe IP") in the order they happened.
async fn run_probed(
    cc: CacheCluster,
    script: Vec<Exchange>,
    probe: ScriptedProbe,
) -> (Result<Action, Error>, Vec<String>) {
    let (ctx, mut handle) = test_context();
    let log = probe.log.clone();
    let mut ctx = Arc::try_unwrap(ctx).unwrap_or_else(|_| unreachable!());
    ctx.probe = Arc::new(probe);
    let ctx = Arc::new(ctx);
    let task = tokio::spawn(reconcile(Arc::new(cc), ctx.clone()));
    for (i, ex) in script.into_iter().enumerate() {
        let next = tokio::time::timeout(Duration::from_secs(5), handle.next_request()).await;
        let (req, send) = match next {
            Ok(Some(r)) => r,
            _ => panic!("request #{i} ({} {}) was never made", ex.method, ex.uri),
        };
        log.lock()
            .unwrap()
            .push(format!("{} {}", req.method(), req.uri().path()));
        assert_eq!(
            (req.method(), req.uri().to_string()),
            (&ex.method, ex.uri.clone()),
            "request #{i}"
        );
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (ex.check)(&body);
        let response = (ex.response)(&body);
        send.send_response(
            Response::builder()
                .status(ex.status)
                .body(Body::from(serde_json::to_vec(&response).unwrap()))
                .unwrap(),
        );
    }
    let result = task.await.unwrap();
    drop(ctx);
    if let Ok(Some((req, _))) =
        tokio::time::timeout(Duration::from_millis(100), handle.next_request()).await
    {
        panic!("unexpected extra request {} {}", req.method(), req.uri());
    }
    let log = log.lock().unwrap().clone();
    (result, log)
}

const NS: &str = "/api/v1/namespaces/prod";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/prod";
const STS: &str = "/apis/apps/v1/namespaces/prod/statefulsets/web";
const STS_LIST: &str =
    "/apis/apps/v1/namespaces/prod/statefulsets?&fieldSelector=metadata.name%3Dweb";
const PDB: &str = "/apis/policy/v1/namespaces/prod/poddisruptionbudgets/web";
const NP: &str = "/apis/networking.k8s.io/v1/namespaces/prod/networkpolicies/web";
const NP_LIST: &str =
    "/apis/networking.k8s.io/v1/namespaces/prod/networkpolicies?&fieldSelector=metadata.name%3Dweb";
const STATUS: &str = "/apis/kache.dev/v1alpha1/namespaces/prod/cacheclusters/web/status";
const PODS: &str = "/api/v1/namespaces/prod/pods?&labelSelector=app.kubernetes.io%2Fcomponent%3Dcache-node%2Capp.kubernetes.io%2Finstance%3Dweb%2Capp.kubernetes.io%2Fname%3Dkache";

fn np_list(np: Option<&NetworkPolicy>) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicyList",
           "metadata": {"resourceVersion": "1"}, "items": np.into_iter().collect::<Vec<_>>()})
}

/// The NetworkPolicy step: applied when enabled, else looked for (none there).
fn network_policy_step(cc: &CacheCluster) -> Exchange {
    match build::network_policy(&validated(cc), DEFAULT_OPERATOR_NAMESPACE) {
        Some(np) => apply_of(NP, &np),
        None => expect(Method::GET, NP_LIST).respond(StatusCode::OK, np_list(None)),
    }
}

fn sts_list(sts: Option<&StatefulSet>) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSetList", "metadata": {"resourceVersion": "1"},
           "items": sts.into_iter().collect::<Vec<_>>()})
}

/// The requests every valid reconcile starts with: RBAC and Services applied,
/// the NetworkPolicy applied (or looked for when disabled), pods listed, the
/// member-list ConfigMap and the StatefulSet read.
fn preamble(
    cc: &CacheCluster,
    pods: &[Pod],
    cm: Option<&ConfigMap>,
    sts: Option<&StatefulSet>,
) -> Vec<Exchange> {
    vec![
        apply_of(
            &format!("{NS}/serviceaccounts/web-node"),
            &build::node_service_account(&validated(cc).cluster),
        ),
        apply_of(
            &format!("{RBAC}/roles/web-node"),
            &build::node_role(&validated(cc).cluster),
        ),
        apply_of(
            &format!("{RBAC}/rolebindings/web-node"),
            &build::node_role_binding(&validated(cc).cluster),
        ),
        apply_of(
            &format!("{NS}/services/web-peers"),
            &build::peers_service(&validated(cc)),
        ),
        apply_of(
            &format!("{NS}/services/web"),
            &build::client_service(&validated(cc)),
        ),
        network_policy_step(cc),
        expect(Method::GET, PODS).respond(StatusCode::OK, pod_list(pods)),
        match cm {
            Some(cm) => expect(Method::GET, format!("{NS}/configmaps/web-members"))
                .respond(StatusCode::OK, serde_json::to_value(cm).unwrap()),
            None => expect(Method::GET, format!("{NS}/configmaps/web-members"))
                .respond(StatusCode::NOT_FOUND, not_found()),
        },
        expect(Method::GET, STS_LIST).respond(StatusCode::OK, sts_list(sts)),
    ]
}

/// A server-side-apply patch of the status subresource; the "API server"
/// answers with the CacheCluster carrying the new status.
fn status_patch(
    cc: &CacheCluster,
    check: impl Fn(&CacheClusterStatus) + Send + 'static,
) -> Exchange {
    let cc = cc.clone();
    expect(Method::PATCH, format!("{STATUS}{APPLY_QS}"))
        .check(move |body| {
            assert_eq!(body["apiVersion"], "kache.dev/v1alpha1");
            assert_eq!(body["kind"], "CacheCluster");
            let status: CacheClusterStatus =
                serde_json::from_value(body["status"].clone()).unwrap();
            check(&status);
        })
        .respond_with(move |body| {
            let mut obj = serde_json::to_value(&cc).unwrap();
            obj["status"] = body["status"].clone();
            obj
        })
}

fn three_ready() -> Vec<Pod> {
    vec![
        pod("web-0", Some("10.0.0.1"), true),
        pod("web-1", Some("10.0.0.2"), true),
        pod("web-2", Some("10.0.0.3"), true),
    ]
}

fn published(cc: &CacheCluster, pods: &[Pod], version: u64) -> MemberList {
    MemberList {
        version,
        ..status::next_member_list(status::ready_members(&observed(cc), pods), 1, None, 0)
    }
}

#[tokio::test]
async fn first_reconcile_creates_everything_and_publishes_version_one() {
    let cc = cluster("web", CacheClusterSpec::default());
    let empty = MemberList {
        version: 1,
        replication_factor: 1,
        members: vec![],
    };
    let sts = build::statefulset(&validated(&cc), "kache-node:test");
    let mut script = preamble(&cc, &[], None, None);
    script.extend([
        apply_of(
            &format!("{NS}/configmaps/web-members"),
            &build::members_configmap(&validated(&cc).cluster, &empty).unwrap(),
        ),
        apply_of(STS, &sts),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| {
            assert_eq!(s.observed_generation, Some(1));
            assert_eq!(s.config_version, 1);
            assert_eq!(s.replicas, 0);
            assert_eq!(s.selector, names::selector_string("web"));
            let ready = status::find_condition(s, "Ready").unwrap();
            assert_eq!(
                (ready.status.as_str(), ready.message.as_str()),
                ("False", "0/3 nodes ready")
            );
            let prog = status::find_condition(s, "Progressing").unwrap();
            assert_eq!(prog.status, "True");
        }),
        event("Created", "Normal"),
        event("MembersChanged", "Normal"),
    ]);
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_CONVERGING));
}

#[tokio::test]
async fn settled_cluster_reconcile_is_a_no_op() {
    let mut cc = cluster("web", CacheClusterSpec::default());
    let pods = three_ready();
    let list = published(&cc, &pods, 4);
    let cm = build::members_configmap(&validated(&cc).cluster, &list).unwrap();
    let mut sts = build::statefulset(&validated(&cc), "kache-node:test");
    sts.metadata.generation = Some(1);
    sts.status = settled_sts(3).status;
    cc.status = Some(status::compute_status(
        &observed(&cc),
        &pods,
        Some(&sts),
        &list,
        fixed_now(),
    ));

    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    script.extend([
        // No ConfigMap write: the published list is unchanged.
        apply_of(STS, &build::statefulset(&validated(&cc), "kache-node:test"))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        // No status patch, no events.
    ]);
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_SETTLED));
}

/// A settled cluster with `spec` (status computed, so nothing else changes).
fn settled(spec: CacheClusterSpec) -> (CacheCluster, Vec<Pod>, ConfigMap, StatefulSet) {
    let mut cc = cluster("web", spec);
    let pods = three_ready();
    let list = published(&cc, &pods, 4);
    let cm = build::members_configmap(&validated(&cc).cluster, &list).unwrap();
    let mut sts = build::statefulset(&validated(&cc), "kache-node:test");
    sts.metadata.generation = Some(1);
    sts.status = settled_sts(3).status;
    cc.status = Some(status::compute_status(
        &observed(&cc),
        &pods,
        Some(&sts),
        &list,
        fixed_now(),
    ));
    (cc, pods, cm, sts)
}

fn np_enabled(enabled: bool) -> CacheClusterSpec {
    CacheClusterSpec {
        network_policy: Some(crate::crd::NetworkPolicyConfig {
            enabled,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The rest of a settled reconcile after the preamble: StatefulSet and PDB.
fn settled_tail(cc: &CacheCluster, sts: &StatefulSet) -> [Exchange; 2] {
    [
        apply_of(STS, &build::statefulset(&validated(cc), "kache-node:test"))
            .respond(StatusCode::OK, serde_json::to_value(sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(cc))),
    ]
}

#[tokio::test]
async fn enabled_network_policy_is_applied_before_the_pods() {
    let (cc, pods, cm, sts) = settled(np_enabled(true));
    let script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    // The preamble applies it right after the Services, before the StatefulSet.
    let np_at = script
        .iter()
        .position(|e| e.uri.starts_with(NP))
        .expect("NetworkPolicy applied");
    assert_eq!(script[np_at].method, Method::PATCH);
    assert_eq!(np_at, 5);
    let np = build::network_policy(&validated(&cc), DEFAULT_OPERATOR_NAMESPACE).unwrap();
    let admin_from = &np.spec.as_ref().unwrap().ingress.as_ref().unwrap()[2]
        .from
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        admin_from
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap()["kubernetes.io/metadata.name"],
        "kache-system",
        "the operator's namespace (Settings::operator_namespace)"
    );
    let mut script = script;
    script.extend(settled_tail(&cc, &sts));
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_SETTLED));
}

/// A NetworkPolicy `web` as the API server holds it, controlled by `owner_uid`.
fn existing_np(owner_uid: &str) -> NetworkPolicy {
    let owned = cluster("web", np_enabled(true));
    let mut np = build::network_policy(&validated(&owned), "kache-system").unwrap();
    np.metadata.uid = Some("np-uid-1".into());
    np.metadata.owner_references.as_mut().unwrap()[0].uid = owner_uid.into();
    np
}

#[tokio::test]
async fn disabling_the_network_policy_deletes_it() {
    for spec in [np_enabled(false), CacheClusterSpec::default()] {
        let (cc, pods, cm, sts) = settled(spec);
        let uid = cc.metadata.uid.clone().unwrap();
        let np = existing_np(&uid);
        let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
        let at = script.iter().position(|e| e.uri == NP_LIST).unwrap();
        script[at] = expect(Method::GET, NP_LIST).respond(StatusCode::OK, np_list(Some(&np)));
        let np_json = serde_json::to_value(&np).unwrap();
        script.insert(
            at + 1,
            expect(Method::DELETE, format!("{NP}?"))
                .check(|body| {
                    assert_eq!(
                        body["preconditions"]["uid"], "np-uid-1",
                        "deletes exactly the policy it read: {body}"
                    );
                })
                .respond(StatusCode::OK, np_json),
        );
        script.insert(at + 2, event("NetworkPolicyDeleted", "Normal"));
        script.extend(settled_tail(&cc, &sts));
        let action = run(cc, script).await.unwrap();
        assert_eq!(action, Action::requeue(REQUEUE_SETTLED));
    }
}

#[tokio::test]
async fn a_network_policy_of_someone_else_is_left_alone() {
    let (cc, pods, cm, sts) = settled(np_enabled(false));
    let np = existing_np("another-owner");
    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    let at = script.iter().position(|e| e.uri == NP_LIST).unwrap();
    script[at] = expect(Method::GET, NP_LIST).respond(StatusCode::OK, np_list(Some(&np)));
    // No DELETE.
    script.extend(settled_tail(&cc, &sts));
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_SETTLED));
}

#[tokio::test]
async fn a_network_policy_already_gone_is_fine() {
    let (cc, pods, cm, sts) = settled(np_enabled(false));
    let uid = cc.metadata.uid.clone().unwrap();
    let np = existing_np(&uid);
    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    let at = script.iter().position(|e| e.uri == NP_LIST).unwrap();
    script[at] = expect(Method::GET, NP_LIST).respond(StatusCode::OK, np_list(Some(&np)));
    script.insert(
        at + 1,
        expect(Method::DELETE, format!("{NP}?")).respond(StatusCode::NOT_FOUND, not_found()),
    );
    // No event: nothing was deleted.
    script.extend(settled_tail(&cc, &sts));
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_SETTLED));
}

#[tokio::test]
async fn pod_becoming_ready_bumps_config_version_by_one() {
    let mut cc = cluster("web", CacheClusterSpec::default());
    let mut pods = three_ready();
    pods[2] = pod("web-2", Some("10.0.0.3"), false);
    let old = published(&cc, &pods, 4);
    let old_cm = build::members_configmap(&validated(&cc).cluster, &old).unwrap();
    let mut sts = build::statefulset(&validated(&cc), "kache-node:test");
    sts.metadata.generation = Some(1);
    sts.status = settled_sts(3).status;
    cc.status = Some(status::compute_status(
        &observed(&cc),
        &pods,
        Some(&sts),
        &old,
        fixed_now(),
    ));

    cc.metadata.resource_version = Some("7".into());

    // web-2 turns Ready.
    let pods = three_ready();
    let new = published(&cc, &pods, 5);
    let mut script = preamble(&cc, &pods, Some(&old_cm), Some(&sts));
    script.extend([
        apply_of(
            &format!("{NS}/configmaps/web-members"),
            &build::members_configmap(&validated(&cc).cluster, &new).unwrap(),
        ),
        apply_of(STS, &build::statefulset(&validated(&cc), "kache-node:test"))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| {
            assert_eq!(s.config_version, 5);
            assert_eq!(s.ready_replicas, 3);
            assert_eq!(status::find_condition(s, "Ready").unwrap().status, "True");
        }),
        event("MembersChanged", "Normal").check(|body| {
            assert_eq!(
                body["note"],
                "published member list version 5 with 3 member(s)"
            );
            // The reference pins the resourceVersion, so kube's Recorder
            // does not fold this event into an earlier MembersChanged (whose
            // note, "version 4", it would keep).
            assert_eq!(body["regarding"]["name"], "web");
            assert_eq!(body["regarding"]["resourceVersion"], "7");
        }),
    ]);
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_SETTLED));
}

#[tokio::test]
async fn spec_change_rolls_statefulset_and_records_event() {
    let mut cc = cluster("web", CacheClusterSpec::default());
    let pods = three_ready();
    let list = published(&cc, &pods, 2);
    let cm = build::members_configmap(&validated(&cc).cluster, &list).unwrap();
    let mut sts = build::statefulset(&validated(&cc), "kache-node:test");
    sts.status = settled_sts(3).status;
    cc.status = Some(status::compute_status(
        &observed(&cc),
        &pods,
        Some(&sts),
        &list,
        fixed_now(),
    ));
    // The user raises memory: generation 2.
    cc.spec.memory_mib = 256;
    cc.metadata.generation = Some(2);
    let desired = build::statefulset(&validated(&cc), "kache-node:test");
    let mut rolled = desired.clone();
    rolled.metadata.generation = Some(2);
    rolled.status = settled_sts(3).status; // controller has not observed generation 2 yet

    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    script.extend([
        apply_of(STS, &desired)
            .check(|body| {
                let args = &body["spec"]["template"]["spec"]["containers"][0]["args"];
                assert!(
                    args.as_array().unwrap().iter().any(|a| a == "256"),
                    "{args}"
                );
            })
            .respond(StatusCode::OK, serde_json::to_value(&rolled).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| {
            assert_eq!(s.observed_generation, Some(2));
            assert_eq!(s.config_version, 2, "no membership change, no version bump");
            let prog = status::find_condition(s, "Progressing").unwrap();
            assert_eq!(
                (prog.status.as_str(), prog.reason.as_str()),
                ("True", "RollingOut")
            );
        }),
        event("SpecApplied", "Normal"),
    ]);
    let action = run(cc, script).await.unwrap();
    assert_eq!(action, Action::requeue(REQUEUE_CONVERGING));
}

#[tokio::test]
async fn invalid_spec_sets_degraded_once_and_does_not_retry() {
    let cc = cluster(
        "web",
        CacheClusterSpec {
            replicas: 2,
            replication_factor: 3,
            ..Default::default()
        },
    );
    let script = vec![
        status_patch(&cc, |s| {
            let deg = status::find_condition(s, "Degraded").unwrap();
            assert_eq!(
                (deg.status.as_str(), deg.reason.as_str()),
                ("True", "InvalidSpec")
            );
            assert!(deg
                .message
                .contains("replicationFactor (3) must not exceed replicas (2)"));
        }),
        event("InvalidSpec", "Warning").check(|body| {
            assert!(body["note"]
                .as_str()
                .unwrap()
                .contains("must not exceed replicas"));
        }),
    ];
    let action = run(cc.clone(), script).await.unwrap();
    assert_eq!(action, Action::await_change());

    // Reconciling again (e.g. a pod event) makes no request at all.
    let mut reported = cc.clone();
    reported.status = Some(status::invalid_spec_status(
        &cc,
        &cc.spec.validate().unwrap_err(),
        fixed_now(),
    ));
    let action = run(reported, vec![]).await.unwrap();
    assert_eq!(action, Action::await_change());
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    let cc = cluster("web", CacheClusterSpec::default());
    let script = vec![expect(
        Method::PATCH,
        format!("{NS}/serviceaccounts/web-node{APPLY_QS}"),
    )
    .respond(
        StatusCode::FORBIDDEN,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "Forbidden", "message": "forbidden", "code": 403}),
    )];
    let err = run(cc.clone(), script).await.unwrap_err();
    assert!(matches!(err, Error::Kube(_)), "{err}");
    assert_eq!(err.metric_label(), "kube");

    let (ctx, _handle) = test_context();
    let cc = Arc::new(cc);
    assert_eq!(
        error_policy(cc.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(cc.clone(), &err, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
    assert_eq!(
        error_policy(cc, &err, ctx),
        Action::requeue(Duration::from_secs(8))
    );
}

#[tokio::test]
async fn deleted_cluster_is_left_to_garbage_collection() {
    let mut cc = cluster("web", CacheClusterSpec::default());
    cc.metadata.deletion_timestamp = Some(t(0));
    assert_eq!(run(cc, vec![]).await.unwrap(), Action::await_change());
}

#[test]
fn backoff_doubles_and_caps() {
    assert_eq!(backoff(1), Duration::from_secs(2));
    assert_eq!(backoff(2), Duration::from_secs(4));
    assert_eq!(backoff(5), Duration::from_secs(32));
    assert_eq!(backoff(9), ERROR_BACKOFF_MAX);
    assert_eq!(backoff(u32::MAX), ERROR_BACKOFF_MAX);
}

#[test]
fn pods_map_to_their_cluster() {
    let mut p = pod("web-0", Some("10.0.0.1"), true);
    p.metadata.labels = Some(names::common_labels("web"));
    let r = pod_owner(p).unwrap();
    assert_eq!(r.name, "web");
    assert_eq!(r.namespace.as_deref(), Some("prod"));
    assert!(pod_owner(pod("stray", None, false)).is_none());
}

// ------------------------------------------------------------------ scale-in

fn handoff(version: u64, done: bool, sent: u64) -> Result<NodeReport, ProbeError> {
    Ok(node_report(
        false,
        version,
        0,
        HandoffReport {
            version,
            running: !done,
            done,
            sent,
            acked: sent,
            failed: 0,
            refilled: 0,
        },
    ))
}

/// `web` settled at 3 Ready nodes with member list version 4, then scaled
/// to 2 (generation 2). Returns it, its pods, the ConfigMap as published
/// before the scale-in, and the StatefulSet (3 replicas).
fn scaled_in_to_two() -> (CacheCluster, Vec<Pod>, ConfigMap, StatefulSet) {
    let mut cc = cluster("web", CacheClusterSpec::default());
    let pods = three_ready();
    let list = published(&cc, &pods, 4);
    let cm = build::members_configmap(&validated(&cc).cluster, &list).unwrap();
    let mut sts = build::statefulset(&validated(&cc), "kache-node:test");
    sts.metadata.generation = Some(1);
    sts.status = settled_sts(3).status;
    cc.status = Some(status::compute_status(
        &observed(&cc),
        &pods,
        Some(&sts),
        &list,
        fixed_now(),
    ));
    cc.spec.replicas = 2;
    cc.metadata.generation = Some(2);
    cc.metadata.resource_version = Some("9".into());
    (cc, pods, cm, sts)
}

/// The StatefulSet the operator applies for `cc`, with `replicas`.
fn sts_with(cc: &CacheCluster, replicas: i32) -> StatefulSet {
    let mut s = build::statefulset(&validated(cc), "kache-node:test");
    s.spec.as_mut().unwrap().replicas = Some(replicas);
    s
}

fn members_cm(cc: &CacheCluster, pods: &[Pod], version: u64) -> ConfigMap {
    build::members_configmap(&validated(cc).cluster, &published(cc, pods, version)).unwrap()
}

#[tokio::test]
async fn scale_in_publishes_members_first_and_holds_the_statefulset() {
    let (cc, pods, old_cm, sts) = scaled_in_to_two();
    let new_cm = members_cm(&cc, &pods, 5);
    let mut script = preamble(&cc, &pods, Some(&old_cm), Some(&sts));
    script.extend([
        // 0. The scale-in's start, recorded before anything moves.
        status_patch(&cc, |s| {
            assert_eq!(s.config_version, 4, "only the start is recorded yet");
            let r = s.rebalance.as_ref().expect("status.rebalance");
            assert_eq!((r.target_replicas, r.current_replicas), (2, 3));
            assert_eq!((r.started_at.clone(), r.deadline.clone()), (t(0), t(300)));
            assert_eq!(r.config_version, 5);
        }),
        // 1. The member list without web-2, version +1.
        apply_of(&format!("{NS}/configmaps/web-members"), &new_cm).check(|body| {
            let list = MemberList::from_json(body["data"]["members.json"].as_str().unwrap())
                .unwrap();
            assert_eq!(list.version, 5);
            assert_eq!(
                list.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
                ["web-0", "web-1"]
            );
        }),
        // 2. (probe of web-2: still at version 4) 3. StatefulSet kept at 3.
        apply_of(STS, &sts_with(&cc, 3))
            .check(|body| assert_eq!(body["spec"]["replicas"], 3))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| {
            assert_eq!(s.config_version, 5);
            let r = s.rebalance.as_ref().expect("status.rebalance");
            assert_eq!((r.target_replicas, r.current_replicas), (2, 3));
            assert_eq!(r.config_version, 5);
            assert_eq!(r.started_at, t(0));
            assert_eq!(r.deadline, t(300));
            assert_eq!(r.departing.len(), 1);
            assert_eq!(r.departing[0].name, "web-2");
            assert!(!r.departing[0].done);
            let reb = status::find_condition(s, "Rebalancing").unwrap();
            assert_eq!(
                (reb.status.as_str(), reb.reason.as_str()),
                ("True", "HandingOff")
            );
            assert!(reb.message.contains("web-2"), "{}", reb.message);
            assert!(reb.message.contains("(0/1 done"), "{}", reb.message);
        }),
        event("SpecApplied", "Normal"),
        event("MembersChanged", "Normal"),
        event("RebalanceStarted", "Normal").check(|body| {
            assert_eq!(
                body["note"],
                "scaling in from 3 to 2 nodes: published member list version 5 without web-2; \
                 they keep running and hand their data to the remaining nodes (waiting at most 300s)"
            );
        }),
    ]);
    let probe = ScriptedProbe::default().answer("10.0.0.3", handoff(4, true, 0));
    let (action, log) = run_probed(cc, script, probe).await;
    assert_eq!(action.unwrap(), Action::requeue(REQUEUE_REBALANCING));
    // The order that matters: ConfigMap, then the probe, then the StatefulSet.
    let pos = |needle: &str| {
        log.iter()
            .position(|l| l == needle)
            .unwrap_or_else(|| panic!("{needle} not in {log:?}"))
    };
    let cm = pos(&format!("PATCH {NS}/configmaps/web-members"));
    let probe = pos("probe 10.0.0.3");
    let sts = pos(&format!("PATCH {STS}"));
    assert!(cm < probe && probe < sts, "{log:?}");
}

#[tokio::test]
async fn restarted_between_recording_the_start_and_publishing_keeps_the_deadline() {
    // The previous operator recorded the start 100 s ago and stopped before it published
    // the member list without web-2.
    let (mut cc, pods, old_cm, sts) = scaled_in_to_two();
    let start = scale::unrecorded_start(
        &observed(&cc),
        Some(&sts),
        &published(&cc, &pods, 5),
        &t(-100),
    )
    .expect("a scale-in is starting");
    cc.status.as_mut().unwrap().rebalance = Some(start);
    let new_cm = members_cm(&cc, &pods, 5);
    let mut script = preamble(&cc, &pods, Some(&old_cm), Some(&sts));
    script.extend([
        // No second start record: the list goes out, the deadline stays.
        apply_of(&format!("{NS}/configmaps/web-members"), &new_cm),
        apply_of(STS, &sts_with(&cc, 3))
            .check(|body| assert_eq!(body["spec"]["replicas"], 3))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| {
            let r = s.rebalance.as_ref().expect("status.rebalance");
            assert_eq!(
                (r.started_at.clone(), r.deadline.clone()),
                (t(-100), t(200))
            );
            assert_eq!(r.departing.len(), 1);
        }),
        event("SpecApplied", "Normal"),
        event("MembersChanged", "Normal"),
        // Never announced by the stopped operator: announced now, with the original wait.
        event("RebalanceStarted", "Normal"),
    ]);
    let probe = ScriptedProbe::default().answer("10.0.0.3", handoff(4, true, 0));
    let (action, _) = run_probed(cc, script, probe).await;
    assert_eq!(action.unwrap(), Action::requeue(REQUEUE_REBALANCING));
}

/// `cc` as the API server holds it after the first scale-in reconcile.
fn waiting_on_web_2(started: i64) -> (CacheCluster, Vec<Pod>, ConfigMap, StatefulSet) {
    let (mut cc, pods, _, sts) = scaled_in_to_two();
    let cm = members_cm(&cc, &pods, 5);
    let list = published(&cc, &pods, 5);
    let probes: ProbeResults = [("web-2".to_string(), handoff(5, false, 10))].into();
    let d = scale::decide(
        &observed(&cc),
        Some(&sts),
        &pods,
        &list,
        &probes,
        &t(started),
    );
    assert!(d.waiting());
    cc.status = Some(status::compute_status_underway(
        &observed(&cc),
        &pods,
        Some(&sts),
        &list,
        status::Underway {
            rebalance: d.status_rebalance(),
            ..Default::default()
        },
        t(started),
    ));
    (cc, pods, cm, sts)
}

#[tokio::test]
async fn restarted_mid_scale_in_keeps_waiting_without_writes() {
    // A fresh operator: nothing in memory; the StatefulSet has 3, the spec 2,
    // the ConfigMap already excludes web-2, the status holds the start time.
    let (cc, pods, cm, sts) = waiting_on_web_2(-60);
    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    script.extend([
        // No ConfigMap write; the StatefulSet stays at 3.
        apply_of(STS, &sts_with(&cc, 3))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        // Same progress: no status patch, no event.
    ]);
    let probe = ScriptedProbe::default().answer("10.0.0.3", handoff(5, false, 10));
    let (action, log) = run_probed(cc, script, probe).await;
    assert_eq!(action.unwrap(), Action::requeue(REQUEUE_REBALANCING));
    assert!(log.contains(&"probe 10.0.0.3".to_string()), "{log:?}");
}

#[tokio::test]
async fn scale_in_shrinks_the_statefulset_once_the_handoff_is_done() {
    let (cc, pods, cm, sts) = waiting_on_web_2(-60);
    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    script.extend([
        apply_of(STS, &sts_with(&cc, 2))
            .check(|body| assert_eq!(body["spec"]["replicas"], 2))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| {
            assert!(s.rebalance.is_none());
            let reb = status::find_condition(s, "Rebalancing").unwrap();
            assert_eq!(reb.status, "False");
        }),
        event("RebalanceFinished", "Normal").check(|body| {
            assert_eq!(
                body["note"],
                "hand-off done (42 items sent, 42 acked, 0 failed); scaling StatefulSet from 3 to 2 nodes, removing web-2"
            );
        }),
    ]);
    let probe = ScriptedProbe::default().answer("10.0.0.3", handoff(5, true, 42));
    let (action, log) = run_probed(cc, script, probe).await;
    // The StatefulSet controller has not removed the pod yet: converging.
    assert_eq!(action.unwrap(), Action::requeue(REQUEUE_CONVERGING));
    let probe = log.iter().position(|l| l == "probe 10.0.0.3").unwrap();
    let sts = log
        .iter()
        .position(|l| l == &format!("PATCH {STS}"))
        .unwrap();
    assert!(probe < sts, "{log:?}");
}

#[tokio::test]
async fn scale_in_timeout_warns_and_shrinks() {
    let (cc, pods, cm, sts) = waiting_on_web_2(-301);
    let mut script = preamble(&cc, &pods, Some(&cm), Some(&sts));
    script.extend([
        apply_of(STS, &sts_with(&cc, 2))
            .respond(StatusCode::OK, serde_json::to_value(&sts).unwrap()),
        apply_of(PDB, &build::pod_disruption_budget(&validated(&cc))),
        status_patch(&cc, |s| assert!(s.rebalance.is_none())),
        event("HandoffTimeout", "Warning").check(|body| {
            assert_eq!(
                body["note"],
                "web-2 did not finish handing off within 300s (web-2: no answer within 2s); \
                 removing them anyway, items not yet moved are lost"
            );
        }),
        event("RebalanceFinished", "Normal").check(|body| {
            assert!(body["note"]
                .as_str()
                .unwrap()
                .starts_with("hand-off timed out on web-2"));
        }),
    ]);
    let probe = ScriptedProbe::default().answer("10.0.0.3", Err(unanswered()));
    let (action, _) = run_probed(cc, script, probe).await;
    assert_eq!(action.unwrap(), Action::requeue(REQUEUE_CONVERGING));
}
