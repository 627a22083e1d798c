#!/usr/bin/python3
"""Compare kache-node with memcached (and later other targets) on this machine.

This is a benchmark, not a test: it prints numbers and exits 0 unless something
could not be measured at all. Run it with `make bench` (which builds kache-node
first) or directly:

    /usr/bin/python3 bench/compare.py            # full run (~5 minutes)
    /usr/bin/python3 bench/compare.py --quick    # smoke test (~40 seconds)
    /usr/bin/python3 bench/compare.py --proxy    # proxy benchmark instead: see proxy_compare.py

What it measures, for every target, in one run:

* throughput and latency with a closed loop of 32 connections, 90% get / 10% set,
  100-byte values: primarily with bench/loadgen (a tiny Rust client that records
  every latency in an HDR histogram, so p50/p99/p999 are exact), and as a second
  opinion with memcaslap (TPS, avg/std, and a p99 estimated from its log2
  latency histogram). Targets run in alternation (A B B A ...) and the median of
  the rounds is reported. The server's CPU time during each run is read from
  /proc so that "CPU µs per request" can be compared as well.
* memory: a fresh server with -m 1024 is loaded with 1,000,000 items
  (`key:%07d`, 100-byte values), a sample is read back and checked, then VmRSS
  from /proc/PID/status and the server's own `stats` (curr_items, bytes) are
  recorded.

At the end it prints a table with kache/memcached ratios (throughput >= 1.0,
p99 <= 1.0 and RSS <= 1.0 are the goals) and, as the very last line, one JSON
object with every figure.

Adding a target (e.g. a proxy in front of memcached): subclass Target, implement
start() (it may start helper processes, e.g. backends; list every process in
Server.procs and put the process whose memory/CPU counts first), register the
class in TARGET_KINDS and name it in --targets.

Only loopback addresses are used; every subprocess has a timeout and every
server is stopped at the end, also on errors and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LOADGEN_MANIFEST = os.path.join(HERE, "loadgen", "Cargo.toml")
LOADGEN_BIN = os.path.join(HERE, "loadgen", "target", "release", "kache-loadgen")
HOST = "127.0.0.1"  # loopback only, always
CLK_TCK = os.sysconf("SC_CLK_TCK")

LIVE_SERVERS: list["Server"] = []


def log(msg: str = "") -> None:
    print(msg, flush=True)


class BenchError(Exception):
    pass


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def run(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"timed out after {timeout:.0f}s: {' '.join(argv)}") from e


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/... from /proc/PID/status, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k.startswith("Vm") or k.startswith("Rss"):
                parts = v.split()
                if parts and parts[0].isdigit():
                    out[k] = int(parts[0])
    return out


def proc_cpu_seconds(pid: int) -> float:
    """utime+stime of all threads of a process."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_busy_seconds() -> float:
    """CPU time spent in processes on the whole machine (all CPUs), from /proc/stat.

    user + nice + system + steal; irq/softirq are left out because most of it is the
    loopback traffic of the benchmark itself, which is not charged to any process.
    """
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system = v[0], v[1], v[2]
    steal = v[7] if len(v) > 7 else 0
    return (user + nice + system + steal) / CLK_TCK


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def mc_command(port: int, cmd: bytes, terminator: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(cmd)
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(terminator):
            if time.monotonic() > deadline:
                raise BenchError(f"no complete reply to {cmd!r} on port {port}")
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        return buf


def mc_stats(port: int) -> dict[str, str]:
    try:
        raw = mc_command(port, b"stats\r\n", b"END\r\n")
    except (OSError, BenchError) as e:
        log(f"  (stats failed on port {port}: {e})")
        return {}
    stats = {}
    for line in raw.decode(errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


def wait_ready(server: "Server", timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for p in server.procs:
            if p.poll() is not None:
                raise BenchError(
                    f"{server.name} exited with {p.returncode} during start-up; log:\n"
                    + server.log_tail()
                )
        try:
            with socket.create_connection((HOST, server.port), timeout=1.0) as s:
                s.settimeout(2.0)
                s.sendall(b"version\r\n")
                try:
                    s.recv(256)
                except OSError:
                    pass  # accepted the connection: good enough
                return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise BenchError(f"{server.name} not accepting connections on port {server.port}: {last}")


# --------------------------------------------------------------------------- targets


class Server:
    def __init__(self, name: str, port: int, procs: list[subprocess.Popen], logpath: str):
        self.name = name
        self.port = port
        self.procs = procs  # procs[0] is the one whose RSS/CPU is measured
        self.logpath = logpath

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.logpath, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if self in LIVE_SERVERS:
            LIVE_SERVERS.remove(self)


class Target:
    kind = "?"

    def __init__(self, name: str, binary: str, args: argparse.Namespace, workdir: str):
        self.name = name
        self.binary = binary
        self.args = args
        self.workdir = workdir

    def describe(self) -> str:
        return f"{self.name}: {self.binary} ({self.kind})"

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def start(self) -> Server:
        port = free_port()
        argv = self.argv(port)
        logpath = os.path.join(self.workdir, f"{self.name}-{port}.log")
        logf = open(logpath, "w")
        proc = subprocess.Popen(
            argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        logf.close()
        server = Server(self.name, port, [proc], logpath)
        LIVE_SERVERS.append(server)
        try:
            wait_ready(server)
        except BaseException:
            server.stop()
            raise
        return server


class MemcachedTarget(Target):
    kind = "memcached"

    def argv(self, port: int) -> list[str]:
        a = self.args
        argv = [self.binary, "-t", str(a.server_threads), "-m", str(a.memory_mb),
                "-c", str(a.max_conns), "-U", "0", "-l", HOST, "-p", str(port)]
        if os.geteuid() == 0:
            argv += ["-u", "root"]  # memcached refuses to run as root without -u
        return argv


class KacheTarget(Target):
    kind = "kache"

    def argv(self, port: int) -> list[str]:
        a = self.args
        return [self.binary, "-t", str(a.server_threads), "-m", str(a.memory_mb),
                "-c", str(a.max_conns), "-l", HOST, "-p", str(port),
                "--admin-port", str(free_port())]


TARGET_KINDS: dict[str, type[Target]] = {
    "memcached": MemcachedTarget,
    "kache": KacheTarget,
}


def looks_like_memcached(binary: str) -> bool:
    """For development: allow --kache-bin /usr/bin/memcached."""
    try:
        out = run([binary, "--version"], timeout=5)
    except (BenchError, OSError):
        return False
    return out.stdout.strip().startswith("memcached ")


def resolve_kache_bin(args) -> str:
    path = args.kache_bin or os.environ.get("KACHE_NODE_BIN") or os.path.join(
        ROOT, "target", "release", "kache-node")
    path = os.path.abspath(path)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise BenchError(
            f"kache-node binary not found at {path}.\n"
            "Build it with `cargo build --release -p kache-node` (or run `make bench`, which does),\n"
            "or point --kache-bin / KACHE_NODE_BIN at it.")
    return path


def make_targets(args, workdir: str) -> list[Target]:
    targets = []
    for name in args.targets.split(","):
        name = name.strip()
        if name == "memcached":
            binary = args.memcached_bin
            if not shutil.which(binary):
                raise BenchError(f"memcached not found ({binary}); apt-get install memcached")
            targets.append(MemcachedTarget(name, shutil.which(binary), args, workdir))
        elif name == "kache":
            binary = resolve_kache_bin(args)
            cls = KacheTarget
            if args.kache_style == "memcached" or (
                    args.kache_style == "auto" and looks_like_memcached(binary)):
                cls = MemcachedTarget  # development stand-in
            targets.append(cls(name, binary, args, workdir))
        elif "=" in name:
            # NAME=PATH: another kache-node binary, e.g. main's build for an A/B in one run.
            label, path = (part.strip() for part in name.split("=", 1))
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise BenchError(f"target {label}: no executable at {path}")
            targets.append(KacheTarget(label, os.path.abspath(path), args, workdir))
        elif name in TARGET_KINDS:
            raise BenchError(f"target {name}: no binary option for it yet")
        else:
            raise BenchError(f"unknown target {name!r}; known: {', '.join(TARGET_KINDS)}")
    if len(targets) < 1:
        raise BenchError("no targets")
    return targets


# --------------------------------------------------------------------------- load generators


def build_loadgen(args) -> str | None:
    if args.no_loadgen:
        return None
    cargo = shutil.which("cargo")
    if cargo is None:
        if os.path.exists(LOADGEN_BIN):
            return LOADGEN_BIN
        log("cargo not found and bench/loadgen not built: falling back to memcaslap only")
        return None
    log("building bench/loadgen ...")
    env = dict(os.environ)
    env.pop("CARGO_TARGET_DIR", None)  # must land in bench/loadgen/target
    r = run(["nice", "-n", str(max(10 - args.nice, 10)), cargo, "build", "--release", "--quiet", "--manifest-path", LOADGEN_MANIFEST],
            timeout=900, env=env)
    if r.returncode != 0 or not os.path.exists(LOADGEN_BIN):
        log(r.stderr[-3000:])
        raise BenchError("building bench/loadgen failed (use --no-loadgen to skip it)")
    return LOADGEN_BIN


def loadgen(bin_: str, port: int, extra: list[str], timeout: float) -> list[dict]:
    argv = [bin_, "--server", f"{HOST}:{port}", "--timeout", str(int(timeout))] + extra
    r = run(argv, timeout=timeout + 10)
    if r.returncode != 0:
        raise BenchError(f"loadgen failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def memcaslap_cfg(workdir: str, args) -> str:
    # memcaslap's config: key size range (its minimum is 16), value size range,
    # and the command mix: 0 = set, 1 = get.
    path = os.path.join(workdir, "memcaslap.cfg")
    with open(path, "w") as f:
        f.write("key\n16 16 1\n")
        f.write(f"value\n{args.value_size} {args.value_size} 1\n")
        f.write(f"cmd\n0 {args.set_ratio}\n1 {1 - args.set_ratio:.4f}\n")
    return path


def parse_memcaslap(out: str) -> dict:
    out = ANSI.sub("", out)
    res: dict = {}
    m = re.search(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)", out)
    if not m:
        raise BenchError("cannot parse memcaslap output:\n" + out[-2000:])
    res["ops"] = int(m.group(2))
    res["ops_per_sec"] = float(m.group(3))
    m = re.search(r"get_misses: (\d+)", out)
    res["get_misses"] = int(m.group(1)) if m else None
    # Final summary block, printed because of -S:
    #   Total Statistics (N events)\n Min: ..\n Max: ..\n Avg: ..\n Geo: ..\n Std: ..\n Log2 Dist:\n  4: a b c d\n  8: ...
    blk = re.search(r"Total Statistics \((\d+) events\)\n(.*?)\n\n", out, re.S)
    if blk:
        body = blk.group(2)
        for key in ("Min", "Max", "Avg", "Geo", "Std"):
            m = re.search(rf"{key}:\s+([\d.]+)", body)
            if m:
                res[key.lower() + "_us"] = float(m.group(1))
        dist = {}
        after = body.split("Log2 Dist:", 1)[1] if "Log2 Dist:" in body else ""
        for line in after.splitlines():
            parts = line.split()
            if not parts or not parts[0].endswith(":"):
                continue
            base = int(parts[0][:-1])
            for i, c in enumerate(parts[1:]):
                dist[base + i] = int(c)
        if dist:
            res["log2_dist"] = dist
            for q, label in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
                res[label + "_us"] = log2_quantile(dist, q)
    return res


def log2_quantile(dist: dict[int, int], q: float) -> float:
    """Quantile from memcaslap's log2 histogram.

    memcaslap puts a latency t (µs) into bucket r = ceil(log2 t), i.e. bucket r holds
    (2^(r-1), 2^r]. We interpolate geometrically inside the bucket that holds the
    quantile, so the figure is an estimate within a factor of 2 (the bucket bounds).
    """
    total = sum(dist.values())
    want = q * total
    acc = 0
    for r in sorted(dist):
        c = dist[r]
        if c and acc + c >= want:
            frac = (want - acc) / c
            lo = 2 ** (r - 1) if r > 0 else 0.5
            return round(lo * (2 ** frac), 1)
        acc += c
    return float(2 ** max(dist))


def run_memcaslap(port: int, args, cfg: str) -> dict:
    d = int(args.duration)
    argv = ["memcaslap", "-s", f"{HOST}:{port}", "-T", str(args.client_threads),
            "-c", str(args.conns), "-t", f"{d}s", "-S", f"{d}s", "-F", cfg]
    r = run(argv, timeout=d + 30)
    if r.returncode != 0:
        raise BenchError(f"memcaslap failed ({r.returncode}): {r.stderr.strip()[-1000:]}")
    return parse_memcaslap(r.stdout)


# --------------------------------------------------------------------------- phases


def measure(server: Server, fn):
    """Runs fn() (a client run against server).

    Returns (result, server CPU seconds per wall second, CPUs used by anything else:
    neither the server nor the client, e.g. other people's compiles; a noise indicator).
    """
    cpu0, t0 = proc_cpu_seconds(server.pid), time.monotonic()
    sys0, cl0 = system_busy_seconds(), children_cpu_seconds()
    result = fn()
    cpu1, t1 = proc_cpu_seconds(server.pid), time.monotonic()
    sys1, cl1 = system_busy_seconds(), children_cpu_seconds()
    if not server.alive():
        raise BenchError(f"{server.name} died during the run; log:\n{server.log_tail()}")
    wall = max(t1 - t0, 1e-9)
    other = ((sys1 - sys0) - (cpu1 - cpu0) - (cl1 - cl0)) / wall
    return result, (cpu1 - cpu0) / wall, max(other, 0.0)


def throughput_phase(targets: list[Target], args, lg: str | None, workdir: str) -> dict:
    results = {t.name: {"loadgen": [], "memcaslap": []} for t in targets}
    servers = {}
    try:
        for t in targets:
            servers[t.name] = s = t.start()
            log(f"  started {t.name} pid {s.pid} on {HOST}:{s.port}")
            if lg:
                r = loadgen(lg, s.port, ["--fill", str(args.keys), "--verify", "200",
                                         "--value-size", str(args.value_size),
                                         "--threads", str(args.client_threads)], timeout=120)
                v = [x for x in r if x["mode"] == "verify"][0]
                if v["ok"] != v["checked"]:
                    raise BenchError(f"{t.name}: keyspace pre-fill check failed: {v}")
        cfg = memcaslap_cfg(workdir, args)
        for rnd in range(args.rounds):
            order = targets if rnd % 2 == 0 else list(reversed(targets))
            for t in order:
                s = servers[t.name]
                if lg:
                    extra = loadgen_run_args(args)
                    out, cpu, other = measure(s, lambda: loadgen(
                        lg, s.port, extra, timeout=args.duration + args.warmup + 60))
                    r = [x for x in out if x["mode"] == "run"][0]
                    r["server_cpu"] = round(cpu, 3)
                    r["other_cpu"] = round(other, 3)
                    r["cpu_us_per_op"] = round(cpu * 1e6 / max(r["ops_per_sec"], 1), 2)
                    results[t.name]["loadgen"].append(r)
                    log(f"  round {rnd + 1} {t.name:10s} loadgen  : {r['ops_per_sec']:>9.0f} ops/s"
                        f"  p50 {r['p50_us']:7.1f}  p99 {r['p99_us']:7.1f}  p999 {r['p999_us']:7.1f} µs"
                        f"  server CPU {cpu * 100:4.0f}%  other load {other * 100:3.0f}%"
                        f"  errors {r['errors']} misses {r['misses']}")
                if not args.no_memcaslap:
                    r, cpu, other = measure(s, lambda: run_memcaslap(s.port, args, cfg))
                    r["server_cpu"] = round(cpu, 3)
                    r["other_cpu"] = round(other, 3)
                    results[t.name]["memcaslap"].append(r)
                    log(f"  round {rnd + 1} {t.name:10s} memcaslap: {r['ops_per_sec']:>9.0f} ops/s"
                        f"  avg {r.get('avg_us', float('nan')):7.1f}  p99≈{r.get('p99_us', float('nan')):7.1f} µs"
                        f"  server CPU {cpu * 100:4.0f}%  other load {other * 100:3.0f}%")
        if args.perf and lg:
            for t in targets:
                s = servers[t.name]
                results[t.name]["perf"] = perf_run(s, lg, args, workdir)
    finally:
        for s in servers.values():
            s.stop()
    return results


def loadgen_run_args(args) -> list[str]:
    return ["--duration", str(args.duration), "--warmup", str(args.warmup),
            "--keys", str(args.keys), "--conns", str(args.conns),
            "--threads", str(args.client_threads),
            "--set-ratio", str(args.set_ratio),
            "--value-size", str(args.value_size)]


PERF_EVENTS = ["task-clock", "context-switches", "cpu-migrations", "page-faults",
               "raw_syscalls:sys_enter"]


def perf_run(server: Server, lg: str, args, workdir: str) -> dict:
    """An extra loadgen run (not in the medians) with `perf stat` on the server.

    Gives per-request figures: server CPU, system calls and context switches. Counting
    the syscall tracepoint costs a little, which is why this run is kept separate.
    """
    if not shutil.which("perf"):
        log("  perf not found: skipping --perf")
        return {}
    out_path = os.path.join(workdir, f"perf-{server.name}.csv")
    box: dict = {}

    def go():
        box["r"] = loadgen(lg, server.port, loadgen_run_args(args),
                           timeout=args.duration + args.warmup + 60)

    # loadgen measures from warmup+0.2 s after its start, for `duration` seconds:
    # start perf at about that moment and let it count for as long.
    th = threading.Thread(target=go, daemon=True)
    t0 = time.monotonic()
    th.start()
    time.sleep(max(args.warmup + 0.2 - (time.monotonic() - t0), 0))
    perf = subprocess.Popen(
        ["perf", "stat", "-x", ",", "-o", out_path, "-e", ",".join(PERF_EVENTS),
         "-p", str(server.pid), "--", "sleep", f"{args.duration:g}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        perf.wait(timeout=args.duration + 30)
    except subprocess.TimeoutExpired:
        perf.kill()
        perf.wait(timeout=5)
    th.join(timeout=args.duration + args.warmup + 70)
    out = box.get("r")
    if not out:
        log(f"  perf run on {server.name} failed")
        return {}
    run_ = [x for x in out if x["mode"] == "run"][0]
    ops = run_["ops"] or 1
    counts = {}
    try:
        with open(out_path) as f:
            for line in f:
                parts = line.strip().split(",")
                if len(parts) >= 3 and parts[2] in PERF_EVENTS:
                    try:
                        counts[parts[2]] = float(parts[0])
                    except ValueError:
                        counts[parts[2]] = None  # <not supported>
    except OSError:
        pass
    res = {"ops": ops, "ops_per_sec": run_["ops_per_sec"], "p99_us": run_["p99_us"]}
    if counts.get("task-clock") is not None:
        res["cpu_us_per_op"] = round(counts["task-clock"] * 1000 / ops, 2)  # task-clock is in ms
    for ev, key in (("raw_syscalls:sys_enter", "syscalls_per_op"),
                    ("context-switches", "ctx_switches_per_op"),
                    ("page-faults", "page_faults_per_op")):
        if counts.get(ev) is not None:
            res[key] = round(counts[ev] / ops, 3)
    log(f"  perf {server.name:10s}: {res.get('cpu_us_per_op', '-')} CPU µs/op, "
        f"{res.get('syscalls_per_op', '-')} syscalls/op, "
        f"{res.get('ctx_switches_per_op', '-')} context switches/op, "
        f"{res.get('page_faults_per_op', '-')} page faults/op "
        f"({res['ops_per_sec']:.0f} ops/s in this run)")
    return res


def py_fill(port: int, n: int, vsize: int) -> None:
    """Fallback loader without the Rust loadgen: pipelined `noreply` sets."""
    value = b"v" * vsize
    batch = 5000
    with socket.create_connection((HOST, port), timeout=30) as s:
        for lo in range(0, n, batch):
            hi = min(lo + batch, n)
            parts = [b"set key:%07d 0 0 %d noreply\r\n%s\r\n" % (i, vsize, value)
                     for i in range(lo, hi - 1)]
            parts.append(b"set key:%07d 0 0 %d\r\n%s\r\n" % (hi - 1, vsize, value))
            s.sendall(b"".join(parts))
            buf = b""
            while not buf.endswith(b"\r\n"):
                chunk = s.recv(1024)
                if not chunk:
                    raise BenchError("connection closed during fill")
                buf += chunk
            if buf != b"STORED\r\n":
                raise BenchError(f"unexpected reply during fill: {buf[:80]!r}")


def py_verify(port: int, n: int, sample: int, vsize: int) -> dict:
    ok = 0
    step = max(n // sample, 1)
    keys = list(range(step // 2, n, step))[:sample]
    for i in keys:
        raw = mc_command(port, b"get key:%07d\r\n" % i, b"END\r\n")
        if raw.startswith(b"VALUE ") and len(raw.split(b"\r\n", 1)[1]) == vsize + 7:
            ok += 1
    return {"mode": "verify", "checked": len(keys), "ok": ok}


def memory_phase(targets: list[Target], args, lg: str | None) -> dict:
    results = {}
    for t in targets:
        s = t.start()
        try:
            idle = proc_status(s.pid)
            t0 = time.monotonic()
            if lg:
                out = loadgen(lg, s.port, ["--fill", str(args.items), "--verify", "1000",
                                           "--value-size", str(args.value_size),
                                           "--threads", str(args.client_threads),
                                           "--batch", "1000"], timeout=120)
                ver = [x for x in out if x["mode"] == "verify"][0]
            else:
                py_fill(s.port, args.items, args.value_size)
                ver = py_verify(s.port, args.items, 1000, args.value_size)
            fill_s = time.monotonic() - t0
            time.sleep(0.5)
            st = proc_status(s.pid)
            stats = mc_stats(s.port)
            r = {
                "items_loaded": args.items,
                "fill_seconds": round(fill_s, 2),
                "verify": ver,
                "rss_idle_kib": idle.get("VmRSS"),
                "rss_kib": st.get("VmRSS"),
                "hwm_kib": st.get("VmHWM"),
                "rss_mib": round(st.get("VmRSS", 0) / 1024, 1),
                "curr_items": int(stats["curr_items"]) if "curr_items" in stats else None,
                "bytes": int(stats["bytes"]) if "bytes" in stats else None,
                "limit_maxbytes": int(stats["limit_maxbytes"]) if "limit_maxbytes" in stats else None,
                "evictions": int(stats["evictions"]) if "evictions" in stats else None,
            }
            if r["curr_items"]:
                r["rss_bytes_per_item"] = round((r["rss_kib"] - (r["rss_idle_kib"] or 0)) * 1024
                                                / r["curr_items"], 1)
            results[t.name] = r
            log(f"  {t.name:10s} {args.items} items in {fill_s:.1f}s, verify {ver['ok']}/{ver['checked']},"
                f" RSS {r['rss_mib']} MiB (idle {(r['rss_idle_kib'] or 0) / 1024:.1f} MiB),"
                f" curr_items {r['curr_items']}, bytes {r['bytes']}, evictions {r['evictions']}")
            if ver["ok"] != ver["checked"]:
                log(f"  WARNING: {t.name} returned wrong/missing values for"
                    f" {ver['checked'] - ver['ok']} of {ver['checked']} sampled keys")
        finally:
            s.stop()
    return results


# --------------------------------------------------------------------------- report


STAT = "median"
HIGHER_IS_BETTER = {"ops_per_sec"}


def med(runs: list[dict], key: str):
    """Median (default) or best (--stat best) of one figure over the rounds.

    "best" is the highest throughput / lowest latency or CPU: other processes on the
    machine only ever make a run worse, so on a busy machine it is the less noisy one.
    """
    vals = [r[key] for r in runs if r.get(key) is not None]
    if not vals:
        return None
    if STAT == "best":
        return max(vals) if key in HIGHER_IS_BETTER else min(vals)
    return statistics.median(vals)


def summarize(targets, tp, mem, args) -> dict:
    summary = {}
    for t in targets:
        row: dict = {"target": t.name, "kind": t.kind, "binary": t.binary}
        lgr = tp.get(t.name, {}).get("loadgen", []) if tp else []
        msr = tp.get(t.name, {}).get("memcaslap", []) if tp else []
        if lgr:
            for k in ("ops_per_sec", "p50_us", "p99_us", "p999_us", "mean_us", "server_cpu",
                      "cpu_us_per_op"):
                row[k] = med(lgr, k)
            row["ops_per_sec_runs"] = [r["ops_per_sec"] for r in lgr]
            row["p99_us_runs"] = [r["p99_us"] for r in lgr]
            row["other_cpu_max"] = max(r.get("other_cpu", 0) for r in lgr + msr)
            row["errors"] = sum(r["errors"] for r in lgr)
            row["misses"] = sum(r["misses"] for r in lgr)
        if msr:
            row["memcaslap"] = {k: med(msr, k) for k in
                                ("ops_per_sec", "avg_us", "std_us", "p50_us", "p99_us", "p999_us",
                                 "max_us", "server_cpu")}
            row["memcaslap"]["ops_per_sec_runs"] = [r["ops_per_sec"] for r in msr]
        if tp and tp.get(t.name, {}).get("perf"):
            row["perf"] = tp[t.name]["perf"]
        if mem and t.name in mem:
            m = mem[t.name]
            row["rss_mib"] = m["rss_mib"]
            row["memory"] = m
        summary[t.name] = row
    return summary


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def fmt(v, spec="{:.1f}", width=9):
    s = "-" if v is None else spec.format(v)
    return s.rjust(width)


def print_report(summary: dict, targets, args) -> dict:
    base = targets[0].name
    head = (f"{'target':<12}{'ops/s':>10}{'p50 µs':>9}{'p99 µs':>9}{'p999 µs':>9}"
            f"{'CPU µs/op':>10}{'RSS MiB':>9}   {'ms ops/s':>9}{'ms avg':>8}{'ms p99≈':>9}")
    log()
    log("=" * len(head))
    log(f"kache benchmark: {args.conns} conns x {args.client_threads} client threads, "
        f"{int((1 - args.set_ratio) * 100)}% get / {int(args.set_ratio * 100)}% set, "
        f"{args.value_size} B values, {args.keys} keys, {args.rounds} x {args.duration:g}s per target "
        f"({args.stat}); memory after {args.items} items")
    log("ops/s, p50/p99/p999: bench/loadgen (HDR histogram, exact); CPU µs/op: server CPU time"
        " per request; ms *: memcaslap (p99 estimated from its log2 histogram)")
    log("-" * len(head))
    log(head)
    for t in targets:
        r = summary[t.name]
        ms = r.get("memcaslap", {})
        log(f"{t.name:<12}{fmt(r.get('ops_per_sec'), '{:.0f}', 10)}{fmt(r.get('p50_us'))}"
            f"{fmt(r.get('p99_us'))}{fmt(r.get('p999_us'))}{fmt(r.get('cpu_us_per_op'), '{:.2f}', 10)}"
            f"{fmt(r.get('rss_mib'))}   {fmt(ms.get('ops_per_sec'), '{:.0f}')}"
            f"{fmt(ms.get('avg_us'), '{:.0f}', 8)}{fmt(ms.get('p99_us'), '{:.0f}')}")
    ratios = {}
    for t in targets[1:]:
        r, b = summary[t.name], summary[base]
        rm, bm = r.get("memcaslap", {}), b.get("memcaslap", {})
        rr = {
            "ops_per_sec": ratio(r.get("ops_per_sec"), b.get("ops_per_sec")),
            "p50_us": ratio(r.get("p50_us"), b.get("p50_us")),
            "p99_us": ratio(r.get("p99_us"), b.get("p99_us")),
            "p999_us": ratio(r.get("p999_us"), b.get("p999_us")),
            "cpu_us_per_op": ratio(r.get("cpu_us_per_op"), b.get("cpu_us_per_op")),
            "rss_mib": ratio(r.get("rss_mib"), b.get("rss_mib")),
            "memcaslap_ops_per_sec": ratio(rm.get("ops_per_sec"), bm.get("ops_per_sec")),
            "memcaslap_avg_us": ratio(rm.get("avg_us"), bm.get("avg_us")),
            "memcaslap_p99_us": ratio(rm.get("p99_us"), bm.get("p99_us")),
        }
        ratios[f"{t.name}/{base}"] = rr
        log(f"{(t.name + '/' + base)[:12]:<12}{fmt(rr['ops_per_sec'], '{:.2f}x', 10)}"
            f"{fmt(rr['p50_us'], '{:.2f}x')}{fmt(rr['p99_us'], '{:.2f}x')}{fmt(rr['p999_us'], '{:.2f}x')}"
            f"{fmt(rr['cpu_us_per_op'], '{:.2f}x', 10)}{fmt(rr['rss_mib'], '{:.2f}x')}   "
            f"{fmt(rr['memcaslap_ops_per_sec'], '{:.2f}x')}{fmt(rr['memcaslap_avg_us'], '{:.2f}x', 8)}"
            f"{fmt(rr['memcaslap_p99_us'], '{:.2f}x')}")
        goals = []
        for key, label, good in (("ops_per_sec", "throughput", lambda x: x >= 1.0),
                                 ("p99_us", "p99", lambda x: x <= 1.0),
                                 ("rss_mib", "RSS", lambda x: x <= 1.0)):
            if rr[key] is not None:
                goals.append(f"{label} {rr[key]:.2f} {'OK' if good(rr[key]) else 'MISSED'}")
        if goals:
            log(f"{'':<12}goals vs {base}: " + ", ".join(goals))
    for t in targets:
        r = summary[t.name]
        if r.get("ops_per_sec_runs"):
            runs = r["ops_per_sec_runs"]
            log(f"  {t.name}: loadgen ops/s per round {', '.join(f'{x:.0f}' for x in runs)}"
                f" (spread {100 * (max(runs) - min(runs)) / max(statistics.median(runs), 1):.0f}%),"
                f" p99 µs per round {', '.join(f'{x:.0f}' for x in r['p99_us_runs'])},"
                f" max CPU used by other processes {100 * r['other_cpu_max']:.0f}%")
    if any(summary[t.name].get("perf") for t in targets):
        log("  perf stat (one extra run each, slowed by syscall counting): per request on the server")
        for t in targets:
            pr = summary[t.name].get("perf", {})
            log(f"    {t.name:<12} CPU {fmt(pr.get('cpu_us_per_op'), '{:.2f}', 6)} µs,"
                f" syscalls {fmt(pr.get('syscalls_per_op'), '{:.2f}', 5)},"
                f" context switches {fmt(pr.get('ctx_switches_per_op'), '{:.3f}', 6)},"
                f" page faults {fmt(pr.get('page_faults_per_op'), '{:.3f}', 6)}")
    noisy = max((summary[t.name].get("other_cpu_max", 0) for t in targets), default=0)
    if noisy > 0.15:
        log(f"  NOTE: other processes used up to {noisy * 100:.0f}% of a CPU during the runs:"
            " the figures are noisy; compare ratios, or re-run on a quiet machine.")
    log("=" * len(head))
    return ratios


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kache-bin", help="kache-node binary (default: $KACHE_NODE_BIN or "
                                       "target/release/kache-node)")
    p.add_argument("--kache-style", choices=["auto", "kache", "memcached"], default="auto",
                   help="command-line style for the kache target; auto treats a binary whose "
                        "--version says 'memcached ...' as memcached (for developing this script)")
    p.add_argument("--memcached-bin", default="memcached")
    p.add_argument("--targets", default="memcached,kache",
                   help="comma-separated, the first is the baseline for ratios; NAME=PATH "
                        "adds another kache-node binary (memcached,kache,main=/tmp/kache-node.main "
                        "compares a change with main's build in the same run)")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 s runs, 1 round, 100k items")
    p.add_argument("--duration", type=float, help="seconds per measured run (default 15, quick 3)")
    p.add_argument("--warmup", type=float, help="loadgen warm-up seconds (default 2, quick 1)")
    p.add_argument("--rounds", type=int, help="alternating rounds per target (default 3, quick 1)")
    p.add_argument("--items", type=int, help="items for the memory test (default 1000000, quick 100000)")
    p.add_argument("--keys", type=int, default=100_000, help="keyspace of the throughput runs")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--client-threads", type=int, default=2)
    p.add_argument("--server-threads", type=int, default=2)
    p.add_argument("--memory-mb", type=int, default=1024)
    p.add_argument("--max-conns", type=int, default=4096)
    p.add_argument("--value-size", type=int, default=100)
    p.add_argument("--set-ratio", type=float, default=0.1)
    p.add_argument("--no-loadgen", action="store_true", help="skip bench/loadgen (memcaslap only)")
    p.add_argument("--no-memcaslap", action="store_true")
    p.add_argument("--no-throughput", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--stat", choices=["median", "best"], default="median",
                   help="how the rounds are combined (best: max ops/s, min latency)")
    p.add_argument("--perf", action="store_true",
                   help="one extra loadgen run per target under `perf stat` (syscalls, "
                        "context switches, CPU per request)")
    p.add_argument("--nice", type=int, default=-10 if os.geteuid() == 0 else 0,
                   help="scheduling priority for this script and everything it starts "
                        "(servers and clients alike; default -10 as root, so that other "
                        "jobs on the machine disturb the measurement less)")
    p.add_argument("--json-out", help="also write the final JSON to this file")
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration or (3.0 if q else 15.0)
    a.warmup = a.warmup if a.warmup is not None else (1.0 if q else 2.0)
    a.rounds = a.rounds or (1 if q else 3)
    a.items = a.items or (100_000 if q else 1_000_000)
    if a.quick and a.keys == 100_000:
        a.keys = 20_000
    return a


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--proxy" in argv:
        # The proxy benchmark (direct node vs kache proxy vs twemproxy): bench/proxy_compare.py.
        import proxy_compare
        return proxy_compare.main([a for a in argv if a != "--proxy"])
    args = parse_args(argv)
    global STAT
    STAT = args.stat
    if args.nice:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, args.nice)  # inherited by every child
        except OSError as e:
            log(f"cannot set priority {args.nice}: {e}")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workdir = tempfile.mkdtemp(prefix="kache-bench-")
    started = time.time()
    try:
        targets = make_targets(args, workdir)
        if not args.no_memcaslap and not shutil.which("memcaslap"):
            log("memcaslap not found (apt-get install libmemcached-tools): skipping it")
            args.no_memcaslap = True
        lg = build_loadgen(args)
        if lg is None and args.no_memcaslap and not args.no_throughput:
            raise BenchError("neither bench/loadgen nor memcaslap available")
        log("targets: " + "; ".join(t.describe() for t in targets))
        tp, mem = {}, {}
        if not args.no_throughput:
            log(f"== throughput/latency: {args.rounds} round(s) x {args.duration:g}s per target and tool")
            tp = throughput_phase(targets, args, lg, workdir)
        if not args.no_memory:
            log(f"== memory: {args.items} items x {args.value_size} B, -m {args.memory_mb}")
            mem = memory_phase(targets, args, lg)
        summary = summarize(targets, tp, mem, args)
        ratios = print_report(summary, targets, args)
        doc = {
            "bench": "kache-compare",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": round(time.time() - started, 1),
            "host": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
            "config": {k: getattr(args, k) for k in (
                "quick", "stat", "duration", "warmup", "rounds", "items", "keys", "conns", "client_threads",
                "server_threads", "memory_mb", "max_conns", "value_size", "set_ratio", "nice")},
            "targets": summary,
            "ratios": ratios,
            "runs": tp,
        }
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(doc, f, indent=1)
        # Last line: machine-readable (without the per-run details).
        doc.pop("runs")
        for row in doc["targets"].values():
            row.get("memory", {}).pop("verify", None)
        print(json.dumps(doc, separators=(",", ":")), flush=True)
        return 0
    except BenchError as e:
        log(f"bench error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for s in list(LIVE_SERVERS):
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
