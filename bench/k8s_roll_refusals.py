#!/usr/bin/env python3
"""Connections refused through a Service while the pods behind it restart, with and
without kache-node's --shutdown-delay, measured on a real cluster in the same run.

For each delay (default: 0, then 5 s) it creates a 2-pod StatefulSet of plain kache-node
(`serve`, readiness probe on /readyz, no operator involved) behind a ClusterIP Service,
reads one key through the Service IP from this machine in a loop (a new TCP connection per
read, as short-lived clients do), rolls the StatefulSet (`kubectl rollout restart`) and
counts the reads refused (ECONNREFUSED: kube-proxy still sent the connection to a pod that
had stopped accepting) and the time they spanned.

Needs the cluster the k8s kit starts (its Service IPs are reachable from this machine) with
the kache-node image loaded; `tests/k8s/run.sh` does both. For example:

    out=$(bash ../shared/k8s/up.sh) && eval "$out"
    make images && bash ../shared/k8s/load-image.sh target/images/kache-node.tar
    KACHE_E2E_KUBECONFIG=$KUBECONFIG python3 bench/k8s_roll_refusals.py
    bash ../shared/k8s/down.sh
"""
import argparse
import json
import os
import socket
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "k8s"))
import kube  # noqa: E402

NS = "kache-roll-bench"


def manifests(image, delay):
    labels = {"app": "roll-bench"}
    sts = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "roll", "namespace": NS},
        "spec": {
            "replicas": 2, "serviceName": "roll", "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 65532},
                    "containers": [{
                        "name": "kache-node", "image": image, "imagePullPolicy": "IfNotPresent",
                        "args": ["serve", "--listen", "0.0.0.0", "--port", "11211",
                                 "--threads", "1", "--memory-limit", "16",
                                 "--admin-port", "11280", "--shutdown-delay", str(delay)],
                        "ports": [{"name": "memcache", "containerPort": 11211}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": 11280},
                                           "periodSeconds": 1, "failureThreshold": 1},
                        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}},
                    }],
                },
            },
        },
    }
    svc = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "roll", "namespace": NS},
        "spec": {"selector": labels, "ports": [{"name": "memcache", "port": 11211}]},
    }
    return [sts, svc]


def measure(image, delay):
    kube.kubectl("create", "namespace", NS)
    try:
        for doc in manifests(image, delay):
            kube.kubectl("apply", "-f", "-", input=json.dumps(doc))
        kube.kubectl("rollout", "status", "-n", NS, "statefulset/roll", "--timeout=120s")
        svc_ip = kube.get("service", "roll", NS)["spec"]["clusterIP"]
        # Every pod answers (each has its own store): one key set on each.
        for p in kube.pods(NS, "app=roll-bench"):
            kube.mc_set(kube.pod_ip(p), "k", "v")
        counts = {"reads": 0, "refused": 0, "other": 0, "refused_at": []}
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    kube.mc_get(svc_ip, "k")
                    counts["reads"] += 1
                except ConnectionRefusedError:
                    counts["refused"] += 1
                    counts["refused_at"].append(time.monotonic())
                except OSError:
                    counts["other"] += 1

        t = threading.Thread(target=reader)
        t.start()
        try:
            time.sleep(1)
            started = time.monotonic()
            kube.kubectl("rollout", "restart", "-n", NS, "statefulset/roll")
            # `rollout status` returns once the last pod is Ready again.
            time.sleep(1)
            kube.kubectl("rollout", "status", "-n", NS, "statefulset/roll", "--timeout=180s",
                         timeout=200)
            rolled = time.monotonic() - started
            time.sleep(1)
        finally:
            stop.set()
            t.join()
        at = counts["refused_at"]
        span = (at[-1] - at[0]) if at else 0.0
        return {"delay_s": delay, "reads": counts["reads"], "refused": counts["refused"],
                "refused_span_s": round(span, 2), "other_errors": counts["other"],
                "roll_s": round(rolled, 1)}
    finally:
        kube.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=120s", check=False,
                     timeout=150)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--image", default="ghcr.io/kache-dev/kache-node:0.1.0")
    ap.add_argument("--delays", default="0,5", help="comma-separated --shutdown-delay values")
    args = ap.parse_args()
    if not kube.KUBECONFIG:
        sys.exit("set KACHE_E2E_KUBECONFIG to the cluster's kubeconfig (see the docstring)")
    rows = [measure(args.image, int(d)) for d in args.delays.split(",")]
    print(f"{'shutdown-delay':>14} {'reads':>7} {'refused':>8} {'refused for':>12} "
          f"{'other errors':>13} {'roll':>7}")
    for r in rows:
        print(f"{r['delay_s']:>12} s {r['reads']:>7} {r['refused']:>8} "
              f"{r['refused_span_s']:>10} s {r['other_errors']:>13} {r['roll_s']:>5} s")


if __name__ == "__main__":
    main()
