"""A replica that stops reading (SIGSTOP: a hung pod, a partition) must not make its writer
queue without bound: the writer marks it down after --peer-timeout-ms, drops what it had
queued for it, keeps its own memory within -m plus a fixed overhead, and replicates again
once the replica answers."""
import signal
import socket
import time

from conftest import metric, request

MIB = 1024 * 1024
VALUE = 1_000_000  # the largest value -I 1m takes, with its header
SETS = 400


def wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def has_key(node, key):
    return request(node.port, b"get %s\r\n" % key).startswith(b"VALUE ")


def holds(node, key):
    """Whether the node itself holds `key` (`me` never reads through from a peer)."""
    return request(node.port, b"me %s\r\n" % key, until=b"\r\n").startswith(b"ME ")


def test_a_stopped_replica_costs_its_writer_bounded_memory(local_cluster):
    cluster = local_cluster(replication_factor=2)
    writer = cluster.add_node(memory_mb=64)
    replica = cluster.add_node()
    cluster.publish([writer, replica])
    cluster.wait_version()
    # Replication works before the fault.
    assert request(writer.port, b"set before 0 0 1\r\nb\r\n", until=b"\r\n") == b"STORED\r\n"
    wait_for("the replica to get the first key", lambda: has_key(replica, b"before"))

    replica.proc.send_signal(signal.SIGSTOP)
    try:
        value = b"v" * VALUE
        with socket.create_connection(("127.0.0.1", writer.port), timeout=30) as s:
            f = s.makefile("rb")
            for i in range(SETS):
                s.sendall(b"set big%d 0 0 %d\r\n%s\r\n" % (i, VALUE, value))
                assert f.readline() == b"STORED\r\n"
        metrics = wait_for("the writer to mark the replica down",
                           lambda: (m := writer.metrics()).get("kache_peer_stalls_total", 0) >= 1 and m)
        assert metrics["kache_peer_dropped_total"] > 0, metrics
        # The queue never holds more than its budget (default 16 MiB).
        assert metrics["kache_peer_queued_bytes"] <= 16 * MIB
        peak_mib = writer.status("VmHWM") / 1024
        assert peak_mib <= 64 + 64, f"writer peak RSS {peak_mib:.0f} MiB with -m 64 and a stopped replica"
        # The writer keeps serving what it holds.
        assert request(writer.port, b"get big%d\r\n" % (SETS - 1)).startswith(b"VALUE ")
    finally:
        replica.proc.send_signal(signal.SIGCONT)
    # Once the replica answers again, new writes reach it.
    assert request(writer.port, b"set after 0 0 1\r\na\r\n", until=b"\r\n") == b"STORED\r\n"

    def replicated_again():
        request(writer.port, b"set after 0 0 1\r\na\r\n", until=b"\r\n")
        return has_key(replica, b"after")

    wait_for("replication to resume", replicated_again, timeout=60)


NOT_REPLICATED = b"SERVER_ERROR not enough replicas acknowledged the write\r\n"


def test_a_dropped_queue_is_repaired_by_anti_entropy_once_the_peer_returns(local_cluster):
    """With --write-acks all, a replica that stops answering is marked down after
    --peer-timeout-ms and its queue dropped; from then on writes are refused at once (no
    write waits out --write-timeout-ms). When it answers again the link comes back up, and
    the replica's own anti-entropy round pulls what the dropped queue held: the interval
    is an hour here, so nothing else could."""
    cluster = local_cluster(replication_factor=2)
    flags = ["--write-acks", "all", "--write-timeout-ms", "20000", "--peer-timeout-ms", "300",
             "--anti-entropy-interval", "3600"]
    writer = cluster.add_node("a", extra=flags)
    replica = cluster.add_node("b", extra=flags)
    cluster.publish([writer, replica])
    cluster.wait_version()
    assert request(writer.port, b"set before 0 0 1\r\nb\r\n", until=b"\r\n") == b"STORED\r\n"
    assert holds(replica, b"before")

    replica.proc.send_signal(signal.SIGSTOP)
    try:
        # Pipelined writes, more than the sockets between the two buffer: applied on the
        # writer, queued for the stopped replica until the stall is noticed, then dropped
        # with the queue.
        value = b"v" * 65536
        keys = [b"dropped%d" % i for i in range(300)]
        with socket.create_connection(("127.0.0.1", writer.port), timeout=60) as s:
            s.sendall(b"".join(b"set %s 0 0 %d noreply\r\n%s\r\n" % (k, len(value), value) for k in keys)
                      + b"mn\r\n")
            f = s.makefile("rb")
            assert f.readline() == b"MN\r\n"
        wait_for("the writer to mark the replica down", lambda: metric(writer, "kache_peer_stalls_total") >= 1)
        assert metric(writer, "kache_peer_dropped_total") > 0
        # Marked down: every write that needs the replica is refused at once.
        for i in range(20):
            key = b"later%d" % i
            assert request(writer.port, b"set %s 0 0 2\r\nv2\r\n" % key, until=b"\r\n") == NOT_REPLICATED
            keys.append(key)
        assert metric(writer, "kache_replication_timeouts_total") == 0
        assert metric(writer, "kache_write_ack_failures_total") >= 20
    finally:
        replica.proc.send_signal(signal.SIGCONT)

    wait_for("the replica to hold every key", lambda: all(holds(replica, k) for k in keys), timeout=60)
    assert metric(replica, "kache_anti_entropy_items_pulled_total") > 0
    # Replicated again: writes are acknowledged by both owners.
    wait_for("writes to be acknowledged again",
             lambda: request(writer.port, b"set after 0 0 1\r\na\r\n", until=b"\r\n") == b"STORED\r\n")
