"""`kache-node proxy` when a node misbehaves: dies in the middle of a request, stalls, or is
down, with replicas to fail over to (replicationFactor 2)."""
import signal
import socket
import threading
import time

from conftest import free_port, request
from test_proxy import ProxyProcess, proxied  # noqa: F401  (proxied: fixture)


def bound_socket():
    """A TCP socket bound to a free loopback port, and the port."""
    while True:
        sock = socket.socket()
        try:
            sock.bind(("127.0.0.1", free_port()))
            return sock, sock.getsockname()[1]
        except OSError:  # taken since free_port looked
            sock.close()


class HangUpNode:
    """A member that reads whatever arrives and hangs up without answering: a node that
    dies in the middle of a request (it may or may not have applied it)."""

    def __init__(self, name):
        self.name = name
        self.sock, self.port = bound_socket()
        self.peer_port = free_port()
        self.seen = []
        self.sock.listen(16)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.seen.append(conn.recv(65536))
                except OSError:
                    pass

    def member(self):
        return {"name": self.name, "host": "127.0.0.1", "ip": "127.0.0.1",
                "port": self.port, "peerPort": self.peer_port}

    def stop(self):
        self.sock.close()


class AbsentNode:
    """A member nothing listens for: connections to it are refused. Its ports are bound
    (not listening) so that no other process can take them while the test runs."""

    def __init__(self, name):
        self.name = name
        (self.sock, self.port), (self.peer_sock, self.peer_port) = bound_socket(), bound_socket()

    def stop(self):
        self.sock.close()
        self.peer_sock.close()

    def member(self):
        return {"name": self.name, "host": "127.0.0.1", "ip": "127.0.0.1",
                "port": self.port, "peerPort": self.peer_port}


def keys_owned(node, owners, count, prefix):
    """`count` keys whose owner list (per `node`'s ring) starts with `owners`."""
    found = []
    for i in range(100_000):
        k = f"{prefix}{i}"
        if node.admin(f"/cluster/owners?key={k}")["owners"][:len(owners)] == owners:
            found.append(k)
            if len(found) == count:
                return found
    raise AssertionError(f"no key owned by {owners}")


def read_replies(port, payload, count, timeout=20.0):
    """Sends `payload` on one connection and returns the first `count` reply lines
    (values skipped: the test's values are one line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        data = b""
        deadline = time.monotonic() + timeout
        while data.count(b"END\r\n") + data.count(b"STORED\r\n") + data.count(b"DELETED\r\n") \
                + data.count(b"NOT_FOUND\r\n") < count:
            assert time.monotonic() < deadline, data[-200:]
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_write_whose_node_hung_up_is_not_repeated_on_a_replica(local_cluster):
    cluster = local_cluster(replication_factor=2)
    dead = HangUpNode("kache-a")
    real = cluster.add_node(name="kache-b")
    cluster.publish([dead, real])
    cluster.wait_version([real])
    proxy = ProxyProcess(cluster.members_file)
    try:
        key = keys_owned(real, ["kache-a", "kache-b"], 1, "counter:")[0]
        assert request(real.port, f"set {key} 0 0 2\r\n10\r\n".encode(), until=b"\r\n") \
            == b"STORED\r\n"
        # The owner took the incr and hung up: it may have applied it. Repeating it on the
        # replica could count it twice, so the client gets an error instead.
        reply = request(proxy.port, f"incr {key} 5\r\n".encode(), until=b"\r\n")
        assert reply.startswith(b"SERVER_ERROR "), reply
        assert any(b"incr" in seen for seen in dead.seen), dead.seen
        assert request(real.port, f"get {key}\r\n".encode()) == \
            f"VALUE {key} 0 2\r\n10\r\nEND\r\n".encode()
        # A read is harmless to repeat: it is answered by the replica.
        assert request(proxy.port, f"get {key}\r\n".encode()) == \
            f"VALUE {key} 0 2\r\n10\r\nEND\r\n".encode()
    finally:
        proxy.stop()
        dead.stop()


def test_a_clients_requests_for_one_key_stay_in_order_while_its_owner_is_down(local_cluster):
    cluster = local_cluster(replication_factor=2)
    real = cluster.add_node(name="kache-b")
    down = AbsentNode("kache-a")
    cluster.publish([down, real])
    cluster.wait_version([real])
    proxy = ProxyProcess(cluster.members_file)
    try:
        key, other = keys_owned(real, ["kache-a"], 2, "order:")
        for round_ in range(8):
            payload = (f"delete {key}\r\nset {key} 0 0 1\r\n{round_ % 10}\r\n"
                       + f"get {other}\r\n" * 20 + f"get {key}\r\n").encode()
            data = read_replies(proxy.port, payload, 23)
            assert data.endswith(f"VALUE {key} 0 1\r\n{round_ % 10}\r\nEND\r\n".encode()), \
                (round_, data[-120:])
    finally:
        proxy.stop()
        down.stop()


def test_a_multi_get_fails_over_key_by_key(proxied):
    _, nodes, proxy = proxied(nodes=3, replication_factor=2)
    a, b, c = (n.name for n in nodes)
    x = keys_owned(nodes[1], [a, b], 1, "mx:")[0]
    y = keys_owned(nodes[1], [a, c], 1, "my:")[0]
    client = proxy.client()
    assert client.set(x, b"1", noreply=False) and client.set(y, b"2", noreply=False)
    nodes[0].stop()  # kill -9: both keys' owner
    assert client.get_many([x, y]) == {x: b"1", y: b"2"}


def test_a_stalled_node_fails_over_to_its_replica(proxied):
    _, nodes, proxy = proxied(nodes=3, replication_factor=2)
    stalled = nodes[0]
    try:
        keys = keys_owned(nodes[1], [stalled.name], 3, "stall:")
        client = proxy.client()
        for k in keys:
            assert client.set(k, k.encode(), noreply=False)
        stalled.proc.send_signal(signal.SIGSTOP)  # alive, listening, answering nothing
        started = time.monotonic()
        assert client.get(keys[0]) == keys[0].encode()
        waited = time.monotonic() - started
        assert waited < 9, f"failover took {waited:.1f}s"
        # The node now counts as down: the next reads go straight to the replica.
        started = time.monotonic()
        assert client.get_many(keys[1:]) == {k: k.encode() for k in keys[1:]}
        assert time.monotonic() - started < 1.0
        print(f"\nfirst read after the stall: {waited:.2f}s; then "
              f"{time.monotonic() - started:.3f}s")
    finally:
        stalled.proc.send_signal(signal.SIGCONT)


def test_a_replica_waiting_on_a_stalled_peer_is_not_taken_for_stalled(proxied):
    """B owns the keys and waits (up to 1 s per write) for the acks of its stalled replica A:
    slow, but answering, so the proxy keeps using it."""
    _, nodes, proxy = proxied(nodes=3, replication_factor=2)
    a, b = nodes[0], nodes[1]
    try:
        keys = keys_owned(b, [b.name, a.name], 4, "slow:")
        a.proc.send_signal(signal.SIGSTOP)
        payload = "".join(f"set {k} 0 0 1\r\nx\r\n" for k in keys).encode()
        data = read_replies(proxy.port, payload, len(keys))
        assert data == b"STORED\r\n" * len(keys), data
    finally:
        a.proc.send_signal(signal.SIGCONT)


def test_a_restarted_node_is_reconnected_without_a_false_error(local_cluster):
    """The node closes the proxy's idle connection when it restarts; the next request, even
    one that may not be repeated, goes over a new connection."""
    cluster = local_cluster(replication_factor=1)
    node = cluster.add_node()
    cluster.publish([node])
    cluster.wait_version()
    proxy = ProxyProcess(cluster.members_file)
    try:
        assert request(proxy.port, b"set n 0 0 1\r\n5\r\n", until=b"\r\n") == b"STORED\r\n"
        node.stop()
        node.start()
        cluster.wait_version([node])
        time.sleep(0.2)
        # The restarted node lost the value (one copy): NOT_FOUND, not a connection error.
        assert request(proxy.port, b"incr n 1\r\n", until=b"\r\n") == b"NOT_FOUND\r\n"
    finally:
        proxy.stop()
