//! Pure functions from observed state to the published member list and to the
//! CacheCluster's status and conditions.
//!
//! The `configVersion` rule lives here ([`next_member_list`]): the member list
//! is computed from Ready pods in ordinal order; when it differs from the list
//! last published (ignoring the version) it is published with the previous
//! version plus one; a no-op never bumps it.

use crate::crd::{
    CacheCluster, CacheClusterStatus, MemberState, MemberStatus, RebalanceStatus, RolloutStatus,
    SpecErrors,
};
use crate::observe::{
    member_state, pod_ip, pod_ordinal, pod_revision, update_revision, ObservedCluster,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kache_cluster::{names, Member, MemberList};
use kube::ResourceExt;

/// Condition type: every desired node is Ready and the rollout is complete.
pub const CONDITION_READY: &str = "Ready";
/// Condition type: the operator or the StatefulSet is moving towards the spec.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// Condition type: something needs a human (invalid spec, failing nodes).
pub const CONDITION_DEGRADED: &str = "Degraded";
/// Condition type: a scale-in is under way; departing nodes hand their data
/// to the remaining ones before their pods are removed.
pub const CONDITION_REBALANCING: &str = "Rebalancing";
/// Reason of a True `Rebalancing` condition.
pub const REASON_HANDING_OFF: &str = "HandingOff";

/// Reason of a True `Progressing` condition while the operator restarts the
/// nodes one by one for a new revision.
pub const REASON_ROLLING_UPDATE: &str = "RollingUpdate";
/// Reason of a True `Degraded` condition while the scheduler cannot place a
/// pod (the message carries the scheduler's reason).
pub const REASON_UNSCHEDULABLE: &str = "Unschedulable";

/// Reason: the spec failed validation.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";
/// Reason of a True `Ready`: `replicas` is 0.
pub const REASON_SCALED_TO_ZERO: &str = "ScaledToZero";
/// Reason of a True `Ready`: every node the spec asks for is Ready.
pub const REASON_ALL_NODES_READY: &str = "AllNodesReady";
/// Reason of a False `Ready`.
pub const REASON_NODES_NOT_READY: &str = "NodesNotReady";
/// Reason of a True `Progressing` while departing nodes hand off before a scale-in.
pub const REASON_SCALING_IN: &str = "ScalingIn";
/// Reason of a True `Progressing` while the StatefulSet controller rolls out a change.
pub const REASON_ROLLING_OUT: &str = "RollingOut";
/// Reason of a True `Progressing` while nodes start.
pub const REASON_WAITING_FOR_NODES: &str = "WaitingForNodes";
/// Reason of a False `Progressing`: every node runs the current spec.
pub const REASON_ROLLOUT_COMPLETE: &str = "RolloutComplete";
/// Reason of a True `Degraded` while nodes crash or cannot pull their image.
pub const REASON_NODES_FAILING: &str = "NodesFailing";
/// Reason of a False `Degraded`.
pub const REASON_AS_EXPECTED: &str = "AsExpected";
/// Reason of a False `Rebalancing`.
pub const REASON_IDLE: &str = "Idle";

/// Container waiting reasons that will not fix themselves.
const FAILING_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The pods of the cluster `name` (named `<name>-<ordinal>`), sorted by ordinal.
fn ordered_pods<'a>(name: &str, pods: &'a [Pod]) -> Vec<(u32, &'a Pod)> {
    let mut out: Vec<_> = pods
        .iter()
        .filter_map(|p| pod_ordinal(&p.name_any(), name).map(|o| (o, p)))
        .collect();
    out.sort_by_key(|(o, _)| *o);
    out
}

/// Every pod of the cluster with its state, in ordinal order.
pub fn member_statuses(cluster: &ObservedCluster, pods: &[Pod]) -> Vec<MemberStatus> {
    let (name, ns) = (cluster.name(), &cluster.valid.cluster.namespace);
    ordered_pods(name, pods)
        .into_iter()
        .map(|(_, p)| MemberStatus {
            name: p.name_any(),
            host: names::pod_host(&p.name_any(), name, ns),
            ip: pod_ip(p),
            port: i32::from(cluster.spec().port),
            state: member_state(p),
        })
        .collect()
}

/// How long a member whose pod stopped being Ready stays in the member list
/// (with `replicationFactor` 2 or more): long enough for a restarted pod to
/// come back, refill its share from the replicas and be Ready again, so a
/// restart (planned or not) does not change the ring twice. A pod the
/// scheduler cannot place is dropped at once.
pub const RESTART_GRACE_SECONDS: i64 = 120;

/// The scheduler's reason when it cannot place the pod
/// (`PodScheduled=False`, reason `Unschedulable`).
pub fn unschedulable_message(pod: &Pod) -> Option<String> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        })
        .map(|c| {
            c.message
                .clone()
                .unwrap_or_else(|| "the scheduler cannot place it".into())
        })
}

/// Since when a pod has not been Ready: the Ready condition's last change, or
/// the pod's creation for a pod that never was.
fn not_ready_since(pod: &Pod) -> Option<Time> {
    let ready_change = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.clone());
    match (ready_change, pod.metadata.creation_timestamp.clone()) {
        (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// Whether a published member whose pod is not Ready stays listed: its pod
/// is restarting (gone and about to be recreated, terminating, or starting)
/// within [`RESTART_GRACE_SECONDS`], and the scheduler has not given up on it.
fn restarting(pod: Option<&Pod>, now: &Time) -> bool {
    let Some(pod) = pod else {
        // Deleted: the StatefulSet controller recreates it right away.
        return true;
    };
    if pod.metadata.deletion_timestamp.is_some() {
        return true;
    }
    if unschedulable_message(pod).is_some() {
        return false;
    }
    not_ready_since(pod).is_none_or(|since| (now.0 - since.0).num_seconds() < RESTART_GRACE_SECONDS)
}

/// The members to publish, in ordinal order, for ordinals below
/// `spec.replicas` (a scale-in removes the departing ones from the list
/// before they go away):
/// * every Ready pod, except the one a rolling update drains
///   (`drained`, see [`crate::roll`]);
/// * with `replicationFactor` 2 or more, every member of the `published`
///   list whose pod is restarting (see [`RESTART_GRACE_SECONDS`]), as
///   published: its replacement then finds itself listed and pulls its
///   share back from the replicas before it reports Ready, and the ring does
///   not change twice.
pub fn desired_members(
    cluster: &ObservedCluster,
    pods: &[Pod],
    published: Option<&MemberList>,
    drained: Option<&str>,
    now: &Time,
) -> Vec<Member> {
    let (name, spec) = (cluster.name(), cluster.spec());
    let mut members: Vec<(u32, Member)> = ready_members(cluster, pods)
        .into_iter()
        .filter(|m| Some(m.name.as_str()) != drained)
        .filter_map(|m| Some((pod_ordinal(&m.name, name)?, m)))
        .collect();
    if spec.replication_factor >= 2 {
        for m in published.map_or(&[][..], |p| p.members.as_slice()) {
            let Some(ordinal) = pod_ordinal(&m.name, name) else {
                continue;
            };
            let listed = members.iter().any(|(_, x)| x.name == m.name);
            let pod = pods.iter().find(|p| p.name_any() == m.name);
            let ready = pod.is_some_and(|p| member_state(p) == MemberState::Ready);
            if ordinal < spec.replicas && !listed && !ready && restarting(pod, now) {
                members.push((ordinal, m.clone()));
            }
        }
    }
    members.sort_by_key(|(o, _)| *o);
    members.into_iter().map(|(_, m)| m).collect()
}

/// Ready pods in ordinal order, as members. Pods whose ordinal is at or above
/// `spec.replicas` are left out.
pub fn ready_members(cluster: &ObservedCluster, pods: &[Pod]) -> Vec<Member> {
    let (name, ns) = (cluster.name(), &cluster.valid.cluster.namespace);
    let spec = cluster.spec();
    ordered_pods(name, pods)
        .into_iter()
        .filter(|(ordinal, p)| *ordinal < spec.replicas && member_state(p) == MemberState::Ready)
        .filter_map(|(_, p)| {
            Some(Member {
                name: p.name_any(),
                host: names::pod_host(&p.name_any(), name, ns),
                ip: pod_ip(p)?,
                port: spec.port,
                peer_port: names::PEER_PORT,
            })
        })
        .collect()
}

/// The member list currently published in the `<name>-members` ConfigMap, if
/// there is one and it parses.
pub fn published_member_list(cm: Option<&ConfigMap>) -> Option<MemberList> {
    let json = cm?.data.as_ref()?.get(names::MEMBERS_JSON_KEY)?;
    MemberList::from_json(json).ok()
}

/// The `configVersion` rule. `published` is the list in the ConfigMap now;
/// `status_version` is `status.configVersion`, a floor so the version never
/// goes backwards even if someone deletes the ConfigMap.
pub fn next_member_list(
    members: Vec<Member>,
    replication_factor: u8,
    published: Option<&MemberList>,
    status_version: i64,
) -> MemberList {
    let floor = u64::try_from(status_version).unwrap_or(0);
    let candidate = MemberList {
        version: 0,
        replication_factor,
        members,
    };
    match published {
        Some(p) if p.same_membership(&candidate) && p.version >= floor => p.clone(),
        _ => {
            let previous = published.map_or(0, |p| p.version).max(floor);
            MemberList {
                version: previous.saturating_add(1),
                ..candidate
            }
        }
    }
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Carries `lastTransitionTime` over from `previous` when a condition's status
/// did not change.
pub fn merge_conditions(previous: &[Condition], mut next: Vec<Condition>) -> Vec<Condition> {
    for c in &mut next {
        if let Some(old) = previous.iter().find(|o| o.type_ == c.type_) {
            if old.status == c.status {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
    }
    next
}

fn failing_pods(pods: &[(u32, &Pod)]) -> Vec<String> {
    pods.iter()
        .filter_map(|(_, p)| {
            let statuses = p.status.as_ref()?.container_statuses.as_ref()?;
            statuses.iter().find_map(|cs| {
                let reason = cs.state.as_ref()?.waiting.as_ref()?.reason.as_deref()?;
                FAILING_REASONS
                    .contains(&reason)
                    .then(|| format!("{}: {reason}", p.name_any()))
            })
        })
        .collect()
}

/// What the StatefulSet says about its rollout, if it is still moving. The
/// rolling update itself is the operator's ([`crate::roll`]): it reports
/// through [`Underway::roll_progress`].
fn rollout_in_progress(sts: Option<&StatefulSet>, desired: i32) -> Option<String> {
    let Some(sts) = sts else {
        return Some("creating the StatefulSet".into());
    };
    let Some(st) = sts.status.as_ref() else {
        return Some("waiting for the StatefulSet controller".into());
    };
    if st.observed_generation.unwrap_or(0) < sts.metadata.generation.unwrap_or(0) {
        return Some("waiting for the StatefulSet controller to observe the new spec".into());
    }
    if st.replicas != desired {
        return Some(format!("scaling from {} to {desired} nodes", st.replicas));
    }
    None
}

/// Pods the scheduler cannot place, each with its reason, in ordinal order.
fn unschedulable_pods(pods: &[(u32, &Pod)]) -> Vec<String> {
    pods.iter()
        .filter(|(_, p)| p.metadata.deletion_timestamp.is_none())
        .filter_map(|(_, p)| {
            unschedulable_message(p).map(|m| format!("{}: {}", p.name_any(), m.trim()))
        })
        .collect()
}

/// Live pods that run the StatefulSet's current revision.
fn updated_replicas(name: &str, pods: &[Pod], sts: Option<&StatefulSet>) -> i32 {
    let Some(revision) = update_revision(sts) else {
        return 0;
    };
    let n = ordered_pods(name, pods)
        .iter()
        .filter(|(_, p)| {
            p.metadata.deletion_timestamp.is_none() && pod_revision(p) == Some(revision)
        })
        .count();
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// What the operator is in the middle of, for the status.
#[derive(Clone, Copy, Debug, Default)]
pub struct Underway<'a> {
    /// The scale-in it waits on (see [`crate::scale`]).
    pub rebalance: Option<&'a RebalanceStatus>,
    /// The rolling-update step under way (see [`crate::roll`]).
    pub rollout: Option<&'a RolloutStatus>,
    /// The rolling update's progress, while one is under way.
    pub roll_progress: Option<&'a str>,
}

/// Status of a valid CacheCluster from what the operator observed, with
/// nothing under way.
pub fn compute_status(
    cluster: &ObservedCluster,
    pods: &[Pod],
    sts: Option<&StatefulSet>,
    published: &MemberList,
    now: Time,
) -> CacheClusterStatus {
    compute_status_underway(cluster, pods, sts, published, Underway::default(), now)
}

/// How many nodes the spec asks for and how many there are.
struct Counts {
    /// `spec.replicas`.
    desired: i32,
    /// Ready nodes among those the spec asks for (departing ones do not count).
    ready: i32,
    /// Ready pods, departing ones included.
    ready_total: i32,
    /// Pods not being deleted.
    live: i32,
    /// The StatefulSet's size: `desired`, or more while departing nodes hand off.
    held: i32,
}

impl Counts {
    fn of(
        cluster: &ObservedCluster,
        pods: &[Pod],
        members: &[MemberStatus],
        underway: &Underway,
    ) -> Self {
        let count = |n: usize| i32::try_from(n).unwrap_or(i32::MAX);
        let spec = cluster.spec();
        let desired = spec.replicas_i32();
        let ready = ordered_pods(cluster.name(), pods)
            .iter()
            .filter(|(o, p)| *o < spec.replicas && member_state(p) == MemberState::Ready)
            .count();
        let state_count =
            |keep: fn(MemberState) -> bool| count(members.iter().filter(|m| keep(m.state)).count());
        Counts {
            desired,
            ready: count(ready),
            ready_total: state_count(|s| s == MemberState::Ready),
            live: state_count(|s| s != MemberState::Terminating),
            held: underway.rebalance.map_or(desired, |r| r.current_replicas),
        }
    }
}

/// A condition's status, reason and message, before it is stamped with the generation and
/// the time.
struct Verdict {
    status: bool,
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn new(status: bool, reason: &'static str, message: String) -> Self {
        Verdict {
            status,
            reason,
            message,
        }
    }
}

/// `Ready`: every node the spec asks for is Ready and no rollout is under way.
fn ready_verdict(n: &Counts, rollout: Option<&str>) -> Verdict {
    let (desired, ready) = (n.desired, n.ready);
    if desired == 0 && rollout.is_none() {
        Verdict::new(
            true,
            REASON_SCALED_TO_ZERO,
            "replicas is 0: no cache nodes".into(),
        )
    } else if ready >= desired && rollout.is_none() {
        Verdict::new(
            true,
            REASON_ALL_NODES_READY,
            format!("{ready}/{desired} nodes ready"),
        )
    } else {
        Verdict::new(
            false,
            REASON_NODES_NOT_READY,
            format!("{ready}/{desired} nodes ready"),
        )
    }
}

/// `Progressing`: a scale-in, a rollout, or nodes still starting.
fn progressing_verdict(
    n: &Counts,
    underway: &Underway,
    rollout: Option<&str>,
    published: &MemberList,
) -> Verdict {
    let (desired, ready, held) = (n.desired, n.ready, n.held);
    if let Some(r) = underway.rebalance {
        let departing: Vec<&str> = r.departing.iter().map(|d| d.name.as_str()).collect();
        return Verdict::new(
            true,
            REASON_SCALING_IN,
            format!(
                "waiting for {} to hand off before scaling from {held} to {desired} nodes",
                departing.join(", ")
            ),
        );
    }
    match rollout {
        Some(what) if underway.roll_progress.is_some() => {
            Verdict::new(true, REASON_ROLLING_UPDATE, what.to_string())
        }
        Some(what) => Verdict::new(true, REASON_ROLLING_OUT, what.to_string()),
        None if ready < desired => Verdict::new(
            true,
            REASON_WAITING_FOR_NODES,
            format!(
                "waiting for {} more node(s) to become ready",
                desired - ready
            ),
        ),
        None => Verdict::new(
            false,
            REASON_ROLLOUT_COMPLETE,
            format!(
                "all {desired} nodes run the current spec; member list version {}",
                published.version
            ),
        ),
    }
}

/// `Degraded`: pods the scheduler cannot place, or nodes that fail.
fn degraded_verdict(name: &str, pods: &[Pod]) -> Verdict {
    let ordered = ordered_pods(name, pods);
    let failing = failing_pods(&ordered);
    let mut unschedulable = unschedulable_pods(&ordered);
    if !unschedulable.is_empty() {
        unschedulable.extend(failing);
        Verdict::new(true, REASON_UNSCHEDULABLE, unschedulable.join("; "))
    } else if !failing.is_empty() {
        Verdict::new(true, REASON_NODES_FAILING, failing.join(", "))
    } else {
        Verdict::new(false, REASON_AS_EXPECTED, "no problems detected".into())
    }
}

/// `Rebalancing`: a scale-in's hand-off.
fn rebalancing_verdict(rebalance: Option<&RebalanceStatus>) -> Verdict {
    match rebalance {
        Some(r) => Verdict::new(true, REASON_HANDING_OFF, crate::scale::progress_message(r)),
        None => Verdict::new(false, REASON_IDLE, "no scale-in under way".into()),
    }
}

/// Status of a valid CacheCluster from what the operator observed and what
/// it is in the middle of.
pub fn compute_status_underway(
    cluster: &ObservedCluster,
    pods: &[Pod],
    sts: Option<&StatefulSet>,
    published: &MemberList,
    underway: Underway<'_>,
    now: Time,
) -> CacheClusterStatus {
    let generation = cluster.generation;
    let members = member_statuses(cluster, pods);
    let n = Counts::of(cluster, pods, &members, &underway);
    let rollout = underway
        .roll_progress
        .map(str::to_string)
        .or_else(|| rollout_in_progress(sts, n.held));
    let verdicts = [
        (CONDITION_READY, ready_verdict(&n, rollout.as_deref())),
        (
            CONDITION_PROGRESSING,
            progressing_verdict(&n, &underway, rollout.as_deref(), published),
        ),
        (CONDITION_DEGRADED, degraded_verdict(cluster.name(), pods)),
        (
            CONDITION_REBALANCING,
            rebalancing_verdict(underway.rebalance),
        ),
    ];
    let conditions = verdicts
        .into_iter()
        .map(|(type_, v)| condition(type_, v.status, v.reason, v.message, generation, &now))
        .collect();
    let previous = cluster
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    CacheClusterStatus {
        observed_generation: generation,
        replicas: n.live,
        ready_replicas: n.ready_total,
        selector: names::selector_string(cluster.name()),
        members,
        config_version: i64::try_from(published.version).unwrap_or(i64::MAX),
        conditions: merge_conditions(previous, conditions),
        rebalance: underway.rebalance.cloned(),
        revision: update_revision(sts).map(str::to_string),
        updated_replicas: updated_replicas(cluster.name(), pods, sts),
        rollout: underway.rollout.cloned(),
    }
}

/// Status of a CacheCluster whose spec failed validation: nothing is changed
/// in the cluster; the conditions say why, the rest of the status is kept. Only the
/// CacheCluster's metadata and last status are read (there is no [`ObservedCluster`]
/// without a valid spec, and the raw one is not read).
pub fn invalid_spec_status(
    cc: &CacheCluster,
    errors: &SpecErrors,
    now: Time,
) -> CacheClusterStatus {
    let generation = cc.metadata.generation;
    let prev = cc.status.clone().unwrap_or_default();
    let message = format!("invalid spec: {errors}");
    let mut conditions = vec![
        condition(
            CONDITION_READY,
            false,
            REASON_INVALID_SPEC,
            "the spec is invalid; the last valid configuration keeps running".into(),
            generation,
            &now,
        ),
        condition(
            CONDITION_PROGRESSING,
            false,
            REASON_INVALID_SPEC,
            "waiting for a valid spec".into(),
            generation,
            &now,
        ),
        condition(
            CONDITION_DEGRADED,
            true,
            REASON_INVALID_SPEC,
            message,
            generation,
            &now,
        ),
    ];
    // Nothing changes while the spec is invalid: a scale-in under way stays as it was.
    conditions.extend(
        prev.conditions
            .iter()
            .filter(|c| c.type_ == CONDITION_REBALANCING)
            .cloned(),
    );
    CacheClusterStatus {
        observed_generation: generation,
        selector: names::selector_string(&cc.name_any()),
        conditions: merge_conditions(&prev.conditions, conditions),
        ..prev
    }
}

/// Looks a condition up by type.
pub fn find_condition<'a>(status: &'a CacheClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::CacheClusterSpec;
    use crate::fixtures::{cluster, observed, pod, settled_sts, t};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition,
    };

    fn three_ready() -> Vec<Pod> {
        vec![
            pod("web-2", Some("10.0.0.3"), true),
            pod("web-0", Some("10.0.0.1"), true),
            pod("web-1", Some("10.0.0.2"), true),
        ]
    }

    #[test]
    fn only_ready_pods_in_ordinal_order_are_members() {
        let cc = cluster("web", CacheClusterSpec::default());
        let mut pods = three_ready();
        pods[0] = pod("web-2", Some("10.0.0.3"), false);
        pods.push(pod("other-0", Some("10.0.0.9"), true));
        let members = ready_members(&observed(&cc), &pods);
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["web-0", "web-1"]);
        assert_eq!(members[0].host, "web-0.web-peers.prod.svc");
        assert_eq!(members[0].ip, "10.0.0.1");
        assert_eq!(members[0].port, 11211);
        assert_eq!(members[0].peer_port, 11212);
    }

    fn names_of(members: &[Member]) -> Vec<&str> {
        members.iter().map(|m| m.name.as_str()).collect()
    }

    fn replicated(rf: i32) -> CacheCluster {
        cluster(
            "web",
            CacheClusterSpec {
                replication_factor: rf,
                ..Default::default()
            },
        )
    }

    #[test]
    fn a_restarting_member_stays_listed_with_replicas() {
        let cc = replicated(2);
        let v1 = next_member_list(ready_members(&observed(&cc), &three_ready()), 2, None, 0);
        // web-1 deleted (gone, terminating) or restarted (not Ready, new IP).
        let mut terminating = pod("web-1", Some("10.0.0.2"), false);
        terminating.metadata.deletion_timestamp = Some(t(0));
        let mut starting = pod("web-1", Some("10.0.0.22"), false);
        starting.metadata.creation_timestamp = Some(t(0));
        let cases = [
            ("gone", None),
            ("terminating", Some(terminating)),
            ("starting", Some(starting.clone())),
        ];
        for (what, web1) in cases {
            let mut pods = vec![
                pod("web-0", Some("10.0.0.1"), true),
                pod("web-2", Some("10.0.0.3"), true),
            ];
            pods.extend(web1);
            let members = desired_members(&observed(&cc), &pods, Some(&v1), None, &t(30));
            assert_eq!(members, v1.members, "{what}: kept as published");
        }
        // Longer than the grace: dropped.
        let pods = vec![
            pod("web-0", Some("10.0.0.1"), true),
            starting.clone(),
            pod("web-2", Some("10.0.0.3"), true),
        ];
        let late = desired_members(
            &observed(&cc),
            &pods,
            Some(&v1),
            None,
            &t(RESTART_GRACE_SECONDS),
        );
        assert_eq!(names_of(&late), ["web-0", "web-2"]);
        // Ready again: listed with its new IP.
        let back = vec![
            pod("web-0", Some("10.0.0.1"), true),
            pod("web-1", Some("10.0.0.22"), true),
            pod("web-2", Some("10.0.0.3"), true),
        ];
        let members = desired_members(&observed(&cc), &back, Some(&v1), None, &t(30));
        assert_eq!(names_of(&members), ["web-0", "web-1", "web-2"]);
        assert_eq!(members[1].ip, "10.0.0.22");
        // Without replicas it has no copy to refill from: dropped at once.
        let cc1 = replicated(1);
        let pods = vec![pod("web-0", Some("10.0.0.1"), true), starting];
        let members = desired_members(&observed(&cc1), &pods, Some(&v1), None, &t(30));
        assert_eq!(names_of(&members), ["web-0"]);
    }

    #[test]
    fn an_unschedulable_or_departing_member_is_not_kept() {
        let cc = replicated(2);
        let v1 = next_member_list(ready_members(&observed(&cc), &three_ready()), 2, None, 0);
        let mut stuck = pod("web-1", None, false);
        stuck.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/1 nodes are available: 1 Insufficient cpu.".into()),
            ..Default::default()
        }]);
        assert_eq!(
            unschedulable_message(&stuck).as_deref(),
            Some("0/1 nodes are available: 1 Insufficient cpu.")
        );
        let pods = vec![
            pod("web-0", Some("10.0.0.1"), true),
            stuck,
            pod("web-2", Some("10.0.0.3"), true),
        ];
        let members = desired_members(&observed(&cc), &pods, Some(&v1), None, &t(1));
        assert_eq!(names_of(&members), ["web-0", "web-2"]);
        // Scaled to 2: web-2 departs even though it restarts.
        let mut two = replicated(2);
        two.spec.replicas = 2;
        let pods = vec![
            pod("web-0", Some("10.0.0.1"), true),
            pod("web-1", Some("10.0.0.2"), true),
        ];
        let members = desired_members(&observed(&two), &pods, Some(&v1), None, &t(1));
        assert_eq!(names_of(&members), ["web-0", "web-1"]);
    }

    #[test]
    fn a_drained_pod_is_left_out() {
        let cc = replicated(1);
        let members = desired_members(&observed(&cc), &three_ready(), None, Some("web-2"), &t(0));
        assert_eq!(names_of(&members), ["web-0", "web-1"]);
    }

    #[test]
    fn unschedulable_pods_degrade_the_cluster_with_the_schedulers_reason() {
        let cc = cluster(
            "web",
            CacheClusterSpec {
                replicas: 4,
                ..Default::default()
            },
        );
        let mut pods = three_ready();
        let mut stuck = pod("web-3", None, false);
        stuck.status.as_mut().unwrap().conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some(
                "0/1 nodes are available: 1 Insufficient cpu. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.."
                    .into(),
            ),
            ..Default::default()
        }]);
        pods.push(stuck);
        let list = next_member_list(ready_members(&observed(&cc), &pods), 1, None, 0);
        assert_eq!(list.members.len(), 3, "the pending pod is not published");
        let st = compute_status(&observed(&cc), &pods, Some(&settled_sts(4)), &list, t(0));
        let deg = find_condition(&st, CONDITION_DEGRADED).unwrap();
        assert_eq!(
            (deg.status.as_str(), deg.reason.as_str()),
            ("True", REASON_UNSCHEDULABLE)
        );
        assert!(
            deg.message
                .starts_with("web-3: 0/1 nodes are available: 1 Insufficient cpu."),
            "{}",
            deg.message
        );
        let ready = find_condition(&st, CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("False", "3/4 nodes ready")
        );
    }

    #[test]
    fn scale_down_unpublishes_surplus_ordinals_first() {
        let cc = cluster(
            "web",
            CacheClusterSpec {
                replicas: 2,
                ..Default::default()
            },
        );
        let names: Vec<_> = ready_members(&observed(&cc), &three_ready())
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["web-0", "web-1"]);
    }

    #[test]
    fn config_version_starts_at_one_and_never_bumps_on_no_op() {
        let cc = cluster("web", CacheClusterSpec::default());
        let first = next_member_list(ready_members(&observed(&cc), &three_ready()), 1, None, 0);
        assert_eq!(first.version, 1);
        let again = next_member_list(
            ready_members(&observed(&cc), &three_ready()),
            1,
            Some(&first),
            1,
        );
        assert_eq!(again, first, "a no-op reconcile keeps the version");
    }

    #[test]
    fn config_version_rises_by_one_per_change() {
        let cc = cluster("web", CacheClusterSpec::default());
        let v1 = next_member_list(ready_members(&observed(&cc), &three_ready()), 1, None, 0);
        let mut pods = three_ready();
        pods[0] = pod("web-2", Some("10.0.0.3"), false);
        let v2 = next_member_list(ready_members(&observed(&cc), &pods), 1, Some(&v1), 1);
        assert_eq!(v2.version, 2);
        assert_eq!(v2.members.len(), 2);
        // IP change of a member is a change.
        pods[1] = pod("web-0", Some("10.0.0.42"), true);
        let v3 = next_member_list(ready_members(&observed(&cc), &pods), 1, Some(&v2), 2);
        assert_eq!(v3.version, 3);
        // Replication factor change is a change.
        let v4 = next_member_list(v3.members.clone(), 2, Some(&v3), 3);
        assert_eq!(v4.version, 4);
    }

    #[test]
    fn config_version_never_goes_backwards() {
        // ConfigMap deleted by hand: status remembers version 7.
        let v = next_member_list(vec![], 1, None, 7);
        assert_eq!(v.version, 8);
        // ConfigMap replaced by an older document with the same members.
        let stale = MemberList {
            version: 2,
            replication_factor: 1,
            members: vec![],
        };
        assert_eq!(next_member_list(vec![], 1, Some(&stale), 7).version, 8);
    }

    #[test]
    fn published_list_is_read_from_configmap() {
        let cc = cluster("web", CacheClusterSpec::default());
        let list = next_member_list(ready_members(&observed(&cc), &three_ready()), 1, None, 0);
        let cm = crate::build::members_configmap(&crate::fixtures::owner("web"), &list).unwrap();
        assert_eq!(published_member_list(Some(&cm)), Some(list));
        assert_eq!(published_member_list(None), None);
        let mut broken = cm.clone();
        broken.data = Some([(names::MEMBERS_JSON_KEY.to_string(), "{".to_string())].into());
        assert_eq!(published_member_list(Some(&broken)), None);
    }

    #[test]
    fn all_ready_cluster_is_ready_and_settled() {
        let cc = cluster("web", CacheClusterSpec::default());
        let pods = three_ready();
        let list = next_member_list(ready_members(&observed(&cc), &pods), 1, None, 0);
        let st = compute_status(&observed(&cc), &pods, Some(&settled_sts(3)), &list, t(0));
        assert_eq!(st.observed_generation, Some(1));
        assert_eq!(st.replicas, 3);
        assert_eq!(st.ready_replicas, 3);
        assert_eq!(st.config_version, 1);
        assert_eq!(st.selector, names::selector_string("web"));
        let members: Vec<_> = st
            .members
            .iter()
            .map(|m| (m.name.as_str(), m.state))
            .collect();
        assert_eq!(
            members,
            [
                ("web-0", MemberState::Ready),
                ("web-1", MemberState::Ready),
                ("web-2", MemberState::Ready)
            ]
        );
        let ready = find_condition(&st, CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "AllNodesReady")
        );
        assert_eq!(ready.message, "3/3 nodes ready");
        let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
        assert_eq!(
            (prog.status.as_str(), prog.reason.as_str()),
            ("False", "RolloutComplete")
        );
        let deg = find_condition(&st, CONDITION_DEGRADED).unwrap();
        assert_eq!(
            (deg.status.as_str(), deg.reason.as_str()),
            ("False", "AsExpected")
        );
    }

    #[test]
    fn starting_cluster_is_progressing() {
        let cc = cluster("web", CacheClusterSpec::default());
        let pods = vec![
            pod("web-0", Some("10.0.0.1"), true),
            pod("web-1", None, false),
        ];
        let list = next_member_list(ready_members(&observed(&cc), &pods), 1, None, 0);
        let st = compute_status(&observed(&cc), &pods, None, &list, t(0));
        assert_eq!(st.ready_replicas, 1);
        let ready = find_condition(&st, CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.message.as_str()),
            ("False", "1/3 nodes ready")
        );
        let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
        assert_eq!(
            (prog.status.as_str(), prog.reason.as_str()),
            ("True", "RollingOut")
        );

        let mut scaling = settled_sts(3);
        scaling.status.as_mut().unwrap().replicas = 2;
        let st = compute_status(&observed(&cc), &pods, Some(&scaling), &list, t(0));
        let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
        assert_eq!(prog.message, "scaling from 2 to 3 nodes");

        // The operator's rolling update reports through `Underway`.
        let underway = Underway {
            roll_progress: Some("rolling update: 1/3 nodes run revision r2; restarting web-1"),
            ..Underway::default()
        };
        let st = compute_status_underway(
            &observed(&cc),
            &three_ready(),
            Some(&settled_sts(3)),
            &list,
            underway,
            t(0),
        );
        let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
        assert_eq!(
            (prog.reason.as_str(), prog.message.as_str()),
            (
                REASON_ROLLING_UPDATE,
                "rolling update: 1/3 nodes run revision r2; restarting web-1"
            )
        );
        assert_eq!(
            find_condition(&st, CONDITION_READY).unwrap().status,
            "False"
        );
        assert_eq!(st.revision.as_deref(), Some("r1"));
    }

    #[test]
    fn crashlooping_nodes_degrade_the_cluster() {
        let cc = cluster("web", CacheClusterSpec::default());
        let mut pods = three_ready();
        pods[0] = pod("web-2", Some("10.0.0.3"), false);
        pods[0].status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
            name: "kache-node".into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        let list = next_member_list(ready_members(&observed(&cc), &pods), 1, None, 0);
        let st = compute_status(&observed(&cc), &pods, Some(&settled_sts(3)), &list, t(0));
        let deg = find_condition(&st, CONDITION_DEGRADED).unwrap();
        assert_eq!(
            (deg.status.as_str(), deg.reason.as_str()),
            ("True", "NodesFailing")
        );
        assert_eq!(deg.message, "web-2: CrashLoopBackOff");
        assert_eq!(st.members[2].state, MemberState::NotReady);
    }

    #[test]
    fn scaled_to_zero_is_ready() {
        let cc = cluster(
            "web",
            CacheClusterSpec {
                replicas: 0,
                ..Default::default()
            },
        );
        let list = next_member_list(vec![], 1, None, 0);
        let st = compute_status(&observed(&cc), &[], Some(&settled_sts(0)), &list, t(0));
        let ready = find_condition(&st, CONDITION_READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "ScaledToZero")
        );
    }

    #[test]
    fn transition_time_only_moves_when_status_flips() {
        let mut cc = cluster("web", CacheClusterSpec::default());
        let pods = three_ready();
        let list = next_member_list(ready_members(&observed(&cc), &pods), 1, None, 0);
        let first = compute_status(&observed(&cc), &pods, Some(&settled_sts(3)), &list, t(0));
        cc.status = Some(first.clone());
        let second = compute_status(&observed(&cc), &pods, Some(&settled_sts(3)), &list, t(60));
        assert_eq!(first, second, "nothing changed: status is identical");
        cc.status = Some(second);
        let fewer = &pods[1..];
        let third = compute_status(&observed(&cc), fewer, Some(&settled_sts(3)), &list, t(120));
        let ready = find_condition(&third, CONDITION_READY).unwrap();
        assert_eq!(ready.last_transition_time, t(120));
        let degraded = find_condition(&third, CONDITION_DEGRADED).unwrap();
        assert_eq!(degraded.last_transition_time, t(0));
    }

    #[test]
    fn invalid_spec_sets_degraded_and_keeps_observations() {
        let mut cc = cluster(
            "web",
            CacheClusterSpec {
                replication_factor: 3,
                replicas: 2,
                ..Default::default()
            },
        );
        cc.metadata.generation = Some(4);
        cc.status = Some(CacheClusterStatus {
            config_version: 5,
            ready_replicas: 2,
            ..Default::default()
        });
        let errors = cc.spec.validate().unwrap_err();
        let st = invalid_spec_status(&cc, &errors, t(0));
        assert_eq!(st.observed_generation, Some(4));
        assert_eq!(st.config_version, 5);
        assert_eq!(st.ready_replicas, 2);
        let deg = find_condition(&st, CONDITION_DEGRADED).unwrap();
        assert_eq!(
            (deg.status.as_str(), deg.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert_eq!(
            deg.message,
            "invalid spec: replicationFactor (3) must not exceed replicas (2)"
        );
        assert_eq!(deg.observed_generation, Some(4));
        assert_eq!(
            find_condition(&st, CONDITION_READY).unwrap().status,
            "False"
        );
        assert_eq!(
            find_condition(&st, CONDITION_PROGRESSING).unwrap().status,
            "False"
        );
    }
}
