"""The user journey on a real Kubernetes node, step by step (issue 9).

Install the operator with Helm, `kubectl apply` a CacheCluster in a namespace enforcing
the "restricted" Pod Security Standard, reach it from an application pod by Service DNS
and per-pod names, replicate, scale 3 -> 5 -> 2 warm, lose a pod, roll a spec change,
use the proxy sidecar and the TLS + auth example, see a capacity problem reported, then
upgrade, uninstall and delete. Every step runs real pods on the kit's kubelet (containerd,
runc, bridge CNI, kube-proxy, kube-dns) from the images scripts/build-images.sh built.

The steps share one cluster and run in file order; a step whose predecessor failed is
skipped (the failure is what matters). Figures go to target/k8s-e2e-results.json.
"""
import base64
import functools
import json
import os
import ssl
import socket
import subprocess
import tempfile
import threading
import time

import pylibmc
import pytest
import yaml

import kube
from conftest import record, watch_namespace

pytestmark = pytest.mark.needs_cluster

OPERATOR_NS = "kache-system"
NS = "shop"
NAME = "my-cache"
SECURE_NS = "secure"
CAPACITY_NS = "capacity"
HELM = os.environ.get("KACHE_E2E_HELM", "helm")
BUSYBOX = os.environ.get("KACHE_E2E_BUSYBOX", "local/busybox:1.35")
KEYS = 20_000


class Journey:
    """What the steps hand to each other."""
    failed = None
    helm_started = None
    keys = {}


def step(fn):
    """Runs a step only when every earlier one passed."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        if Journey.failed:
            pytest.skip(f"an earlier step failed: {Journey.failed}")
        try:
            return fn(*a, **kw)
        except BaseException:
            Journey.failed = fn.__name__
            raise
    return wrapper


def helm(*args, timeout=240):
    home = os.path.join(tempfile.gettempdir(), "kache-k8s-e2e-helm")
    env = dict(os.environ, HELM_CACHE_HOME=f"{home}/cache", HELM_CONFIG_HOME=f"{home}/config",
               HELM_DATA_HOME=f"{home}/data", KUBECONFIG=kube.KUBECONFIG)
    p = subprocess.run([HELM, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"helm {' '.join(args)} failed: {p.stderr.strip()}"
    return p.stdout


def restricted_namespace(ns, labels=None):
    watch_namespace(ns)
    kube.kubectl("create", "namespace", ns)
    kube.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted",
                 "pod-security.kubernetes.io/enforce-version=latest",
                 *[f"{k}={v}" for k, v in (labels or {}).items()])


def client_pod(ns, name="client", labels=None):
    """A busybox pod meeting the restricted standard, for application-side checks."""
    kube.apply({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 65532,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "sh", "image": BUSYBOX, "imagePullPolicy": "Never",
                "command": ["sleep", "36000"],
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        },
    })
    kube.kubectl("wait", "-n", ns, "--for=condition=Ready", f"pod/{name}", "--timeout=90s")


def nc(ns, pod, host, payload, container=None):
    """memcached text sent from inside a pod with busybox nc (closes after 2 s idle)."""
    script = f"printf '{payload}' | timeout 10 nc -w 2 {host} 11211"
    return kube.exec_in(ns, pod, script, container=container)


def ketama(members):
    """pylibmc as README configures it: ketama_weighted over the members' host:port."""
    servers = [f"{m['host']}:{m['port']}" for m in members["members"]]
    return pylibmc.Client(servers, behaviors={
        "ketama_weighted": True, "connect_timeout": 2000, "retry_timeout": 1,
        "dead_timeout": 1, "receive_timeout": 2_000_000, "send_timeout": 2_000_000})


def write_keys(members, keys):
    c = ketama(members)
    items = list(keys.items())
    failed = []
    for i in range(0, len(items), 500):
        failed += c.set_multi(dict(items[i:i + 500]))
    c.disconnect_all()
    assert not failed, f"{len(failed)} of {len(keys)} writes failed"


def hit_ratio(members, keys):
    c = ketama(members)
    names = list(keys)
    hits = 0
    for i in range(0, len(names), 1000):
        got = c.get_multi(names[i:i + 1000])
        hits += sum(1 for k, v in got.items() if v == keys[k])
    c.disconnect_all()
    return hits / len(keys)


def settled(ns, name, replicas, timeout=180):
    """Waits until the cluster is at rest with `replicas` Ready nodes: status, ConfigMap and
    every node agree on one member list and no hand-off runs. Returns the member list."""
    def check():
        cc = kube.get("cachecluster", name, ns)
        st = cc.get("status", {})
        if st.get("observedGeneration") != cc["metadata"]["generation"]:
            return False, "status not observed for the current generation"
        ready = kube.condition(cc, "Ready") or {}
        if ready.get("status") != "True":
            return False, f"Ready: {ready.get('message')}"
        if st.get("rebalance") or st.get("rollout"):
            return False, "a scale-in or rolling update is under way"
        members = kube.members_json(ns, name)
        if members["version"] != st.get("configVersion"):
            return False, f"ConfigMap v{members['version']} vs status v{st.get('configVersion')}"
        pods = kube.cluster_pods(ns, name)
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        if len(live) != replicas or not all(kube.pod_ready(p) for p in live):
            return False, f"pods: {[(p['metadata']['name'], kube.pod_ready(p)) for p in pods]}"
        listed = [(m["name"], m["ip"]) for m in members["members"]]
        want = [(p["metadata"]["name"], kube.pod_ip(p)) for p in live]
        if listed != want:
            return False, f"listed {listed}, pods {want}"
        for p in live:
            r = kube.node_report(kube.pod_ip(p))
            h = r["handoff"]
            if r["version"] != members["version"] or h["running"] or not (
                    (h["version"] >= members["version"] and h["done"]) or h["version"] == 0):
                return False, f"{p['metadata']['name']} /cluster: {r}"
        return members
    return kube.wait_for(f"{ns}/{name} settled at {replicas} nodes", check, timeout=timeout)


# ---------------------------------------------------------------------------- 1. helm


@step
def test_01_helm_install_operator_ready_lease_metrics(cluster):
    """helm install charts/kache: the operator pod is Ready, holds its Lease, serves /metrics."""
    watch_namespace(OPERATOR_NS)
    Journey.helm_started = time.monotonic()
    helm("install", "kache", os.path.join(kube.ROOT, "charts/kache"), "--namespace", OPERATOR_NS,
         "--create-namespace", "--wait", "--timeout", "180s")
    pod = kube.wait_for("operator pod Ready", lambda: next(
        (p for p in kube.pods(OPERATOR_NS, "app.kubernetes.io/name=kache") if kube.pod_ready(p)), None))
    name = pod["metadata"]["name"]
    # Ready through its real readinessProbe (GET /readyz on the metrics port).
    probe = pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]
    assert probe["path"] == "/readyz", probe
    lease = kube.wait_for("operator Lease held", lambda: (
        lambda l: l if l and l["spec"].get("holderIdentity") == name else (False, f"{l and l['spec']}"))(
        kube.get("lease", "kache-operator", OPERATOR_NS, check=False)))
    assert lease["spec"]["leaseDurationSeconds"] > 0
    status, body = kube.http_get(kube.pod_ip(pod), 8080, "/metrics")
    assert status == 200 and "kache_operator_leader 1" in body, body[:500]
    assert "kache_operator_reconciles_total" in body
    record("step1_helm_install_to_operator_ready_s", round(time.monotonic() - Journey.helm_started, 1))


# ---------------------------------------------------------------------------- 2. apply


@step
def test_02_example_cachecluster_in_restricted_namespace(cluster):
    """kubectl apply -f examples/cachecluster.yaml where the restricted standard is enforced:
    pods admitted and Ready through their probes; status, printer columns, ConfigMap and
    `config get cluster` name the same members."""
    restricted_namespace(NS)
    kube.kubectl("apply", "-n", NS, "-f", os.path.join(kube.ROOT, "examples/cachecluster.yaml"))
    svc_ip = kube.wait_for("client Service", lambda: kube.get("service", NAME, NS)["spec"]["clusterIP"])

    # The first set/get through the client Service, timed from `helm install`.
    def first_set_get():
        kube.mc_set(svc_ip, "first", "hello")
        return kube.mc_get(svc_ip, "first") == "hello"
    kube.wait_for("first set/get through the Service", first_set_get, timeout=120, interval=0.2)
    record("step2_helm_install_to_first_set_get_s", round(time.monotonic() - Journey.helm_started, 1))

    members = settled(NS, NAME, 3)
    names = [m["name"] for m in members["members"]]
    assert names == [f"{NAME}-0", f"{NAME}-1", f"{NAME}-2"]
    cc = kube.get("cachecluster", NAME, NS)
    assert [m["name"] for m in cc["status"]["members"]] == names
    assert all(m["state"] == "Ready" for m in cc["status"]["members"])
    assert [m["host"] for m in cc["status"]["members"]] == [m["host"] for m in members["members"]]
    # Printer columns as the API server renders them (kubectl's table).
    row = kube.kubectl("get", "cachecluster", NAME, "-n", NS, "--no-headers").split()
    assert row[1:4] == ["3", "3", str(members["version"])], row
    for p in kube.cluster_pods(NS, NAME):
        # Admitted under "restricted" and Ready through the kubelet's probes.
        c = p["spec"]["containers"][0]
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert p["spec"]["securityContext"]["runAsNonRoot"] is True
        out = kube.memcache(kube.pod_ip(p), "config get cluster\r\n")
        nodes = " ".join(f"{m['host']}|{m['ip']}|{m['port']}" for m in members["members"])
        payload = f"{members['version']}\n{nodes}\n"
        assert kube.get("configmap", f"{NAME}-members", NS)["data"]["cluster-config"] == payload
        assert out == f"CONFIG cluster 0 {len(payload)}\r\n{payload}\r\nEND\r\n", out


# ---------------------------------------------------------------------------- 3. DNS


@step
def test_03_application_pod_reaches_service_and_pod_names(cluster):
    """From an application pod: set/get via my-cache.<ns>.svc.cluster.local and each
    pod's stable name my-cache-N.my-cache-peers.<ns>.svc."""
    client_pod(NS)
    out = nc(NS, "client", f"{NAME}.{NS}.svc.cluster.local",
             r"set dns 0 0 2\r\nok\r\nget dns\r\nquit\r\n")
    assert out == "STORED\r\nVALUE dns 0 2\r\nok\r\nEND\r\n", out
    for i in range(3):
        host = f"{NAME}-{i}.{NAME}-peers.{NS}.svc"
        out = nc(NS, "client", host, rf"set pod{i} 0 0 1\r\n{i}\r\nget pod{i}\r\nquit\r\n")
        assert out == f"STORED\r\nVALUE pod{i} 0 1\r\n{i}\r\nEND\r\n", f"{host}: {out}"


# ---------------------------------------------------------------------------- 4. discovery


@step
def test_04_nodes_discover_each_other_through_the_api_and_replicate(cluster):
    """replicationFactor 2: the nodes learn it from their ConfigMap (in-cluster config, the
    Role the operator made: nothing more) and a write lands on both owners."""
    sa = f"system:serviceaccount:{NS}:{NAME}-node"
    can = lambda *a: kube.kubectl("auth", "can-i", *a, "-n", NS, f"--as={sa}", check=False).strip()
    assert can("get", f"configmap/{NAME}-members") == "yes"
    assert can("watch", f"configmap/{NAME}-members") == "yes"
    assert can("get", "configmap/other") == "no"
    assert can("list", "pods") == "no"
    assert can("get", "secrets") == "no"
    version = kube.members_json(NS, NAME)["version"]
    kube.kubectl("patch", "cachecluster", NAME, "-n", NS, "--type=merge",
                 "-p", '{"spec":{"replicationFactor":2}}')
    members = settled(NS, NAME, 3)
    assert members["replicationFactor"] == 2 and members["version"] == version + 1
    ips = {m["name"]: m["ip"] for m in members["members"]}
    for ip in ips.values():
        assert kube.node_report(ip)["replicationFactor"] == 2
    for i in range(20):
        key = f"replicated-{i}"
        owners = json.loads(kube.http_get(ips[f"{NAME}-0"], kube.ADMIN_PORT,
                                          f"/cluster/owners?key={key}")[1])["owners"]
        assert len(owners) == 2, owners
        # Written to a node that is not the first owner; both owners hold it.
        entry = next(n for n in ips if n != owners[0])
        assert kube.mc_set(ips[entry], key, f"v{i}") == "STORED\r\n"
        for o in owners:
            kube.wait_for(f"{key} on {o}", lambda o=o: kube.mc_get(ips[o], key) == f"v{i}",
                          timeout=10, interval=0.1)


# ---------------------------------------------------------------------------- 5. scaling


@step
def test_05_warm_scaling_3_to_5_to_2(cluster):
    """A ketama client fed the member list writes 20,000 keys; scaling to 5 and then to 2
    keeps >= 99% of them; the StatefulSet shrinks only after the hand-off."""
    members = settled(NS, NAME, 3)
    Journey.keys = {f"key-{i}": f"value-{i}" for i in range(KEYS)}
    write_keys(members, Journey.keys)
    assert hit_ratio(members, Journey.keys) == 1.0

    kube.kubectl("scale", "cachecluster", NAME, "-n", NS, "--replicas=5")
    members = settled(NS, NAME, 5)
    up = hit_ratio(members, Journey.keys)
    record("step5_hit_ratio_after_3_to_5", round(up, 4))
    assert up >= 0.99, f"hit ratio after 3 -> 5: {up:.4f}"

    # Down to 2: watch the StatefulSet and the departing nodes until it shrinks.
    kube.kubectl("scale", "cachecluster", NAME, "-n", NS, "--replicas=2")
    departing = [f"{NAME}-{i}" for i in (2, 3, 4)]
    seen_rebalance = False
    last_reports = {}
    deadline = time.monotonic() + 180
    while True:
        # Pods first: a departing pod seen deleted while the StatefulSet read after it
        # still has 5 replicas was killed early.
        pods = kube.cluster_pods(NS, NAME)
        cc = kube.get("cachecluster", NAME, NS)
        sts = kube.get("statefulset", NAME, NS)
        if sts["spec"]["replicas"] < 5:
            break
        seen_rebalance |= bool(cc.get("status", {}).get("rebalance"))
        for p in pods:
            if p["metadata"]["name"] in departing:
                assert not p["metadata"].get("deletionTimestamp"), \
                    f"{p['metadata']['name']} deleted before the StatefulSet shrank"
                try:
                    last_reports[p["metadata"]["name"]] = kube.node_report(kube.pod_ip(p))
                except OSError:
                    pass
        assert time.monotonic() < deadline, "the StatefulSet did not shrink within 180 s"
        time.sleep(0.3)
    assert seen_rebalance, "status.rebalance never showed the scale-in"
    members = settled(NS, NAME, 2)
    for name in departing:
        r = last_reports.get(name)
        assert r and not r["member"], f"{name} was still a member: {r}"
    events = kube.kubectl("get", "events", "-n", NS, "--field-selector",
                          f"involvedObject.kind=CacheCluster,involvedObject.name={NAME}",
                          "-o", "jsonpath={range .items[*]}{.reason}|{.message}{'\\n'}{end}")
    finished = [e for e in events.splitlines() if e.startswith("RebalanceFinished|")]
    assert finished and "hand-off done" in finished[-1], events
    assert "HandoffTimeout" not in events
    down = hit_ratio(members, Journey.keys)
    record("step5_hit_ratio_after_5_to_2", round(down, 4))
    assert down >= 0.99, f"hit ratio after 5 -> 2: {down:.4f}"


# ---------------------------------------------------------------------------- 6. pod loss


@step
def test_06_deleted_pod_loses_no_acknowledged_write_and_refills_before_ready(cluster):
    """kubectl delete pod my-cache-1 under replicationFactor 2 while a client writes: every
    acknowledged write is still there afterwards, and the new pod held its share (refilled
    from the replica) when it first reported Ready."""
    members = settled(NS, NAME, 2)
    old = kube.get("pod", f"{NAME}-1", NS)
    acked, stop = {}, threading.Event()
    errors = []

    def writer():
        c = ketama(members)
        i = 0
        while not stop.is_set():
            k, v = f"during-delete-{i}", f"v{i}"
            try:
                if c.set(k, v):
                    acked[k] = v
            except pylibmc.Error as e:
                errors.append(str(e))
            i += 1
        c.disconnect_all()

    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(1)
        # What the cluster held when the pod went: the new one must hold it all when Ready.
        held = kube.node_report(kube.pod_ip(kube.get("pod", f"{NAME}-0", NS)))["items"]
        kube.kubectl("delete", "pod", f"{NAME}-1", "-n", NS, "--wait=false")

        def ready_again():
            p = kube.get("pod", f"{NAME}-1", NS, check=False)
            if not p or p["metadata"]["uid"] == old["metadata"]["uid"] or not kube.pod_ready(p):
                return False, "not back"
            return p
        new = kube.wait_for("new my-cache-1 Ready", ready_again, timeout=120, interval=0.1)
        # What it held the moment it was first seen Ready.
        report = kube.node_report(kube.pod_ip(new))
        time.sleep(1)
    finally:
        stop.set()
        t.join()
    record("step6_items_before_delete", held)
    record("step6_items_at_ready_refilled", f"{report['items']} ({report['handoff']['refilled']} refilled)")
    # With two nodes and replicationFactor 2 each owns every key: it pulled back all the
    # cluster held before it went (writes made meanwhile reach it by replication).
    assert report["member"], report
    assert report["handoff"]["refilled"] >= held > 0, (held, report)
    assert report["items"] >= held, (held, report)
    members = settled(NS, NAME, 2)
    lost = [k for k, v in acked.items() if ketama(members).get(k) != v]
    # How far the two replicas ended apart (writes in flight on the links the restart cut).
    counts = [kube.node_report(m["ip"])["items"] for m in members["members"]]
    record("step6_items_on_each_replica_after", counts)
    record("step6_acked_writes_during_delete", len(acked))
    record("step6_acked_writes_lost", len(lost))
    assert acked, f"no write was acknowledged during the deletion ({errors[:3]})"
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {lost[:5]}"
    ratio = hit_ratio(members, Journey.keys)
    record("step6_hit_ratio_after_delete", round(ratio, 4))
    assert ratio >= 0.99


# ---------------------------------------------------------------------------- 7. roll


@step
def test_07_rolling_update_keeps_the_cache_warm(cluster):
    """Changing spec.threads rolls the pods: the operator restarts them one at a time, each
    only once the previous one refilled; the cache stays >= 99% warm throughout, and no
    client connecting through the Service is refused: a stopping node reports not ready
    but keeps accepting for its --shutdown-delay (5 s), while kube-proxy drops it."""
    members = settled(NS, NAME, 2)
    svc_ip = kube.get("service", NAME, NS)["spec"]["clusterIP"]
    revision = kube.get("cachecluster", NAME, NS)["status"]["revision"]
    sample = list(Journey.keys.items())[:2000]
    through = {"hits": 0, "reads": 0, "errors": 0, "refused": 0, "error_ticks": set(),
               "min_ready": 2, "reasons": set()}
    stop = threading.Event()

    def reader():
        # Reads through the client Service while the pods restart: with two nodes and
        # replicationFactor 2 any Ready node holds every key.
        i = 0
        while not stop.is_set():
            k, v = sample[i % len(sample)]
            try:
                got = kube.mc_get(svc_ip, k)
                through["reads"] += 1
                through["hits"] += got == v
            except OSError as e:
                # A connection refused: kube-proxy still sent it to a node that had stopped
                # accepting (what --shutdown-delay prevents). Anything else (a reset, a
                # timeout) is counted apart.
                through["refused"] += isinstance(e, ConnectionRefusedError)
                through["errors"] += 1
                through["error_ticks"].add(int(time.monotonic() * 10))
            i += 1

    t = threading.Thread(target=reader)
    t.start()
    try:
        kube.kubectl("patch", "cachecluster", NAME, "-n", NS, "--type=merge",
                     "-p", '{"spec":{"threads":1}}')

        def rolled():
            cc = kube.get("cachecluster", NAME, NS)
            st = cc.get("status", {})
            prog = kube.condition(cc, "Progressing") or {}
            through["reasons"].add(prog.get("reason"))
            pods = kube.cluster_pods(NS, NAME)
            through["min_ready"] = min(through["min_ready"], sum(kube.pod_ready(p) for p in pods))
            return (st.get("revision") not in (None, revision) and st.get("updatedReplicas") == 2
                    and not st.get("rollout") and prog.get("status") == "False") or (False, prog)
        started = time.monotonic()
        kube.wait_for("the rolling update to finish", rolled, timeout=240, interval=0.3)
        record("step7_roll_duration_s", round(time.monotonic() - started, 1))
    finally:
        stop.set()
        t.join()
    members = settled(NS, NAME, 2)
    assert "RollingUpdate" in through["reasons"], through["reasons"]
    assert through["min_ready"] >= 1, "both nodes were down at once"
    during = through["hits"] / max(through["reads"], 1)
    record("step7_hit_ratio_during_roll_via_service",
           f"{during:.4f} of {through['reads']} answered reads ({through['errors']} connection "
           f"errors, {through['refused']} refused, within {len(through['error_ticks']) / 10:.1f} s)")
    record("step7_connections_refused_via_service", through["refused"])
    after = hit_ratio(members, Journey.keys)
    record("step7_hit_ratio_after_roll", round(after, 4))
    assert through["refused"] == 0, (
        f"{through['refused']} connections through the Service refused during the roll")
    assert during >= 0.99, f"hit ratio during the roll: {during:.4f}"
    assert after >= 0.99, f"hit ratio after the roll: {after:.4f}"
    for p in kube.cluster_pods(NS, NAME):
        args = p["spec"]["containers"][0]["args"]
        assert args[args.index("--threads") + 1] == "1", args
    events = kube.kubectl("get", "events", "-n", NS, "--field-selector",
                          f"involvedObject.kind=CacheCluster,involvedObject.name={NAME}",
                          "-o", "jsonpath={range .items[*]}{.reason}|{.message}{'\\n'}{end}")
    restarts = [e for e in events.splitlines() if e.startswith("RollingUpdate|") and "restarting" in e]
    assert [r.split("restarting ")[1].split(" ")[0] for r in restarts][-2:] == \
        [f"{NAME}-1", f"{NAME}-0"], events


# ---------------------------------------------------------------------------- 8. sidecar


def sidecar_docs(server_minor):
    """examples/sidecar.yaml, with the application container a busybox that does set/get on
    127.0.0.1:11211 (no image registry here); on clusters before 1.29 the proxy moves from
    initContainers (native sidecar) to containers, as the example's comment says."""
    with open(os.path.join(kube.ROOT, "examples/sidecar.yaml")) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        d["spec"]["replicas"] = 1
        spec = d["spec"]["template"]["spec"]
        app = spec["containers"][0]
        app["image"] = BUSYBOX
        app["imagePullPolicy"] = "Never"
        app["command"] = ["sh", "-c"]
        app["args"] = ["sleep 36000"]
        if server_minor < 29:
            proxy = spec.pop("initContainers")[0]
            proxy.pop("restartPolicy", None)
            spec["containers"].insert(0, proxy)
    return docs


@step
def test_08_proxy_sidecar_reaches_the_cluster_on_localhost(cluster):
    """examples/sidecar.yaml: the application's plain client on 127.0.0.1:11211 reaches the
    cluster through the `kache-node proxy` sidecar, which routes each key to its owner."""
    minor = int(json.loads(kube.kubectl("version", "-o", "json"))["serverVersion"]["minor"].rstrip("+"))
    for d in sidecar_docs(minor):
        kube.apply(d, ns=NS)
    kube.kubectl("rollout", "status", "-n", NS, "deployment/my-app", "--timeout=120s")
    pod = kube.wait_for("my-app pod Ready", lambda: next(
        (p for p in kube.pods(NS, "app.kubernetes.io/name=my-app") if kube.pod_ready(p)), None))
    name = pod["metadata"]["name"]
    out = nc(NS, name, "127.0.0.1", r"set via-proxy 0 0 5\r\nworld\r\nget via-proxy\r\nquit\r\n",
             container="app")
    assert out == "STORED\r\nVALUE via-proxy 0 5\r\nworld\r\nEND\r\n", out
    members = kube.members_json(NS, NAME)
    owners = json.loads(kube.http_get(members["members"][0]["ip"], kube.ADMIN_PORT,
                                      "/cluster/owners?key=via-proxy")[1])["owners"]
    ips = {m["name"]: m["ip"] for m in members["members"]}
    for o in owners:
        assert kube.mc_get(ips[o], "via-proxy") == "world", o
    # Keys written by the ketama client earlier are read through the proxy too.
    out = nc(NS, name, "127.0.0.1", r"get key-1 key-2 key-3\r\nquit\r\n", container="app")
    assert out.count("VALUE ") == 3, out
    kube.kubectl("delete", "-n", NS, "deployment/my-app", "--wait=true")


# ---------------------------------------------------------------------------- 9. secure


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(d, ns):
    """The CA, server and client certificates as examples/cachecluster-secure.yaml says."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kache-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=secure-cache",
            "-keyout", "tls.key", "-out", "tls.csr", cwd=d)
    with open(os.path.join(d, "tls.ext"), "w") as f:
        f.write(f"subjectAltName=DNS:secure-cache.{ns}.svc,DNS:*.secure-cache-peers.{ns}.svc\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", "tls.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "tls.ext", "-out", "tls.crt", cwd=d)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=shop-app",
            "-keyout", "client.key", "-out", "client.csr", cwd=d)
    with open(os.path.join(d, "client.ext"), "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", "client.ext", "-out", "client.crt", cwd=d)


def tls_exchange(ip, d, ns, payload, client_cert=True, until=(b"END\r\n",)):
    ctx = ssl.create_default_context(cafile=os.path.join(d, "ca.crt"))
    if client_cert:
        ctx.load_cert_chain(os.path.join(d, "client.crt"), os.path.join(d, "client.key"))
    with socket.create_connection((ip, 11211), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=f"secure-cache.{ns}.svc") as s:
            return kube.exchange(s, payload, until)


@step
def test_09_secure_example_tls_and_auth(cluster):
    """examples/cachecluster-secure.yaml with real Secrets: a TLS client with a certificate
    and credentials works; without the certificate, without TLS, or without credentials
    it is refused."""
    restricted_namespace(SECURE_NS, {"team": "web"})
    d = tempfile.mkdtemp(prefix="kache-k8s-tls-")
    make_certs(d, SECURE_NS)
    password = base64.b16encode(os.urandom(12)).decode().lower()
    with open(os.path.join(d, "auth-file"), "w") as f:
        f.write(f"app:{password}\n")
    kube.kubectl("create", "secret", "generic", "secure-cache-tls", "-n", SECURE_NS,
                 "--type=kubernetes.io/tls", f"--from-file={d}/tls.crt", f"--from-file={d}/tls.key",
                 f"--from-file={d}/ca.crt")
    kube.kubectl("create", "secret", "generic", "secure-cache-auth", "-n", SECURE_NS,
                 f"--from-file={d}/auth-file")
    kube.kubectl("create", "secret", "generic", "secure-cache-peer", "-n", SECURE_NS,
                 f"--from-literal=secret={base64.b16encode(os.urandom(32)).decode()}")
    with open(os.path.join(kube.ROOT, "examples/cachecluster-secure.yaml")) as f:
        cc = next(x for x in yaml.safe_load_all(f) if x and x["kind"] == "CacheCluster")
    kube.apply(cc, ns=SECURE_NS)
    members = settled(SECURE_NS, "secure-cache", cc["spec"]["replicas"])
    ip = members["members"][0]["ip"]
    login = f"set auth 0 0 {len('app ' + password)}\r\napp {password}\r\n".encode()
    out = tls_exchange(ip, d, SECURE_NS, login + b"set k 0 0 2\r\nok\r\nget k\r\n")
    assert out == "STORED\r\nSTORED\r\nVALUE k 0 2\r\nok\r\nEND\r\n", out
    # TLS and certificate, no credentials: refused.
    out = tls_exchange(ip, d, SECURE_NS, b"get k\r\n", until=(b"\r\n",))
    assert out.startswith("CLIENT_ERROR") and "VALUE" not in out, out
    # Wrong password: refused.
    out = tls_exchange(ip, d, SECURE_NS, b"set auth 0 0 9\r\napp wrong\r\n", until=(b"\r\n",))
    assert out.startswith("CLIENT_ERROR"), out
    # No client certificate (clientAuth): the handshake fails.
    with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
        tls_exchange(ip, d, SECURE_NS, login + b"get k\r\n", client_cert=False)
    # Plain TCP: no answer.
    try:
        out = kube.memcache(ip, login + b"get k\r\n", timeout=3)
    except OSError:
        out = ""
    assert "VALUE" not in out and "STORED" not in out, out
    # The nodes reach each other over TLS with the peer secret: replication works.
    for m in members["members"]:
        r = kube.node_report(m["ip"])
        assert r["member"] and r["version"] == members["version"], r
    rejected = kube.http_get(ip, kube.ADMIN_PORT, "/metrics")[1]
    assert "peer_rejected" in rejected


# ---------------------------------------------------------------------------- capacity


def millis(cpu):
    return int(cpu[:-1]) if cpu.endswith("m") else int(float(cpu) * 1000)


def free_cpu_millis():
    """CPU the node can still give to requests: allocatable minus every scheduled request."""
    node = kube.get("nodes")["items"][0]
    used = 0
    for p in json.loads(kube.kubectl("get", "pods", "-A", "-o", "json"))["items"]:
        if p.get("status", {}).get("phase") in ("Succeeded", "Failed") or not p["spec"].get("nodeName"):
            continue
        for c in p["spec"]["containers"]:
            used += millis(c.get("resources", {}).get("requests", {}).get("cpu", "0"))
    return millis(node["status"]["allocatable"]["cpu"]) - used


@step
def test_10a_unschedulable_pods_are_reported(cluster):
    """More nodes than the node's CPU fits (4 threads x 100m each): the pods the scheduler
    cannot place are reported in the conditions and a Warning event with the scheduler's
    reason; only running nodes are published; scaling back down does not hang."""
    restricted_namespace(CAPACITY_NS)
    fit = free_cpu_millis() // 400
    replicas = fit + 1
    kube.apply({"apiVersion": "kache.dev/v1alpha1", "kind": "CacheCluster",
                "metadata": {"name": "big", "namespace": CAPACITY_NS},
                "spec": {"replicas": replicas, "memoryMiB": 16}})

    def reported():
        cc = kube.get("cachecluster", "big", CAPACITY_NS)
        deg = kube.condition(cc, "Degraded") or {}
        ready = sum(1 for p in kube.cluster_pods(CAPACITY_NS, "big") if kube.pod_ready(p))
        # The status counts the Ready pods too (a reconcile after the kubelet's report).
        counted = (kube.condition(cc, "Ready") or {}).get("message")
        if deg.get("reason") == "Unschedulable" and ready == fit and \
                counted == f"{fit}/{replicas} nodes ready":
            return cc
        return False, f"Degraded {deg}, {ready} Ready, status: {counted}"
    cc = kube.wait_for("Degraded Unschedulable", reported, timeout=120)
    deg = kube.condition(cc, "Degraded")
    assert deg["status"] == "True" and "Insufficient cpu" in deg["message"], deg
    assert f"big-{fit}" in deg["message"], deg
    ready = kube.condition(cc, "Ready")
    assert ready["status"] == "False" and ready["message"] == f"{fit}/{replicas} nodes ready", ready
    record("capacity_degraded_message", deg["message"])
    members = kube.wait_for("the running nodes published", lambda: (
        lambda m: m if len(m["members"]) == fit else (False, m))(kube.members_json(CAPACITY_NS, "big")))
    assert [m["name"] for m in members["members"]] == [f"big-{i}" for i in range(fit)]
    kube.wait_for("Warning event Unschedulable", lambda: "Insufficient cpu" in kube.kubectl(
        "get", "events", "-n", CAPACITY_NS, "--field-selector",
        "involvedObject.kind=CacheCluster,reason=Unschedulable,type=Warning",
        "-o", "jsonpath={.items[*].message}"), timeout=30)
    # Scaling to what fits: the unplaced pod holds nothing; no wait, no hang.
    kube.kubectl("scale", "cachecluster", "big", "-n", CAPACITY_NS, f"--replicas={fit}")
    settled(CAPACITY_NS, "big", fit, timeout=60)
    cc = kube.get("cachecluster", "big", CAPACITY_NS)
    assert kube.condition(cc, "Degraded")["status"] == "False"
    kube.kubectl("delete", "namespace", CAPACITY_NS, "--wait=false")


# ---------------------------------------------------------------------------- 10. upgrade


OWNED = ["statefulsets", "pods", "services", "configmaps", "poddisruptionbudgets",
         "serviceaccounts", "roles", "rolebindings", "networkpolicies"]


@step
def test_10b_helm_upgrade_uninstall_and_garbage_collection(cluster):
    """helm upgrade with a changed value keeps the caches running; helm uninstall and the
    CacheClusters' deletion leave nothing owned behind, only the CRD."""
    before = {p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.cluster_pods(NS, NAME)}
    old_op = {p["metadata"]["uid"] for p in kube.pods(OPERATOR_NS, "app.kubernetes.io/name=kache")}
    helm("upgrade", "kache", os.path.join(kube.ROOT, "charts/kache"), "--namespace", OPERATOR_NS,
         "--reuse-values", "--set", "operator.logLevel=debug", "--wait", "--timeout", "180s")
    dep = kube.get("deployment", "kache-operator", OPERATOR_NS)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["RUST_LOG"] == "debug"

    def new_leader():
        ps = [p for p in kube.pods(OPERATOR_NS, "app.kubernetes.io/name=kache")
              if kube.pod_ready(p) and p["metadata"]["uid"] not in old_op]
        lease = kube.get("lease", "kache-operator", OPERATOR_NS)
        return ps and lease["spec"].get("holderIdentity") == ps[0]["metadata"]["name"]
    kube.wait_for("the upgraded operator leads", new_leader, timeout=120)
    # The upgraded operator reconciles without restarting the nodes.
    kube.kubectl("annotate", "cachecluster", NAME, "-n", NS, "kache.dev/poke=1")
    settled(NS, NAME, 2)
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in kube.cluster_pods(NS, NAME)} == before

    helm("uninstall", "kache", "--namespace", OPERATOR_NS, "--wait", "--timeout", "120s")
    kube.kubectl("delete", "cacheclusters", "--all", "-A", "--wait=true", timeout=180)
    for ns in (NS, SECURE_NS):
        def gone(ns=ns):
            left = kube.kubectl("get", ",".join(OWNED), "-n", ns, "-o", "name",
                                "-l", "app.kubernetes.io/managed-by=kache-operator").split()
            return not left or (False, left)
        kube.wait_for(f"everything owned in {ns} garbage-collected", gone, timeout=120)
    assert not kube.exists("deployment", "kache-operator", OPERATOR_NS)
    assert not kube.kubectl("get", "clusterroles,clusterrolebindings", "-o", "name",
                            "-l", "app.kubernetes.io/instance=kache").split()
    assert kube.exists("crd", "cacheclusters.kache.dev"), "helm keeps the CRD (crds/)"
