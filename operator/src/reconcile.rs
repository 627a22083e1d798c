//! The reconciler: read → validate → build desired objects → apply (server-side apply,
//! one field manager) → compute status → patch status → record events.
//!
//! All decisions are made by the pure functions in [`crate::build`] and
//! [`crate::status`]; this module only performs the I/O around them.

use crate::build::{self, BuildError};
use crate::crd::{CacheCluster, CacheClusterStatus, SpecErrors};
use crate::metrics::Metrics;
use crate::observe::ObservedCluster;
use crate::probe::{HttpProbe, NodeProbe, ProbeResults, ProbeTarget};
use crate::roll::{self, RestartReason, RollAction};
use crate::scale::{self, ScaleOutcome};
use crate::status::{self, CONDITION_DEGRADED, REASON_INVALID_SPEC};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::chrono::Utc;
use k8s_openapi::NamespaceResourceScope;
use kache_cluster::names;
use kache_cluster::MemberList;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Requeue interval of a settled cluster (a safety net; watches drive the rest).
pub const REQUEUE_SETTLED: Duration = Duration::from_secs(300);
/// Requeue interval while a cluster is still converging.
pub const REQUEUE_CONVERGING: Duration = Duration::from_secs(15);
/// Requeue interval while departing nodes hand their data off (scale-in).
pub const REQUEUE_REBALANCING: Duration = Duration::from_secs(2);
/// First retry delay after an error; doubles per consecutive failure.
pub const ERROR_BACKOFF_BASE: Duration = Duration::from_secs(2);
/// Longest retry delay after errors.
pub const ERROR_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Why a reconciliation failed. Failures are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error("kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    /// A desired object could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
}

impl Error {
    /// Short label for the error metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Build(_) => "build",
        }
    }
}

/// Operator-wide settings the reconciler needs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image for CacheClusters that do not set `spec.image`.
    pub node_image: String,
    /// Admin port of the nodes, where a scale-in asks departing nodes for
    /// their hand-off progress (`GET /cluster`).
    pub node_admin_port: u16,
    /// The operator's own namespace: a CacheCluster's NetworkPolicy admits
    /// every pod of it to the nodes' admin port.
    pub operator_namespace: String,
}

/// Operator namespace when none is configured (the chart's usual one).
pub const DEFAULT_OPERATOR_NAMESPACE: &str = "kache-system";

impl Default for Settings {
    fn default() -> Self {
        Self {
            node_image: build::DEFAULT_NODE_IMAGE.to_string(),
            node_admin_port: names::ADMIN_PORT,
            operator_namespace: DEFAULT_OPERATOR_NAMESPACE.to_string(),
        }
    }
}

/// Shared state of the reconciler.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Settings from flags.
    pub settings: Settings,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Clock (injected so tests are deterministic).
    pub now: fn() -> Time,
    /// Asks departing nodes for their hand-off progress (injected so tests
    /// can script it).
    pub probe: Arc<dyn NodeProbe>,
    failures: Mutex<HashMap<ObjectRef<CacheCluster>, u32>>,
}

fn wall_clock() -> Time {
    Time(Utc::now())
}

impl Context {
    /// A context with the real clock.
    pub fn new(
        client: Client,
        settings: Settings,
        metrics: Arc<Metrics>,
        reporter: Reporter,
    ) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            probe: Arc::new(HttpProbe::new(settings.node_admin_port)),
            settings,
            metrics,
            now: wall_clock,
            failures: Mutex::default(),
        }
    }

    fn record_failure(&self, obj: ObjectRef<CacheCluster>) -> u32 {
        let mut f = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = f.entry(obj).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn clear_failures(&self, obj: &ObjectRef<CacheCluster>) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(obj);
    }
}

/// Delay before retry number `failures` (1-based): 2s, 4s, 8s … capped at 5 min.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    ERROR_BACKOFF_BASE
        .saturating_mul(1u32 << exp)
        .min(ERROR_BACKOFF_MAX)
}

/// Server-side apply of one namespaced object under the operator's field manager.
async fn apply<K>(client: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let params = PatchParams::apply(names::MANAGER).force();
    Ok(api
        .patch(&obj.name_any(), &params, &Patch::Apply(obj))
        .await?)
}

async fn patch_status(
    client: &Client,
    cc: &CacheCluster,
    status: &CacheClusterStatus,
) -> Result<(), Error> {
    let ns = build::namespace(cc)?;
    let api: Api<CacheCluster> = Api::namespaced(client.clone(), &ns);
    let patch = serde_json::json!({
        "apiVersion": CacheCluster::api_version(&()),
        "kind": CacheCluster::kind(&()),
        "status": status,
    });
    let params = PatchParams::apply(names::MANAGER).force();
    api.patch_status(&cc.name_any(), &params, &Patch::Apply(&patch))
        .await?;
    Ok(())
}

async fn publish(
    ctx: &Context,
    cc: &CacheCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    // The reference carries the resourceVersion, as client-go's does. kube's
    // Recorder folds events with the same type, reason, action and reference
    // into one series that keeps the FIRST note, so without it a second
    // "published member list version N" within minutes would only bump the
    // count of the first one and `kubectl describe` would show a stale note.
    // Every event here reports a distinct change (which itself changes the
    // CacheCluster), so none must be folded.
    let mut regarding = cc.object_ref(&());
    regarding.resource_version = cc.meta().resource_version.clone();
    // Events are best effort: failing to record one must not fail the reconcile.
    if let Err(e) = ctx.recorder.publish(&event, &regarding).await {
        tracing::warn!(error = %e, reason, "could not publish event");
    }
}

/// Reconciles one CacheCluster. Idempotent: running it twice on an unchanged
/// cluster makes no change.
pub async fn reconcile(cc: Arc<CacheCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&cc, &ctx).await;
    ctx.metrics.observe(
        started.elapsed(),
        result.as_ref().err().map(Error::metric_label),
    );
    if result.is_ok() {
        ctx.clear_failures(&ObjectRef::from_obj(cc.as_ref()));
    }
    result
}

async fn reconcile_inner(cc: &CacheCluster, ctx: &Context) -> Result<Action, Error> {
    if cc.meta().deletion_timestamp.is_some() {
        // Owner references let the garbage collector remove everything.
        return Ok(Action::await_change());
    }
    let name = cc.name_any();
    let ns = build::namespace(cc)?;
    let client = &ctx.client;
    let now = (ctx.now)();

    // Validate once; everything desired is built, and every decision made, from the
    // validated spec.
    let spec = match cc.spec.validate() {
        Ok(valid) => valid,
        Err(errors) => return report_invalid_spec(ctx, cc, &errors, now).await,
    };
    let observed = ObservedCluster::new(cc, spec)?;
    let desired = &observed.valid;
    let owner = &desired.cluster;

    // Identity and networking first, so pods find them when they start.
    apply(client, &ns, &build::node_service_account(owner)).await?;
    apply(client, &ns, &build::node_role(owner)).await?;
    apply(client, &ns, &build::node_role_binding(owner)).await?;
    apply(client, &ns, &build::peers_service(desired)).await?;
    apply(client, &ns, &build::client_service(desired)).await?;
    match build::network_policy(desired, &ctx.settings.operator_namespace) {
        Some(np) => {
            apply(client, &ns, &np).await?;
        }
        None => remove_network_policy(ctx, cc, &ns).await?,
    }

    // Observe the pods and the published member list.
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pods = pods_api
        .list(&ListParams::default().labels(&names::selector_string(&name)))
        .await?
        .items;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let current_cm = cms.get_opt(&names::members_configmap_name(&name)).await?;
    // The StatefulSet as it is (its replicas tell a scale-in under way, its
    // revision a rolling update). Read with a list by name: the chart grants
    // list, not get, on StatefulSets.
    let sts_api: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let current_sts = sts_api
        .list(&ListParams::default().fields(&format!("metadata.name={name}")))
        .await?
        .items
        .into_iter()
        .find(|s| s.name_any() == name);
    let published = status::published_member_list(current_cm.as_ref());
    let previous_version = cc.status.as_ref().map_or(0, |s| s.config_version);
    let member_list = |drained: Option<&str>| {
        status::next_member_list(
            status::desired_members(&observed, &pods, published.as_ref(), drained, &now),
            desired.spec.replication_factor,
            published.as_ref(),
            previous_version,
        )
    };
    let drained = roll::drained_pod(&observed, current_sts.as_ref(), &pods).map(|p| p.name_any());
    let mut list = member_list(drained.as_deref());
    // The member list goes first: on a scale-in it no longer lists the
    // departing nodes, which start handing their data off. Just before it,
    // the scale-in's start goes into the status, so an operator restarted in
    // between keeps its deadline.
    let cm_changed = cm_differs(current_cm.as_ref(), owner, &list)?;
    if cm_changed {
        if let Some(start) = scale::unrecorded_start(&observed, current_sts.as_ref(), &list, &now) {
            let mut recorded = cc.status.clone().unwrap_or_default();
            recorded.rebalance = Some(start);
            patch_status(client, cc, &recorded).await?;
        }
        apply(client, &ns, &build::members_configmap(owner, &list)?).await?;
    }

    // Ask the nodes what a scale-in (the departing ones) or a rolling update
    // (all of them) waits on.
    let mut targets = scale::pods_to_probe(&observed, current_sts.as_ref(), &pods);
    if roll::rolling(&observed, current_sts.as_ref(), &pods) || drained.is_some() {
        for t in roll::report_targets(&observed, &pods) {
            if !targets.iter().any(|x| x.name == t.name) {
                targets.push(t);
            }
        }
    }
    let probes = probe_all(ctx.probe.as_ref(), &targets).await;
    let decision = scale::decide(&observed, current_sts.as_ref(), &pods, &list, &probes, &now);
    let roll = roll::decide(
        &observed,
        current_sts.as_ref(),
        &pods,
        &list,
        cm_changed,
        &probes,
        decision.rebalance.is_some(),
        &now,
    );
    // A node to drain first: marked on its pod (so a restarted operator
    // knows), then left out of the member list.
    if let RollAction::Drain { pod, revision } = &roll.action {
        apply(client, &ns, &roll_drain_mark(&ns, pod, revision, &now)).await?;
        list = member_list(Some(pod));
        apply(client, &ns, &build::members_configmap(owner, &list)?).await?;
    }

    // Scale-in: the StatefulSet keeps the departing pods until they report
    // their hand-off done (or the timeout passes).
    let mut desired_sts = build::statefulset(desired, &ctx.settings.node_image);
    if let Some(spec) = desired_sts.spec.as_mut() {
        spec.replicas = Some(decision.statefulset_replicas);
    }
    let sts = apply(client, &ns, &desired_sts).await?;
    apply(client, &ns, &build::pod_disruption_budget(desired)).await?;

    // Rolling update: one node restarts.
    if let RollAction::Restart { pod, uid, .. } = &roll.action {
        delete_pod(&pods_api, pod, uid).await?;
    }

    let new_status = status::compute_status_underway(
        &observed,
        &pods,
        Some(&sts),
        &list,
        status::Underway {
            rebalance: decision.status_rebalance(),
            rollout: roll.rollout.as_ref(),
            roll_progress: roll.progress.as_deref(),
        },
        now,
    );
    if cc.status.as_ref() != Some(&new_status) {
        patch_status(client, cc, &new_status).await?;
    }

    // Events: what the operator did.
    let first = cc
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_none();
    if first {
        let np = if desired.spec.network_policy.is_some() {
            ", NetworkPolicy"
        } else {
            ""
        };
        let note = format!(
            "created StatefulSet {name} ({} nodes), Services {name} and {}, ConfigMap {}, PodDisruptionBudget{np} and RBAC",
            desired.spec.replicas,
            names::peers_service_name(&name),
            names::members_configmap_name(&name)
        );
        publish(ctx, cc, EventType::Normal, "Created", "Reconcile", note).await;
    } else if cc.status.as_ref().and_then(|s| s.observed_generation) != cc.metadata.generation {
        let note = format!(
            "applied generation {} to StatefulSet {name} ({} nodes)",
            cc.metadata.generation.unwrap_or_default(),
            desired.spec.replicas
        );
        publish(ctx, cc, EventType::Normal, "SpecApplied", "Reconcile", note).await;
    }
    if published.as_ref().map(|p| p.version) != Some(list.version) {
        let note = format!(
            "published member list version {} with {} member(s)",
            list.version,
            list.members.len()
        );
        publish(
            ctx,
            cc,
            EventType::Normal,
            "MembersChanged",
            "PublishMembers",
            note,
        )
        .await;
    }
    rebalance_events(ctx, cc, &decision, desired.spec.scale_down_timeout_seconds).await;
    roll_events(ctx, cc, &roll, desired.spec.scale_down_timeout_seconds).await;
    unschedulable_events(ctx, cc, &new_status).await;
    if decision.waiting() || roll.waiting() {
        return Ok(Action::requeue(REQUEUE_REBALANCING));
    }

    let settled = status::find_condition(&new_status, status::CONDITION_READY)
        .is_some_and(|c| c.status == "True");
    Ok(Action::requeue(if settled {
        REQUEUE_SETTLED
    } else {
        REQUEUE_CONVERGING
    }))
}

/// Whether the members ConfigMap differs from what `list` renders to.
fn cm_differs(
    current: Option<&ConfigMap>,
    cluster: &build::ClusterRef,
    list: &MemberList,
) -> Result<bool, Error> {
    let desired = build::members_configmap(cluster, list)?;
    Ok(current.map(|c| &c.data) != Some(&desired.data)
        || current.map(|c| &c.metadata.annotations) != Some(&desired.metadata.annotations))
}

/// The drain mark of a rolling update on pod `name` (server-side applied
/// under the operator's field manager, so it only ever touches these two
/// annotations).
fn roll_drain_mark(ns: &str, name: &str, revision: &str, now: &Time) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(ns.to_string()),
            annotations: Some(
                [
                    (
                        roll::DRAIN_REVISION_ANNOTATION.to_string(),
                        revision.to_string(),
                    ),
                    (roll::DRAIN_SINCE_ANNOTATION.to_string(), now.0.to_rfc3339()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        spec: None,
        status: None,
    }
}

/// Deletes pod `name` if it is still the one with `uid` (the StatefulSet
/// controller recreates it from the current template).
async fn delete_pod(api: &Api<Pod>, name: &str, uid: &str) -> Result<(), Error> {
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Already gone, or replaced since.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Events of a rolling update: a node drained, a node restarted (and why),
/// the roll finished (`timeout`: `scaleDownTimeoutSeconds`).
async fn roll_events(ctx: &Context, cc: &CacheCluster, roll: &roll::RollDecision, timeout: u32) {
    let previous = cc.status.as_ref().and_then(|s| s.rollout.as_ref());
    match &roll.action {
        RollAction::Drain { pod, revision } => {
            let note = format!(
                "rolling update to revision {revision}: {pod} leaves the member list and hands its data to the other nodes before it restarts"
            );
            publish(ctx, cc, EventType::Normal, "RollingUpdate", "Drain", note).await;
        }
        RollAction::Restart { pod, why, .. } => {
            let revision = roll.rollout.as_ref().map_or("", |r| r.revision.as_str());
            if let RestartReason::DrainTimedOut(detail) = why {
                let note = format!(
                    "{pod} did not finish handing off within {timeout}s ({detail}); restarting it anyway, items not yet moved are lost"
                );
                publish(
                    ctx,
                    cc,
                    EventType::Warning,
                    "HandoffTimeout",
                    "Restart",
                    note,
                )
                .await;
            }
            let how = match why {
                RestartReason::Turn => {
                    "its replacement refills from the replicas before it is Ready"
                }
                RestartReason::Drained | RestartReason::DrainTimedOut(_) => {
                    "its replacement joins as a new member"
                }
                RestartReason::NotReady => "it was not Ready",
            };
            let note = format!("rolling update to revision {revision}: restarting {pod} ({how})");
            publish(ctx, cc, EventType::Normal, "RollingUpdate", "Restart", note).await;
        }
        RollAction::None => {
            if let (Some(done), None) = (previous, roll.rollout.as_ref()) {
                let note = format!(
                    "rolling update finished: every node runs revision {}",
                    done.revision
                );
                publish(
                    ctx,
                    cc,
                    EventType::Normal,
                    "RolloutFinished",
                    "Restart",
                    note,
                )
                .await;
            }
        }
    }
}

/// A Warning event when pods become unschedulable (or the scheduler's
/// reason changes), with the scheduler's reason.
async fn unschedulable_events(ctx: &Context, cc: &CacheCluster, next: &CacheClusterStatus) {
    let unschedulable = |s: &CacheClusterStatus| {
        status::find_condition(s, CONDITION_DEGRADED)
            .filter(|c| c.status == "True" && c.reason == status::REASON_UNSCHEDULABLE)
            .map(|c| c.message.clone())
    };
    let Some(now) = unschedulable(next) else {
        return;
    };
    if cc.status.as_ref().and_then(unschedulable) == Some(now.clone()) {
        return;
    }
    let note = format!("cannot schedule: {now}");
    publish(
        ctx,
        cc,
        EventType::Warning,
        status::REASON_UNSCHEDULABLE,
        "Schedule",
        note,
    )
    .await;
}

/// Deletes the NetworkPolicy `<name>` when it exists and this CacheCluster
/// controls it (`spec.networkPolicy` was disabled or removed). A policy of
/// the same name that someone else made is left alone. Read with a list by
/// name: the chart grants list, not get, on NetworkPolicies.
async fn remove_network_policy(ctx: &Context, cc: &CacheCluster, ns: &str) -> Result<(), Error> {
    let name = cc.name_any();
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), ns);
    let existing = api
        .list(&ListParams::default().fields(&format!("metadata.name={name}")))
        .await?
        .items
        .into_iter()
        .find(|np| np.name_any() == name);
    let Some(np) = existing else {
        return Ok(());
    };
    let ours = np
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == cc.metadata.uid.as_ref());
    if !ours {
        return Ok(());
    }
    // The uid precondition makes sure it is the policy just read.
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: np.metadata.uid.clone(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {}
        // Already gone, or replaced by another object since.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    tracing::info!(%ns, %name, "deleted NetworkPolicy (spec.networkPolicy disabled)");
    let note = format!("deleted NetworkPolicy {name}: spec.networkPolicy is not enabled");
    publish(
        ctx,
        cc,
        EventType::Normal,
        "NetworkPolicyDeleted",
        "Reconcile",
        note,
    )
    .await;
    Ok(())
}

/// Says why the spec is invalid (in the status, and in one Warning event per generation)
/// and changes nothing else. No retry loop: the next spec change triggers a new reconcile.
async fn report_invalid_spec(
    ctx: &Context,
    cc: &CacheCluster,
    errors: &SpecErrors,
    now: Time,
) -> Result<Action, Error> {
    let (ns, name) = (build::namespace(cc)?, cc.name_any());
    ctx.metrics.invalid_specs.inc();
    let status = status::invalid_spec_status(cc, errors, now);
    let already_reported = cc.status.as_ref().is_some_and(|s| {
        s.observed_generation == cc.metadata.generation
            && status::find_condition(s, CONDITION_DEGRADED)
                .is_some_and(|c| c.reason == REASON_INVALID_SPEC)
    });
    tracing::warn!(%ns, %name, %errors, "invalid CacheCluster spec");
    if cc.status.as_ref() != Some(&status) {
        patch_status(&ctx.client, cc, &status).await?;
    }
    if !already_reported {
        let note = format!("invalid spec, nothing changed: {errors}");
        publish(
            ctx,
            cc,
            EventType::Warning,
            REASON_INVALID_SPEC,
            "Validate",
            note,
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Asks every target for its hand-off progress, all at once.
async fn probe_all(probe: &dyn NodeProbe, targets: &[ProbeTarget]) -> ProbeResults {
    let answers = futures::future::join_all(targets.iter().map(|t| probe.report(&t.ip))).await;
    targets
        .iter()
        .map(|t| t.name.clone())
        .zip(answers)
        .collect()
}

/// Events of a scale-in: started, timed out, finished (`timeout`: `scaleDownTimeoutSeconds`).
async fn rebalance_events(
    ctx: &Context,
    cc: &CacheCluster,
    decision: &scale::ScaleDecision,
    timeout: u32,
) {
    let Some(r) = decision.rebalance.as_ref() else {
        return;
    };
    let previous = cc.status.as_ref().and_then(|s| s.rebalance.as_ref());
    // A record without departing nodes is only the start, written before the member list
    // went out: the scale-in has not been announced yet.
    let same_as_before = previous.is_some_and(|p| {
        p.target_replicas == r.target_replicas
            && p.current_replicas == r.current_replicas
            && !p.departing.is_empty()
    });
    match &decision.outcome {
        ScaleOutcome::Waiting if !same_as_before => {
            let note = scale::started_note(r, timeout);
            publish(
                ctx,
                cc,
                EventType::Normal,
                "RebalanceStarted",
                "ScaleIn",
                note,
            )
            .await;
        }
        ScaleOutcome::TimedOut { unfinished } => {
            let note = scale::timeout_note(r, unfinished, timeout);
            publish(
                ctx,
                cc,
                EventType::Warning,
                "HandoffTimeout",
                "ScaleIn",
                note,
            )
            .await;
            let note = scale::finished_note(r, &decision.outcome);
            publish(
                ctx,
                cc,
                EventType::Normal,
                "RebalanceFinished",
                "ScaleIn",
                note,
            )
            .await;
        }
        ScaleOutcome::HandedOff => {
            let note = scale::finished_note(r, &decision.outcome);
            publish(
                ctx,
                cc,
                EventType::Normal,
                "RebalanceFinished",
                "ScaleIn",
                note,
            )
            .await;
        }
        ScaleOutcome::Waiting | ScaleOutcome::Steady => {}
    }
}

/// Failed reconciliations are retried with exponential backoff per object.
pub fn error_policy(cc: Arc<CacheCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.record_failure(ObjectRef::from_obj(cc.as_ref()));
    let delay = backoff(failures);
    tracing::warn!(
        namespace = cc.namespace().unwrap_or_default(),
        name = cc.name_any(),
        %error,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Maps a cache-node pod to the CacheCluster it belongs to.
fn pod_owner(pod: Pod) -> Option<ObjectRef<CacheCluster>> {
    let cluster = pod.labels().get(names::LABEL_INSTANCE)?;
    let ns = pod.namespace()?;
    Some(ObjectRef::new(cluster).within(&ns))
}

/// Runs the controller until `shutdown` resolves: watches CacheClusters, the
/// objects they own, and their pods (readiness changes change the member list).
pub async fn run_controller(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let client = &ctx.client;
    let managed = watcher::Config::default().labels(&format!(
        "{}={}",
        names::LABEL_MANAGED_BY,
        names::MANAGER
    ));
    Controller::new(
        api::<CacheCluster>(client, &namespace),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(client, &namespace), managed.clone())
    .owns(api::<Service>(client, &namespace), managed.clone())
    .owns(api::<ConfigMap>(client, &namespace), managed.clone())
    .owns(
        api::<PodDisruptionBudget>(client, &namespace),
        managed.clone(),
    )
    .owns(api::<NetworkPolicy>(client, &namespace), managed.clone())
    .watches(api::<Pod>(client, &namespace), managed, pod_owner)
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx.clone())
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => {
                tracing::debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled")
            }
            Err(e) => tracing::debug!(error = %e, "reconcile stream error"),
        }
    })
    .await;
}

#[cfg(test)]
mod tests;
