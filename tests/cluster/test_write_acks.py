"""`--write-acks`: when a replicated write is acknowledged, and what a client hears when it
cannot be (memcached's SERVER_ERROR, silenced by text noreply, not by meta quiet mode)."""
from conftest import metric, request

NOT_REPLICATED = b"SERVER_ERROR not enough replicas acknowledged the write\r\n"


def two_nodes(local_cluster, *flags):
    cluster = local_cluster(replication_factor=2)
    a = cluster.add_node("a", extra=flags)
    b = cluster.add_node("b", extra=flags)
    cluster.publish([a, b])
    cluster.wait_version()
    return a, b


def test_all_refuses_a_write_an_owner_did_not_take(local_cluster):
    a, b = two_nodes(local_cluster, "--write-acks", "all", "--write-timeout-ms", "500")
    assert request(a.port, b"set k 0 0 2\r\nv1\r\n", until=b"\r\n") == b"STORED\r\n"
    # Both owners have it, so the other one answers it.
    assert request(b.port, b"get k\r\n") == b"VALUE k 0 2\r\nv1\r\nEND\r\n"
    b.stop()
    assert request(a.port, b"set k 0 0 2\r\nv2\r\n", until=b"\r\n") == NOT_REPLICATED
    # Its outcome is unknown, as after any server error: here the write did land on `a`.
    assert request(a.port, b"get k\r\n") == b"VALUE k 0 2\r\nv2\r\nEND\r\n"
    assert request(a.port, b"delete k\r\n", until=b"\r\n") == NOT_REPLICATED
    # Text noreply silences the error too; meta quiet mode reports it.
    assert request(a.port, b"set q 0 0 1 noreply\r\nx\r\nmn\r\n", until=b"MN\r\n") == b"MN\r\n"
    assert request(a.port, b"ms m 1 q\r\nx\r\nmn\r\n", until=b"MN\r\n") == (
        NOT_REPLICATED + b"MN\r\n")
    # Reads and requests already refused keep their replies.
    assert request(a.port, b"get nothing\r\n") == b"END\r\n"
    assert request(a.port, b"incr m 1\r\n", until=b"\r\n").startswith(b"CLIENT_ERROR")
    assert metric(a, "kache_write_ack_failures_total") == 4


def test_one_acknowledges_what_this_node_applied(local_cluster):
    a, b = two_nodes(local_cluster, "--write-timeout-ms", "500")
    b.stop()
    assert request(a.port, b"set k 0 0 2\r\nv1\r\n", until=b"\r\n") == b"STORED\r\n"
    assert request(a.port, b"delete k\r\n", until=b"\r\n") == b"DELETED\r\n"
    assert metric(a, "kache_write_ack_failures_total") == 0


def test_all_confirms_a_not_found_with_the_other_owners(local_cluster):
    """A delete that finds nothing here may still have something to delete on another
    owner (this node's earlier delete failed, or it restarted empty): under `all` its
    NOT_FOUND holds only once the other owners confirm, as a DELETED does."""
    a, b = two_nodes(local_cluster, "--write-acks", "all", "--write-timeout-ms", "500")
    assert request(a.port, b"set k 0 0 2\r\nv1\r\n", until=b"\r\n") == b"STORED\r\n"
    b.stop()
    # The delete lands on `a` only: its outcome is unknown.
    assert request(a.port, b"delete k\r\n", until=b"\r\n") == NOT_REPLICATED
    # Asked again, `a` finds nothing; `b` (cut off) may still hold v1, so this is no
    # acknowledged delete either. Nor is one of a key `a` never had, nor a meta delete.
    assert request(a.port, b"delete k\r\n", until=b"\r\n") == NOT_REPLICATED
    assert request(a.port, b"delete never-set\r\n", until=b"\r\n") == NOT_REPLICATED
    assert request(a.port, b"md never-set\r\n", until=b"\r\n") == NOT_REPLICATED
    # A meta delete conditional on a CAS that is not there changes nothing: its NF stands.
    assert request(a.port, b"md never-set C123\r\n", until=b"\r\n") == b"NF\r\n"
    assert metric(a, "kache_write_ack_failures_total") == 4


def test_all_not_found_is_acknowledged_when_the_owners_agree(local_cluster):
    a, b = two_nodes(local_cluster, "--write-acks", "all", "--write-timeout-ms", "2000")
    assert request(a.port, b"delete never-set\r\n", until=b"\r\n") == b"NOT_FOUND\r\n"
    assert request(a.port, b"md never-set\r\n", until=b"\r\n") == b"NF\r\n"
    assert metric(a, "kache_write_ack_failures_total") == 0


def test_one_answers_not_found_from_this_node(local_cluster):
    a, b = two_nodes(local_cluster, "--write-timeout-ms", "500")
    b.stop()
    assert request(a.port, b"delete never-set\r\n", until=b"\r\n") == b"NOT_FOUND\r\n"
    assert metric(a, "kache_write_ack_failures_total") == 0
