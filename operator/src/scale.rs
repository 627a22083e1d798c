//! Warm scale-in: pure decisions from observed state.
//!
//! When `spec.replicas` drops below the StatefulSet's replicas, the pods with
//! the highest ordinals leave. The member list published for the spec already
//! leaves them out ([`crate::status::ready_members`]), so every node starts
//! handing the departing nodes' items to their new owners, while the
//! StatefulSet keeps its replicas. Each departing node reports on its admin
//! port when it has handed off for a member-list version; once every one of
//! them reports the published version done (or `spec.scaleDownTimeoutSeconds`
//! passes), the StatefulSet shrinks.
//!
//! Nothing is remembered between reconciles: the scale-in is seen in the
//! cluster (the StatefulSet has more replicas than the spec) and its start
//! time in `status.rebalance`, so an operator restarted half-way carries on.
//! Scaling out is unaffected: new pods join the list once Ready.

use crate::crd::{DepartingMember, RebalanceStatus};
use crate::observe::{member_state, pod_ordinal, ObservedCluster};
use crate::probe::{ProbeResults, ProbeTarget};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kache_cluster::MemberList;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// What happens to the StatefulSet's size in this reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaleOutcome {
    /// No scale-in: the StatefulSet gets `spec.replicas` (scale-out included).
    Steady,
    /// Departing nodes are still handing off: the StatefulSet keeps its replicas.
    Waiting,
    /// Every departing node handed off (or had nothing to hand off): shrink.
    HandedOff,
    /// The timeout passed before these nodes finished: shrink anyway.
    TimedOut {
        /// Departing pods that had not reported done.
        unfinished: Vec<String>,
    },
}

/// The scale decision of one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleDecision {
    /// Replicas to apply to the StatefulSet.
    pub statefulset_replicas: i32,
    /// The scale-in and its progress (`None` when `Steady`).
    pub rebalance: Option<RebalanceStatus>,
    /// What to do.
    pub outcome: ScaleOutcome,
}

impl ScaleDecision {
    /// The rebalance to show in the status: only while waiting.
    pub fn status_rebalance(&self) -> Option<&RebalanceStatus> {
        match self.outcome {
            ScaleOutcome::Waiting => self.rebalance.as_ref(),
            _ => None,
        }
    }

    /// True when the reconcile must come back soon to check progress.
    pub fn waiting(&self) -> bool {
        self.outcome == ScaleOutcome::Waiting
    }
}

/// Replicas the StatefulSet has now (its spec), if it exists.
pub fn statefulset_replicas(sts: Option<&StatefulSet>) -> Option<i32> {
    sts.map(|s| s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1))
}

/// Ordinals leaving in a scale-in under way: `spec.replicas` up to the
/// StatefulSet's replicas. Empty when not scaling in.
pub fn departing_ordinals(
    cluster: &ObservedCluster,
    sts: Option<&StatefulSet>,
) -> std::ops::Range<u32> {
    let target = cluster.spec().replicas;
    let current = statefulset_replicas(sts)
        .and_then(|r| u32::try_from(r).ok())
        .unwrap_or(0);
    target..current.max(target)
}

/// Whether this pod's node can hold data: running, with an IP, not being
/// deleted, and no container status saying the node is not running.
fn may_hold_data(pod: &Pod) -> bool {
    let Some(st) = pod.status.as_ref() else {
        return false;
    };
    let ip = st.pod_ip.as_deref().is_some_and(|ip| !ip.is_empty());
    let container_down = st.container_statuses.as_ref().is_some_and(|cs| {
        !cs.is_empty()
            && cs
                .iter()
                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_none()))
    });
    pod.metadata.deletion_timestamp.is_none()
        && ip
        && st.phase.as_deref() == Some("Running")
        && !container_down
}

/// The pods of the cluster `name` chosen by `keep` (given each pod's ordinal) that have an
/// IP, as probe targets in ordinal order.
pub fn probe_targets(
    name: &str,
    pods: &[Pod],
    keep: impl Fn(u32, &Pod) -> bool,
) -> Vec<ProbeTarget> {
    let mut out: Vec<(u32, ProbeTarget)> = pods
        .iter()
        .filter_map(|p| {
            let ordinal = pod_ordinal(&p.name_any(), name)?;
            let ip = p
                .status
                .as_ref()?
                .pod_ip
                .clone()
                .filter(|ip| !ip.is_empty())?;
            keep(ordinal, p).then(|| {
                (
                    ordinal,
                    ProbeTarget {
                        name: p.name_any(),
                        ip,
                    },
                )
            })
        })
        .collect();
    out.sort_by_key(|(o, _)| *o);
    out.into_iter().map(|(_, t)| t).collect()
}

/// The departing pods to ask for hand-off progress, in ordinal order. Pods
/// without a running node (pending, no IP, deleted, crashed) hold nothing.
pub fn pods_to_probe(
    cluster: &ObservedCluster,
    sts: Option<&StatefulSet>,
    pods: &[Pod],
) -> Vec<ProbeTarget> {
    let departing = departing_ordinals(cluster, sts);
    probe_targets(cluster.name(), pods, |ordinal, p| {
        departing.contains(&ordinal) && may_hold_data(p)
    })
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The scale decision. `published` is the member list as published after
/// this reconcile (it never lists departing pods); `probes` holds the answers
/// of [`pods_to_probe`]'s pods (a missing entry counts as no answer).
pub fn decide(
    cluster: &ObservedCluster,
    sts: Option<&StatefulSet>,
    pods: &[Pod],
    published: &MemberList,
    probes: &ProbeResults,
    now: &Time,
) -> ScaleDecision {
    let spec = cluster.spec();
    let target = spec.replicas_i32();
    let departing = departing_ordinals(cluster, sts);
    if departing.is_empty() {
        return ScaleDecision {
            statefulset_replicas: target,
            rebalance: None,
            outcome: ScaleOutcome::Steady,
        };
    }
    let current = i32::try_from(departing.end).unwrap_or(i32::MAX);
    let name = cluster.name();
    let probed: BTreeMap<String, ProbeTarget> = pods_to_probe(cluster, sts, pods)
        .into_iter()
        .map(|t| (t.name.clone(), t))
        .collect();
    let version = published.version;
    // With no member left there is nobody to hand off to; with a timeout of
    // 0 the user asked not to wait.
    let nothing_to_wait_for = published.members.is_empty() || spec.scale_down_timeout_seconds == 0;

    let departing_members: Vec<DepartingMember> = departing
        .clone()
        .map(|ordinal| {
            let pod = format!("{name}-{ordinal}");
            if !probed.contains_key(&pod) {
                let state = pods
                    .iter()
                    .find(|p| p.name_any() == pod)
                    .map(|p| format!("{:?}", member_state(p)));
                return DepartingMember {
                    name: pod,
                    done: true,
                    handoff_version: None,
                    sent: 0,
                    acked: 0,
                    failed: 0,
                    message: Some(match state {
                        Some(s) => format!("no running node ({s}): nothing to hand off"),
                        None => "no pod: nothing to hand off".into(),
                    }),
                };
            }
            match probes.get(&pod).map(|r| r.as_ref().map(|r| &r.handoff)) {
                Some(Ok(r)) => DepartingMember {
                    done: nothing_to_wait_for || (r.version >= version && r.done),
                    handoff_version: Some(to_i64(r.version)),
                    sent: to_i64(r.sent),
                    acked: to_i64(r.acked),
                    failed: to_i64(r.failed),
                    message: (r.version < version)
                        .then(|| format!("has not started the hand-off for version {version}")),
                    name: pod,
                },
                Some(Err(e)) => DepartingMember {
                    done: nothing_to_wait_for,
                    handoff_version: None,
                    sent: 0,
                    acked: 0,
                    failed: 0,
                    message: Some(e.to_string()),
                    name: pod,
                },
                None => DepartingMember {
                    done: nothing_to_wait_for,
                    handoff_version: None,
                    sent: 0,
                    acked: 0,
                    failed: 0,
                    message: Some("not probed".into()),
                    name: pod,
                },
            }
        })
        .collect();

    // The same scale-in as the one in the status keeps its start time.
    let started_at = recorded_start(cluster, target, current).unwrap_or_else(|| now.clone());
    let deadline = spec.handoff_deadline(&started_at);
    let rebalance = RebalanceStatus {
        target_replicas: target,
        current_replicas: current,
        config_version: to_i64(version),
        started_at,
        deadline: deadline.clone(),
        departing: departing_members,
    };
    let unfinished: Vec<String> = rebalance
        .departing
        .iter()
        .filter(|d| !d.done)
        .map(|d| d.name.clone())
        .collect();
    let (statefulset_replicas, outcome) = if unfinished.is_empty() {
        (target, ScaleOutcome::HandedOff)
    } else if now.0 >= deadline.0 {
        (target, ScaleOutcome::TimedOut { unfinished })
    } else {
        (current, ScaleOutcome::Waiting)
    };
    ScaleDecision {
        statefulset_replicas,
        rebalance: Some(rebalance),
        outcome,
    }
}

/// When the scale-in from `current` to `target` replicas started, if the status records it.
fn recorded_start(cluster: &ObservedCluster, target: i32, current: i32) -> Option<Time> {
    cluster
        .status
        .as_ref()
        .and_then(|s| s.rebalance.as_ref())
        .filter(|r| r.target_replicas == target && r.current_replicas == current)
        .map(|r| r.started_at.clone())
}

/// A scale-in that is starting and that the status does not record yet, as a first
/// `status.rebalance` (no departing-node progress yet). The operator writes it before it
/// publishes the member list without the departing nodes, so an operator restarted between
/// the two keeps the start time, and so the deadline, instead of starting the clock again.
pub fn unrecorded_start(
    cluster: &ObservedCluster,
    sts: Option<&StatefulSet>,
    published: &MemberList,
    now: &Time,
) -> Option<RebalanceStatus> {
    let departing = departing_ordinals(cluster, sts);
    if departing.is_empty() {
        return None;
    }
    let target = cluster.spec().replicas_i32();
    let current = i32::try_from(departing.end).unwrap_or(i32::MAX);
    if recorded_start(cluster, target, current).is_some() {
        return None;
    }
    Some(RebalanceStatus {
        target_replicas: target,
        current_replicas: current,
        config_version: to_i64(published.version),
        started_at: now.clone(),
        deadline: cluster.spec().handoff_deadline(now),
        departing: Vec::new(),
    })
}

/// Items sent, acknowledged and failed by the departing nodes together.
pub fn totals(r: &RebalanceStatus) -> (i64, i64, i64) {
    r.departing.iter().fold((0, 0, 0), |(s, a, f), d| {
        (
            s.saturating_add(d.sent),
            a.saturating_add(d.acked),
            f.saturating_add(d.failed),
        )
    })
}

fn names(r: &RebalanceStatus) -> String {
    r.departing
        .iter()
        .map(|d| d.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `Rebalancing` condition's message while waiting.
pub fn progress_message(r: &RebalanceStatus) -> String {
    let done = r.departing.iter().filter(|d| d.done).count();
    let (sent, acked, failed) = totals(r);
    format!(
        "scaling in from {} to {} nodes: {} hand off their data for member list version {} \
         ({done}/{} done; {sent} items sent, {acked} acked, {failed} failed); \
         the StatefulSet shrinks when all are done, at the latest at {}",
        r.current_replicas,
        r.target_replicas,
        names(r),
        r.config_version,
        r.departing.len(),
        r.deadline.0.to_rfc3339(),
    )
}

/// Note of the `RebalanceStarted` event.
pub fn started_note(r: &RebalanceStatus, timeout_seconds: u32) -> String {
    format!(
        "scaling in from {} to {} nodes: published member list version {} without {}; \
         they keep running and hand their data to the remaining nodes (waiting at most {timeout_seconds}s)",
        r.current_replicas,
        r.target_replicas,
        r.config_version,
        names(r)
    )
}

/// Note of the `RebalanceFinished` event.
pub fn finished_note(r: &RebalanceStatus, outcome: &ScaleOutcome) -> String {
    let (sent, acked, failed) = totals(r);
    let how = match outcome {
        ScaleOutcome::TimedOut { unfinished } => {
            format!("hand-off timed out on {}", unfinished.join(", "))
        }
        _ => "hand-off done".into(),
    };
    format!(
        "{how} ({sent} items sent, {acked} acked, {failed} failed); scaling StatefulSet from {} to {} nodes, removing {}",
        r.current_replicas,
        r.target_replicas,
        names(r)
    )
}

/// Note of the `HandoffTimeout` warning.
pub fn timeout_note(r: &RebalanceStatus, unfinished: &[String], timeout_seconds: u32) -> String {
    let detail: Vec<String> = r
        .departing
        .iter()
        .filter(|d| unfinished.contains(&d.name))
        .map(|d| match &d.message {
            Some(m) => format!("{}: {m}", d.name),
            None => format!("{}: {} of {} items acked", d.name, d.acked, d.sent),
        })
        .collect();
    format!(
        "{} did not finish handing off within {timeout_seconds}s ({}); removing them anyway, items not yet moved are lost",
        unfinished.join(", "),
        detail.join("; ")
    )
}

#[cfg(test)]
mod tests;
