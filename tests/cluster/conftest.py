"""Fixtures for multi-node tests: kache-node processes on loopback sharing a members file."""
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

NODE_BIN = os.environ.get("KACHE_NODE_BIN")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open")


def request(port, data, until=b"END\r\n", timeout=5.0):
    """Sends raw bytes and reads until the reply ends with `until`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while not out.endswith(until):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def metric(node, name):
    """A counter or gauge from a node's /metrics (0 when absent)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.admin_port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return int(float(line.split()[1]))
    return 0


class Node:
    def __init__(self, name, members_file, replication_factor, extra=(), host="127.0.0.1"):
        self.name = name
        # The member's `host` in the list (what peers connect to and verify over TLS); the
        # node always listens on 127.0.0.1.
        self.host = host
        self.port = free_port()
        self.peer_port = free_port()
        self.admin_port = free_port()
        self.members_file = members_file
        self.extra = list(extra)
        self.proc = None

    def member(self):
        return {"name": self.name, "host": self.host, "ip": "127.0.0.1",
                "port": self.port, "peerPort": self.peer_port}

    def start(self):
        if not NODE_BIN:
            raise RuntimeError("KACHE_NODE_BIN is not set: run the suite through `make test`")
        self.proc = subprocess.Popen(
            [NODE_BIN, "-l", "127.0.0.1", "-p", str(self.port), "-t", "2", "-m", "256",
             "--admin-port", str(self.admin_port), "--peer-port", str(self.peer_port),
             "--members-file", self.members_file, "--node-name", self.name] + self.extra,
            # A file, not a pipe: a pipe nobody reads would block the node once full.
            stdout=subprocess.DEVNULL, stderr=open(f"{self.members_file}.{self.name}.log", "ab"))
        wait_port(self.port)
        return self

    def stop(self, sig=None):
        if self.proc and self.proc.poll() is None:
            if sig:
                self.proc.send_signal(sig)
            else:
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def admin(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"


class LocalCluster:
    """N nodes and the members file the operator would publish."""

    def __init__(self, tmpdir, replication_factor=1):
        self.dir = tmpdir
        self.members_file = os.path.join(tmpdir, "members.json")
        self.replication_factor = replication_factor
        self.version = 0
        self.nodes = []
        self.published = []

    def add_node(self, name=None, start=True, extra=(), host="127.0.0.1"):
        node = Node(name or f"kache-{len(self.nodes)}", self.members_file,
                    self.replication_factor, extra, host)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def publish(self, nodes):
        """Writes the member list as the operator would: version + 1, atomically."""
        self.version += 1
        self.published = list(nodes)
        doc = {"version": self.version, "replicationFactor": self.replication_factor,
               "members": [n.member() for n in nodes]}
        tmp = self.members_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, self.members_file)
        return doc

    def wait_version(self, nodes=None, timeout=10.0):
        deadline = time.monotonic() + timeout
        for node in nodes or self.published:
            while node.admin("/cluster")["version"] != self.version:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.name} did not reach version {self.version}")
                time.sleep(0.05)

    def stop(self):
        for node in self.nodes:
            node.stop()


@pytest.fixture
def local_cluster():
    if not shutil.which("memcached") and not NODE_BIN:
        pytest.fail("run through `make test`")
    tmpdir = tempfile.mkdtemp(prefix="kache-cluster-")
    clusters = []

    def make(replication_factor=1):
        c = LocalCluster(tmpdir, replication_factor)
        clusters.append(c)
        return c

    yield make
    for c in clusters:
        c.stop()
    shutil.rmtree(tmpdir, ignore_errors=True)
