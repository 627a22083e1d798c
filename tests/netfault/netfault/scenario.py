"""A fault run: a cache of three nodes, four clients, a schedule of faults drawn from a seed,
then the checker's verdict.

The schedule (`schedule`) holds one fault of each kind, in an order, on targets and for
durations drawn from the seed, each followed by a heal and a quiet gap:
- `isolate`: one node cut from everyone;
- `split`: one node on one side, two on the other, the clients' gateway (the proxy, or the
  clients themselves for a client-side-failover baseline) on either side;
- `oneway`: what one node sends to another is dropped (the reverse still flows);
- `slow`: every node's packets delayed by 50-200 ms, 5% of them dropped;
- `kill`: one node killed with SIGKILL, restarted (empty) when the fault ends;
- `pause`: one node stopped with SIGSTOP, continued when the fault ends.

Two systems run the same schedule: `Kache` (nodes replicating with R = 2, clients through
`kache-node proxy`) and `Ketama` (plain memcached nodes, no replication, each client a
libmemcached ketama client that ejects a failing node and fails over to the next one).
"""
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

from . import checker
from .net import HERE, Net

NODES = ["n0", "n1", "n2"]
CLIENTS = ["c0", "c1", "c2", "c3"]
OBSERVER = "obs"
PORT, PEER_PORT, ADMIN_PORT = 11211, 11212, 11280
KEYS = 40
KINDS = ["isolate", "split", "oneway", "slow", "kill", "pause"]
# Node counters reported after a kache run.
REPORTED_METRICS = ["write_ack_failures", "anti_entropy_rounds", "anti_entropy_items_pulled",
                    "peer_dropped"]


@dataclass
class Fault:
    kind: str
    start: float  # seconds after the run started
    end: float
    node: str = ""
    other: str = ""  # oneway: the node that stops hearing `node`
    gateway_with_node: bool = False  # split: the gateway is on the lone node's side
    delay_ms: int = 0
    loss_pct: float = 0.0

    def describe(self):
        return {
            "isolate": lambda: f"isolate {self.node}",
            "split": lambda: (f"split {self.node} | rest, gateway with "
                              f"{self.node if self.gateway_with_node else 'rest'}"),
            "oneway": lambda: f"oneway {self.node} -> {self.other} dropped",
            "slow": lambda: f"delay {self.delay_ms} ms, loss {self.loss_pct:g}%",
            "kill": lambda: f"kill -9 {self.node}, restart",
            "pause": lambda: f"SIGSTOP {self.node}, SIGCONT",
        }[self.kind]()


def schedule(seed, duration=60.0, warmup=3.0):
    """One fault of each kind, in a random order, filling `duration` after a healthy warmup."""
    rng = random.Random(seed)
    kinds = KINDS[:]
    rng.shuffle(kinds)
    plan = []
    for kind in kinds:
        node = rng.choice(NODES)
        plan.append((kind, rng.uniform(4.0, 7.0), rng.uniform(2.0, 3.5), Fault(
            kind, 0, 0, node=node, other=rng.choice([n for n in NODES if n != node]),
            gateway_with_node=rng.random() < 0.5, delay_ms=rng.randint(50, 200),
            loss_pct=5.0)))
    scale = min(1.0, (duration - warmup - 4.0) / sum(length + gap for _, length, gap, _ in plan))
    t = warmup
    faults = []
    for _kind, length, gap, fault in plan:
        fault.start, fault.end = t, t + length * scale
        faults.append(fault)
        t = fault.end + gap * scale
    return faults


class Kache:
    """kache nodes (R = 2) behind the proxy."""

    name = "kache"

    def __init__(self, binary, write_acks="all", anti_entropy_interval=3, tombstone_ttl=300,
                 extra=()):
        self.binary = binary
        self.write_acks = write_acks
        self.anti_entropy_interval = anti_entropy_interval
        self.tombstone_ttl = tombstone_ttl
        self.extra = list(extra)
        self.procs = {}
        self.label = f"kache --write-acks {write_acks}"

    hosts = NODES + ["proxy"]
    gateway = ["proxy"]
    replicas = True
    # Longer than the proxy's failover (--node-timeout-ms, 2 s) plus a write's wait.
    client_timeout = 5.0

    def start(self, net):
        self.net = net
        self.members_file = os.path.join(net.dir, "members.json")
        members = [{"name": n, "host": net.ips[n], "ip": net.ips[n], "port": PORT,
                    "peerPort": PEER_PORT} for n in NODES]
        with open(self.members_file, "w") as f:
            json.dump({"version": 1, "replicationFactor": 2, "members": members}, f)
        for node in NODES:
            self.start_node(node)
        net.spawn("proxy", [self.binary, "proxy", "-l", "0.0.0.0", "-p", str(PORT), "-t", "2",
                            "--admin-port", "11290", "--members-file", self.members_file],
                  log=os.path.join(net.dir, "proxy.log"))
        probe(net, "wait", *[f"{net.ips[n]}:{PORT}" for n in NODES],
              f"{net.ips['proxy']}:{PORT}")

    def start_node(self, node):
        self.procs[node] = self.net.spawn(node, [
            self.binary, "-l", "0.0.0.0", "-p", str(PORT), "-t", "2", "-m", "64", "-v",
            "--admin-port", str(ADMIN_PORT), "--peer-port", str(PEER_PORT),
            "--members-file", self.members_file, "--node-name", node,
            "--write-acks", self.write_acks,
            "--anti-entropy-interval", str(self.anti_entropy_interval),
            "--tombstone-ttl", str(self.tombstone_ttl)] + self.extra,
            log=os.path.join(self.net.dir, f"{node}.log"))

    def client_target(self):
        return "kache", f"{self.net.ips['proxy']}:{PORT}"


class Ketama:
    """Plain memcached nodes; clients fail over by themselves (no server replication)."""

    name = "ketama"
    label = "memcached + pylibmc ketama failover"
    hosts = NODES
    gateway = CLIENTS
    replicas = False
    # libmemcached's timeouts, after which it ejects the node and fails over.
    client_timeout = 1.0

    def __init__(self, binary="memcached"):
        self.binary = binary
        self.procs = {}

    def start(self, net):
        self.net = net
        for node in NODES:
            self.start_node(node)
        probe(net, "wait", *[f"{net.ips[n]}:{PORT}" for n in NODES])

    def start_node(self, node):
        self.procs[node] = self.net.spawn(node, [
            self.binary, "-l", "0.0.0.0", "-p", str(PORT), "-U", "0", "-t", "2", "-m", "64",
            "-u", "root"], log=os.path.join(self.net.dir, f"{node}.log"))

    def client_target(self):
        return "ketama", ",".join(f"{self.net.ips[n]}:{PORT}" for n in NODES)


def probe(net, *args):
    return net.run(OBSERVER, [sys.executable, os.path.join(HERE, "probe.py"), *args])


def apply_fault(net, system, fault):
    if fault.kind == "isolate":
        net.isolate(fault.node)
    elif fault.kind == "split":
        rest = [n for n in NODES if n != fault.node]
        lone = [fault.node]
        (lone if fault.gateway_with_node else rest).extend(system.gateway)
        net.partition(lone, rest)
    elif fault.kind == "oneway":
        net.block(fault.node, fault.other)
    elif fault.kind == "slow":
        for node in NODES:
            net.shape(node, fault.delay_ms, fault.loss_pct)
    elif fault.kind == "kill":
        net.kill(system.procs[fault.node])
    elif fault.kind == "pause":
        net.pause(system.procs[fault.node])


def heal_fault(net, system, fault):
    if fault.kind == "kill":
        system.start_node(fault.node)
    elif fault.kind == "pause":
        net.resume(system.procs[fault.node])
    else:
        net.heal()


@dataclass
class RunResult:
    system: str
    seed: int
    faults: list
    history: list
    final: dict  # key -> value the cluster settled on (None: absent)
    final_disagreeing: list  # keys whose owners still disagreed at the final read
    polls: list = field(default_factory=list)
    owners: dict = field(default_factory=dict)
    settled_after: float = None  # seconds from the final heal until all replicas agreed
    final_heal: float = 0.0
    started: float = 0.0
    metrics: dict = field(default_factory=dict)  # node -> counter -> value, at the end

    def phase_of(self, t):
        rel = t - self.started
        index = -1
        for i, fault in enumerate(self.faults):
            if rel >= fault.start:
                index = i
        return index

    def table(self):
        """Rows per phase: ops, acked writes, lost, stale reads, replica divergence."""
        tallies = checker.check(self.history, self.final, self.phase_of)
        rows = []
        for index in range(-1, len(self.faults)):
            t = tallies.get(index, checker.Tally())
            if index < 0:
                label, divergence = "healthy warmup", None
            else:
                fault = self.faults[index]
                label = fault.describe()
                if index == len(self.faults) - 1:
                    label += ", healthy to the end"
                divergence = (checker.settle_time(self.polls, self.owners,
                                                  self.started + fault.end)
                              if self.replicas_known() else None)
            rows.append((label, t, divergence))
        return rows, checker.total(tallies)

    def replicas_known(self):
        return bool(self.polls and self.owners)


def run(system, seed, duration=60.0, settle_limit=30.0, keep_logs=None):
    """Runs `system` through the schedule of `seed` for `duration` seconds; returns what the
    checker needs. `keep_logs`: a directory to copy the nodes' logs into."""
    faults = schedule(seed, duration)
    hosts = system.hosts + CLIENTS + [OBSERVER]
    with Net(hosts) as net:
        system.start(net)
        started = time.monotonic() + 1.0
        stop = started + duration
        kind, servers = system.client_target()
        outs = []
        clients = []
        for i, host in enumerate(CLIENTS):
            out = os.path.join(net.dir, f"history-{host}.jsonl")
            outs.append(out)
            clients.append(net.spawn(host, [
                sys.executable, os.path.join(HERE, "workload.py"), "--kind", kind,
                "--servers", servers, "--client", str(i), "--keys", str(KEYS),
                "--seed", str(seed), "--start-at", repr(started), "--stop-at", repr(stop),
                "--timeout", str(system.client_timeout), "--out", out], log=os.path.join(net.dir, f"{host}.log")))
        polls_file = os.path.join(net.dir, "polls.jsonl")
        observer = None
        nodes_arg = ",".join(f"{n}={net.ips[n]}" for n in NODES)
        last_end = started + max(f.end for f in faults)
        final_heal = max(stop, last_end)
        if system.replicas:
            observer = net.spawn(OBSERVER, [
                sys.executable, os.path.join(HERE, "observer.py"), "poll", "--nodes",
                nodes_arg, "--keys", str(KEYS), "--admin-port", str(ADMIN_PORT),
                "--until", repr(final_heal + settle_limit), "--settle-from", repr(final_heal),
                "--out", polls_file], log=os.path.join(net.dir, "observer.log"))
        events = sorted([(started + f.start, 0, f) for f in faults] +
                        [(started + f.end, 1, f) for f in faults], key=lambda e: e[:2])
        for at, is_end, fault in events:
            time.sleep(max(0.0, at - time.monotonic()))
            (heal_fault if is_end else apply_fault)(net, system, fault)
        for proc in clients:
            proc.wait(timeout=duration + 60)
        polls, owners = [], {}
        if observer:
            observer.wait(timeout=settle_limit + 60)
            with open(polls_file) as f:
                for line in f:
                    entry = json.loads(line)
                    if "owners" in entry:
                        owners = entry["owners"]
                    else:
                        polls.append(entry)
        metrics = {}
        if system.replicas:
            for node in NODES:
                metrics[node] = {name: int(probe(net, "metric", f"{net.ips[node]}:{ADMIN_PORT}",
                                                 name).strip() or 0)
                                 for name in REPORTED_METRICS}
        history = checker.load(outs)
        keys = {f"key-{i:03d}" for i in range(KEYS)} | {op["k"] for op in history}
        final, disagreeing = final_values(net, system, nodes_arg, keys)
        settled = checker.all_agree_at(polls, owners, final_heal) if owners else None
        if keep_logs:
            os.makedirs(keep_logs, exist_ok=True)
            for name in os.listdir(net.dir):
                if name.endswith((".log", ".jsonl")):
                    with open(os.path.join(net.dir, name), "rb") as src, open(
                            os.path.join(keep_logs, f"{system.name}-{name}"), "wb") as dst:
                        dst.write(src.read())
        return RunResult(
            system=getattr(system, "label", system.name), seed=seed, faults=faults,
            history=history, final=final, final_disagreeing=disagreeing,
            polls=polls, owners=owners, started=started, final_heal=final_heal, metrics=metrics,
            settled_after=None if settled is None else settled - final_heal)


def final_values(net, system, nodes_arg, keys):
    """What each key settled on: for kache, read from every owner directly over the memcached
    protocol (the first owner's copy; keys whose owners differ are listed); for the
    baseline, what a client reading through its continuum sees."""
    keys_file = os.path.join(net.dir, "keys.txt")
    with open(keys_file, "w") as f:
        f.write("\n".join(sorted(keys)) + "\n")
    script = [sys.executable, os.path.join(HERE, "observer.py"), "final", "--nodes", nodes_arg,
              "--keys", str(KEYS), "--keys-file", keys_file, "--port", str(PORT),
              "--admin-port", str(ADMIN_PORT), "--timeout", "5"]
    if not system.replicas:
        script += ["--through-ketama"]
    read = json.loads(net.run(OBSERVER, script, timeout=300))
    final, disagreeing = {}, []
    for key in keys:
        if system.replicas:
            seen = [read["nodes"][n].get(key) for n in read["owners"][key]]
            if any(s != seen[0] for s in seen[1:]):
                disagreeing.append(key)
            final[key] = seen[0][1] if seen[0] else None
        else:
            got = read["client"].get(key)
            final[key] = got[1] if got else None
    return final, disagreeing


def format_table(result, examples=True):
    rows, total = result.table()
    lines = [f"{result.system}: seed {result.seed}",
             f"{'phase':50} {'ops':>6} {'acked':>6} {'unknown':>7} {'lost':>5} "
             f"{'stale':>6} {'divergence':>11}"]
    for label, t, divergence in rows:
        div = ("-" if not result.replicas_known() or label == "healthy warmup" else
               "never" if divergence is None else f"{divergence:.1f} s")
        lines.append(f"{label[:50]:50} {t.ops:>6} {t.acked_writes:>6} {t.unknown_writes:>7} "
                     f"{t.lost:>5} {t.stale_reads:>6} {div:>11}")
    settled = ("-" if not result.replicas_known() else
               "never" if result.settled_after is None else f"{result.settled_after:.1f} s")
    lines.append(f"{'total':50} {total.ops:>6} {total.acked_writes:>6} "
                 f"{total.unknown_writes:>7} {total.lost:>5} {total.stale_reads:>6} "
                 f"{settled:>11}")
    lines.append(f"  reads failed: {total.failed_reads}/{total.reads}; unexplained reads: "
                 f"{total.unexplained}; replicas disagreeing at the final read: "
                 f"{len(result.final_disagreeing)}")
    for node, counters in result.metrics.items():
        lines.append(f"  {node}: " + ", ".join(f"{k} {v}" for k, v in counters.items()))
    if examples:
        lines.extend(format_examples(result, total))
    return "\n".join(lines)


def format_examples(result, total, window=2.0):
    """Each lost, stale or unexplained operation the checker noted, with what happened to
    its key around it (times in seconds from the start): what a failure needs to be
    understood from a CI log alone."""
    lines = []
    for example in total.examples:
        op = example["op"]
        lines.append(f"  {example['kind']} ({example['detail']}) in phase "
                     f"{result.phase_of(op['t0'])}: {op}")
        for other in sorted((o for o in result.history if o["k"] == op["k"]),
                            key=lambda o: o["t0"]):
            if abs(other["t0"] - op["t0"]) <= window:
                mark = ">" if other is op else " "
                lines.append(f"   {mark} {other['t0'] - result.started:8.3f} "
                             f"{other['t1'] - result.started:8.3f} client {other['client']} "
                             f"{other['f']:6} {other.get('v')!s:10} {other['r']}")
    return lines
