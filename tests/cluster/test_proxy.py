"""`kache-node proxy`: a plain memcached client made cluster-aware."""
import os
import signal
import socket
import subprocess
import threading
import urllib.request

import pymemcache.client.base as pmc
import pytest

from conftest import NODE_BIN, free_port, metric, ready, request, start_listening, wait_until
from test_peer_tls import client as tls_client, pki, tls_args  # noqa: F401  (pki: fixture)


class ProxyProcess:
    count = 0

    def __init__(self, members_file, extra=()):
        ProxyProcess.count += 1
        self.log_path = f"{members_file}.proxy-{ProxyProcess.count}.log"

        def pick_ports():
            self.port, self.admin_port = free_port(), free_port()

        pick_ports()
        self.proc = start_listening(
            lambda: [NODE_BIN, "proxy", "-l", "127.0.0.1", "-p", str(self.port), "--admin-port",
                     str(self.admin_port), "--members-file", members_file, "-t", "2", *extra],
            lambda: [self.port, self.admin_port], self.log_path, reselect=pick_ports,
            env={**os.environ, "RUST_LOG": os.environ.get("KACHE_PROXY_LOG", "warn")})
        wait_until(lambda: ready(self), "proxy never became ready")

    def client(self):
        return pmc.Client(("127.0.0.1", self.port), connect_timeout=2, timeout=5)

    def metrics(self):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                assert self.proc.wait(timeout=10) == 0
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise


@pytest.fixture
def proxied(local_cluster):
    started = []

    def make(nodes=3, replication_factor=1, node_extra=(), proxy_extra=()):
        cluster = local_cluster(replication_factor)
        members = [cluster.add_node(extra=node_extra) for _ in range(nodes)]
        cluster.publish(members)
        cluster.wait_version()
        proxy = ProxyProcess(cluster.members_file, proxy_extra)
        started.append(proxy)
        return cluster, members, proxy

    yield make
    for p in started:
        p.stop()


def owner(node, key):
    return node.admin(f"/cluster/owners?key={key}")["owners"][0]


def test_keys_land_where_the_ring_says(proxied):
    cluster, nodes, proxy = proxied()
    client = proxy.client()
    keys = [f"acct:{i}" for i in range(2000)]
    for k in keys:
        assert client.set(k, k.encode(), noreply=False)
    direct = {n.name: pmc.Client(("127.0.0.1", n.port)) for n in nodes}
    for k in keys[:600]:
        holders = [name for name, c in direct.items() if c.get(k) is not None]
        assert holders == [owner(nodes[0], k)], k
    assert all(client.get(k) == k.encode() for k in keys)
    # stats through the proxy add up every node's counters.
    assert int(client.stats()[b"cmd_set"]) == len(keys)


def test_multi_get_answers_in_the_clients_key_order(proxied):
    cluster, nodes, proxy = proxied()
    client = proxy.client()
    keys = [f"k{i}" for i in range(60)]
    for k in keys[::2]:
        assert client.set(k, k, noreply=False)
    asked = keys + ["k4", "missing", "k0"]
    reply = request(proxy.port, ("get " + " ".join(asked) + "\r\n").encode())
    expected = b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (k.encode(), len(k), k.encode())
                        for k in asked if k in keys[::2]) + b"END\r\n"
    assert reply == expected
    # Pipelined mixed requests come back in order.
    batch = b"set p1 0 0 1\r\na\r\nget k0 k2\r\nincr nope 1\r\ndelete p1\r\nversion\r\nmn\r\n"
    reply = request(proxy.port, batch, until=b"MN\r\n")
    assert reply.startswith(b"STORED\r\nVALUE k0 0 2\r\nk0\r\nVALUE k2 0 2\r\nk2\r\nEND\r\n"
                            b"NOT_FOUND\r\nDELETED\r\nVERSION ")


def test_bad_input_gets_the_replies_a_node_gives(proxied):
    cluster, nodes, proxy = proxied()
    cases = [b"bogus\r\n", b"set k 0 0 notanumber\r\n", b"get " + b"k" * 251 + b"\r\n",
             b"incr k abc\r\n", b"mg k !\r\n", b"set k 0 0 3\r\nabcde\r\n",
             b"set big 0 0 2000000 noreply\r\n" + b"x" * 2000000 + b"\r\n",
             b"flush_all 0 noreply\r\n", b"verbosity 1 noreply\r\n", b"delete k 5\r\n"]
    for case in cases:
        via_node = request(nodes[0].port, case + b"mn\r\n", until=b"MN\r\n")
        via_proxy = request(proxy.port, case + b"mn\r\n", until=b"MN\r\n")
        assert via_proxy == via_node, case[:40]
    assert request(proxy.port, b"config get cluster\r\n") == request(nodes[1].port, b"config get cluster\r\n")


def test_meta_replies_through_the_proxy(proxied):
    """Values, returned fields, opaque and base64 key echoes and the q rules of each meta
    command, over keys spread across the nodes: the proxy frames each reply (a VA's data
    included) and drops what q hides, as memcached 1.6.18 answers (the differential suite
    holds the node to it), except `ma` creating with N under q, which answers nothing as
    memcached does since 1.6.40 (test_differential.py `ma_autocreate_quiet`)."""
    cluster, nodes, proxy = proxied()
    batch = (b"ms pk1 2 T0 F5 q Oa1\r\nhi\r\n"      # stored: hidden
             b"mg pk1 v f s k q Oa2\r\n"              # a hit is not hidden
             b"mg pmiss v q\r\n"                      # a miss is
             b"mg pmiss v Oa3 k\r\n"
             b"ma pn N0 J41 v q\r\n"                  # created: hidden (1.6.40)
             b"ma pn v Oa5 k\r\n"
             b"ma pk1 q\r\n"                          # errors are never hidden
             b"md pk1 q\r\n"
             b"md pk1 q Oa4\r\n"
             b"ms cGtiaW4= 2 b\r\nxy\r\n"           # key "pkbin", sent in base64
             b"mg cGtiaW4= b k v\r\n"
             b"mg Zm9vYmFy b k v\r\n"                 # "foobar": a miss
             b"mn\r\n")
    assert request(proxy.port, batch, until=b"MN\r\n") == (
        b"VA 2 f5 s2 kpk1 Oa2\r\nhi\r\n"
        b"EN Oa3 kpmiss\r\n"
        b"VA 2 Oa5 kpn\r\n42\r\n"
        b"CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
        b"NF Oa4\r\n"
        b"HD\r\n"
        b"VA 2 kcGtiaW4= b\r\nxy\r\n"
        b"EN kZm9vYmFy b\r\n"
        b"MN\r\n")
    # The keys did spread: not every one is on the same node.
    assert len({owner(nodes[0], k) for k in ("pk1", "pmiss", "pn", "pkbin")}) > 1


def run_traffic(proxy, keys, stop, errors, misses):
    client = proxy.client()
    i = 0
    while not stop.is_set():
        k = keys[i % len(keys)]
        try:
            if i % 5 == 0:
                client.set(k, b"v", noreply=False)
            elif client.get(k) is None:
                misses.append(k)
        except Exception as e:  # any client-visible error fails the test
            errors.append(repr(e))
        i += 1


def under_traffic(proxy, keys, disturb):
    """Fills `keys` through the proxy, runs 4 client threads of gets and sets over them while
    `disturb()` runs, and returns the client errors and misses they saw."""
    client = proxy.client()
    for k in keys:
        assert client.set(k, b"v", noreply=False)
    stop, errors, misses = threading.Event(), [], []
    workers = [threading.Thread(target=run_traffic, args=(proxy, keys, stop, errors, misses))
               for _ in range(4)]
    for w in workers:
        w.start()
    try:
        traffic_flows(proxy)
        disturb()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=10)
    return errors, misses


def traffic_flows(proxy, requests=1000):
    """Waits until the proxy has handled `requests` more client requests."""
    target = metric(proxy, "kache_proxy_requests_total") + requests
    wait_until(lambda: metric(proxy, "kache_proxy_requests_total") >= target,
               f"the proxy did not handle {requests} more requests")


def served(node):
    """Client requests a node has handled (the proxy's, in these tests)."""
    return metric(node, "kache_cmd_get_total") + metric(node, "kache_cmd_set_total")


def test_member_list_changes_mid_traffic_cause_no_client_error(proxied):
    cluster, nodes, proxy = proxied()

    def scale_out_and_back():
        new = cluster.add_node()
        nodes.append(new)
        cluster.publish(nodes)            # 3 -> 4 under traffic
        # The proxy has taken the new list: the new member gets its share of the traffic.
        wait_until(lambda: served(new) >= 200, "the proxy never routed to the new member")
        traffic_flows(proxy)
        cluster.publish(nodes[:3])        # and back, while traffic continues

        def dropped():
            # 1000 requests over four members would send ~250 to the new one: none did.
            before = served(new)
            traffic_flows(proxy)
            return served(new) == before
        wait_until(dropped, "the proxy kept routing to the removed member")

    errors, misses = under_traffic(proxy, [f"live:{i}" for i in range(3000)], scale_out_and_back)
    assert not errors, errors[:5]
    print(f"\nmember-list changes under traffic: 0 errors, {len(misses)} misses")


def test_a_killed_node_with_two_replicas_causes_no_client_error(proxied):
    cluster, nodes, proxy = proxied(nodes=3, replication_factor=2)
    keys = [f"ha:{i}" for i in range(3000)]

    def kill_a_node():
        failovers = metric(proxy, "kache_proxy_failovers_total")
        nodes[1].stop()                   # kill -9, member list unchanged
        # The proxy noticed (its requests for that node go to the replicas) and the traffic
        # went on for a while in that state.
        wait_until(lambda: metric(proxy, "kache_proxy_failovers_total") > failovers,
                   "no request failed over")
        traffic_flows(proxy)

    errors, misses = under_traffic(proxy, keys, kill_a_node)
    client = proxy.client()
    assert not errors, errors[:5]
    assert not misses, f"{len(misses)} misses after failover, e.g. {misses[:5]}"
    assert all(client.get(k) == b"v" for k in keys)
    metrics = dict(line.rsplit(" ", 1) for line in proxy.metrics().splitlines()
                   if line.startswith("kache_proxy_"))
    assert int(metrics["kache_proxy_failovers_total"]) > 0, metrics
    assert "kache_proxy_nodes_down" in metrics


def test_the_proxy_logs_in_to_nodes_that_require_authentication(proxied, tmp_path):
    """Nodes run with memcached's -Y auth; the proxy logs in with --node-auth-file, so the
    application's client needs no credentials. A wrong password gets an error, not data."""
    auth = tmp_path / "auth"
    auth.write_text("app:s3cret\n")
    cluster, nodes, proxy = proxied(node_extra=["--auth-file", str(auth)],
                                    proxy_extra=["--node-auth-file", str(auth)])
    client = proxy.client()
    keys = [f"secure:{i}" for i in range(300)]
    for k in keys:
        assert client.set(k, k.encode(), noreply=False)
    assert client.get_many(keys) == {k: k.encode() for k in keys}
    # Every node holds some of them, and refuses a client that has not logged in.
    for node in nodes:
        assert request(node.port, b"get secure:1\r\n", until=b"\r\n") == \
            b"CLIENT_ERROR unauthenticated\r\n"

    wrong = tmp_path / "wrong"
    wrong.write_text("app:nope\n")
    refused = ProxyProcess(cluster.members_file, ["--node-auth-file", str(wrong)])
    try:
        for line in (b"get secure:1\r\n", b"set x 0 0 1\r\nx\r\n"):
            assert request(refused.port, line, until=b"\r\n") == \
                b"SERVER_ERROR no cache node available\r\n"

    finally:
        refused.stop()
    # The refused logins harmed nothing.
    assert client.get_many(keys[:50]) == {k: k.encode() for k in keys[:50]}


@pytest.mark.parametrize("mode", ["peer-ca", "mutual"])
def test_the_proxy_reaches_tls_nodes(proxied, pki, mode):
    """Nodes with TLS on their client port (and, with `mutual`, client certificates
    required): the proxy connects over TLS, verifying them against --node-tls-ca and
    presenting --node-tls-cert when asked; the application still speaks plain TCP to it."""
    proxy_tls = ["--node-tls-ca", pki["ca"]]
    if mode == "mutual":
        proxy_tls += ["--node-tls-cert", pki["node"][0], "--node-tls-key", pki["node"][1]]
    cluster, nodes, proxy = proxied(node_extra=tls_args(pki, mode), proxy_extra=proxy_tls)
    client = proxy.client()
    keys = [f"tls:{i}" for i in range(300)]
    for k in keys:
        assert client.set(k, k.encode(), noreply=False)
    assert client.get_many(keys) == {k: k.encode() for k in keys}
    # Every node got its share: the proxy spoke TLS to each of them.
    for node in nodes:
        assert int(tls_client(node, pki).stats()[b"curr_items"]) > 0

    # A proxy that does not trust the nodes' CA gets errors, never data; so does one without
    # a certificate when the nodes require one.
    refused = [["--node-tls-ca", pki["intruder"][0]]]
    if mode == "mutual":
        refused.append(["--node-tls-ca", pki["ca"]])
    for extra in refused:
        other = ProxyProcess(cluster.members_file, extra)
        try:
            reply = request(other.port, b"get tls:1\r\n", until=b"\r\n")
            assert reply.startswith(b"SERVER_ERROR "), (extra, reply)
        finally:
            other.stop()
    assert client.get_many(keys[:20]) == {k: k.encode() for k in keys[:20]}


def stat_lines(reply):
    return dict(line.split(" ", 2)[1:] for line in reply.decode().splitlines() if line.startswith("STAT "))


def test_admin_commands_through_the_proxy(proxied):
    """The operations surface through the proxy (README): per-class stats and detail are
    summed over the nodes, dumps concatenated, crawler commands go to every node; watch and
    shutdown stay per node."""
    cluster, nodes, proxy = proxied()
    keys = [f"acct:{i}" for i in range(300)]
    batch = b"".join(b"set %s 0 0 5\r\nhello\r\n" % k.encode() for k in keys)
    assert request(proxy.port, batch + b"mn\r\n", until=b"MN\r\n") == b"STORED\r\n" * len(keys) + b"MN\r\n"
    slabs = stat_lines(request(proxy.port, b"stats slabs\r\n"))
    assert slabs["1:used_chunks"] == str(len(keys)) and slabs["1:chunk_size"] == "96"
    assert slabs["1:cmd_set"] == str(len(keys)) and slabs["active_slabs"] == "1"
    items = stat_lines(request(proxy.port, b"stats items\r\n"))
    assert items["items:1:number"] == str(len(keys))
    per_node = [int(stat_lines(request(n.port, b"stats items\r\n")).get("items:1:number", 0)) for n in nodes]
    assert sum(per_node) == len(keys) and all(per_node)
    dump = request(proxy.port, b"lru_crawler metadump all\r\n")
    assert dump.endswith(b"END\r\n")
    assert sorted(line.split(b" ")[0] for line in dump[:-5].split(b"\n")[:-1]) == sorted(b"key=acct%3A" + k[5:].encode() for k in keys)
    cachedump = request(proxy.port, b"stats cachedump 1 10\r\n")
    assert cachedump.count(b"ITEM acct:") == 10 and cachedump.endswith(b"END\r\n")
    assert request(proxy.port, b"lru_crawler metadump 99\r\n", until=b"\r\n") == b"BADCLASS invalid class id\r\n"
    assert request(proxy.port, b"lru_crawler sleep 50\r\n", until=b"\r\n") == b"OK\r\n"
    for n in nodes:
        assert stat_lines(request(n.port, b"stats settings\r\n"))["lru_crawler_sleep"] == "50"
    assert request(proxy.port, b"stats detail on\r\n", until=b"\r\n") == b"OK\r\n"
    request(proxy.port, b"get acct:1 acct:2 nope:1\r\n")
    assert request(proxy.port, b"stats detail dump\r\n") == b"PREFIX acct get 2 hit 2 set 0 del 0\r\nPREFIX nope get 1 hit 0 set 0 del 0\r\nEND\r\n"
    assert request(proxy.port, b"watch\r\n", until=b"\r\n").startswith(b"CLIENT_ERROR ")
    assert request(proxy.port, b"shutdown\r\n", until=b"\r\n") == b"ERROR: shutdown not enabled\r\n"


def test_the_admin_endpoint_answers_beyond_the_loopback_listener(proxied):
    # A sidecar listens on 127.0.0.1 for the application, but the kubelet probes it at
    # the pod's IP: the admin endpoint listens on every interface (--admin-listen), the
    # client port only where -l says. 127.0.0.2 stands in for the pod IP.
    _, _, proxy = proxied(nodes=1)
    with urllib.request.urlopen(f"http://127.0.0.2:{proxy.admin_port}/readyz", timeout=2) as r:
        assert r.status == 200
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", proxy.port), timeout=2).close()
