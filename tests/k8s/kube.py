"""Helpers of the real-cluster suite: kubectl, waiting on state, plain memcached and HTTP.

Everything talks to the real cluster: `kubectl` (the kit's, $KUBECTL) against the
kubeconfig in $KACHE_E2E_KUBECONFIG, memcached over TCP to pod and Service IPs on the
kit's bridge (10.88.0.0/16) and Service network (10.96.0.0/16), and the nodes' admin
port over HTTP.
"""
import ctypes
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

KUBECONFIG = os.environ.get("KACHE_E2E_KUBECONFIG", "")
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl") or "kubectl"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ADMIN_PORT = 11280
MEMCACHE_PORT = 11211


class KubectlError(AssertionError):
    pass


def kubectl(*args, input=None, check=True, timeout=120):
    """Runs kubectl; returns stdout. Fails with kubectl's stderr."""
    cmd = [KUBECTL, "--kubeconfig", KUBECONFIG, *args]
    # Bytes, not text mode: memcached replies end lines with \r\n, kept as they are.
    p = subprocess.run(cmd, input=input.encode() if input else None, capture_output=True,
                       timeout=timeout)
    stdout, stderr = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise KubectlError(f"{' '.join(args)} failed ({p.returncode}): {stderr.strip()}")
    return stdout


def get(kind, name=None, ns=None, check=True):
    """An object (or a list) as JSON; None when it does not exist and check is False."""
    args = ["get", kind] + ([name] if name else []) + (["-n", ns] if ns else []) + ["-o", "json"]
    try:
        return json.loads(kubectl(*args))
    except KubectlError:
        if check:
            raise
        return None


def apply(doc, ns=None, server_side=False):
    """kubectl apply of a dict or YAML/JSON text."""
    text = doc if isinstance(doc, str) else json.dumps(doc)
    args = ["apply", "-f", "-"] + (["-n", ns] if ns else [])
    if server_side:
        args += ["--server-side", "--force-conflicts"]
    return kubectl(*args, input=text)


def exists(kind, name, ns=None):
    args = ["get", kind, name, "--ignore-not-found", "-o", "name"] + (["-n", ns] if ns else [])
    return bool(kubectl(*args).strip())


def wait_for(what, fn, timeout=120.0, interval=0.5):
    """Polls fn() until it returns a truthy value (returned) or raises with the last reason.

    fn returns a value, or raises/returns a falsy value; a string it raises (AssertionError)
    or a `(False, reason)` pair says what is still missing.
    """
    deadline = time.monotonic() + timeout
    last = "never checked"
    while True:
        try:
            v = fn()
            if isinstance(v, tuple) and len(v) == 2 and v[0] is False:
                last = v[1]
            elif v:
                return v
            else:
                last = repr(v)
        except (AssertionError, KubectlError, OSError, ValueError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last seen: {last}")
        time.sleep(interval)


def pods(ns, selector):
    return get("pods", ns=ns)["items"] if not selector else json.loads(
        kubectl("get", "pods", "-n", ns, "-l", selector, "-o", "json"))["items"]


def cluster_pods(ns, cluster):
    sel = f"app.kubernetes.io/instance={cluster},app.kubernetes.io/component=cache-node"
    items = pods(ns, sel)
    return sorted(items, key=lambda p: int(p["metadata"]["name"].rsplit("-", 1)[1]))


def pod_ready(pod):
    if pod["metadata"].get("deletionTimestamp"):
        return False
    conds = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def pod_ip(pod):
    return pod.get("status", {}).get("podIP")


def condition(obj, type_):
    for c in obj.get("status", {}).get("conditions", []):
        if c["type"] == type_:
            return c
    return None


def members_json(ns, cluster):
    cm = get("configmap", f"{cluster}-members", ns)
    return json.loads(cm["data"]["members.json"])


def http_get(ip, port, path, timeout=3.0):
    with urllib.request.urlopen(f"http://{ip}:{port}{path}", timeout=timeout) as r:
        return r.status, r.read().decode()


def node_report(ip):
    """A node's GET /cluster document."""
    return json.loads(http_get(ip, ADMIN_PORT, "/cluster")[1])


def exchange(sock, request, until=(b"END\r\n",)):
    """Sends raw memcached text on a connected socket (plain or TLS) and reads until the
    reply ends with one of `until` or the peer closes."""
    if isinstance(request, str):
        request = request.encode()
    sock.sendall(request)
    out = b""
    while not any(out.endswith(u) for u in until):
        chunk = sock.recv(65536)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def memcache(host, request, port=MEMCACHE_PORT, until=(b"END\r\n",), timeout=5.0):
    """Sends raw memcached text on a new connection and reads the reply (see exchange)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        return exchange(s, request, until)


def mc_set(host, key, value, port=MEMCACHE_PORT):
    return memcache(host, f"set {key} 0 0 {len(value)}\r\n{value}\r\n", port,
                    until=(b"STORED\r\n", b"\r\n"))


def mc_get(host, key, port=MEMCACHE_PORT):
    """The value of key on that node, or None."""
    out = memcache(host, f"get {key}\r\n", port)
    lines = out.split("\r\n")
    if lines[0].startswith("VALUE "):
        return lines[1]
    return None


def exec_in(ns, pod, script, container=None, timeout=60):
    args = ["exec", "-n", ns, pod] + (["-c", container] if container else []) + ["--", "sh", "-c", script]
    return kubectl(*args, timeout=timeout)


# ---------------------------------------------------------------- cluster DNS on the host

CLONE_NEWNS = 0x00020000


def use_cluster_dns(dns_ip="10.96.0.10"):
    """Makes this process (and its children) resolve names through the cluster DNS.

    A ketama client must connect to the members' `host` names (the ring is computed over
    them), which only the cluster DNS knows. The process moves into a mount namespace of
    its own and bind-mounts a resolv.conf naming kube-dns over /etc/resolv.conf there: the
    host's own resolver configuration is untouched. Needs root (CAP_SYS_ADMIN).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    subprocess.run(["mount", "--make-rprivate", "/"], check=True)
    fd, path = tempfile.mkstemp(prefix="kache-k8s-resolv-")
    with os.fdopen(fd, "w") as f:
        f.write(f"nameserver {dns_ip}\nsearch cluster.local\noptions ndots:5 timeout:1 attempts:3\n")
    os.chmod(path, 0o644)
    subprocess.run(["mount", "--bind", path, "/etc/resolv.conf"], check=True)
    return path
