"""A replica that stops reading (SIGSTOP: a hung pod, a partition) must not make its writer
queue without bound: the writer marks it down after --peer-timeout-ms, drops what it had
queued for it, keeps its own memory within -m plus a fixed overhead, and replicates again
once the replica answers."""
import signal
import socket
import time

from conftest import request

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
