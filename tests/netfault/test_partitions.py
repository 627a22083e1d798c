"""kache under network faults, judged by the checker (see README "Consistency model").

Three nodes with R = 2 and `--write-acks all`, four clients through the proxy for 60 s,
through a schedule of faults drawn from a seed (printed; set KACHE_FAULT_SEED to replay
one): one node isolated, a 2|1 split, a one-way partition, 50-200 ms delay with 5% loss,
kill -9 and restart, SIGSTOP and SIGCONT. Every node, the proxy, each client and the
observer live in network namespaces of their own (see netfault/net.py). Then the checker:
no acknowledged write lost, no stale read, every key identical on its owners soon after
the last heal.

Two shorter runs check the tombstone bound: a delete made while the key's other owner was
cut off holds after a partition shorter than `--tombstone-ttl`, and comes back after a
longer one.
"""
import json
import os
import random
import sys
import time

import pytest

from netfault import scenario
from netfault.net import HERE, Net

NODE_BIN = os.environ.get("KACHE_NODE_BIN")
SEED = int(os.environ.get("KACHE_FAULT_SEED") or random.SystemRandom().randrange(1 << 31))
ANTI_ENTROPY_INTERVAL = 3
# README: after a heal, replicas are identical within one anti-entropy interval plus the
# link's retry (at most 2 s) and the round itself.
CONVERGENCE_BOUND = ANTI_ENTROPY_INTERVAL + 2 + 3


def node_bin():
    if not NODE_BIN:
        pytest.fail("KACHE_NODE_BIN is not set: run the suite through `make test`")
    return NODE_BIN


def report(request, text):
    """Prints past pytest's capture: the seed and the table belong in every run's output."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + text, flush=True)


@pytest.fixture(scope="module")
def partitioned_run(request):
    logs = os.environ.get("KACHE_FAULT_LOGS")
    result = scenario.run(scenario.Kache(node_bin(), write_acks="all",
                                         anti_entropy_interval=ANTI_ENTROPY_INTERVAL),
                          SEED, duration=60.0, keep_logs=logs)
    report(request, f"fault run: KACHE_FAULT_SEED={SEED} make test  (or pytest "
                    f"tests/netfault with that variable)\n" + scenario.format_table(result))
    return result


def test_no_acknowledged_write_is_lost(partitioned_run):
    _, total = partitioned_run.table()
    assert total.acked_writes > 1000, "too little traffic to judge"
    assert total.lost == 0, total.examples


def test_reads_are_never_stale_nor_invented(partitioned_run):
    _, total = partitioned_run.table()
    assert total.reads > 1000
    assert total.stale_reads == 0, total.examples
    assert total.unexplained == 0, total.examples


def test_the_faults_were_felt(partitioned_run):
    """The faults did something: writes that could not reach both owners were refused,
    and the replicas disagreed at some point."""
    _, total = partitioned_run.table()
    assert total.unknown_writes > 0
    refused = sum(m["write_ack_failures"] for m in partitioned_run.metrics.values())
    assert refused > 0


def test_replicas_agree_after_every_heal(partitioned_run):
    rows, _ = partitioned_run.table()
    for label, _, divergence in rows[1:]:
        assert divergence is not None, f"some key's owners never agreed after: {label}"
    assert partitioned_run.settled_after is not None
    assert partitioned_run.settled_after <= CONVERGENCE_BOUND
    assert partitioned_run.final_disagreeing == []


# --- tombstones ------------------------------------------------------------------------------

def probe(net, *args):
    return net.run(scenario.OBSERVER, [sys.executable, os.path.join(HERE, "probe.py"), *args])


def admin(net, node):
    return f"{net.ips[node]}:{scenario.ADMIN_PORT}"


def held(net, node, key):
    item = json.loads(probe(net, "items", admin(net, node), key))
    return item["value"] if item["found"] and not item["deleted"] else None


def wait_for(what, check, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def delete_across_a_partition(tombstone_ttl, partition_secs):
    """Writes a key to both owners, cuts the second owner off, deletes the key through the
    first, keeps the partition for `partition_secs`, heals, and lets both owners run two
    anti-entropy rounds. Returns what each owner then holds."""
    system = scenario.Kache(node_bin(), write_acks="one", anti_entropy_interval=1,
                            tombstone_ttl=tombstone_ttl)
    with Net(scenario.NODES + ["proxy", scenario.OBSERVER]) as net:
        system.start(net)
        key = "doomed"
        owners = json.loads(net.run(scenario.OBSERVER, [
            sys.executable, "-c",
            "import json,urllib.request;print(urllib.request.urlopen("
            f"'http://{admin(net, 'n0')}/cluster/owners?key={key}').read().decode())"]))["owners"]
        first, second = owners
        proxy = f"{net.ips['proxy']}:{scenario.PORT}"
        assert probe(net, "send", proxy, f"set {key} 0 0 5\\r\\nalive\\r\\n") == "STORED\r\n"
        wait_for("both owners to hold the key",
                 lambda: held(net, first, key) == held(net, second, key) == "alive")
        net.isolate(second)
        target = f"{net.ips[first]}:{scenario.PORT}"
        assert probe(net, "send", target, f"delete {key}\\r\\n") == "DELETED\r\n"
        assert held(net, first, key) is None
        time.sleep(partition_secs)  # the fault's duration, not a wait for an outcome
        net.heal()

        def rounds(node):
            return int(probe(net, "metric", admin(net, node), "anti_entropy_rounds"))

        before = {n: rounds(n) for n in owners}
        wait_for("two anti-entropy rounds on both owners after the heal",
                 lambda: all(rounds(n) >= before[n] + 2 for n in owners))
        through_proxy = probe(net, "send", proxy, f"get {key}\\r\\n")
        return held(net, first, key), held(net, second, key), through_proxy


def test_a_delete_survives_a_partition_shorter_than_the_tombstone_ttl():
    first, second, through_proxy = delete_across_a_partition(tombstone_ttl=300,
                                                             partition_secs=6)
    assert (first, second) == (None, None)
    assert through_proxy == "END\r\n"


def test_a_partition_longer_than_the_tombstone_ttl_brings_the_key_back():
    """The bound is real: once the tombstone has expired, the copy the cut-off owner kept
    wins anti-entropy and the deleted key is back on both."""
    first, second, through_proxy = delete_across_a_partition(tombstone_ttl=2,
                                                             partition_secs=6)
    assert (first, second) == ("alive", "alive")
    assert "alive" in through_proxy
