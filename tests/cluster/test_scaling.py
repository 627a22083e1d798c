"""Warm scaling and replication on loopback, as the operator drives them with a member list.

The hit ratios printed here are the figures the cluster issue asks for: kache with hand-off,
plain ketama without hand-off (real memcached servers), and `hash mod n` (real memcached).
"""
import signal
import time

import pylibmc

from conftest import kt, ready, wait_until

KEYS = [f"key:{i:06d}" for i in range(100_000)]
VALUE = b"v" * 32
KETAMA = {"ketama_weighted": True}


def write_all(addresses, behaviors):
    client = pylibmc.Client(addresses, behaviors=behaviors)
    for i in range(0, len(KEYS), 2000):
        failed = client.set_multi({k: VALUE for k in KEYS[i:i + 2000]})
        assert not failed, f"{len(failed)} sets failed"


def hit_ratio(addresses, behaviors):
    client = pylibmc.Client(addresses, behaviors=behaviors)
    hits = 0
    for i in range(0, len(KEYS), 2000):
        hits += len(client.get_multi(KEYS[i:i + 2000]))
    return hits / len(KEYS)


def wait_handoff(nodes, version, timeout=120.0):
    deadline = time.monotonic() + timeout
    for node in nodes:
        while True:
            h = node.admin("/cluster")["handoff"]
            if h["version"] == version and h["done"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node.name} hand-off for {version} not done: {h}")
            time.sleep(0.1)


class Memcached:
    """A real memcached, for the baselines."""

    def __init__(self):
        self.server = kt.start_memcached(memory_mb=256)

    @property
    def address(self):
        return f"127.0.0.1:{self.server.port}"

    def stop(self):
        kt.stop_all(self.server)


def baseline(behaviors, before, after):
    """Hit ratio of a client that writes with `before` servers and reads with `after`."""
    servers = [Memcached() for _ in range(max(before, after))]
    try:
        write_all([s.address for s in servers[:before]], behaviors)
        return hit_ratio([s.address for s in servers[:after]], behaviors)
    finally:
        for s in servers:
            s.stop()


def test_scaling_keeps_the_cache_warm(local_cluster):
    cluster = local_cluster(replication_factor=1)
    nodes = [cluster.add_node() for _ in range(3)]
    cluster.publish(nodes)
    cluster.wait_version()
    write_all([n.address for n in nodes], KETAMA)
    assert hit_ratio([n.address for n in nodes], KETAMA) == 1.0

    # 3 -> 4: the new node starts, becomes ready, then joins the published ring.
    new = cluster.add_node()
    nodes.append(new)
    cluster.publish(nodes)
    cluster.wait_version()
    wait_handoff(nodes, cluster.version)
    kache_out = hit_ratio([n.address for n in nodes], KETAMA)

    # 4 -> 2: the departing nodes leave the ring first, hand off, and only then stop.
    staying, leaving = nodes[:2], nodes[2:]
    cluster.publish(staying)
    cluster.wait_version(nodes)
    wait_handoff(nodes, cluster.version)
    for node in leaving:
        node.stop(signal.SIGTERM)
    kache_in = hit_ratio([n.address for n in staying], KETAMA)

    ketama_out = baseline(KETAMA, 3, 4)
    modn_out = baseline({}, 3, 4)
    ketama_in = baseline(KETAMA, 4, 2)
    modn_in = baseline({}, 4, 2)
    print(f"\nhit ratio after 3->4: kache {kache_out:.4f}, ketama without hand-off "
          f"{ketama_out:.4f}, mod n {modn_out:.4f}")
    print(f"hit ratio after 4->2: kache {kache_in:.4f}, ketama without hand-off "
          f"{ketama_in:.4f}, mod n {modn_in:.4f}")
    assert kache_out >= 0.99
    assert kache_in >= 0.99
    # The baselines are what kache is compared against; they must look like themselves.
    assert 0.6 < ketama_out < 0.9 and modn_out < 0.5
    assert 0.3 < ketama_in < 0.7 and modn_in < 0.7


def test_replicas_survive_a_killed_node_and_a_restarted_node_refills(local_cluster):
    cluster = local_cluster(replication_factor=2)
    nodes = [cluster.add_node() for _ in range(3)]
    cluster.publish(nodes)
    cluster.wait_version()
    keys = KEYS[:20_000]
    client = pylibmc.Client([n.address for n in nodes], behaviors=KETAMA)
    for i in range(0, len(keys), 1000):
        assert not client.set_multi({k: VALUE for k in keys[i:i + 1000]})

    victim = nodes[1]
    owned = victim.admin("/cluster")["items"]
    assert owned > len(keys) // 3  # it holds its own keys and replicas of others'
    victim.stop()  # kill -9: no chance to hand anything off

    # A ketama client that ejects the dead node fails over to the next node on the ring.
    survivors = [n.address for n in nodes if n is not victim]
    found = pylibmc.Client(survivors, behaviors=KETAMA).get_multi(keys)
    missing = [k for k in keys if k not in found]
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"

    # Restarted empty under the same name while still listed: it refills before ready.
    victim.start()
    wait_until(lambda: ready(victim), "restarted node never became ready", timeout=60)
    refilled = victim.admin("/cluster")
    assert refilled["handoff"]["refilled"] >= owned * 0.99, refilled
    direct = pylibmc.Client([victim.address])
    sample = keys[:3000]
    mine = [k for k in sample if victim.name in nodes[0].admin(f"/cluster/owners?key={k}")["owners"]]
    assert mine and len(direct.get_multi(mine)) == len(mine)


def handing_off(node, version):
    """Whether `node` is in the middle of its hand-off for member list `version`."""
    h = node.admin("/cluster")["handoff"]
    return h["version"] == version and h["running"] and not h["done"]


# One item a second: a hand-off of hundreds of items is still under way when the test ends,
# however fast the machine (the first batch goes at once, then the rate holds).
CRAWLING = ["--handoff-rate", "1"]


def test_new_owners_read_through_while_a_hand_off_is_under_way(local_cluster):
    """Clients keep hitting during a (deliberately slow) hand-off: a new owner that misses a
    key fetches it from the previous owner."""
    cluster = local_cluster(replication_factor=1)
    nodes = [cluster.add_node(extra=CRAWLING) for _ in range(3)]
    cluster.publish(nodes)
    cluster.wait_version()
    keys = KEYS[:12_000]
    client = pylibmc.Client([n.address for n in nodes], behaviors=KETAMA)
    for i in range(0, len(keys), 2000):
        assert not client.set_multi({k: VALUE for k in keys[i:i + 2000]})

    new = cluster.add_node(extra=CRAWLING)
    # As in Kubernetes: the new node runs (and has read the current list) before it joins.
    cluster.wait_version([new])
    nodes.append(new)
    cluster.publish(nodes)
    cluster.wait_version()
    for n in nodes[:3]:
        wait_until(lambda: handing_off(n, cluster.version), f"{n.name} never started its hand-off")
    # A joining node takes its share from the hand-off, not from a refill (which is only for
    # a node that restarts empty while listed).
    assert new.admin("/cluster")["handoff"]["refilled"] == 0
    reader = pylibmc.Client([n.address for n in nodes], behaviors=KETAMA)
    found = 0
    for i in range(0, len(keys), 500):
        found += len(reader.get_multi(keys[i:i + 500]))
    print(f"\nhits during hand-off: {found / len(keys):.4f} "
          f"(read-through hits {new.admin('/cluster')['readThroughHits']})")
    assert found == len(keys)
    assert new.admin("/cluster")["readThroughHits"] > 0
    # The reads did happen while the hand-off was under way.
    assert all(handing_off(n, cluster.version) for n in nodes[:3])


def test_a_node_killed_during_a_hand_off_loses_nothing_that_had_another_copy(local_cluster):
    """R=2: scale 3 -> 4, kill -9 an old node in the middle of its (slow) hand-off, then
    publish the ring without it (as the operator would once its pod is gone). Every key had
    two copies, so every key must still be readable from the surviving members."""
    cluster = local_cluster(replication_factor=2)
    # The victim hands off slowly enough to be killed in the middle of it; the others at
    # full speed (they hand off again once it is gone).
    nodes = [cluster.add_node(extra=CRAWLING)] + [cluster.add_node() for _ in range(2)]
    cluster.publish(nodes)
    cluster.wait_version()
    keys = KEYS[:15_000]
    client = pylibmc.Client([n.address for n in nodes], behaviors=KETAMA)
    for i in range(0, len(keys), 1000):
        assert not client.set_multi({k: VALUE for k in keys[i:i + 1000]})

    nodes.append(cluster.add_node())
    cluster.publish(nodes)
    cluster.wait_version()
    victim = nodes[0]
    wait_until(lambda: handing_off(victim, cluster.version)
               and victim.admin("/cluster")["handoff"]["sent"] > 0,
               "the victim's hand-off did not start")
    victim.stop()  # kill -9 mid-hand-off
    survivors = nodes[1:]
    cluster.publish(survivors)
    cluster.wait_version(survivors)
    wait_handoff(survivors, cluster.version)
    found = pylibmc.Client([n.address for n in survivors], behaviors=KETAMA).get_multi(keys)
    missing = [k for k in keys if k not in found]
    print(f"\nkill -9 during hand-off: {len(keys) - len(missing)}/{len(keys)} keys readable")
    assert not missing, f"{len(missing)} keys lost, e.g. {missing[:5]}"


def test_a_scale_in_whose_survivor_restarts_hands_everything_over_once_it_is_back(
        local_cluster):
    """Scale 2 -> 1 while the survivor is down (killed; its pod restarting, say): the
    departing node's sends are refused. It must not report its hand-off done while items are
    unacknowledged (the operator would then delete its pod, and the items with it); once the
    survivor is back, every item the departing node held arrives."""
    cluster = local_cluster(replication_factor=1)
    nodes = [cluster.add_node() for _ in range(2)]
    cluster.publish(nodes)
    cluster.wait_version()
    survivor, departing = nodes
    client = pylibmc.Client([n.address for n in nodes], behaviors=KETAMA)
    # A few hundred items: a couple of hand-off chunks (256 items each).
    assert not client.set_multi({k: VALUE for k in KEYS[:600]})
    held = departing.admin("/cluster")["items"]
    assert 150 < held < 450, held

    survivor.stop()  # kill -9
    cluster.publish([survivor])
    cluster.wait_version([departing])
    # Each chunk (one per shard here) waits out the acknowledgement timeout (5 s). A hand-off
    # that gave up on unacknowledged chunks would be done after the last one (~40 s); one
    # that sends them again counts more failed sends than it holds items, still under way.
    handoff = lambda: departing.admin("/cluster")["handoff"]  # noqa: E731
    wait_until(lambda: handoff()["done"] or handoff()["failed"] > held,
               "the departing node's sends neither failed nor finished", timeout=150)
    h = handoff()
    assert h["running"] and not h["done"], f"done with {h['failed']} sends unacknowledged: {h}"

    survivor.start()  # the same ports, empty
    cluster.wait_version([survivor])
    wait_handoff([departing], cluster.version)
    h = departing.admin("/cluster")["handoff"]
    arrived = survivor.admin("/cluster")["items"]
    print(f"\nsurvivor down during the hand-off: {arrived}/{held} of the departing node's items "
          f"arrived; its sends: {h['sent']} sent, {h['acked']} acked, {h['failed']} not "
          f"acknowledged and sent again")
    # Counted, not read: a read could be answered by read-through.
    assert arrived == held
