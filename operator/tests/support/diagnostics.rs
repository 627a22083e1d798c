//! What a failed test prints about its namespace (as the journey's conftest does):
//! the objects, `kubectl describe` of the CacheClusters and pods, the events and
//! the pods' logs; and named steps, so a failure says which step it was in.

use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::process::Command;
use std::sync::Mutex;

/// The step running now (the tests of one binary run one at a time).
static STEP: Mutex<String> = Mutex::new(String::new());

/// The step [`step`] is running, if any.
pub fn current_step() -> String {
    STEP.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Runs one named step of a test: announces it, and when it fails says which
/// step failed before the failure goes on (the namespace's state is printed
/// by `in_namespace`).
pub async fn step<T, Fut: Future<Output = T>>(ns: &str, name: &str, body: Fut) -> T {
    if let Ok(mut s) = STEP.lock() {
        *s = name.to_string();
    }
    println!("[{ns}] step: {name}");
    match AssertUnwindSafe(body).catch_unwind().await {
        Ok(v) => v,
        Err(panic) => {
            println!("[{ns}] FAILED step: {name}");
            std::panic::resume_unwind(panic)
        }
    }
}

fn kubectl(args: &[&str]) -> String {
    let bin = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let Ok(kubeconfig) = std::env::var(super::ENV) else {
        return "(no kubeconfig)".into();
    };
    match Command::new(&bin)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(args)
        .output()
    {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("(cannot run {bin}: {e}; set KUBECTL)"),
    }
}

/// Prints the state of namespace `ns` and of the nodes.
pub fn print(ns: &str) {
    let dump = |title: &str, args: &[&str]| println!("\n===== {title}\n{}", kubectl(args));
    dump("nodes", &["get", "nodes", "-o", "wide", "--show-labels"]);
    dump(
        &format!("{ns}: objects"),
        &[
            "get",
            "cacheclusters,statefulsets,pods,services,configmaps,pdb,networkpolicies",
            "-n",
            ns,
            "-o",
            "wide",
        ],
    );
    dump(
        &format!("{ns}: CacheClusters"),
        &["describe", "cacheclusters", "-n", ns],
    );
    dump(&format!("{ns}: pods"), &["describe", "pods", "-n", ns]);
    dump(
        &format!("{ns}: events"),
        &["get", "events", "-n", ns, "--sort-by=.lastTimestamp"],
    );
    let names = kubectl(&["get", "pods", "-n", ns, "-o", "name"]);
    for pod in names.lines().filter(|l| l.starts_with("pod/")) {
        dump(
            &format!("{ns}/{pod}: logs"),
            &["logs", "-n", ns, pod, "--all-containers", "--tail=80"],
        );
    }
}
