//! The scale decision as a pure function of observed state.

use super::*;
use crate::crd::{CacheCluster, CacheClusterSpec, CacheClusterStatus};
use crate::fixtures::{cluster, observed};
use crate::fixtures::{node_report, pod, settled_sts, t, unanswered};
use crate::probe::{HandoffReport, NodeReport, ProbeError};
use crate::status::{
    self, compute_status_underway, find_condition, CONDITION_PROGRESSING, CONDITION_READY,
    CONDITION_REBALANCING,
};
use k8s_openapi::api::apps::v1::StatefulSetSpec;
use k8s_openapi::api::core::v1::{ContainerState, ContainerStateWaiting, ContainerStatus};

/// A StatefulSet whose spec and status both say `replicas`.
pub(crate) fn sts(replicas: i32) -> StatefulSet {
    let mut s = settled_sts(replicas);
    s.spec = Some(StatefulSetSpec {
        replicas: Some(replicas),
        ..Default::default()
    });
    s
}

/// `web` with `replicas` wanted (default timeout 300s).
fn web(replicas: i32) -> CacheCluster {
    cluster(
        "web",
        CacheClusterSpec {
            replicas,
            ..Default::default()
        },
    )
}

fn ready_pods(n: u32) -> Vec<Pod> {
    (0..n)
        .map(|i| {
            pod(
                &format!("web-{i}"),
                Some(&format!("10.0.0.{}", i + 1)),
                true,
            )
        })
        .collect()
}

/// The list published for `cc` (departing pods left out) at `version`.
fn list(cc: &CacheCluster, pods: &[Pod], version: u64) -> MemberList {
    MemberList {
        version,
        ..status::next_member_list(status::ready_members(&observed(cc), pods), 1, None, 0)
    }
}

fn report(version: u64, done: bool, sent: u64) -> Result<NodeReport, ProbeError> {
    Ok(node_report(
        false,
        version,
        0,
        HandoffReport {
            version,
            running: !done,
            done,
            sent,
            acked: if done { sent } else { sent / 2 },
            failed: 0,
            refilled: 0,
        },
    ))
}

fn probes(entries: &[(&str, Result<NodeReport, ProbeError>)]) -> ProbeResults {
    entries
        .iter()
        .map(|(n, r)| ((*n).to_string(), r.clone()))
        .collect()
}

#[test]
fn scale_out_and_steady_state_are_unaffected() {
    // Steady: 3 wanted, 3 in the StatefulSet.
    let cc = web(3);
    let pods = ready_pods(3);
    let l = list(&cc, &pods, 4);
    let none = ProbeResults::new();
    let d = decide(&observed(&cc), Some(&sts(3)), &pods, &l, &none, &t(0));
    assert_eq!(
        d,
        ScaleDecision {
            statefulset_replicas: 3,
            rebalance: None,
            outcome: ScaleOutcome::Steady
        }
    );
    assert!(pods_to_probe(&observed(&cc), Some(&sts(3)), &pods).is_empty());
    // Scale-out: 5 wanted, 3 now: grow at once; new pods join when Ready.
    let cc = web(5);
    let d = decide(&observed(&cc), Some(&sts(3)), &pods, &l, &none, &t(0));
    assert_eq!(d.statefulset_replicas, 5);
    assert_eq!(d.outcome, ScaleOutcome::Steady);
    assert!(!d.waiting());
    // First reconcile: no StatefulSet yet.
    let d = decide(&observed(&cc), None, &[], &l, &none, &t(0));
    assert_eq!(
        (d.statefulset_replicas, d.outcome),
        (5, ScaleOutcome::Steady)
    );
}

#[test]
fn scale_in_start_holds_the_statefulset_and_probes_the_departing_pods() {
    let cc = web(3);
    let pods = ready_pods(5);
    let l = list(&cc, &pods, 8);
    // The published list already leaves web-3 and web-4 out.
    assert_eq!(
        l.members
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["web-0", "web-1", "web-2"]
    );
    assert_eq!(departing_ordinals(&observed(&cc), Some(&sts(5))), 3..5);
    let targets = pods_to_probe(&observed(&cc), Some(&sts(5)), &pods);
    assert_eq!(
        targets,
        [
            ProbeTarget {
                name: "web-3".into(),
                ip: "10.0.0.4".into()
            },
            ProbeTarget {
                name: "web-4".into(),
                ip: "10.0.0.5".into()
            }
        ]
    );
    // The nodes still report the previous version's hand-off.
    let p = probes(&[("web-3", report(7, true, 0)), ("web-4", report(7, true, 0))]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(0));
    assert_eq!(d.outcome, ScaleOutcome::Waiting);
    assert!(d.waiting());
    assert_eq!(d.statefulset_replicas, 5, "the StatefulSet keeps its pods");
    let r = d.status_rebalance().unwrap();
    assert_eq!((r.target_replicas, r.current_replicas), (3, 5));
    assert_eq!(r.config_version, 8);
    assert_eq!(r.started_at, t(0));
    assert_eq!(r.deadline, t(300));
    assert_eq!(
        r.departing
            .iter()
            .map(|d| (d.name.as_str(), d.done, d.handoff_version))
            .collect::<Vec<_>>(),
        [("web-3", false, Some(7)), ("web-4", false, Some(7))]
    );
    assert_eq!(
        r.departing[0].message.as_deref(),
        Some("has not started the hand-off for version 8")
    );
    assert!(started_note(r, 300).contains("without web-3, web-4"));
}

#[test]
fn waiting_keeps_the_start_time_and_reports_progress() {
    let mut cc = web(3);
    let pods = ready_pods(5);
    let l = list(&cc, &pods, 8);
    let first = decide(
        &observed(&cc),
        Some(&sts(5)),
        &pods,
        &l,
        &probes(&[("web-3", report(7, true, 0)), ("web-4", report(7, true, 0))]),
        &t(0),
    );
    cc.status = Some(CacheClusterStatus {
        rebalance: first.status_rebalance().cloned(),
        ..Default::default()
    });
    // 100s later web-3 is done, web-4 half-way; an answer is missing.
    let p = probes(&[
        ("web-3", report(8, true, 40)),
        ("web-4", report(8, false, 60)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(100));
    assert_eq!(
        (d.statefulset_replicas, &d.outcome),
        (5, &ScaleOutcome::Waiting)
    );
    let r = d.status_rebalance().unwrap();
    assert_eq!(r.started_at, t(0), "the start time is kept");
    assert_eq!(r.deadline, t(300));
    assert_eq!(
        r.departing
            .iter()
            .map(|d| (d.done, d.sent, d.acked))
            .collect::<Vec<_>>(),
        [(true, 40, 40), (false, 60, 30)]
    );
    assert_eq!(totals(r), (100, 70, 0));
    let msg = progress_message(r);
    assert!(
        msg.contains("1/2 done; 100 items sent, 70 acked, 0 failed"),
        "{msg}"
    );

    // An unreachable node is not done: keep waiting (until the deadline).
    let p = probes(&[("web-3", report(8, true, 40)), ("web-4", Err(unanswered()))]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(200));
    assert_eq!(d.outcome, ScaleOutcome::Waiting);
    assert_eq!(
        d.rebalance.unwrap().departing[1].message.as_deref(),
        Some("no answer within 2s")
    );
    let d = decide(
        &observed(&cc),
        Some(&sts(5)),
        &pods,
        &l,
        &probes(&[]),
        &t(200),
    );
    assert_eq!(d.outcome, ScaleOutcome::Waiting, "no answer is not done");
}

#[test]
fn all_departing_done_shrinks_the_statefulset() {
    let cc = web(3);
    let pods = ready_pods(5);
    let l = list(&cc, &pods, 8);
    // A later version counts too (the list changed again meanwhile).
    let p = probes(&[
        ("web-3", report(8, true, 40)),
        ("web-4", report(9, true, 60)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(10));
    assert_eq!(d.outcome, ScaleOutcome::HandedOff);
    assert_eq!(d.statefulset_replicas, 3);
    assert!(d.status_rebalance().is_none(), "nothing left to show");
    let note = finished_note(d.rebalance.as_ref().unwrap(), &d.outcome);
    assert_eq!(
        note,
        "hand-off done (100 items sent, 100 acked, 0 failed); scaling StatefulSet from 5 to 3 nodes, removing web-3, web-4"
    );
    // Done for an older version does not count.
    let p = probes(&[
        ("web-3", report(8, true, 40)),
        ("web-4", report(7, true, 60)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(10));
    assert_eq!(d.outcome, ScaleOutcome::Waiting);
}

#[test]
fn timeout_shrinks_anyway_and_names_the_unfinished() {
    let mut cc = web(3);
    cc.spec.scale_down_timeout_seconds = 30;
    let pods = ready_pods(5);
    let l = list(&cc, &pods, 8);
    let p = probes(&[
        ("web-3", report(8, true, 40)),
        ("web-4", report(8, false, 60)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(0));
    assert_eq!(d.rebalance.as_ref().unwrap().deadline, t(30));
    cc.status = Some(CacheClusterStatus {
        rebalance: d.status_rebalance().cloned(),
        ..Default::default()
    });
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(29));
    assert_eq!(d.outcome, ScaleOutcome::Waiting);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(30));
    assert_eq!(
        d.outcome,
        ScaleOutcome::TimedOut {
            unfinished: vec!["web-4".into()]
        }
    );
    assert_eq!(d.statefulset_replicas, 3);
    let r = d.rebalance.as_ref().unwrap();
    assert_eq!(
        timeout_note(r, &["web-4".into()], 30),
        "web-4 did not finish handing off within 30s (web-4: 30 of 60 items acked); removing them anyway, items not yet moved are lost"
    );
    assert!(finished_note(r, &d.outcome).starts_with("hand-off timed out on web-4"));
    // Done beats the deadline.
    let p = probes(&[
        ("web-3", report(8, true, 40)),
        ("web-4", report(8, true, 60)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(1000));
    assert_eq!(d.outcome, ScaleOutcome::HandedOff);
}

#[test]
fn restart_mid_scale_in_carries_on_from_the_cluster() {
    // A new operator process: the StatefulSet still has 5, the spec says 3,
    // the ConfigMap already excludes web-3/web-4 (version 8), and the status
    // (written by the previous process) holds the start time.
    let pods = ready_pods(5);
    let mut cc = web(3);
    let l = list(&cc, &pods, 8);
    let before = decide(
        &observed(&cc),
        Some(&sts(5)),
        &pods,
        &l,
        &probes(&[
            ("web-3", report(8, false, 1)),
            ("web-4", report(8, false, 1)),
        ]),
        &t(0),
    );
    cc.status = Some(CacheClusterStatus {
        config_version: 8,
        rebalance: before.status_rebalance().cloned(),
        ..Default::default()
    });
    // The ConfigMap says 8 already: recomputing gives the same list, no bump.
    let again =
        status::next_member_list(status::ready_members(&observed(&cc), &pods), 1, Some(&l), 8);
    assert_eq!(again, l);
    let p = probes(&[
        ("web-3", report(8, false, 5)),
        ("web-4", report(8, false, 5)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(120));
    assert_eq!(d.outcome, ScaleOutcome::Waiting);
    assert_eq!(d.statefulset_replicas, 5);
    assert_eq!(d.status_rebalance().unwrap().started_at, t(0));
    // Without the status (e.g. it was lost) the clock restarts: never shorter.
    cc.status = None;
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(120));
    assert_eq!(d.status_rebalance().unwrap().started_at, t(120));
    // A different scale-in (now to 4) restarts the clock as well.
    let mut cc4 = web(4);
    cc4.status = Some(CacheClusterStatus {
        rebalance: before.status_rebalance().cloned(),
        ..Default::default()
    });
    let d = decide(&observed(&cc4), Some(&sts(5)), &pods, &l, &p, &t(120));
    let r = d.status_rebalance().unwrap();
    assert_eq!((r.target_replicas, r.started_at.clone()), (4, t(120)));
    assert_eq!(r.departing.len(), 1);
}

#[test]
fn departing_pods_without_a_running_node_hold_nothing() {
    let cc = web(1);
    let mut pods = ready_pods(1);
    pods.push(pod("web-1", None, false)); // Pending, no IP
    let mut crashed = pod("web-2", Some("10.0.0.3"), false);
    crashed.status.as_mut().unwrap().container_statuses = Some(vec![ContainerStatus {
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
    pods.push(crashed);
    let mut leaving = pod("web-3", Some("10.0.0.4"), true);
    leaving.metadata.deletion_timestamp = Some(t(0));
    pods.push(leaving);
    // web-4 has no pod at all.
    let l = list(&cc, &pods, 3);
    assert!(pods_to_probe(&observed(&cc), Some(&sts(5)), &pods).is_empty());
    let d = decide(
        &observed(&cc),
        Some(&sts(5)),
        &pods,
        &l,
        &ProbeResults::new(),
        &t(0),
    );
    assert_eq!(d.outcome, ScaleOutcome::HandedOff);
    assert_eq!(d.statefulset_replicas, 1);
    let msgs: Vec<_> = d
        .rebalance
        .unwrap()
        .departing
        .into_iter()
        .map(|d| (d.name, d.done, d.message.unwrap_or_default()))
        .collect();
    assert_eq!(
        msgs,
        [
            (
                "web-1".into(),
                true,
                "no running node (Pending): nothing to hand off".into()
            ),
            (
                "web-2".into(),
                true,
                "no running node (NotReady): nothing to hand off".into()
            ),
            (
                "web-3".into(),
                true,
                "no running node (Terminating): nothing to hand off".into()
            ),
            ("web-4".into(), true, "no pod: nothing to hand off".into()),
        ]
    );
    // A NotReady node that is running may hold data: it is asked.
    let pods = vec![
        pod("web-0", Some("10.0.0.1"), true),
        pod("web-1", Some("10.0.0.2"), false),
    ];
    assert_eq!(pods_to_probe(&observed(&cc), Some(&sts(2)), &pods).len(), 1);
}

#[test]
fn nothing_to_wait_for_when_no_member_remains_or_timeout_is_zero() {
    // Scaling to 0: no one to hand off to.
    let cc = web(0);
    let pods = ready_pods(2);
    let l = list(&cc, &pods, 5);
    assert!(l.members.is_empty());
    let p = probes(&[("web-0", report(4, true, 9)), ("web-1", Err(unanswered()))]);
    let d = decide(&observed(&cc), Some(&sts(2)), &pods, &l, &p, &t(0));
    assert_eq!(
        (d.statefulset_replicas, d.outcome),
        (0, ScaleOutcome::HandedOff)
    );
    // scaleDownTimeoutSeconds 0: do not wait.
    let mut cc = web(1);
    cc.spec.scale_down_timeout_seconds = 0;
    let l = list(&cc, &pods, 5);
    let p = probes(&[("web-1", report(4, false, 9))]);
    let d = decide(&observed(&cc), Some(&sts(2)), &pods, &l, &p, &t(0));
    assert_eq!(
        (d.statefulset_replicas, d.outcome),
        (1, ScaleOutcome::HandedOff)
    );
}

#[test]
fn status_shows_rebalancing_while_waiting() {
    let cc = web(3);
    let pods = ready_pods(5);
    let l = list(&cc, &pods, 8);
    let p = probes(&[
        ("web-3", report(8, false, 10)),
        ("web-4", report(8, true, 5)),
    ]);
    let d = decide(&observed(&cc), Some(&sts(5)), &pods, &l, &p, &t(0));
    let underway = status::Underway {
        rebalance: d.status_rebalance(),
        ..Default::default()
    };
    let st = compute_status_underway(&observed(&cc), &pods, Some(&sts(5)), &l, underway, t(0));
    let reb = find_condition(&st, CONDITION_REBALANCING).unwrap();
    assert_eq!(
        (reb.status.as_str(), reb.reason.as_str()),
        ("True", "HandingOff")
    );
    assert!(
        reb.message.starts_with(
            "scaling in from 5 to 3 nodes: web-3, web-4 hand off their data for member list version 8 (1/2 done; 15 items sent"
        ),
        "{}",
        reb.message
    );
    // The remaining nodes are all ready; the StatefulSet is held on purpose.
    let ready = find_condition(&st, CONDITION_READY).unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.message.as_str()),
        ("True", "3/3 nodes ready")
    );
    let prog = find_condition(&st, CONDITION_PROGRESSING).unwrap();
    assert_eq!(
        (
            prog.status.as_str(),
            prog.reason.as_str(),
            prog.message.as_str()
        ),
        (
            "True",
            "ScalingIn",
            "waiting for web-3, web-4 to hand off before scaling from 5 to 3 nodes"
        )
    );
    assert_eq!(st.rebalance.as_ref(), d.status_rebalance());
    assert_eq!(st.ready_replicas, 5);

    // Once done: the condition turns False and status.rebalance goes away.
    let st = compute_status_underway(
        &observed(&cc),
        &pods[..3],
        Some(&sts(3)),
        &l,
        Default::default(),
        t(9),
    );
    let reb = find_condition(&st, CONDITION_REBALANCING).unwrap();
    assert_eq!(
        (reb.status.as_str(), reb.reason.as_str()),
        ("False", "Idle")
    );
    assert!(st.rebalance.is_none());
    let json = serde_json::to_value(&st).unwrap();
    assert!(json.get("rebalance").is_none(), "{json}");
}
