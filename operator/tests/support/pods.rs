//! Real pods on the cluster's real node, and the faults a test causes them with real
//! means: scheduling held back by a node label, a container's process stopped with
//! SIGSTOP, a pod's connections refused by iptables in its network namespace.
//!
//! The processes are reached on this machine (`/proc`, `kill`): the cluster's node
//! must be this machine, as the k8s kit's is. Elsewhere these helpers fail, saying so.

use super::eventually;
use k8s_openapi::api::core::v1::{Node, Pod};
use kache_operator::observe::pod_ip;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------ scheduling

/// Node label a test's held pods need to be scheduled: a CacheCluster whose spec went
/// through [`held`] selects nodes labelled `SCHEDULE_LABEL=<namespace>`, so its pods
/// stay Pending (the scheduler really cannot place them) until the test labels the
/// node ([`allow_scheduling`]). Pods already running are not affected by a label
/// removed later (`IgnoredDuringExecution`).
pub const SCHEDULE_LABEL: &str = "kache.dev/e2e-schedule";

/// The nodeSelector of [`held`].
pub fn held_selector(ns: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(SCHEDULE_LABEL.to_string(), ns.to_string())])
}

/// `spec` with the nodeSelector that holds its pods until [`allow_scheduling`].
pub fn held(ns: &str, mut spec: Value) -> Value {
    spec["nodeSelector"] = json!(held_selector(ns));
    spec
}

/// Labels every node so that the pods of namespace `ns` held by [`held`] can be
/// scheduled (`allow`), or removes the label so that new ones stay Pending.
pub async fn allow_scheduling(client: &Client, ns: &str, allow: bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    let value = if allow { json!(ns) } else { Value::Null };
    let patch = json!({"metadata": {"labels": {SCHEDULE_LABEL: value}}});
    for node in nodes.list(&ListParams::default()).await.unwrap() {
        nodes
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .unwrap_or_else(|e| panic!("label node {}: {e}", node.name_any()));
    }
}

/// Removes the label [`allow_scheduling`] set for `ns` (cleanup; errors printed).
pub async fn release_scheduling(client: &Client, ns: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let Ok(list) = nodes.list(&ListParams::default()).await else {
        return;
    };
    let patch = json!({"metadata": {"labels": {SCHEDULE_LABEL: null}}});
    for node in list {
        if node.labels().get(SCHEDULE_LABEL).map(String::as_str) == Some(ns) {
            if let Err(e) = nodes
                .patch(
                    &node.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                println!(
                    "[{ns}] cleanup: cannot unlabel node {}: {e}",
                    node.name_any()
                );
            }
        }
    }
}

// ------------------------------------------------------------------ pod state

/// Ready (the kubelet's readiness probe passes) and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// How often the pod's first container was restarted.
pub fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .map_or(0, |c| c.restart_count)
}

fn describe(pod: &Pod) -> String {
    let st = pod.status.clone().unwrap_or_default();
    let conditions: Vec<String> = st
        .conditions
        .iter()
        .flatten()
        .map(|c| format!("{}={}", c.type_, c.status))
        .collect();
    format!(
        "phase {:?}, ip {:?}, {}, restarts {}{}",
        st.phase,
        st.pod_ip,
        conditions.join(" "),
        restarts(pod),
        if pod.metadata.deletion_timestamp.is_some() {
            ", terminating"
        } else {
            ""
        }
    )
}

/// Waits until pod `name` exists and satisfies `pred`; returns it.
pub async fn wait_pod(pods: &Api<Pod>, name: &str, what: &str, pred: impl Fn(&Pod) -> bool) -> Pod {
    let pred = &pred;
    eventually(&format!("pod {name} {what}"), || async move {
        match pods.get_opt(name).await.map_err(|e| e.to_string())? {
            Some(p) if pred(&p) => Ok(p),
            Some(p) => Err(describe(&p)),
            None => Err("no such pod".into()),
        }
    })
    .await
}

/// Waits until pod `name` is Ready through the kubelet's probe, with an IP.
pub async fn wait_ready(pods: &Api<Pod>, name: &str) -> Pod {
    wait_pod(pods, name, "Ready", |p| is_ready(p) && pod_ip(p).is_some()).await
}

/// Waits until pod `name` is gone.
pub async fn wait_gone(pods: &Api<Pod>, name: &str) {
    eventually(&format!("pod {name} gone"), || async move {
        match pods.get_opt(name).await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(p) => Err(describe(&p)),
        }
    })
    .await;
}

// ------------------------------------------------------------------ processes

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The host pid of the main process of the pod's first container: the process of
/// that container's cgroup (named by its container ID) whose parent is outside it.
pub fn container_pid(pod: &Pod) -> u32 {
    let name = pod.name_any();
    let id = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.container_id.clone())
        .unwrap_or_else(|| panic!("pod {name} has no running container: {}", describe(pod)));
    let id = id.rsplit("://").next().unwrap_or(&id).to_string();
    let in_container = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|cg| cg.lines().any(|l| l.ends_with(&format!("/{id}"))))
    };
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| in_container(*pid))
        .collect();
    pids.iter()
        .copied()
        .find(|pid| parent(*pid).is_some_and(|pp| !pids.contains(&pp)))
        .unwrap_or_else(|| {
            panic!(
                "no process of container {id} (pod {name}) on this machine: the fault tests \
                 reach the cache pods' processes on the cluster's node, which must be this \
                 machine (as the k8s kit's is)"
            )
        })
}

fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// A pod's kache-node process stopped with SIGSTOP (it answers nothing: probes
/// and hand-off stall, its connections stay open); SIGCONT when dropped.
pub struct Frozen {
    pid: u32,
    what: String,
}

impl Frozen {
    /// Stops the process of the pod's first container and waits until it is stopped.
    pub fn freeze(pod: &Pod) -> Self {
        let pid = container_pid(pod);
        let what = format!("pod {} (pid {pid})", pod.name_any());
        run(Command::new("kill").args(["-STOP", &pid.to_string()])).unwrap();
        let frozen = Self { pid, what };
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_state(pid) != Some('T') {
            assert!(
                Instant::now() < deadline,
                "{} not stopped by SIGSTOP",
                frozen.what
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        println!("{} stopped (SIGSTOP)", frozen.what);
        frozen
    }

    /// Lets it run again (SIGCONT).
    pub fn thaw(self) {}
}

impl Drop for Frozen {
    fn drop(&mut self) {
        match run(Command::new("kill").args(["-CONT", &self.pid.to_string()])) {
            Ok(_) => println!("{} continued (SIGCONT)", self.what),
            Err(e) => println!("{}: {e}", self.what),
        }
    }
}

/// Connections a pod opens refused by an iptables rule in its network namespace (REJECT
/// with a TCP reset, so the process sees "connection refused" at once); with
/// [`Refused::api_server`] its open connections there are aborted too. The process stays
/// alive, serves clients and answers its probes (unlike [`Frozen`], the kubelet never
/// restarts it). The rule is removed when dropped, unless the pod is gone by then (its
/// namespace goes with it).
pub struct Refused {
    pid: u32,
    what: String,
    rule: Vec<String>,
}

/// Runs `args` (a program and its arguments) in the network namespace of process `pid`.
fn in_netns<S: AsRef<std::ffi::OsStr>>(pid: u32, args: &[S]) -> Result<String, String> {
    run(Command::new("nsenter")
        .args(["-t", &pid.to_string(), "-n"])
        .args(args))
}

fn iptables_in(pid: u32, action: &str, rule: &[String]) -> Result<String, String> {
    let head = ["iptables", "-w", action].map(String::from);
    in_netns(pid, &[&head[..], rule].concat())
}

/// `ss` arguments selecting TCP connections to `ip:port`.
fn ss_filter(ip: &str, port: u16) -> Vec<String> {
    format!("dst {ip} dport = :{port}")
        .split(' ')
        .map(String::from)
        .collect()
}

impl Refused {
    /// Connections to peer ports (the hand-off, replication, refill).
    pub fn peer_ports(pod: &Pod) -> Self {
        Self::insert(pod, None, kache_cluster::names::PEER_PORT, "peer ports")
    }

    /// Connections to the API server at `ip:port` as the pod sees it (the `kubernetes`
    /// Service), and those already open aborted (`ss -K`): as if it went away.
    pub fn api_server(pod: &Pod, ip: &str, port: u16) -> Self {
        let refused = Self::insert(pod, Some(ip), port, "the API server");
        let kill = ["ss", "-K", "-t"].map(String::from);
        let aborted = in_netns(refused.pid, &[&kill[..], &ss_filter(ip, port)].concat()).unwrap();
        let open = aborted.lines().skip(1).count();
        println!(
            "{}: {open} open connection(s) to the API server aborted",
            refused.what
        );
        refused
    }

    fn insert(pod: &Pod, dst: Option<&str>, port: u16, to: &str) -> Self {
        let pid = container_pid(pod);
        let mut rule: Vec<String> = vec!["OUTPUT".into(), "-p".into(), "tcp".into()];
        if let Some(ip) = dst {
            rule.extend(["-d".into(), ip.into()]);
        }
        let port = port.to_string();
        rule.extend(
            [
                "--dport",
                &port,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ]
            .map(String::from),
        );
        iptables_in(pid, "-I", &rule).unwrap();
        let what = format!("pod {} (pid {pid})", pod.name_any());
        println!("{what}: connections to {to} refused");
        Self { pid, what, rule }
    }

    /// Established connections of the pod to `ip:port` (`ss`), e.g. its API server watch.
    pub fn established(pod: &Pod, ip: &str, port: u16) -> usize {
        let list = ["ss", "-H", "-t", "state", "established"].map(String::from);
        in_netns(
            container_pid(pod),
            &[&list[..], &ss_filter(ip, port)].concat(),
        )
        .unwrap()
        .lines()
        .count()
    }

    /// Lets those connections through again.
    pub fn lift(self) {}
}

impl Drop for Refused {
    fn drop(&mut self) {
        match iptables_in(self.pid, "-D", &self.rule) {
            Ok(_) => println!("{}: connections allowed again", self.what),
            Err(e) => println!("{}: {e}", self.what),
        }
    }
}
