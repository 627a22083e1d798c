//! The rolling-update decision as a pure function of observed state.

use super::*;
use crate::crd::{CacheCluster, CacheClusterSpec};
use crate::fixtures::{cluster, observed};
use crate::fixtures::{node_report, pod, settled_sts, t, unanswered};
use crate::observe::REVISION_LABEL;
use crate::probe::{HandoffReport, ProbeError};
use crate::status::{self, next_member_list};
use std::collections::BTreeMap;

/// `web` with `replicas` nodes and replication factor `rf`.
fn web(replicas: i32, rf: i32) -> CacheCluster {
    cluster(
        "web",
        CacheClusterSpec {
            replicas,
            replication_factor: rf,
            ..Default::default()
        },
    )
}

/// A StatefulSet that has seen the spec, rolling towards `r2`.
fn sts_at(revision: &str) -> StatefulSet {
    let mut s = settled_sts(3);
    s.status.as_mut().unwrap().update_revision = Some(revision.into());
    s
}

/// Ready pod `web-<i>` at 10.0.0.<i+1> running `revision`.
fn node(i: u32, revision: &str) -> Pod {
    let mut p = pod(
        &format!("web-{i}"),
        Some(&format!("10.0.0.{}", i + 1)),
        true,
    );
    p.metadata.labels = Some(BTreeMap::from([(
        REVISION_LABEL.to_string(),
        revision.to_string(),
    )]));
    p.metadata.uid = Some(format!("uid-{i}"));
    p
}

fn not_ready(mut p: Pod) -> Pod {
    p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
    p
}

fn deleting(mut p: Pod) -> Pod {
    p.metadata.deletion_timestamp = Some(t(0));
    p
}

fn drain_marked(mut p: Pod, revision: &str, since: i64) -> Pod {
    p.metadata.annotations = Some(BTreeMap::from([
        (DRAIN_REVISION_ANNOTATION.to_string(), revision.to_string()),
        (DRAIN_SINCE_ANNOTATION.to_string(), t(since).0.to_rfc3339()),
    ]));
    p
}

/// The list of the Ready, undrained pods at `version`.
fn list_of(cc: &CacheCluster, pods: &[Pod], version: u64) -> MemberList {
    let drained = drained_pod(&observed(cc), Some(&sts_at("r2")), pods).map(|p| p.name_any());
    MemberList {
        version,
        ..next_member_list(
            status::desired_members(&observed(cc), pods, None, drained.as_deref(), &t(0)),
            observed(cc).spec().replication_factor,
            None,
            0,
        )
    }
}

/// A node's report: member, on `version`, hand-off for `handoff` done.
fn report(version: u64, handoff: u64, running: bool) -> Result<NodeReport, ProbeError> {
    Ok(node_report(
        true,
        version,
        100,
        HandoffReport {
            version: handoff,
            running,
            done: !running,
            ..Default::default()
        },
    ))
}

fn all_settled(pods: &[Pod], version: u64) -> ProbeResults {
    pods.iter()
        .map(|p| (p.name_any(), report(version, version, false)))
        .collect()
}

/// The decision with the StatefulSet at r2, `list_changed`, `scaling_in`, at `now`.
fn decide_as(
    cc: &CacheCluster,
    pods: &[Pod],
    list: &MemberList,
    reports: &ProbeResults,
    list_changed: bool,
    scaling_in: bool,
    now: Time,
) -> RollDecision {
    let sts = sts_at("r2");
    decide(
        &observed(cc),
        Some(&sts),
        pods,
        list,
        list_changed,
        reports,
        scaling_in,
        &now,
    )
}

/// The decision of a settled moment: nothing published, no scale-in, at t(10).
fn decide_now(
    cc: &CacheCluster,
    pods: &[Pod],
    list: &MemberList,
    reports: &ProbeResults,
) -> RollDecision {
    decide_as(cc, pods, list, reports, false, false, t(10))
}

#[test]
fn nothing_to_roll_is_idle() {
    let cc = web(3, 2);
    let pods: Vec<Pod> = (0..3).map(|i| node(i, "r2")).collect();
    let list = list_of(&cc, &pods, 4);
    let d = decide_now(&cc, &pods, &list, &ProbeResults::new());
    assert_eq!(d, RollDecision::idle());
    assert!(!rolling(&observed(&cc), Some(&sts_at("r2")), &pods));
    // Pods without a revision label are not known to be outdated.
    let unlabelled = vec![pod("web-0", Some("10.0.0.1"), true)];
    assert!(!rolling(&observed(&cc), Some(&sts_at("r2")), &unlabelled));
}

#[test]
fn a_stale_statefulset_revision_is_not_acted_on() {
    let cc = web(3, 2);
    let pods: Vec<Pod> = (0..3).map(|i| node(i, "r1")).collect();
    let mut sts = sts_at("r2");
    sts.metadata.generation = Some(2); // not observed yet
    assert_eq!(update_revision(Some(&sts)), None);
    let list = list_of(&cc, &pods, 4);
    let d = decide(
        &observed(&cc),
        Some(&sts),
        &pods,
        &list,
        false,
        &all_settled(&pods, 4),
        false,
        &t(0),
    );
    assert_eq!(d.action, RollAction::None);
}

#[test]
fn replicated_cluster_restarts_the_highest_ordinal_first_once_settled() {
    let cc = web(3, 2);
    let pods: Vec<Pod> = (0..3).map(|i| node(i, "r1")).collect();
    let list = list_of(&cc, &pods, 4);
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 4));
    assert_eq!(
        d.action,
        RollAction::Restart {
            pod: "web-2".into(),
            uid: "uid-2".into(),
            why: RestartReason::Turn
        }
    );
    let r = d.rollout.unwrap();
    assert_eq!(
        (r.revision.as_str(), r.pod.as_str(), r.phase),
        ("r2", "web-2", RolloutPhase::Restarting)
    );
    assert_eq!(r.started_at, t(10));
    assert_eq!(
        d.progress.as_deref(),
        Some("rolling update: 0/3 nodes run revision r2; restarting web-2")
    );
}

#[test]
fn settled_says_which_member_is_not_and_why() {
    let cc = web(3, 2);
    let mut pods: Vec<Pod> = (0..3).map(|i| node(i, "r1")).collect();
    let list = list_of(&cc, &pods, 4);
    let mut reports = all_settled(&pods, 4);
    assert!(settled(&list, &pods, &reports).is_ok());
    reports.insert("web-1".into(), report(4, 4, true));
    assert!(matches!(
        settled(&list, &pods, &reports),
        Err(NotSettled::Behind { member, follows: 4, published: 4, handing_off: true })
            if member == "web-1"
    ));
    reports.insert("web-1".into(), Err(unanswered()));
    assert!(matches!(
        settled(&list, &pods, &reports),
        Err(NotSettled::Unanswered { member, source: ProbeError::Timeout(_) }) if member == "web-1"
    ));
    reports.remove("web-1");
    assert!(matches!(
        settled(&list, &pods, &reports),
        Err(NotSettled::NotAsked(member)) if member == "web-1"
    ));
    pods[0] = pod("web-0", Some("10.0.0.1"), false);
    assert!(matches!(
        settled(&list, &pods, &reports),
        Err(NotSettled::NotReady(member)) if member == "web-0"
    ));
}

#[test]
fn no_restart_until_every_member_is_settled() {
    let cc = web(3, 2);
    let pods: Vec<Pod> = (0..3).map(|i| node(i, "r1")).collect();
    let list = list_of(&cc, &pods, 4);
    let cases: Vec<(ProbeResults, &str)> = vec![
        // A node still on the previous member list.
        (
            [
                ("web-0".to_string(), report(4, 4, false)),
                ("web-1".to_string(), report(3, 3, false)),
                ("web-2".to_string(), report(4, 4, false)),
            ]
            .into(),
            "web-1 follows member list version 3 (published: 4)",
        ),
        // A hand-off under way.
        (
            [
                ("web-0".to_string(), report(4, 4, false)),
                ("web-1".to_string(), report(4, 4, true)),
                ("web-2".to_string(), report(4, 4, false)),
            ]
            .into(),
            "web-1 follows member list version 4 (published: 4), hand-off under way",
        ),
        // A node that cannot be asked.
        (
            [
                ("web-0".to_string(), Err(unanswered())),
                ("web-1".to_string(), report(4, 4, false)),
                ("web-2".to_string(), report(4, 4, false)),
            ]
            .into(),
            "web-0: no answer within 2s",
        ),
    ];
    for (reports, why) in cases {
        let d = decide_now(&cc, &pods, &list, &reports);
        assert_eq!(d.action, RollAction::None, "{why}");
        assert!(d.waiting());
        assert!(
            d.progress.as_deref().unwrap().ends_with(why),
            "{:?} should end with {why:?}",
            d.progress
        );
    }
    // A node started since the list was published never ran a hand-off.
    let mut reports = all_settled(&pods, 4);
    reports.insert("web-0".into(), report(4, 0, false));
    assert!(matches!(
        decide_now(&cc, &pods, &list, &reports).action,
        RollAction::Restart { .. }
    ));
    // A node that is no member (it has not seen itself listed yet).
    let mut reports = all_settled(&pods, 4);
    if let Some(Ok(r)) = reports.get_mut("web-0") {
        r.member = false;
    }
    assert_eq!(
        decide_now(&cc, &pods, &list, &reports).action,
        RollAction::None
    );
}

#[test]
fn no_restart_while_the_list_changes_or_a_scale_in_runs() {
    let cc = web(3, 2);
    let pods: Vec<Pod> = (0..3).map(|i| node(i, "r1")).collect();
    let list = list_of(&cc, &pods, 4);
    let reports = all_settled(&pods, 4);
    let changing = decide_as(&cc, &pods, &list, &reports, true, false, t(0));
    assert_eq!(changing.action, RollAction::None);
    assert!(changing
        .progress
        .unwrap()
        .ends_with("publishing member list version 4"));
    let scaling = decide_as(&cc, &pods, &list, &reports, false, true, t(0));
    assert_eq!(scaling.action, RollAction::None);
    assert!(scaling
        .progress
        .unwrap()
        .contains("a scale-in is under way"));
}

#[test]
fn waits_for_the_restarted_node_to_come_back_and_be_listed_again() {
    let cc = web(3, 2);
    // web-2 was deleted: terminating.
    let pods = vec![node(0, "r1"), node(1, "r1"), deleting(node(2, "r1"))];
    let list = list_of(&cc, &pods, 4);
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 4));
    assert_eq!(d.action, RollAction::None);
    assert!(d.progress.unwrap().ends_with("web-2 is shutting down"));
    // Gone and not recreated yet.
    let pods = vec![node(0, "r1"), node(1, "r1")];
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 4));
    assert_eq!(d.action, RollAction::None);
    assert!(d
        .progress
        .unwrap()
        .ends_with("waiting for web-2 to be recreated"));
    // Recreated at r2, refilling (not Ready).
    let pods = vec![node(0, "r1"), node(1, "r1"), not_ready(node(2, "r2"))];
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 4));
    assert_eq!(d.action, RollAction::None);
    let progress = d.progress.unwrap();
    assert!(
        progress.starts_with("rolling update: 1/3 nodes run revision r2;"),
        "{progress}"
    );
    assert!(progress.ends_with("waiting for web-2 to refill and become Ready"));
    // Ready at a new IP the published list does not have yet.
    let mut back = node(2, "r2");
    back.status.as_mut().unwrap().pod_ip = Some("10.0.0.33".into());
    let pods = vec![node(0, "r1"), node(1, "r1"), back];
    let old_list = list_of(&cc, &[node(0, "r1"), node(1, "r1"), node(2, "r1")], 4);
    let d = decide_now(&cc, &pods, &old_list, &all_settled(&pods, 4));
    assert_eq!(d.action, RollAction::None);
    assert!(d
        .progress
        .unwrap()
        .ends_with("web-2 is not yet listed at its new IP"));
    // Listed at its new IP, every node settled: web-1 is next.
    let list = list_of(&cc, &pods, 5);
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 5));
    assert_eq!(
        d.action,
        RollAction::Restart {
            pod: "web-1".into(),
            uid: "uid-1".into(),
            why: RestartReason::Turn
        }
    );
    assert!(d
        .progress
        .unwrap()
        .starts_with("rolling update: 1/3 nodes run revision r2;"));
}

#[test]
fn an_outdated_pod_that_is_not_ready_is_restarted_at_once() {
    let cc = web(3, 2);
    let pods = vec![node(0, "r1"), not_ready(node(1, "r1")), node(2, "r1")];
    let list = list_of(&cc, &pods, 4);
    // No reports needed: it holds nothing to protect.
    let d = decide_now(&cc, &pods, &list, &ProbeResults::new());
    assert_eq!(
        d.action,
        RollAction::Restart {
            pod: "web-1".into(),
            uid: "uid-1".into(),
            why: RestartReason::NotReady
        }
    );
}

#[test]
fn departing_pods_of_a_scale_in_are_not_rolled() {
    let cc = web(2, 2);
    let pods = vec![node(0, "r2"), node(1, "r2"), node(2, "r1")];
    assert!(!rolling(&observed(&cc), Some(&sts_at("r2")), &pods));
}

#[test]
fn unreplicated_cluster_drains_before_restarting() {
    let cc = web(3, 1);
    let pods: Vec<Pod> = (0..3).map(|i| node(i, "r1")).collect();
    let list = list_of(&cc, &pods, 4);
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 4));
    assert_eq!(
        d.action,
        RollAction::Drain {
            pod: "web-2".into(),
            revision: "r2".into()
        }
    );
    assert_eq!(d.rollout.unwrap().phase, RolloutPhase::Draining);

    // Marked: the member list leaves it out.
    let pods = vec![
        node(0, "r1"),
        node(1, "r1"),
        drain_marked(node(2, "r1"), "r2", 10),
    ];
    assert_eq!(
        drained_pod(&observed(&cc), Some(&sts_at("r2")), &pods).map(|p| p.name_any()),
        Some("web-2".into())
    );
    let list = list_of(&cc, &pods, 5);
    assert_eq!(
        list.members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["web-0", "web-1"]
    );
    // Still handing off version 5: wait (until the deadline, 300 s).
    let mut reports = all_settled(&pods, 5);
    reports.insert("web-2".into(), report(5, 5, true));
    let d = decide_as(&cc, &pods, &list, &reports, false, false, t(100));
    assert_eq!(d.action, RollAction::None);
    let r = d.rollout.unwrap();
    assert_eq!((r.pod.as_str(), r.phase), ("web-2", RolloutPhase::Draining));
    assert!(d.progress.unwrap().contains("web-2 hands its data"));
    // Hand-off done: restart it.
    reports.insert("web-2".into(), report(5, 5, false));
    let d = decide_now(&cc, &pods, &list, &reports);
    assert_eq!(
        d.action,
        RollAction::Restart {
            pod: "web-2".into(),
            uid: "uid-2".into(),
            why: RestartReason::Drained
        }
    );
    // The deadline passes first: restart anyway, saying why.
    reports.insert("web-2".into(), report(5, 5, true));
    let d = decide_as(&cc, &pods, &list, &reports, false, false, t(310));
    assert!(matches!(
        d.action,
        RollAction::Restart {
            why: RestartReason::DrainTimedOut(_),
            ..
        }
    ));
    // A hand-off done for an older list (before the node left it) does not count.
    reports.insert("web-2".into(), report(4, 4, false));
    assert_eq!(
        decide_now(&cc, &pods, &list, &reports).action,
        RollAction::None
    );
}

#[test]
fn a_drain_mark_for_another_revision_is_stale() {
    let cc = web(3, 1);
    let pods = vec![
        node(0, "r1"),
        node(1, "r1"),
        drain_marked(node(2, "r1"), "r0", 10),
    ];
    assert!(drained_pod(&observed(&cc), Some(&sts_at("r2")), &pods).is_none());
    // An up-to-date pod with a mark is not drained either.
    let pods = vec![
        node(0, "r1"),
        node(1, "r1"),
        drain_marked(node(2, "r2"), "r2", 10),
    ];
    assert!(drained_pod(&observed(&cc), Some(&sts_at("r2")), &pods).is_none());
}

#[test]
fn a_single_node_is_restarted_without_draining() {
    let cc = web(1, 1);
    let pods = vec![node(0, "r1")];
    let list = list_of(&cc, &pods, 2);
    let d = decide_now(&cc, &pods, &list, &all_settled(&pods, 2));
    assert!(matches!(
        d.action,
        RollAction::Restart {
            why: RestartReason::Turn,
            ..
        }
    ));
}

#[test]
fn the_same_step_keeps_its_start_time() {
    let mut cc = web(3, 1);
    cc.status = Some(crate::crd::CacheClusterStatus {
        rollout: Some(RolloutStatus {
            revision: "r2".into(),
            pod: "web-2".into(),
            phase: RolloutPhase::Draining,
            started_at: t(-50),
        }),
        ..Default::default()
    });
    let pods = vec![
        node(0, "r1"),
        node(1, "r1"),
        drain_marked(node(2, "r1"), "r2", -50),
    ];
    let list = list_of(&cc, &pods, 5);
    let mut reports = all_settled(&pods, 5);
    reports.insert("web-2".into(), report(5, 5, true));
    let d = decide_now(&cc, &pods, &list, &reports);
    assert_eq!(d.rollout.unwrap().started_at, t(-50));
}

#[test]
fn report_targets_are_the_live_pods_with_an_ip() {
    let cc = web(3, 2);
    let mut pending = node(1, "r2");
    pending.status.as_mut().unwrap().pod_ip = None;
    let pods = vec![node(2, "r1"), pending, deleting(node(0, "r1"))];
    let targets = report_targets(&observed(&cc), &pods);
    assert_eq!(
        targets,
        [ProbeTarget {
            name: "web-2".into(),
            ip: "10.0.0.3".into()
        }]
    );
}

#[test]
fn starting_nodes_without_a_roll_are_no_rolling_update() {
    // A scale-out (web-2 new, not Ready yet) or a crashed node: nothing runs an old revision.
    let cc = web(3, 2);
    let pods = vec![node(0, "r2"), node(1, "r2"), not_ready(node(2, "r2"))];
    let list = list_of(&cc, &pods, 4);
    assert_eq!(
        decide_now(&cc, &pods, &list, &ProbeResults::new()),
        RollDecision::idle()
    );
    // The last node of a roll, recorded in the status, is its tail until it is back.
    let mut cc = cc;
    cc.status = Some(crate::crd::CacheClusterStatus {
        rollout: Some(RolloutStatus {
            revision: "r2".into(),
            pod: "web-2".into(),
            phase: RolloutPhase::Restarting,
            started_at: t(0),
        }),
        ..Default::default()
    });
    let d = decide_now(&cc, &pods, &list, &ProbeResults::new());
    assert_eq!(d.action, RollAction::None);
    assert_eq!(d.rollout.unwrap().started_at, t(0));
    assert!(d
        .progress
        .unwrap()
        .ends_with("waiting for web-2 to refill and become Ready"));
}
