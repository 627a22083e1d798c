//! Pure functions from observed state to the published member list and to the
//! CacheCluster's status and conditions.
//!
//! The `configVersion` rule lives here ([`next_member_list`]): the member list
//! is computed from Ready pods in ordinal order; when it differs from the list
//! last published (ignoring the version) it is published with the previous
//! version plus one; a no-op never bumps it.

use crate::crd::{CacheCluster, CacheClusterStatus, MemberState, MemberStatus, RebalanceStatus};
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

/// Reason: the spec failed validation.
pub const REASON_INVALID_SPEC: &str = "InvalidSpec";

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

/// The StatefulSet ordinal of a pod named `<cluster>-<n>`.
pub fn pod_ordinal(pod_name: &str, cluster: &str) -> Option<u32> {
    pod_name
        .strip_prefix(cluster)?
        .strip_prefix('-')?
        .parse()
        .ok()
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
}

/// The lifecycle state of one pod.
pub fn member_state(pod: &Pod) -> MemberState {
    if pod.metadata.deletion_timestamp.is_some() {
        MemberState::Terminating
    } else if pod_is_ready(pod) && pod_ip(pod).is_some() {
        MemberState::Ready
    } else if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
        MemberState::NotReady
    } else {
        MemberState::Pending
    }
}

/// The cluster's pods (named `<cluster>-<ordinal>`), sorted by ordinal.
fn ordered_pods<'a>(cc: &CacheCluster, pods: &'a [Pod]) -> Vec<(u32, &'a Pod)> {
    let name = cc.name_any();
    let mut out: Vec<_> = pods
        .iter()
        .filter_map(|p| pod_ordinal(&p.name_any(), &name).map(|o| (o, p)))
        .collect();
    out.sort_by_key(|(o, _)| *o);
    out
}

/// Every pod of the cluster with its state, in ordinal order.
pub fn member_statuses(cc: &CacheCluster, pods: &[Pod]) -> Vec<MemberStatus> {
    let name = cc.name_any();
    let ns = cc.namespace().unwrap_or_default();
    ordered_pods(cc, pods)
        .into_iter()
        .map(|(_, p)| MemberStatus {
            name: p.name_any(),
            host: names::pod_host(&p.name_any(), &name, &ns),
            ip: pod_ip(p),
            port: cc.spec.port,
            state: member_state(p),
        })
        .collect()
}

/// The members to publish: Ready pods in ordinal order. Pods whose ordinal is
/// at or above `spec.replicas` are left out, so a scale-down removes them
/// from the list before they go away.
pub fn ready_members(cc: &CacheCluster, pods: &[Pod]) -> Vec<Member> {
    let name = cc.name_any();
    let ns = cc.namespace().unwrap_or_default();
    let replicas = u32::try_from(cc.spec.replicas.max(0)).unwrap_or(0);
    let port = u16::try_from(cc.spec.port).unwrap_or(names::MEMCACHE_PORT);
    ordered_pods(cc, pods)
        .into_iter()
        .filter(|(ordinal, p)| *ordinal < replicas && member_state(p) == MemberState::Ready)
        .filter_map(|(_, p)| {
            Some(Member {
                name: p.name_any(),
                host: names::pod_host(&p.name_any(), &name, &ns),
                ip: pod_ip(p)?,
                port,
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

/// The replication factor of a validated spec as the member list carries it.
pub fn replication_factor(cc: &CacheCluster) -> u8 {
    u8::try_from(cc.spec.replication_factor).unwrap_or(1)
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

/// What the StatefulSet says about its rollout, if it is still moving.
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
    let updated = st.updated_replicas.unwrap_or(0);
    if st.update_revision.is_some()
        && st.current_revision != st.update_revision
        && updated < desired
    {
        return Some(format!("rolling update: {updated}/{desired} nodes updated"));
    }
    None
}

/// Status of a valid CacheCluster from what the operator observed, with no
/// scale-in under way.
pub fn compute_status(
    cc: &CacheCluster,
    pods: &[Pod],
    sts: Option<&StatefulSet>,
    published: &MemberList,
    now: Time,
) -> CacheClusterStatus {
    compute_status_rebalancing(cc, pods, sts, published, None, now)
}

/// Status of a valid CacheCluster from what the operator observed;
/// `rebalance` is the scale-in it is waiting on, if any (see [`crate::scale`]).
pub fn compute_status_rebalancing(
    cc: &CacheCluster,
    pods: &[Pod],
    sts: Option<&StatefulSet>,
    published: &MemberList,
    rebalance: Option<&RebalanceStatus>,
    now: Time,
) -> CacheClusterStatus {
    let generation = cc.metadata.generation;
    let desired = cc.spec.replicas.max(0);
    let members = member_statuses(cc, pods);
    let live = members
        .iter()
        .filter(|m| m.state != MemberState::Terminating)
        .count();
    let ready_total = members
        .iter()
        .filter(|m| m.state == MemberState::Ready)
        .count();
    let ready_total = i32::try_from(ready_total).unwrap_or(i32::MAX);
    // Readiness of the nodes the spec asks for (departing ones do not count).
    let ready = ordered_pods(cc, pods)
        .iter()
        .filter(|(o, p)| {
            i64::from(*o) < i64::from(desired) && member_state(p) == MemberState::Ready
        })
        .count();
    let ready = i32::try_from(ready).unwrap_or(i32::MAX);
    let live = i32::try_from(live).unwrap_or(i32::MAX);
    // While departing nodes hand off, the StatefulSet is held at its size on purpose.
    let held = rebalance.map_or(desired, |r| r.current_replicas);
    let rollout = rollout_in_progress(sts, held);
    let failing = failing_pods(&ordered_pods(cc, pods));

    let all_ready = ready >= desired && rollout.is_none();
    let ready_cond = if desired == 0 && rollout.is_none() {
        condition(
            CONDITION_READY,
            true,
            "ScaledToZero",
            "replicas is 0: no cache nodes".into(),
            generation,
            &now,
        )
    } else if all_ready {
        condition(
            CONDITION_READY,
            true,
            "AllNodesReady",
            format!("{ready}/{desired} nodes ready"),
            generation,
            &now,
        )
    } else {
        condition(
            CONDITION_READY,
            false,
            "NodesNotReady",
            format!("{ready}/{desired} nodes ready"),
            generation,
            &now,
        )
    };

    let progressing = match (&rollout, ready < desired) {
        _ if rebalance.is_some() => condition(
            CONDITION_PROGRESSING,
            true,
            CONDITION_REBALANCING,
            format!(
                "waiting for {} to hand off before scaling from {held} to {desired} nodes",
                rebalance
                    .map(|r| r
                        .departing
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            ),
            generation,
            &now,
        ),
        (Some(what), _) => condition(
            CONDITION_PROGRESSING,
            true,
            "RollingOut",
            what.clone(),
            generation,
            &now,
        ),
        (None, true) => condition(
            CONDITION_PROGRESSING,
            true,
            "WaitingForNodes",
            format!(
                "waiting for {} more node(s) to become ready",
                desired - ready
            ),
            generation,
            &now,
        ),
        (None, false) => condition(
            CONDITION_PROGRESSING,
            false,
            "RolloutComplete",
            format!(
                "all {desired} nodes run the current spec; member list version {}",
                published.version
            ),
            generation,
            &now,
        ),
    };

    let degraded = if !failing.is_empty() {
        condition(
            CONDITION_DEGRADED,
            true,
            "NodesFailing",
            failing.join(", "),
            generation,
            &now,
        )
    } else {
        condition(
            CONDITION_DEGRADED,
            false,
            "AsExpected",
            "no problems detected".into(),
            generation,
            &now,
        )
    };

    let rebalancing = match rebalance {
        Some(r) => condition(
            CONDITION_REBALANCING,
            true,
            REASON_HANDING_OFF,
            crate::scale::progress_message(r),
            generation,
            &now,
        ),
        None => condition(
            CONDITION_REBALANCING,
            false,
            "Idle",
            "no scale-in under way".into(),
            generation,
            &now,
        ),
    };

    let previous = cc
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    CacheClusterStatus {
        observed_generation: generation,
        replicas: live,
        ready_replicas: ready_total,
        selector: names::selector_string(&cc.name_any()),
        members,
        config_version: i64::try_from(published.version).unwrap_or(i64::MAX),
        conditions: merge_conditions(
            previous,
            vec![ready_cond, progressing, degraded, rebalancing],
        ),
        rebalance: rebalance.cloned(),
    }
}

/// Status of a CacheCluster whose spec failed validation: nothing is changed
/// in the cluster; the conditions say why, the rest of the status is kept.
pub fn invalid_spec_status(cc: &CacheCluster, errors: &[String], now: Time) -> CacheClusterStatus {
    let generation = cc.metadata.generation;
    let prev = cc.status.clone().unwrap_or_default();
    let message = format!("invalid spec: {}", errors.join("; "));
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
pub(crate) mod tests {
    use super::*;
    use crate::build::testing::cluster;
    use crate::crd::CacheClusterSpec;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateWaiting, ContainerStatus, PodCondition, PodStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use k8s_openapi::chrono::{TimeZone, Utc};

    pub fn t(secs: i64) -> Time {
        Time(Utc.timestamp_opt(1_700_000_000 + secs, 0).unwrap())
    }

    pub fn pod(name: &str, ip: Option<&str>, ready: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("prod".into()),
                ..Default::default()
            },
            spec: None,
            status: Some(PodStatus {
                phase: Some(if ip.is_some() { "Running" } else { "Pending" }.into()),
                pod_ip: ip.map(Into::into),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    pub fn settled_sts(replicas: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(1),
                ..Default::default()
            },
            spec: None,
            status: Some(StatefulSetStatus {
                observed_generation: Some(1),
                replicas,
                ready_replicas: Some(replicas),
                updated_replicas: Some(replicas),
                current_revision: Some("r1".into()),
                update_revision: Some("r1".into()),
                ..Default::default()
            }),
        }
    }

    fn three_ready() -> Vec<Pod> {
        vec![
            pod("web-2", Some("10.0.0.3"), true),
            pod("web-0", Some("10.0.0.1"), true),
            pod("web-1", Some("10.0.0.2"), true),
        ]
    }

    #[test]
    fn ordinals() {
        assert_eq!(pod_ordinal("web-0", "web"), Some(0));
        assert_eq!(pod_ordinal("web-12", "web"), Some(12));
        assert_eq!(pod_ordinal("web-cache-0", "web"), None);
        assert_eq!(pod_ordinal("webx-0", "web"), None);
        assert_eq!(pod_ordinal("web", "web"), None);
    }

    #[test]
    fn member_states() {
        assert_eq!(
            member_state(&pod("a", Some("1.1.1.1"), true)),
            MemberState::Ready
        );
        assert_eq!(
            member_state(&pod("a", Some("1.1.1.1"), false)),
            MemberState::NotReady
        );
        assert_eq!(member_state(&pod("a", None, false)), MemberState::Pending);
        let mut p = pod("a", Some("1.1.1.1"), true);
        p.metadata.deletion_timestamp = Some(t(0));
        assert_eq!(member_state(&p), MemberState::Terminating);
    }

    #[test]
    fn only_ready_pods_in_ordinal_order_are_members() {
        let cc = cluster("web", CacheClusterSpec::default());
        let mut pods = three_ready();
        pods[0] = pod("web-2", Some("10.0.0.3"), false);
        pods.push(pod("other-0", Some("10.0.0.9"), true));
        let members = ready_members(&cc, &pods);
        let names: Vec<_> = members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["web-0", "web-1"]);
        assert_eq!(members[0].host, "web-0.web-peers.prod.svc");
        assert_eq!(members[0].ip, "10.0.0.1");
        assert_eq!(members[0].port, 11211);
        assert_eq!(members[0].peer_port, 11212);
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
        let names: Vec<_> = ready_members(&cc, &three_ready())
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, ["web-0", "web-1"]);
    }

    #[test]
    fn config_version_starts_at_one_and_never_bumps_on_no_op() {
        let cc = cluster("web", CacheClusterSpec::default());
        let first = next_member_list(ready_members(&cc, &three_ready()), 1, None, 0);
        assert_eq!(first.version, 1);
        let again = next_member_list(ready_members(&cc, &three_ready()), 1, Some(&first), 1);
        assert_eq!(again, first, "a no-op reconcile keeps the version");
    }

    #[test]
    fn config_version_rises_by_one_per_change() {
        let cc = cluster("web", CacheClusterSpec::default());
        let v1 = next_member_list(ready_members(&cc, &three_ready()), 1, None, 0);
        let mut pods = three_ready();
        pods[0] = pod("web-2", Some("10.0.0.3"), false);
        let v2 = next_member_list(ready_members(&cc, &pods), 1, Some(&v1), 1);
        assert_eq!(v2.version, 2);
        assert_eq!(v2.members.len(), 2);
        // IP change of a member is a change.
        pods[1] = pod("web-0", Some("10.0.0.42"), true);
        let v3 = next_member_list(ready_members(&cc, &pods), 1, Some(&v2), 2);
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
        let list = next_member_list(ready_members(&cc, &three_ready()), 1, None, 0);
        let cm = crate::build::members_configmap(&cc, &list).unwrap();
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
        let list = next_member_list(ready_members(&cc, &pods), 1, None, 0);
        let st = compute_status(&cc, &pods, Some(&settled_sts(3)), &list, t(0));
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
        let list = next_member_list(ready_members(&cc, &pods), 1, None, 0);
        let st = compute_status(&cc, &pods, None, &list, t(0));
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
        let st = compute_status(&cc, &pods, Some(&scaling), &list, t(0));
        let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
        assert_eq!(prog.message, "scaling from 2 to 3 nodes");

        let mut rolling = settled_sts(3);
        let s = rolling.status.as_mut().unwrap();
        s.update_revision = Some("r2".into());
        s.updated_replicas = Some(1);
        let st = compute_status(&cc, &three_ready(), Some(&rolling), &list, t(0));
        let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
        assert_eq!(prog.message, "rolling update: 1/3 nodes updated");
        assert_eq!(
            find_condition(&st, CONDITION_READY).unwrap().status,
            "False"
        );
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
        let list = next_member_list(ready_members(&cc, &pods), 1, None, 0);
        let st = compute_status(&cc, &pods, Some(&settled_sts(3)), &list, t(0));
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
        let st = compute_status(&cc, &[], Some(&settled_sts(0)), &list, t(0));
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
        let list = next_member_list(ready_members(&cc, &pods), 1, None, 0);
        let first = compute_status(&cc, &pods, Some(&settled_sts(3)), &list, t(0));
        cc.status = Some(first.clone());
        let second = compute_status(&cc, &pods, Some(&settled_sts(3)), &list, t(60));
        assert_eq!(first, second, "nothing changed: status is identical");
        cc.status = Some(second);
        let fewer = &pods[1..];
        let third = compute_status(&cc, fewer, Some(&settled_sts(3)), &list, t(120));
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
        let errors = cc.spec.validate();
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
