#!/usr/bin/python3
"""Proxy benchmark: kache-node direct vs `kache-node proxy` vs twemproxy (nutcracker).

One invocation measures, on this machine, with the same load as the node benchmark
(bench/compare.py: bench/loadgen, 32 connections on 2 client threads, closed loop,
90% get / 10% set, 100-byte values, uniform keys over a pre-filled keyspace):

  direct     bench/loadgen -> one kache-node (standalone, -t 1 -m 256)
  proxy      bench/loadgen -> `kache-node proxy -t 1` -> 3 kache-nodes (-t 1 -m 256 each)
  twemproxy  bench/loadgen -> nutcracker (ketama, md5) -> the same 3 kache-nodes

    /usr/bin/python3 bench/proxy_compare.py            # full run (~3 min)
    /usr/bin/python3 bench/proxy_compare.py --quick    # smoke test (~40 s)
    /usr/bin/python3 bench/proxy_compare.py --perf     # + one `perf stat` run per target
    /usr/bin/python3 bench/compare.py --proxy [...]    # the same, via compare.py

kache's ring is libmemcached's weighted ketama with MD5 key hashes over "host:port", which
is what twemproxy computes with `distribution: ketama` and `hash: md5` for unnamed servers
`127.0.0.1:PORT:1`: both proxies send every key to the same node. The keyspace is filled
once through the kache proxy and then read back through both proxies (a check that they
agree; a key sent to a non-owner would be replicated to its owner by the node, which would
make twemproxy pay for kache's replication).

Targets run in alternation (A B C, C B A, ...) and the median of the rounds is reported.
The CPU time of the front process (the node itself for "direct", the proxy otherwise) and
of the 3 backend nodes is read from /proc during each run; "other load" is the CPU used by
everything else on the machine (neither the servers nor the load generator): when it is
high the figures are noisy.

Only loopback addresses are used; every subprocess has a timeout and every process this
script starts is stopped at the end, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import compare as cmp  # noqa: E402  (helpers shared with the node benchmark)

sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
import kache_testlib as kt  # noqa: E402  (port picking shared with the test suites)
from compare import HOST, BenchError, Server, log  # noqa: E402

NUTCRACKER = "/usr/sbin/nutcracker"


# A free port below the ephemeral range (so that no outgoing connection of the proxies,
# nodes or load generator can take it between now and the server's bind), never the same
# one twice in one run: the test suite's picker.
free_port = kt.free_port


# --------------------------------------------------------------------------- processes


def spawn(name: str, argv: list[str], port: int, workdir: str, ready_url: str | None = None,
          ready_timeout: float = 20.0) -> Server:
    """Starts one server process and waits until it accepts memcached connections
    (and, if given, until ready_url answers 200)."""
    logpath = os.path.join(workdir, f"{name}.log")
    with open(logpath, "w") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(name, port, [proc], logpath)
    cmp.LIVE_SERVERS.append(server)
    try:
        deadline = time.monotonic() + ready_timeout
        if ready_url:
            last = None
            while True:
                if proc.poll() is not None:
                    raise BenchError(f"{name} exited with {proc.returncode} during start-up; log:\n"
                                     + server.log_tail())
                try:
                    with urllib.request.urlopen(ready_url, timeout=1.0) as r:
                        if r.status == 200:
                            break
                except OSError as e:
                    last = e
                if time.monotonic() > deadline:
                    raise BenchError(f"{name}: {ready_url} not ready after {ready_timeout:.0f}s"
                                     f" ({last}); log:\n{server.log_tail()}")
                time.sleep(0.1)
        cmp.wait_ready(server, timeout=max(deadline - time.monotonic(), 2.0))
    except BaseException:
        server.stop()
        raise
    return server


class Target:
    """A front server (what the load generator talks to) and the backends behind it."""

    def __init__(self, name: str, front: Server, backends: list[Server], describe: str):
        self.name = name
        self.front = front
        self.backends = backends
        self.describe = describe

    @property
    def port(self) -> int:
        return self.front.port

    def pids(self) -> list[int]:
        return [self.front.pid] + [b.pid for b in self.backends]

    def alive(self) -> bool:
        return self.front.alive() and all(b.alive() for b in self.backends)


def node_argv(binary: str, port: int, admin_port: int, args, extra: list[str]) -> list[str]:
    return [binary, "-l", HOST, "-p", str(port), "-t", str(args.node_threads),
            "-m", str(args.memory_mb), "--admin-port", str(admin_port)] + extra


def start_cluster(binary: str, args, workdir: str) -> tuple[list[Server], str, list[dict]]:
    members = []
    for i in range(args.nodes):
        members.append({"name": f"n{i}", "host": HOST, "ip": HOST, "port": free_port(),
                        "peerPort": free_port()})
    members_file = os.path.join(workdir, "members.json")
    with open(members_file, "w") as f:
        json.dump({"version": 1, "replicationFactor": 1, "members": members}, f)
    nodes = []
    for m in members:
        admin = free_port()
        argv = node_argv(binary, m["port"], admin, args,
                         ["--members-file", members_file, "--node-name", m["name"],
                          "--peer-port", str(m["peerPort"])])
        s = spawn(f"node-{m['name']}", argv, m["port"], workdir,
                  ready_url=f"http://{HOST}:{admin}/readyz")
        nodes.append(s)
        log(f"  started node {m['name']} pid {s.pid} on {HOST}:{m['port']} (peer {m['peerPort']})")
    return nodes, members_file, members


def start_kache_proxy(binary: str, members_file: str, args, workdir: str) -> Server:
    port, admin = free_port(), free_port()
    argv = [binary, "proxy", "-l", HOST, "-p", str(port), "--admin-port", str(admin),
            "--members-file", members_file, "-t", str(args.proxy_threads)]
    if args.pool_size:
        argv += ["--pool-size", str(args.pool_size)]
    s = spawn("kache-proxy", argv, port, workdir, ready_url=f"http://{HOST}:{admin}/readyz")
    log(f"  started kache proxy pid {s.pid} on {HOST}:{port}: {' '.join(argv[1:])}")
    return s


def start_nutcracker(binary: str, members: list[dict], args, workdir: str) -> Server:
    port, stats_port = free_port(), free_port()
    conf = os.path.join(workdir, "nutcracker.yml")
    lines = ["kache:",
             f"  listen: {HOST}:{port}",
             "  hash: md5",
             "  distribution: ketama",
             "  redis: false",
             "  auto_eject_hosts: false",
             f"  server_connections: {args.nutcracker_server_connections}",
             "  servers:"]
    lines += [f"   - {HOST}:{m['port']}:1" for m in members]
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    r = cmp.run([binary, "-t", "-c", conf], timeout=10)
    if r.returncode != 0:
        raise BenchError(f"nutcracker rejects its config:\n{r.stdout}{r.stderr}\n"
                         + open(conf).read())
    argv = [binary, "-c", conf, "-s", str(stats_port), "-a", HOST,
            "-p", os.path.join(workdir, "nutcracker.pid"),
            "-o", os.path.join(workdir, "nutcracker-internal.log"), "-v", "4"]
    s = spawn("twemproxy", argv, port, workdir)
    log(f"  started nutcracker pid {s.pid} on {HOST}:{port} (stats {HOST}:{stats_port}),"
        f" server_connections {args.nutcracker_server_connections}")
    return s


# --------------------------------------------------------------------------- measuring


def cpu_of(pids: list[int]) -> list[float]:
    return [cmp.proc_cpu_seconds(p) for p in pids]


def measure(target: Target, fn):
    """Runs fn(); returns (result, front CPUs, backend CPUs, other CPUs) in CPU-seconds per
    wall second."""
    pids = target.pids()
    c0, t0 = cpu_of(pids), time.monotonic()
    s0, cl0 = cmp.system_busy_seconds(), cmp.children_cpu_seconds()
    result = fn()
    c1, t1 = cpu_of(pids), time.monotonic()
    s1, cl1 = cmp.system_busy_seconds(), cmp.children_cpu_seconds()
    if not target.alive():
        raise BenchError(f"{target.name}: a server died during the run; log:\n"
                         + target.front.log_tail())
    wall = max(t1 - t0, 1e-9)
    d = [b - a for a, b in zip(c0, c1)]
    front, back = d[0], sum(d[1:])
    other = ((s1 - s0) - front - back - (cl1 - cl0)) / wall
    return result, front / wall, back / wall, max(other, 0.0)


def loadgen_run(lg: str, port: int, args) -> dict:
    out = cmp.loadgen(lg, port, cmp.loadgen_run_args(args),
                      timeout=args.duration + args.warmup + 60)
    return [x for x in out if x["mode"] == "run"][0]


PERF_EVENTS = cmp.PERF_EVENTS


def perf_stat(pids: list[int], seconds: float, out_path: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["perf", "stat", "-x", ",", "-o", out_path, "-e", ",".join(PERF_EVENTS),
         "-p", ",".join(str(p) for p in pids), "--", "sleep", f"{seconds:g}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def read_perf(path: str) -> dict:
    counts = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) >= 3 and parts[2] in PERF_EVENTS:
                    try:
                        counts[parts[2]] = float(parts[0])
                    except ValueError:
                        counts[parts[2]] = None
    except OSError:
        pass
    return counts


def per_op(counts: dict, ops: int) -> dict:
    res = {}
    if counts.get("task-clock") is not None:
        res["cpu_us_per_op"] = round(counts["task-clock"] * 1000 / ops, 2)
    for ev, key in (("raw_syscalls:sys_enter", "syscalls_per_op"),
                    ("context-switches", "ctx_switches_per_op"),
                    ("page-faults", "page_faults_per_op")):
        if counts.get(ev) is not None:
            res[key] = round(counts[ev] / ops, 3)
    return res


def perf_run(target: Target, lg: str, args, workdir: str) -> dict:
    """One extra loadgen run (not in the medians) with `perf stat` on the front process and,
    separately, on the backend nodes: per request CPU, syscalls, context switches."""
    box: dict = {}

    def go():
        box["r"] = loadgen_run(lg, target.port, args)

    th = threading.Thread(target=go, daemon=True)
    t0 = time.monotonic()
    th.start()
    time.sleep(max(args.warmup + 0.2 - (time.monotonic() - t0), 0))
    front_out = os.path.join(workdir, f"perf-{target.name}-front.csv")
    back_out = os.path.join(workdir, f"perf-{target.name}-backends.csv")
    perfs = [perf_stat([target.front.pid], args.duration, front_out)]
    if target.backends:
        perfs.append(perf_stat([b.pid for b in target.backends], args.duration, back_out))
    for p in perfs:
        try:
            p.wait(timeout=args.duration + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    th.join(timeout=args.duration + args.warmup + 70)
    run_ = box.get("r")
    if not run_:
        log(f"  perf run on {target.name} failed")
        return {}
    ops = run_["ops"] or 1
    res = {"ops": ops, "ops_per_sec": run_["ops_per_sec"], "p99_us": run_["p99_us"],
           "front": per_op(read_perf(front_out), ops)}
    if target.backends:
        res["backends"] = per_op(read_perf(back_out), ops)
    for part in ("front", "backends"):
        if part in res:
            r = res[part]
            log(f"  perf {target.name:10s} {part:8s}: {r.get('cpu_us_per_op', '-')} CPU µs/op, "
                f"{r.get('syscalls_per_op', '-')} syscalls/op, "
                f"{r.get('ctx_switches_per_op', '-')} context switches/op, "
                f"{r.get('page_faults_per_op', '-')} page faults/op")
    log(f"  perf {target.name:10s} ({res['ops_per_sec']:.0f} ops/s, p99 {res['p99_us']:.0f} µs"
        " in this run)")
    return res


def perf_record(target: Target, lg: str, args, workdir: str) -> None:
    """`perf record -g` on the front process during one extra run; prints the top symbols."""
    data = os.path.join(workdir, f"perf-{target.name}.data")
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(r=loadgen_run(lg, target.port, args)),
                          daemon=True)
    th.start()
    time.sleep(args.warmup + 0.2)
    secs = min(args.duration, 8)
    p = subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "999", "-g", "-o", data,
                          "-p", str(target.front.pid), "--", "sleep", f"{secs:g}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        p.wait(timeout=secs + 30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout=5)
    th.join(timeout=args.duration + args.warmup + 70)
    r = cmp.run(["perf", "report", "-i", data, "--no-children", "--sort", "sym",
                 "--stdio", "-g", "none", "--percent-limit", "1.5"], timeout=120)
    log(f"  perf record on {target.name} (pid {target.front.pid}), self time by symbol:")
    for line in r.stdout.splitlines():
        if line.strip() and not line.startswith("#"):
            log("    " + line.strip())
    if args.perf_keep:
        keep = os.path.join(args.perf_keep, f"perf-{target.name}.data")
        shutil.copy(data, keep)
        log(f"  kept {keep}")


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kache-bin", help="kache-node binary (default: $KACHE_NODE_BIN or "
                                       "target/release/kache-node)")
    p.add_argument("--nutcracker-bin", default=NUTCRACKER)
    p.add_argument("--targets", default="direct,proxy,twemproxy",
                   help="comma-separated subset of direct,proxy,twemproxy")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 s runs, 1 round")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 15, quick 3)")
    p.add_argument("--warmup", type=float, help="loadgen warm-up seconds (default 2, quick 1)")
    p.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    p.add_argument("--keys", type=int, default=100_000, help="keyspace (pre-filled)")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--client-threads", type=int, default=2)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--node-threads", type=int, default=1)
    p.add_argument("--proxy-threads", type=int, default=1)
    p.add_argument("--pool-size", type=int, default=0,
                   help="kache proxy --pool-size (default: the proxy's own default)")
    p.add_argument("--nutcracker-server-connections", type=int, default=1,
                   help="twemproxy server_connections (its default is 1)")
    p.add_argument("--memory-mb", type=int, default=256)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--set-ratio", type=float, default=0.1)
    p.add_argument("--stat", choices=["median", "best"], default="median")
    p.add_argument("--perf", action="store_true",
                   help="one extra run per target under `perf stat` (front and backends)")
    p.add_argument("--perf-record", action="store_true",
                   help="one extra run per proxy under `perf record -g`; prints top symbols")
    p.add_argument("--perf-keep", help="directory to keep the perf.data files in")
    p.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0)
    p.add_argument("--json-out", help="also write the final JSON (with every run) to this file")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (3.0 if q else 15.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if q else 2.0)
    a.rounds = a.rounds or (1 if q else 3)
    if q and a.keys == 100_000:
        a.keys = 20_000
    a.no_loadgen = False
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in a.targets:
        if t not in ("direct", "proxy", "twemproxy"):
            raise SystemExit(f"unknown target {t!r}")
    return a


def check_binaries(args) -> str:
    binary = cmp.resolve_kache_bin(args)
    r = cmp.run([binary, "proxy", "--help"], timeout=10)
    if r.returncode != 0:
        raise BenchError(f"{binary} has no `proxy` subcommand (stale build?):"
                         f" {r.stderr.strip()[:300]}\nRebuild: cargo build --release -p kache-node")
    if "twemproxy" in args.targets and not os.access(args.nutcracker_bin, os.X_OK):
        raise BenchError(f"{args.nutcracker_bin} not found: apt-get install nutcracker"
                         " (or leave twemproxy out of --targets)")
    if (args.perf or args.perf_record) and not shutil.which("perf"):
        log("perf not found: no --perf/--perf-record")
        args.perf = args.perf_record = False
    return binary


def fill_and_verify(lg: str, target: Target, args, fill: bool) -> dict:
    extra = ["--keys", str(args.keys), "--verify", "500", "--value-size", str(args.value_size),
             "--threads", str(args.client_threads)]
    if fill:
        extra = ["--fill", str(args.keys)] + extra
    out = cmp.loadgen(lg, target.port, extra, timeout=180)
    v = [x for x in out if x["mode"] == "verify"][0]
    f = [x for x in out if x["mode"] == "fill"]
    log(f"  {target.name:10s} {'fill ' + str(args.keys) + ' keys, ' if fill else ''}"
        f"verify {v['ok']}/{v['checked']}"
        + (f" ({f[0].get('items_per_sec', 0):.0f} items/s)" if f else ""))
    if v["ok"] != v["checked"]:
        raise BenchError(f"{target.name}: keyspace check failed: {v}"
                         + (" (do kache's ring and twemproxy's ketama disagree?)"
                            if target.name == "twemproxy" else ""))
    return v


def node_item_counts(nodes: list[Server]) -> list[int | None]:
    out = []
    for n in nodes:
        st = cmp.mc_stats(n.port)
        out.append(int(st["curr_items"]) if "curr_items" in st else None)
    return out


def backend_connections(t: Target) -> int | None:
    """Sum of the backend nodes' `total_connections` (None for a target without backends)."""
    if not t.backends:
        return None
    total = 0
    for n in t.backends:
        st = cmp.mc_stats(n.port)
        if "total_connections" not in st:
            return None
        total += int(st["total_connections"])
    return total - len(t.backends)  # minus our own stats connections


def summarize(targets: list[Target], runs: dict, perf: dict) -> dict:
    summary = {}
    for t in targets:
        rs = runs[t.name]
        row: dict = {"target": t.name, "describe": t.describe}
        for k in ("ops_per_sec", "p50_us", "p99_us", "p999_us", "mean_us", "front_cpu",
                  "backend_cpu", "front_cpu_us_per_op", "total_cpu_us_per_op"):
            row[k] = cmp.med(rs, k)
        row["ops_per_sec_runs"] = [r["ops_per_sec"] for r in rs]
        row["p99_us_runs"] = [r["p99_us"] for r in rs]
        row["other_cpu_max"] = max((r["other_cpu"] for r in rs), default=0)
        row["errors"] = sum(r["errors"] for r in rs)
        row["misses"] = sum(r["misses"] for r in rs)
        opened = [r["backend_conns_opened"] for r in rs if "backend_conns_opened" in r]
        if opened:
            row["backend_conns_opened_per_run"] = statistics.median(opened)
        if perf.get(t.name):
            row["perf"] = perf[t.name]
        summary[t.name] = row
    return summary


def print_report(summary: dict, args) -> dict:
    fmt, ratio = cmp.fmt, cmp.ratio
    head = (f"{'target':<20}{'ops/s':>10}{'p50 µs':>9}{'p99 µs':>9}{'p999 µs':>9}"
            f"{'front CPU':>11}{'all CPU':>10}{'errors':>8}{'misses':>8}")
    log()
    log("=" * len(head))
    log(f"kache proxy benchmark: {args.conns} conns x {args.client_threads} client threads, "
        f"{int(round((1 - args.set_ratio) * 100))}% get / {int(round(args.set_ratio * 100))}% set,"
        f" {args.value_size} B values, {args.keys} keys pre-filled, {args.rounds} x "
        f"{args.duration:g}s per target ({args.stat}); nodes -t {args.node_threads},"
        f" proxies {args.proxy_threads} thread")
    log("ops/s, p50/p99/p999: bench/loadgen (exact); front CPU: µs of the node (direct) or proxy"
        " CPU per request; all CPU: front + backend nodes, µs per request")
    log("-" * len(head))
    log(head)
    for name in args.targets:
        r = summary[name]
        log(f"{name:<20}{fmt(r['ops_per_sec'], '{:.0f}', 10)}{fmt(r['p50_us'])}{fmt(r['p99_us'])}"
            f"{fmt(r['p999_us'])}{fmt(r['front_cpu_us_per_op'], '{:.2f}', 11)}"
            f"{fmt(r['total_cpu_us_per_op'], '{:.2f}', 10)}{fmt(r['errors'], '{}', 8)}"
            f"{fmt(r['misses'], '{}', 8)}")
    ratios = {}
    for a, b in (("proxy", "twemproxy"), ("proxy", "direct"), ("twemproxy", "direct")):
        if a not in summary or b not in summary:
            continue
        ra, rb = summary[a], summary[b]
        rr = {k: ratio(ra[k], rb[k]) for k in ("ops_per_sec", "p50_us", "p99_us", "p999_us",
                                              "front_cpu_us_per_op", "total_cpu_us_per_op")}
        ratios[f"{a}/{b}"] = rr
        log(f"{a + '/' + b:<20}{fmt(rr['ops_per_sec'], '{:.2f}x', 10)}{fmt(rr['p50_us'], '{:.2f}x')}"
            f"{fmt(rr['p99_us'], '{:.2f}x')}{fmt(rr['p999_us'], '{:.2f}x')}"
            f"{fmt(rr['front_cpu_us_per_op'], '{:.2f}x', 11)}"
            f"{fmt(rr['total_cpu_us_per_op'], '{:.2f}x', 10)}")
    if "proxy/twemproxy" in ratios:
        rr = ratios["proxy/twemproxy"]
        goals = []
        if rr["ops_per_sec"] is not None:
            goals.append(f"throughput {rr['ops_per_sec']:.2f} "
                         f"{'OK' if rr['ops_per_sec'] >= 1.0 else 'MISSED'}")
        if rr["p99_us"] is not None:
            goals.append(f"p99 {rr['p99_us']:.2f} {'OK' if rr['p99_us'] <= 1.0 else 'MISSED'}")
        log(f"{'':<20}goals proxy vs twemproxy: " + ", ".join(goals))
    for name in args.targets:
        r = summary[name]
        runs = r["ops_per_sec_runs"]
        log(f"  {name}: ops/s per round {', '.join(f'{x:.0f}' for x in runs)}"
            f" (spread {100 * (max(runs) - min(runs)) / max(statistics.median(runs), 1):.0f}%),"
            f" p99 µs per round {', '.join(f'{x:.0f}' for x in r['p99_us_runs'])},"
            f" CPUs: front {r['front_cpu']:.2f}, backends {r['backend_cpu']:.2f},"
            f" max other load {100 * r['other_cpu_max']:.0f}%"
            + (f", backend connections opened per run {r['backend_conns_opened_per_run']:.0f}"
               if "backend_conns_opened_per_run" in r else ""))
    if any(summary[n].get("perf") for n in args.targets):
        log("  perf stat (one extra run each, slowed by syscall counting), per request:")
        for name in args.targets:
            pr = summary[name].get("perf", {})
            for part in ("front", "backends"):
                if part in pr:
                    x = pr[part]
                    log(f"    {name:<10} {part:<9} CPU {fmt(x.get('cpu_us_per_op'), '{:.2f}', 6)} µs,"
                        f" syscalls {fmt(x.get('syscalls_per_op'), '{:.2f}', 5)},"
                        f" context switches {fmt(x.get('ctx_switches_per_op'), '{:.3f}', 6)},"
                        f" page faults {fmt(x.get('page_faults_per_op'), '{:.3f}', 6)}")
    noisy = max((summary[n]["other_cpu_max"] for n in args.targets), default=0)
    if noisy > 0.15:
        log(f"  NOTE: other processes used up to {noisy * 100:.0f}% of a CPU during the runs:"
            " the figures are noisy; compare ratios, or re-run on a quiet machine.")
    log("=" * len(head))
    return ratios


def main(argv=None) -> int:
    args = parse_args(argv)
    cmp.STAT = args.stat
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)
        except OSError as e:
            log(f"cannot set priority {args.nice}: {e}")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workdir = tempfile.mkdtemp(prefix="kache-proxy-bench-")
    started = time.time()
    try:
        binary = check_binaries(args)
        lg = cmp.build_loadgen(args)
        log(f"kache-node: {binary}; nutcracker: {args.nutcracker_bin}; loadgen: {lg}")
        targets: dict[str, Target] = {}
        nodes: list[Server] = []
        if "direct" in args.targets:
            port, admin = free_port(), free_port()
            direct = spawn("direct-node", node_argv(binary, port, admin, args, []), port, workdir,
                           ready_url=f"http://{HOST}:{admin}/readyz")
            log(f"  started standalone node pid {direct.pid} on {HOST}:{port}")
            targets["direct"] = Target("direct", direct, [], f"kache-node -t {args.node_threads}")
        if "proxy" in args.targets or "twemproxy" in args.targets:
            nodes, members_file, members = start_cluster(binary, args, workdir)
            if "proxy" in args.targets:
                targets["proxy"] = Target(
                    "proxy", start_kache_proxy(binary, members_file, args, workdir), nodes,
                    f"kache-node proxy -t {args.proxy_threads} over {len(nodes)} nodes")
            if "twemproxy" in args.targets:
                targets["twemproxy"] = Target(
                    "twemproxy", start_nutcracker(args.nutcracker_bin, members, args, workdir),
                    nodes, f"nutcracker over {len(nodes)} nodes")
        order = [targets[n] for n in args.targets]

        log(f"== pre-fill: {args.keys} keys x {args.value_size} B")
        filled = set()
        for t in order:
            # The cluster is filled once (through the first proxy); the other proxy reads it back.
            shared = t.backends and any(t.backends is o.backends for o in order if o.name in filled)
            fill_and_verify(lg, t, args, fill=not shared)
            filled.add(t.name)
        if nodes:
            counts = node_item_counts(nodes)
            log(f"  items per cluster node: {counts}")

        log(f"== throughput/latency: {args.rounds} round(s) x {args.duration:g}s per target")
        runs: dict[str, list[dict]] = {t.name: [] for t in order}
        for rnd in range(args.rounds):
            seq = order if rnd % 2 == 0 else list(reversed(order))
            for t in seq:
                conns0 = backend_connections(t)
                r, front, back, other = measure(t, lambda: loadgen_run(lg, t.port, args))
                conns1 = backend_connections(t)
                ops = max(r["ops_per_sec"], 1)
                r.update(front_cpu=round(front, 3), backend_cpu=round(back, 3),
                         other_cpu=round(other, 3),
                         front_cpu_us_per_op=round(front * 1e6 / ops, 2),
                         total_cpu_us_per_op=round((front + back) * 1e6 / ops, 2))
                if conns0 is not None and conns1 is not None:
                    # Connections the backends accepted during the run (loadgen's 32 are
                    # not among them): a proxy that reuses its backend connections opens none.
                    r["backend_conns_opened"] = conns1 - conns0
                runs[t.name].append(r)
                log(f"  round {rnd + 1} {t.name:10s}: {r['ops_per_sec']:>9.0f} ops/s"
                    f"  p50 {r['p50_us']:7.1f}  p99 {r['p99_us']:7.1f}  p999 {r['p999_us']:7.1f} µs"
                    f"  CPU front {front * 100:4.0f}% backends {back * 100:4.0f}%"
                    f"  other load {other * 100:3.0f}%  errors {r['errors']} misses {r['misses']}"
                    + (f"  backend conns opened {r['backend_conns_opened']}"
                       if "backend_conns_opened" in r else ""))
        perf: dict = {}
        if args.perf:
            for t in order:
                perf[t.name] = perf_run(t, lg, args, workdir)
        if args.perf_record:
            for t in order:
                if t.name != "direct":
                    perf_record(t, lg, args, workdir)
        summary = summarize(order, runs, perf)
        ratios = print_report(summary, args)
        doc = {
            "bench": "kache-proxy-compare",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(time.time() - started, 1),
            "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "config": {k: getattr(args, k) for k in (
                "quick", "stat", "duration", "warmup", "rounds", "keys", "conns",
                "client_threads", "nodes", "node_threads", "proxy_threads", "pool_size",
                "nutcracker_server_connections", "memory_mb", "value_size", "set_ratio", "nice")},
            "targets": summary,
            "ratios": ratios,
        }
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(dict(doc, runs=runs), f, indent=1)
        print(json.dumps(doc, separators=(",", ":")), flush=True)
        return 0
    except BenchError as e:
        log(f"bench error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for s in list(cmp.LIVE_SERVERS):
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
