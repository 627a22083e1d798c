"""Member list, ElastiCache auto discovery and ring agreement with a real ketama client."""
import pylibmc
import pytest

from conftest import log_since, log_size, metric, request, wait_until


def elasticache_payload(doc):
    nodes = " ".join(f"{m['host']}|{m['ip']}|{m['port']}" for m in doc["members"])
    return f"{doc['version']}\n{nodes}\n".encode()


def test_config_get_cluster_is_elasticache_format(local_cluster):
    cluster = local_cluster()
    nodes = [cluster.add_node() for _ in range(3)]
    doc = cluster.publish(nodes)
    cluster.wait_version()
    payload = elasticache_payload(doc)
    expected = b"CONFIG cluster 0 %d\r\n%s\r\nEND\r\n" % (len(payload), payload)
    for node in nodes:
        assert request(node.port, b"config get cluster\r\n") == expected
        assert request(node.port, b"get AmazonElastiCache:cluster\r\n") == (
            b"VALUE AmazonElastiCache:cluster 0 %d\r\n%s\r\nEND\r\n" % (len(payload), payload))


def test_member_list_changes_are_followed_and_bad_documents_ignored(local_cluster):
    cluster = local_cluster()
    nodes = [cluster.add_node() for _ in range(3)]
    cluster.publish(nodes[:2])
    cluster.wait_version(nodes)
    assert nodes[2].admin("/cluster")["member"] is False
    cluster.publish(nodes)
    cluster.wait_version(nodes)
    view = nodes[0].admin("/cluster")
    assert view["members"] == [n.name for n in nodes] and view["version"] == 2
    assert nodes[2].admin("/cluster")["member"] is True
    # A broken document (as from a bad edit) must not replace the good list: once the node
    # has read and refused it (its log says so), it still serves version 2.
    logged = log_size(nodes[1])
    with open(cluster.members_file, "w") as f:
        f.write('{"version": 3, "replicationFactor": 9, "members": []}')
    wait_until(lambda: "ignoring invalid member list" in log_since(nodes[1], logged),
               "the node never read the broken member list")
    assert nodes[1].admin("/cluster")["version"] == 2
    assert b"2\n" in request(nodes[1].port, b"config get cluster\r\n")


@pytest.mark.parametrize("count", [3, 5])
def test_pylibmc_ketama_sends_each_key_to_the_owner_kache_computes(local_cluster, count):
    """A libmemcached client with ketama_weighted agrees with kache on every key's owner."""
    cluster = local_cluster()
    nodes = [cluster.add_node() for _ in range(count)]
    cluster.publish(nodes)
    cluster.wait_version()
    client = pylibmc.Client([n.address for n in nodes], behaviors={"ketama_weighted": True})
    keys = [f"user:{i}:profile" for i in range(1500)]
    for k in keys:
        client.set(k, "v")
    direct = {n.name: pylibmc.Client([n.address]) for n in nodes}
    mismatches = []
    owners_seen = set()
    for k in keys:
        holders = [name for name, c in direct.items() if c.get(k) is not None]
        owner = nodes[0].admin(f"/cluster/owners?key={k}")["owners"][0]
        owners_seen.add(owner)
        if holders != [owner]:
            mismatches.append((k, holders, owner))
    assert not mismatches, mismatches[:10]
    # Every node owns part of the keyspace.
    assert owners_seen == {n.name for n in nodes}


def test_peers_must_present_the_cluster_secret(local_cluster, tmp_path):
    import socket
    import struct

    secret = tmp_path / "peer-secret"
    secret.write_text("s3cret-shared\n")
    cluster = local_cluster(replication_factor=2)
    nodes = [cluster.add_node(extra=["--peer-secret-file", str(secret)]) for _ in range(2)]
    cluster.publish(nodes)
    cluster.wait_version()
    # Nodes holding the secret replicate to each other.
    client = pylibmc.Client([n.address for n in nodes], behaviors={"ketama_weighted": True})
    assert not client.set_multi({f"s:{i}": "v" for i in range(200)})
    assert all(n.admin("/cluster")["items"] == 200 for n in nodes)

    def hello(secret_bytes):
        name = b"intruder"
        body = bytes([1]) + struct.pack(">Q", 0) + bytes([len(name)]) + name \
            + struct.pack(">H", len(secret_bytes)) + secret_bytes
        return struct.pack(">I", len(body)) + body

    def rejected():
        return metric(nodes[0], "kache_peer_rejected_total")

    before = rejected()
    for wrong in (b"", b"guess", b"s3cret-shared-not"):
        with socket.create_connection(("127.0.0.1", nodes[0].peer_port), timeout=5) as s:
            s.sendall(hello(wrong))
            assert s.recv(100) == b""  # closed without an answer
    wait_until(lambda: rejected() >= before + 3, "the wrong secrets were not counted")
