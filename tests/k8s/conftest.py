"""Fixtures of the real-cluster suite (run by tests/k8s/run.sh, which starts the cluster).

On any failure the state of the namespaces the failing test used is printed: the
CacheClusters described, pods, events, and the logs of the nodes and the operator.
"""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import kube  # noqa: E402

# Namespaces a test is working in (diagnostics on failure).
WATCHED = ["kache-system"]
# Figures the journey measures, printed at the end and written to target/.
RESULTS = {}


def watch_namespace(ns):
    if ns not in WATCHED:
        WATCHED.append(ns)


def record(key, value):
    RESULTS[key] = value
    print(f"[k8s-e2e] {key}: {value}")


def _dump(title, *args):
    try:
        out = kube.kubectl(*args, check=False, timeout=30)
    except Exception as e:  # noqa: BLE001 - diagnostics must never mask the failure
        out = f"(could not run kubectl: {e})"
    print(f"\n===== {title}\n{out}")


def print_diagnostics():
    if not kube.KUBECONFIG:
        return
    _dump("nodes", "get", "nodes", "-o", "wide")
    for ns in WATCHED:
        _dump(f"{ns}: objects", "get", "cacheclusters,statefulsets,pods,services,configmaps,pdb",
              "-n", ns, "-o", "wide", "-L", "controller-revision-hash")
        _dump(f"{ns}: CacheClusters", "describe", "cacheclusters", "-n", ns)
        _dump(f"{ns}: pods", "describe", "pods", "-n", ns)
        _dump(f"{ns}: events", "get", "events", "-n", ns, "--sort-by=.lastTimestamp")
        pods = kube.get("pods", ns=ns, check=False) or {"items": []}
        for p in pods["items"]:
            name = p["metadata"]["name"]
            _dump(f"{ns}/{name}: logs", "logs", "-n", ns, name, "--all-containers", "--tail=60")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed and "needs_cluster" in item.keywords:
        print_diagnostics()
        report.sections.append(("k8s diagnostics", "printed above (captured stdout)"))


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cluster: runs against the real cluster")


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    terminalreporter.section("real-cluster figures")
    for k, v in RESULTS.items():
        terminalreporter.write_line(f"{k}: {v}")
    out = os.path.join(kube.ROOT, "target", "k8s-e2e-results.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(RESULTS, f, indent=2)


@pytest.fixture(scope="session")
def cluster():
    """The cluster named by $KACHE_E2E_KUBECONFIG (tests/k8s/run.sh starts the kit's)."""
    if not kube.KUBECONFIG:
        pytest.skip("no cluster: KACHE_E2E_KUBECONFIG is not set (run tests/k8s/run.sh, "
                    "which starts the k8s kit's cluster when its binaries are present)")
    nodes = kube.get("nodes")["items"]
    assert nodes, "the cluster has no node"
    kube.use_cluster_dns(os.environ.get("KACHE_E2E_DNS", "10.96.0.10"))
    return nodes
