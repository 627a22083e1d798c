//! Rolling updates, owned by the operator: pure decisions from observed state.
//!
//! The StatefulSet rolls `OnDelete`: a changed pod template restarts nothing
//! by itself (the StatefulSet controller would roll on readiness alone and
//! delete the last copy of the data while the first restarted node is still
//! empty). Instead the operator restarts the nodes one at a time, highest
//! ordinal first:
//!
//! * It starts a step only when the cluster is settled: every member of the
//!   published list is Ready, runs at its published IP, follows that list
//!   and has no hand-off under way (each node's `GET /cluster` says so), no
//!   scale-in is under way and the member list is not changing.
//! * With `replicationFactor` 2 or more it deletes the pod. The member stays
//!   listed while it restarts ([`crate::status::desired_members`]), so its
//!   replacement starts listed, pulls its share back from the replicas and
//!   only then reports Ready; the ring never changes.
//! * With `replicationFactor` 1 its data has no copy, so the node is drained
//!   first: the pod is marked ([`DRAIN_REVISION_ANNOTATION`]), the member
//!   list leaves it out, and once the node reports its hand-off done (or
//!   `scaleDownTimeoutSeconds` passed) the pod is deleted; its replacement
//!   joins like a new node and the others hand its share back.
//! * A pod that is not Ready holds nothing worth waiting for and is restarted
//!   at once (this is also how a roll fixes a broken revision).
//!
//! Nothing is remembered between reconciles but what the cluster shows: the
//! pods' revisions, deletion and drain marks, and the nodes' reports, so an
//! operator restarted half-way carries on. `status.rollout` only reports.

use crate::crd::{RolloutPhase, RolloutStatus};
use crate::observe::{member_state, pod_ordinal, pod_revision, update_revision, ObservedCluster};
use crate::probe::{NodeReport, ProbeError, ProbeResults, ProbeTarget};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{DateTime, Utc};
use kache_cluster::MemberList;
use kube::ResourceExt;

/// Pod annotation: the revision the pod is drained for (`replicationFactor`
/// 1). A mark for another revision is stale and ignored.
pub const DRAIN_REVISION_ANNOTATION: &str = "kache.dev/drain-revision";
/// Pod annotation: when the drain started (RFC 3339), for its timeout.
pub const DRAIN_SINCE_ANNOTATION: &str = "kache.dev/drain-since";

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn ready(pod: &Pod) -> bool {
    member_state(pod) == crate::crd::MemberState::Ready
}

/// Whether the pod runs another revision than `revision`. A pod without the
/// label is not known to be outdated and is left alone.
fn outdated(pod: &Pod, revision: &str) -> bool {
    pod_revision(pod).is_some_and(|r| r != revision)
}

/// The pods of ordinals below `spec.replicas`, highest ordinal first.
fn pods_in_range<'a>(cluster: &ObservedCluster, pods: &'a [Pod]) -> Vec<(u32, &'a Pod)> {
    let replicas = cluster.spec().replicas;
    let mut out: Vec<(u32, &Pod)> = pods
        .iter()
        .filter_map(|p| pod_ordinal(&p.name_any(), cluster.name()).map(|o| (o, p)))
        .filter(|(o, _)| *o < replicas)
        .collect();
    out.sort_by_key(|(o, _)| std::cmp::Reverse(*o));
    out
}

/// The pods still to restart for `revision`, highest ordinal first.
fn outdated_pods<'a>(cluster: &ObservedCluster, pods: &'a [Pod], revision: &str) -> Vec<&'a Pod> {
    pods_in_range(cluster, pods)
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| !terminating(p) && outdated(p, revision))
        .collect()
}

fn drain_since(pod: &Pod, revision: &str) -> Option<Time> {
    let annotations = pod.metadata.annotations.as_ref()?;
    if annotations
        .get(DRAIN_REVISION_ANNOTATION)
        .map(String::as_str)
        != Some(revision)
    {
        return None;
    }
    let since = annotations.get(DRAIN_SINCE_ANNOTATION)?;
    DateTime::parse_from_rfc3339(since)
        .ok()
        .map(|t| Time(t.with_timezone(&Utc)))
}

/// The pod a rolling update drains (`replicationFactor` 1): outdated, marked
/// for the current revision, not yet deleted. The member list leaves it out.
pub fn drained_pod<'a>(
    cluster: &ObservedCluster,
    sts: Option<&StatefulSet>,
    pods: &'a [Pod],
) -> Option<&'a Pod> {
    let revision = update_revision(sts)?;
    outdated_pods(cluster, pods, revision)
        .into_iter()
        .find(|p| drain_since(p, revision).is_some())
}

/// Whether a rolling update is under way (some pod runs an old revision), so
/// the nodes' reports are needed.
pub fn rolling(cluster: &ObservedCluster, sts: Option<&StatefulSet>, pods: &[Pod]) -> bool {
    update_revision(sts).is_some_and(|rev| !outdated_pods(cluster, pods, rev).is_empty())
}

/// The nodes whose reports a rolling update needs: every pod of the cluster
/// with an IP that is not being deleted (members and the drained one), in
/// ordinal order.
pub fn report_targets(cluster: &ObservedCluster, pods: &[Pod]) -> Vec<ProbeTarget> {
    let replicas = cluster.spec().replicas;
    crate::scale::probe_targets(cluster.name(), pods, |ordinal, p| {
        ordinal < replicas && !terminating(p)
    })
}

/// What the reconcile does for the rolling update.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RollAction {
    /// Nothing (no roll, or waiting).
    None,
    /// Mark this pod drained: the member list leaves it out from now on.
    Drain {
        /// Pod name.
        pod: String,
        /// Revision the drain is for.
        revision: String,
    },
    /// Delete this pod (the StatefulSet recreates it at the new revision).
    Restart {
        /// Pod name.
        pod: String,
        /// Its uid, a precondition of the deletion.
        uid: String,
        /// Why now.
        why: RestartReason,
    },
}

/// Why a pod is restarted now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// Its turn, the cluster being settled.
    Turn,
    /// Drained: it handed its data off.
    Drained,
    /// Drained, but the hand-off did not finish within the timeout.
    DrainTimedOut(String),
    /// Not Ready: it holds nothing to protect.
    NotReady,
}

/// The rolling-update decision of one reconcile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RollDecision {
    /// What to do now.
    pub action: RollAction,
    /// `status.rollout`: the step under way, if any.
    pub rollout: Option<RolloutStatus>,
    /// The `Progressing` message while a roll is under way.
    pub progress: Option<String>,
}

impl RollDecision {
    fn idle() -> Self {
        Self {
            action: RollAction::None,
            rollout: None,
            progress: None,
        }
    }

    /// True when the reconcile must come back soon to check progress.
    pub fn waiting(&self) -> bool {
        self.progress.is_some()
    }
}

/// What a rolling update still waits for before it restarts the next node.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NotSettled {
    /// A member's pod is not Ready.
    #[error("{0} is not Ready")]
    NotReady(String),
    /// A member's pod runs at another IP than the list publishes.
    #[error("{0} is not yet listed at its new IP")]
    NewIp(String),
    /// A member follows an older list, or still hands data off.
    #[error(
        "{member} follows member list version {follows} (published: {published}){}",
        if *handing_off { ", hand-off under way" } else { "" }
    )]
    Behind {
        /// The member.
        member: String,
        /// The list version it follows.
        follows: u64,
        /// The published version.
        published: u64,
        /// A hand-off is under way on it.
        handing_off: bool,
    },
    /// A member's report could not be learnt.
    #[error("{member}: {source}")]
    Unanswered {
        /// The member.
        member: String,
        /// Why.
        source: ProbeError,
    },
    /// A member was not asked for its report.
    #[error("{0} was not asked")]
    NotAsked(String),
}

/// Whether every member of `list` is Ready at its published IP, follows the
/// list and moves no data. `Err` says what is not there yet.
pub fn settled(list: &MemberList, pods: &[Pod], reports: &ProbeResults) -> Result<(), NotSettled> {
    for m in &list.members {
        let pod = pods.iter().find(|p| p.name_any() == m.name);
        let Some(pod) = pod.filter(|p| ready(p)) else {
            return Err(NotSettled::NotReady(m.name.clone()));
        };
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
        if ip != Some(m.ip.as_str()) {
            return Err(NotSettled::NewIp(m.name.clone()));
        }
        match reports.get(&m.name) {
            Some(Ok(r)) if node_settled(r, list.version) => {}
            Some(Ok(r)) => {
                return Err(NotSettled::Behind {
                    member: m.name.clone(),
                    follows: r.version,
                    published: list.version,
                    handing_off: r.handoff.running,
                })
            }
            Some(Err(e)) => {
                return Err(NotSettled::Unanswered {
                    member: m.name.clone(),
                    source: e.clone(),
                })
            }
            None => return Err(NotSettled::NotAsked(m.name.clone())),
        }
    }
    Ok(())
}

/// A listed node is settled on `version`: it is a member, follows that list
/// (or a newer one), and its hand-off for it is done, or it never had one to
/// do (a node started since: `handoff.version` 0).
fn node_settled(r: &NodeReport, version: u64) -> bool {
    let handed_off = r.handoff.version >= version && r.handoff.done;
    let fresh = r.handoff.version == 0;
    r.member && r.version >= version && !r.handoff.running && (handed_off || fresh)
}

fn step(
    cluster: &ObservedCluster,
    revision: &str,
    pod: &str,
    phase: RolloutPhase,
    started_at: Time,
) -> Option<RolloutStatus> {
    // The same step as the one in the status keeps its start time.
    let started_at = cluster
        .status
        .as_ref()
        .and_then(|s| s.rollout.as_ref())
        .filter(|r| r.pod == pod && r.phase == phase && r.revision == revision)
        .map_or(started_at, |r| r.started_at.clone());
    Some(RolloutStatus {
        revision: revision.to_string(),
        pod: pod.to_string(),
        phase,
        started_at,
    })
}

/// The decision to restart `pod` now, as the step of the status.
fn restart_now(
    cluster: &ObservedCluster,
    revision: &str,
    pod: &Pod,
    why: RestartReason,
    progress: String,
    now: &Time,
) -> RollDecision {
    let name = pod.name_any();
    RollDecision {
        rollout: step(
            cluster,
            revision,
            &name,
            RolloutPhase::Restarting,
            now.clone(),
        ),
        action: RollAction::Restart {
            pod: name,
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            why,
        },
        progress: Some(progress),
    }
}

/// The rolling-update decision. `list` is the member list as published after
/// this reconcile and `list_changed` whether this reconcile publishes it (the
/// nodes have not seen it yet); `reports` holds the answers of
/// [`report_targets`]; `scaling_in` says a scale-in is under way.
#[allow(clippy::too_many_arguments)]
pub fn decide(
    cluster: &ObservedCluster,
    sts: Option<&StatefulSet>,
    pods: &[Pod],
    list: &MemberList,
    list_changed: bool,
    reports: &ProbeResults,
    scaling_in: bool,
    now: &Time,
) -> RollDecision {
    let Some(revision) = update_revision(sts) else {
        return RollDecision::idle();
    };
    let spec = cluster.spec();
    let in_range = pods_in_range(cluster, pods);
    let total = in_range.len();
    let updated = in_range
        .iter()
        .filter(|(_, p)| !terminating(p) && pod_revision(p) == Some(revision))
        .count();
    let counts = format!("{updated}/{total} nodes run revision {revision}");

    // A restart under way: a pod of the cluster is being deleted, or not back.
    let restarting = in_range
        .iter()
        .map(|(_, p)| *p)
        .find(|p| terminating(p) || (!outdated(p, revision) && !ready(p)));
    let outdated = outdated_pods(cluster, pods, revision);
    if outdated.is_empty() {
        // Every node runs the revision: the roll is over once the node restarted last
        // (the step in the status) is back. Other starting nodes (a scale-out, a crash)
        // are no rolling update.
        let previous = cluster.status.as_ref().and_then(|s| s.rollout.as_ref());
        let tail = restarting
            .filter(|p| previous.is_some_and(|r| r.revision == revision && r.pod == p.name_any()));
        let Some(pod) = tail else {
            return RollDecision::idle();
        };
        return RollDecision {
            action: RollAction::None,
            rollout: step(
                cluster,
                revision,
                &pod.name_any(),
                RolloutPhase::Restarting,
                now.clone(),
            ),
            progress: Some(format!(
                "rolling update: {counts}; waiting for {} to refill and become Ready",
                pod.name_any()
            )),
        };
    }
    let waiting = |pod: &str, phase: RolloutPhase, message: String| RollDecision {
        action: RollAction::None,
        rollout: step(cluster, revision, pod, phase, now.clone()),
        progress: Some(format!("rolling update: {counts}; {message}")),
    };

    // 1. A drained node: restart it once it has handed its data off.
    if let Some(pod) = drained_pod(cluster, sts, pods) {
        let pod_name = pod.name_any();
        let since = drain_since(pod, revision).unwrap_or_else(|| now.clone());
        let report = reports.get(&pod_name);
        let handed_off = !list_changed
            && !list.members.iter().any(|m| m.name == pod_name)
            && report.is_some_and(|r| {
                r.as_ref().is_ok_and(|r| {
                    r.handoff.version >= list.version && r.handoff.done && !r.handoff.running
                })
            });
        let restarting = format!("rolling update: {counts}; restarting {pod_name}");
        if handed_off || !ready(pod) {
            return restart_now(
                cluster,
                revision,
                pod,
                RestartReason::Drained,
                restarting,
                now,
            );
        }
        let deadline = spec.handoff_deadline(&since);
        if now.0 >= deadline.0 {
            let detail = match report {
                Some(Ok(r)) => format!(
                    "{} of {} items acked, hand-off version {} of {}",
                    r.handoff.acked, r.handoff.sent, r.handoff.version, list.version
                ),
                Some(Err(e)) => e.to_string(),
                None => "not asked".into(),
            };
            let why = RestartReason::DrainTimedOut(detail);
            return restart_now(cluster, revision, pod, why, restarting, now);
        }
        return waiting(
            &pod_name,
            RolloutPhase::Draining,
            format!(
                "{pod_name} hands its data to the other nodes before it restarts (at the latest at {})",
                deadline.0.to_rfc3339()
            ),
        );
    }

    // 2. A pod being deleted or not back yet: wait for it.
    if let Some(pod) = restarting {
        let pod_name = pod.name_any();
        let message = if terminating(pod) {
            format!("{pod_name} is shutting down")
        } else {
            format!("waiting for {pod_name} to refill and become Ready")
        };
        return waiting(&pod_name, RolloutPhase::Restarting, message);
    }
    // Ordinals the StatefulSet has not recreated yet.
    if let Some(missing) = (0..spec.replicas).find(|o| !in_range.iter().any(|(x, _)| x == o)) {
        let pod_name = format!("{}-{missing}", cluster.name());
        return waiting(
            &pod_name,
            RolloutPhase::Restarting,
            format!("waiting for {pod_name} to be recreated"),
        );
    }

    // 3. An outdated pod that is not Ready holds nothing: restart it at once.
    if let Some(pod) = outdated.iter().find(|p| !ready(p)) {
        let progress = format!(
            "rolling update: {counts}; restarting {} (not Ready)",
            pod.name_any()
        );
        return restart_now(
            cluster,
            revision,
            pod,
            RestartReason::NotReady,
            progress,
            now,
        );
    }

    // 4. The next one, highest ordinal first, once the cluster is settled.
    let Some(next) = outdated.first() else {
        return RollDecision::idle();
    };
    let next_name = next.name_any();
    if scaling_in {
        return waiting(
            &next_name,
            RolloutPhase::Restarting,
            "a scale-in is under way; the rolling update carries on after it".into(),
        );
    }
    if list_changed {
        return waiting(
            &next_name,
            RolloutPhase::Restarting,
            format!("publishing member list version {}", list.version),
        );
    }
    if let Err(why) = settled(list, pods, reports) {
        return waiting(
            &next_name,
            RolloutPhase::Restarting,
            format!("before restarting {next_name}: {why}"),
        );
    }
    let others = list.members.iter().any(|m| m.name != next_name);
    if spec.replication_factor < 2 && others {
        return RollDecision {
            action: RollAction::Drain {
                pod: next_name.clone(),
                revision: revision.to_string(),
            },
            rollout: step(cluster, revision, &next_name, RolloutPhase::Draining, now.clone()),
            progress: Some(format!(
                "rolling update: {counts}; {next_name} hands its data to the other nodes before it restarts"
            )),
        };
    }
    let progress = format!("rolling update: {counts}; restarting {next_name}");
    restart_now(cluster, revision, next, RestartReason::Turn, progress, now)
}

#[cfg(test)]
mod tests;
