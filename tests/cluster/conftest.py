"""Fixtures for multi-node tests: kache-node processes on loopback sharing a members file."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

# Ports, start-up waits and /proc checks are shared with the single-node suite.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import kache_testlib as kt  # noqa: E402

NODE_BIN = os.environ.get("KACHE_NODE_BIN")
free_port = kt.free_port


def start_listening(argv, ports, log_path, attempts=5, reselect=None, env=None):
    """Starts `argv` (stderr appended to `log_path`) and waits until the process itself
    listens on every port of `ports()`. A port another process took meanwhile makes the
    server exit: then `reselect()` (if given) picks other ports and it is started again;
    without it (the ports are already published) the same ports are tried again a little
    later. Any other failure is raised with the server's output."""
    for attempt in range(attempts):
        with open(log_path, "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=log, start_new_session=True, env=env)

        def output():
            with open(log_path, "rb") as f:
                f.seek(offset)
                return f.read()[-8000:].decode(errors="replace")

        try:
            kt.wait_listening(proc, ports(), kt.START_TIMEOUT, output)
            return proc
        except kt.PortTaken:
            proc.wait(timeout=10)
            if attempt == attempts - 1:
                raise
            if reselect:
                reselect()
            else:
                time.sleep(1.0)
        except RuntimeError:
            proc.kill()
            proc.wait(timeout=10)
            raise


wait_until = kt.wait_until


def metric(server, name):
    """A counter or gauge from the admin /metrics of a node or proxy (0 if not listed)."""
    return kt.metric(server.admin_port, name)


def ready(server):
    """Whether the admin /readyz of a node or proxy answers 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def log_size(node):
    """Where a node's log ends now (see log_since)."""
    return os.path.getsize(node.log_path)


def log_since(node, offset):
    """What a node logged after `offset`."""
    with open(node.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


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


class Node:
    def __init__(self, name, members_file, replication_factor, extra=(), host="127.0.0.1",
                 memory_mb=256):
        self.name = name
        self.memory_mb = memory_mb
        # The member's `host` in the list (what peers connect to and verify over TLS); the
        # node always listens on 127.0.0.1.
        self.host = host
        self.members_file = members_file
        self.extra = list(extra)
        self.proc = None
        # Once in a member list, its ports are what the others connect to: kept from then on.
        self.published = False
        self.pick_ports()

    def pick_ports(self):
        self.port, self.peer_port, self.admin_port = free_port(), free_port(), free_port()

    def member(self):
        self.published = True
        return {"name": self.name, "host": self.host, "ip": "127.0.0.1",
                "port": self.port, "peerPort": self.peer_port}

    @property
    def log_path(self):
        return f"{self.members_file}.{self.name}.log"

    def start(self):
        if not NODE_BIN:
            raise RuntimeError("KACHE_NODE_BIN is not set: run the suite through `make test`")
        self.proc = start_listening(
            lambda: [NODE_BIN, "-l", "127.0.0.1", "-p", str(self.port), "-t", "2", "-m", str(self.memory_mb),
                     "--admin-port", str(self.admin_port), "--peer-port", str(self.peer_port),
                     "--members-file", self.members_file, "--node-name", self.name] + self.extra,
            lambda: [self.port, self.peer_port, self.admin_port],
            # A file, not a pipe: a pipe nobody reads would block the node once full.
            self.log_path,
            reselect=None if self.published else self.pick_ports)
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

    def metrics(self):
        """The node's /metrics as {name: value} (unlabelled samples)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            parts = line.split(" ")
            if len(parts) == 2 and not line.startswith("#"):
                out[parts[0]] = float(parts[1])
        return out

    def status(self, field):
        """A field of /proc/PID/status, in KiB (VmRSS, VmHWM, ...)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

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

    def add_node(self, name=None, start=True, extra=(), host="127.0.0.1", memory_mb=256):
        node = Node(name or f"kache-{len(self.nodes)}", self.members_file,
                    self.replication_factor, extra, host, memory_mb)
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
