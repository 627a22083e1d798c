"""TLS on the peer port: replication, hand-off and refill between real nodes over TLS, and
peers that do not speak TLS, or hold an untrusted certificate, kept out without harm.

Certificates are made with the `openssl` CLI, as tests/python/test_tls.py does. With
`--tls-cert` the client port speaks TLS too, so the test's memcache clients use TLS.
"""
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile

import pytest
from pymemcache.client.base import Client

from conftest import Node, metric, ready, wait_until

VALUE = b"v" * 100


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(d, name, cn):
    base = os.path.join(d, name)
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", base + ".key",
            "-out", base + ".crt", "-subj", f"/CN={cn}", "-days", "2")
    return base


def make_cert(d, name, ca, cn, san="IP:127.0.0.1,DNS:localhost"):
    """A node certificate: the nodes present it to each other as servers and as clients."""
    key, csr, crt, ext = (os.path.join(d, f"{name}.{x}") for x in ("key", "csr", "crt", "ext"))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-subj", f"/CN={cn}",
            "-out", csr)
    with open(ext, "w") as f:
        f.write(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                "extendedKeyUsage=serverAuth,clientAuth\n")
    openssl("x509", "-req", "-in", csr, "-CA", ca + ".crt", "-CAkey", ca + ".key",
            "-CAcreateserial", "-days", "2", "-out", crt, "-extfile", ext)
    return crt, key


@pytest.fixture(scope="module")
def pki():
    if not shutil.which("openssl"):
        pytest.fail("openssl is needed to make test certificates: run `make deps`")
    d = tempfile.mkdtemp(prefix="kache-peer-tls-")
    ca = make_ca(d, "ca", "kache test CA")
    other_ca = make_ca(d, "other-ca", "someone else's CA")
    yield {
        "ca": ca + ".crt",
        "node": make_cert(d, "node", ca, "kache-node"),
        "intruder": make_cert(d, "intruder", other_ca, "kache-node"),
    }
    shutil.rmtree(d, ignore_errors=True)


# How the nodes trust each other: a CA for peers only (server authentication), the client CA
# (mutual TLS on both ports), or no CA (a peer must present the node's own certificate).
MODES = {
    "peer-ca": lambda pki: ["--peer-tls-ca", pki["ca"]],
    "mutual": lambda pki: ["--tls-client-ca", pki["ca"]],
    "own-certificate": lambda pki: [],
}


def tls_args(pki, mode, identity="node"):
    crt, key = pki[identity]
    return ["--tls-cert", crt, "--tls-key", key] + MODES[mode](pki)


def client(node, pki):
    """A memcache client over TLS; it presents the node certificate (valid for clients too)
    in case the port requires one."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["node"])
    return Client(("127.0.0.1", node.port), tls_context=ctx, connect_timeout=3, timeout=5)


def peer_port_certificate(node, pki, hostname):
    """The subject CN a node's peer port presents to a TLS client verifying `hostname`."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    ctx.load_cert_chain(*pki["node"])
    with socket.create_connection(("127.0.0.1", node.peer_port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=hostname) as s:
            return dict(x[0] for x in s.getpeercert()["subject"])["commonName"]


def owners(node, key):
    return node.admin(f"/cluster/owners?key={key}")["owners"]


def write_to_owners(nodes, keys, pki):
    """Writes every key to its first owner; the reply waits for the replica's ack."""
    by_name = {n.name: n for n in nodes}
    clients = {n.name: client(n, pki) for n in nodes}
    placed = {}
    for k in keys:
        names = owners(nodes[0], k)
        assert clients[names[0]].set(k, VALUE, noreply=False)
        placed[k] = [by_name[name] for name in names]
    return placed


def wait_handoff(nodes, version, timeout=60.0):
    for node in nodes:
        wait_until(lambda: (lambda h: h["version"] == version and h["done"])(
            node.admin("/cluster")["handoff"]), f"{node.name}: hand-off {version} not done",
            timeout)


def wait_ready(node, timeout=60.0):
    wait_until(lambda: ready(node), f"{node.name} never became ready", timeout)


def log_of(node):
    with open(node.log_path, "rb") as f:
        return f.read().decode(errors="replace")


def hello_frame(name=b"intruder", secret=b""):
    """A peer Hello as node/src/peer/wire.rs encodes it."""
    body = bytes([1]) + struct.pack(">Q", 0) + bytes([len(name)]) + name \
        + struct.pack(">H", len(secret)) + secret
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("mode", sorted(MODES))
def test_replicas_are_written_over_tls(local_cluster, pki, mode):
    cluster = local_cluster(replication_factor=2)
    # Members named by DNS name: the certificate is verified for `localhost`.
    nodes = [cluster.add_node(extra=tls_args(pki, mode), host="localhost") for _ in range(3)]
    cluster.publish(nodes)
    cluster.wait_version()
    keys = [f"tls:{mode}:{i}" for i in range(150)]
    placed = write_to_owners(nodes, keys, pki)
    # Every key is on its replica too, read from the replica directly. (A write's reply
    # waits up to 1 s for the replica; on a loaded machine it may arrive a little later.)
    wait_until(lambda: sum(n.admin("/cluster")["items"] for n in nodes) == 2 * len(keys),
               "replicas missing", timeout=10)
    clients = {n.name: client(n, pki) for n in nodes}
    missing = [k for k, (_, replica) in placed.items() if clients[replica.name].get(k) != VALUE]
    assert not missing, f"{len(missing)} keys not replicated, e.g. {missing[:5]}"
    for n in nodes:
        assert metric(n, "kache_peer_rejected_total") == 0, log_of(n)
    assert sum(metric(n, "kache_peer_acked_total") for n in nodes) >= len(keys)
    # What the nodes spoke is TLS, with the node certificate, for the member's host.
    assert peer_port_certificate(nodes[0], pki, "localhost") == "kache-node"


def test_scale_out_hands_off_and_a_restarted_node_refills_over_tls(local_cluster, pki):
    cluster = local_cluster(replication_factor=2)
    args = tls_args(pki, "mutual")
    nodes = [cluster.add_node(extra=args) for _ in range(2)]
    cluster.publish(nodes)
    cluster.wait_version()
    keys = [f"scale:{i}" for i in range(2000)]
    write_to_owners(nodes, keys, pki)

    # Scale out: the new node receives its share from the hand-off, over TLS.
    new = cluster.add_node(extra=args)
    cluster.publish(nodes + [new])
    cluster.wait_version()
    wait_handoff(nodes + [new], cluster.version)
    mine = [k for k in keys if new.name in owners(nodes[0], k)]
    assert len(mine) > len(keys) // 3
    # Counted, not read: a read on the new node could be answered by read-through.
    assert new.admin("/cluster")["items"] == len(mine)
    for n in nodes:
        h = n.admin("/cluster")["handoff"]
        assert h["failed"] == 0 and h["acked"] == h["sent"], h
    assert len(client(new, pki).get_many(mine[:500])) == 500

    # Killed and restarted empty while still listed: it pulls its share back over TLS.
    new.stop()
    new.start()
    wait_ready(new)
    refilled = new.admin("/cluster")
    assert refilled["handoff"]["refilled"] >= len(mine), refilled
    assert refilled["items"] == len(mine)
    for n in nodes + [new]:
        assert metric(n, "kache_peer_rejected_total") == 0, log_of(n)


def test_plain_tcp_peers_are_refused_without_harming_the_cluster(local_cluster, pki, tmp_path):
    cluster = local_cluster(replication_factor=2)
    nodes = [cluster.add_node(extra=tls_args(pki, "peer-ca")) for _ in range(2)]
    cluster.publish(nodes)
    cluster.wait_version()
    before = metric(nodes[0], "kache_peer_rejected_total")

    # A raw peer Hello in plain TCP: closed without an answer, logged and counted.
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", nodes[0].peer_port), timeout=5) as s:
            s.sendall(hello_frame())
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
    wait_until(lambda: metric(nodes[0], "kache_peer_rejected_total") >= before + 3,
               "plain hellos not counted", timeout=5)
    assert "plain-TCP peer on the TLS peer port" in log_of(nodes[0])

    # A node without TLS that believes it is in the cluster: its replication is refused.
    members = tmp_path / "plain-members.json"
    plain = Node("plain", str(members), 2)
    doc = {"version": 1, "replicationFactor": 2,
           "members": [n.member() for n in nodes] + [plain.member()]}
    members.write_text(json.dumps(doc))
    plain.start()
    try:
        wait_until(lambda: plain.admin("/cluster")["version"] == 1, "plain node has no list")
        plain_client = Client(("127.0.0.1", plain.port), connect_timeout=3, timeout=10)
        # Keys the plain node owns, so it tries to send their replicas to the TLS nodes.
        theirs = [k for k in (f"plain:{i}" for i in range(200))
                  if plain.admin(f"/cluster/owners?key={k}")["owners"][0] == "plain"][:3]
        rejected = metric(nodes[0], "kache_peer_rejected_total") \
            + metric(nodes[1], "kache_peer_rejected_total")
        for k in theirs:
            assert plain_client.set(k, VALUE, noreply=False)  # answered, replicas or not
        wait_until(lambda: metric(nodes[0], "kache_peer_rejected_total")
                   + metric(nodes[1], "kache_peer_rejected_total") > rejected,
                   "the plain node's links were not refused", timeout=10)
        assert all(n.admin("/cluster")["items"] == 0 for n in nodes)
    finally:
        plain.stop()

    # The TLS nodes still replicate to each other.
    placed = write_to_owners(nodes, [f"after:{i}" for i in range(100)], pki)
    wait_until(lambda: all(n.admin("/cluster")["items"] == 100 for n in nodes),
               "the TLS nodes stopped replicating", timeout=10)
    clients = {n.name: client(n, pki) for n in nodes}
    assert all(clients[replica.name].get(k) == VALUE for k, (_, replica) in placed.items())
    assert all(n.proc.poll() is None for n in nodes)


def test_a_peer_with_an_untrusted_certificate_gets_no_replicas(local_cluster, pki):
    cluster = local_cluster(replication_factor=2)
    good = cluster.add_node(extra=tls_args(pki, "peer-ca"))
    # Trusts the cluster's CA, but its own certificate comes from another CA.
    intruder = cluster.add_node(extra=tls_args(pki, "peer-ca", identity="intruder"))
    cluster.publish([good, intruder])
    cluster.wait_version()
    ctx = ssl.create_default_context(cafile=pki["ca"])
    good_client = Client(("127.0.0.1", good.port), tls_context=ctx, connect_timeout=3, timeout=5)
    keys = [f"secret:{i}" for i in range(50)]
    for k in keys:
        assert good_client.set(k, VALUE, noreply=False)
    assert good.admin("/cluster")["items"] == len(keys)
    # The good node tried to send the replicas and refused the intruder's certificate...
    wait_until(lambda: "peer link down" in log_of(good), "no log line for the refused peer")
    assert "UnknownIssuer" in log_of(good)
    # ...so nothing reached it.
    assert intruder.admin("/cluster")["items"] == 0
    assert metric(intruder, "kache_peer_received_total") == 0
