#!/usr/bin/python3
"""Memory under realistic traffic: kache-node against memcached 1.6 in one run.

A benchmark, not a test: it prints figures with memcached beside them and exits 0 unless
something could not be measured. Run it after `cargo build --release -p kache-node`:

    python3 bench/memory.py              # full run (~10 minutes)
    python3 bench/memory.py --quick      # smoke test (~2 minutes, smaller -m and volumes)
    python3 bench/memory.py --only zipf,shift

For every target (memcached, kache) and workload a fresh server is started with the same
`-m`, loaded over one pipelined connection (`noreply` sets, a `mn` round trip every batch
so that client and server stay in step), and measured:

* peak RSS (VmHWM of /proc/PID/status) / -m, for
  (a) `uniform`: 100 B values;  (b) `mixed`: 50..1600 B;  (c) `shift`: 100 B, then 1000 B,
  then 5000 B values, new keys each phase;  (d) `ttl`: 50..1600 B, half the items with a
  1..60 s TTL, written at a steady rate for --ttl-seconds;  and `small`: 50..500 B.
  Each phase writes --volume times -m bytes of values, so every cache is full and evicting.
* items held per MiB of RSS (`curr_items` / VmRSS) after the `small`, `uniform` and `mixed`
  loads, and for kache where those bytes go per item (from its `/metrics`): records
  (header, key, value), hash table, segment room holding no linked record, the process;
* newest keys after the size shift: of the last keys written in the 5000 B phase (as many
  as fill a quarter of -m), the share still served;
* `stalled`: 400 sets of 1 MB values at -m 64, to memcached and to a kache-node whose
  replica (replicationFactor 2, a second node) is stopped with SIGSTOP: the writer's peak
  RSS must stay <= -m + 64 MiB (its replica queue is bounded by --peer-queue-bytes and the
  replica is marked down after --peer-timeout-ms);
* hit ratio on a Zipf(0.99) stream larger than memory (libcachesim generates it when
  installed, `pip install libcachesim`; otherwise a built-in generator): each request is
  a `mg`, a miss is followed by a `set` (cache-aside). The first third warms the cache; the
  rest is counted. An LRU of -m bytes simulated by libcachesim (or the built-in one) is the
  reference; kache also runs at the -m that gives it memcached's RSS ("equal RSS").

Goals (printed with OK/MISSED): peak RSS <= 1.10 x -m + 16 MiB in every workload; items per
MiB >= 1.3x memcached for 50..500 B and >= 1.0x for mixed sizes; Zipf hit ratio at equal RSS
>= memcached's; newest keys still hit after the shift. The last line is one JSON object.
Only loopback addresses are used; every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402  (shared helpers: targets, /proc readers, stats)
from compare import HOST, BenchError, log  # noqa: E402

MIB = 1024 * 1024
WORKLOADS = ("uniform", "small", "mixed", "shift", "ttl", "zipf", "stalled")


class Conn:
    """One pipelined memcached connection."""

    def __init__(self, port: int, timeout: float = 60.0):
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.errors = 0

    def close(self) -> None:
        self.sock.close()

    def round_trip(self, payload: bytes) -> bytes:
        """Sends `payload` then `mn`, returns everything the server answered before `MN`."""
        self.sock.sendall(payload + b"mn\r\n")
        buf = bytearray()
        while not buf.endswith(b"MN\r\n"):
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise BenchError("server closed the connection")
            buf += chunk
        return bytes(buf[:-4])

    def sets(self, items, batch_bytes: int = 1 << 20) -> None:
        """`items`: iterable of (key bytes, value bytes, exptime)."""
        parts: list[bytes] = []
        size = 0
        for key, value, exptime in items:
            parts.append(b"set %s 0 %d %d noreply\r\n" % (key, exptime, len(value)))
            parts.append(value)
            parts.append(b"\r\n")
            size += len(value) + 40
            if size >= batch_bytes:
                self._flush_sets(parts)
                parts, size = [], 0
        if parts:
            self._flush_sets(parts)

    def _flush_sets(self, parts: list[bytes]) -> None:
        reply = self.round_trip(b"".join(parts))
        if reply:
            self.errors += reply.count(b"\r\n")

    def hits(self, keys: list[bytes]) -> list[bool]:
        """`mg` of each key (counts as an access, like `get`); True for a hit."""
        reply = self.round_trip(b"".join(b"mg %s\r\n" % k for k in keys))
        lines = reply.split(b"\r\n")[:-1]
        if len(lines) != len(keys):
            raise BenchError(f"expected {len(keys)} mg replies, got {len(lines)}: {reply[:200]!r}")
        return [line == b"HD" for line in lines]


class Values:
    """Value bytes by size, made once."""

    def __init__(self):
        self.cache: dict[int, bytes] = {}

    def __call__(self, size: int) -> bytes:
        v = self.cache.get(size)
        if v is None:
            v = self.cache[size] = (b"0123456789abcdef" * (size // 16 + 1))[:size]
        return v


VALUES = Values()


def sized_stream(prefix: str, sizes, volume_bytes: int, ttl=None):
    """Keys prefix:N with sizes from `sizes()` until `volume_bytes` of values are written."""
    written, i = 0, 0
    while written < volume_bytes:
        size = sizes()
        exptime = ttl() if ttl else 0
        yield b"%s:%d" % (prefix.encode(), i), VALUES(size), exptime
        written += size
        i += 1


class Sampler:
    """Reads a server's memory and stats."""

    def __init__(self, server):
        self.server = server

    def status(self) -> dict:
        st = compare.proc_status(self.server.pid)
        return {"rss_mib": round(st.get("VmRSS", 0) / 1024, 1),
                "peak_rss_mib": round(st.get("VmHWM", 0) / 1024, 1)}

    def stats(self) -> dict:
        s = compare.mc_stats(self.server.port)
        return {k: int(s[k]) for k in ("curr_items", "bytes", "evictions", "limit_maxbytes")
                if k in s}


def fill_workload(server, name: str, args) -> dict:
    rng = random.Random(42)
    m = args.memory_mb * MIB
    volume = int(args.volume * m)
    conn = Conn(server.port)
    out: dict = {}
    try:
        if name == "uniform":
            conn.sets(sized_stream("u", lambda: 100, volume))
        elif name == "small":
            conn.sets(sized_stream("s", lambda: rng.randint(50, 500), volume))
        elif name == "mixed":
            conn.sets(sized_stream("m", lambda: rng.randint(50, 1600), volume))
        elif name == "shift":
            for phase, size in enumerate((100, 1000, 5000)):
                conn.sets(sized_stream(f"p{phase}", lambda s=size: s, volume))
            last = volume // 5000
            newest = max(1, (m // 4) // 5000)
            keys = [b"p2:%d" % i for i in range(last - newest, last)]
            hit = sum(sum(conn.hits(keys[i:i + 500])) for i in range(0, len(keys), 500))
            out["newest_keys"] = newest
            out["newest_hit_ratio"] = round(hit / len(keys), 4)
        elif name == "ttl":
            seconds = args.ttl_seconds
            per_sec = int(args.volume * 1.5 * m / seconds)
            start = time.monotonic()
            i = 0
            while time.monotonic() - start < seconds:
                tick = time.monotonic()
                batch = []
                written = 0
                while written < per_sec // 10:
                    size = rng.randint(50, 1600)
                    ttl = rng.randint(1, 60) if rng.random() < 0.5 else 0
                    batch.append((b"t:%d" % i, VALUES(size), ttl))
                    written += size
                    i += 1
                conn.sets(batch)
                time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
        out["errors"] = conn.errors
    finally:
        conn.close()
    return out


def zipf_trace(args) -> tuple[list[int], str]:
    n_req, n_obj = args.zipf_requests, args.zipf_objects
    try:
        import libcachesim as lcs  # noqa: F401

        reader = lcs.SyntheticReader(num_of_req=n_req, obj_size=args.zipf_value, alpha=0.99,
                                     dist="zipf", num_objects=n_obj, seed=7)
        return [req.obj_id for req in reader], "libcachesim"
    except ImportError:
        rng = random.Random(7)
        weights = [1.0 / (i + 1) ** 0.99 for i in range(n_obj)]
        cum, acc = [], 0.0
        for w in weights:
            acc += w
            cum.append(acc)
        perm = list(range(n_obj))
        rng.shuffle(perm)
        return [perm[bisect.bisect_left(cum, rng.random() * acc)] for _ in range(n_req)], "built-in"


def lru_reference(trace: list[int], cache_bytes: int, value: int, warm: int) -> float:
    """Hit ratio of an exact LRU holding cache_bytes of values, after `warm` requests."""
    capacity = max(1, cache_bytes // value)
    lru: OrderedDict = OrderedDict()
    hits = 0
    for i, obj in enumerate(trace):
        if obj in lru:
            lru.move_to_end(obj)
            if i >= warm:
                hits += 1
        else:
            lru[obj] = True
            if len(lru) > capacity:
                lru.popitem(last=False)
    return hits / max(1, len(trace) - warm)


def zipf_workload(server, trace: list[int], args) -> dict:
    value = VALUES(args.zipf_value)
    warm = len(trace) // 3
    conn = Conn(server.port)
    hits = counted = 0
    try:
        batch = 200
        for lo in range(0, len(trace), batch):
            ids = trace[lo:lo + batch]
            keys = [b"z:%d" % k for k in ids]
            got = conn.hits(keys)
            if lo >= warm:
                hits += sum(got)
                counted += len(got)
            misses = list(dict.fromkeys(k for k, h in zip(keys, got) if not h))
            if misses:
                conn.sets((k, value, 0) for k in misses)
    finally:
        conn.close()
    return {"hit_ratio": round(hits / max(1, counted), 4), "requests": len(trace),
            "counted": counted}


STALLED_SETS, STALLED_VALUE, STALLED_M = 400, 1_000_000, 64


def stalled_sets(port: int) -> None:
    value = b"v" * STALLED_VALUE
    with socket.create_connection((HOST, port), timeout=60) as s:
        f = s.makefile("rb")
        for i in range(STALLED_SETS):
            s.sendall(b"set big%d 0 0 %d\r\n%s\r\n" % (i, STALLED_VALUE, value))
            if f.readline() != b"STORED\r\n":
                raise BenchError("a 1 MB set was not stored")


def stalled_kache(args, workdir: str) -> dict:
    """A writer (-m 64) and its replica, the replica stopped while the writer takes the sets."""
    import subprocess

    binary = compare.resolve_kache_bin(args)
    members = os.path.join(workdir, "members.json")
    nodes = []
    for name in ("writer", "replica"):
        nodes.append({"name": name, "host": HOST, "ip": HOST, "port": compare.free_port(),
                      "peerPort": compare.free_port()})
    with open(members, "w") as f:
        json.dump({"version": 1, "replicationFactor": 2, "members": nodes}, f)
    procs = []
    try:
        for node, m in zip(nodes, (STALLED_M, 256)):
            log_path = os.path.join(workdir, f"stalled-{node['name']}.log")
            procs.append(subprocess.Popen(
                [binary, "-t", "2", "-m", str(m), "-l", HOST, "-p", str(node["port"]),
                 "--admin-port", "0", "--peer-port", str(node["peerPort"]),
                 "--members-file", members, "--node-name", node["name"]] + list(args.kache_arg),
                stdout=subprocess.DEVNULL, stderr=open(log_path, "w"), start_new_session=True))
        for node in nodes:
            deadline = time.monotonic() + 15
            while True:
                try:
                    socket.create_connection((HOST, node["port"]), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise BenchError(f"{node['name']} did not start")
                    time.sleep(0.05)
        writer, replica = procs
        replica.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        stalled_sets(nodes[0]["port"])
        seconds = time.monotonic() - t0
        st = compare.proc_status(writer.pid)
        replica.send_signal(signal.SIGCONT)
        return {"peak_rss_mib": round(st.get("VmHWM", 0) / 1024, 1),
                "rss_mib": round(st.get("VmRSS", 0) / 1024, 1), "seconds": round(seconds, 1)}
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def run_stalled(args, workdir: str) -> dict:
    mc = make_target("memcached", args, STALLED_M, workdir)
    server = mc.start()
    try:
        t0 = time.monotonic()
        stalled_sets(server.port)
        st = Sampler(server).status()
        mc_row = {**st, "seconds": round(time.monotonic() - t0, 1)}
    finally:
        server.stop()
    return {"memcached": mc_row, "kache": stalled_kache(args, workdir)}


def run_one(target, name: str, args, trace=None) -> dict:
    server = target.start()
    try:
        sampler = Sampler(server)
        idle = sampler.status()
        t0 = time.monotonic()
        if name == "zipf":
            r = zipf_workload(server, trace, args)
        else:
            r = fill_workload(server, name, args)
        r["seconds"] = round(time.monotonic() - t0, 1)
        time.sleep(0.3)
        st = sampler.status()
        stats = sampler.stats()
        r.update(st)
        r.update(stats)
        r["idle_rss_mib"] = idle["rss_mib"]
        r["memory_mb"] = target.args.memory_mb
        r["peak_over_m"] = round(st["peak_rss_mib"] / target.args.memory_mb, 3)
        if stats.get("curr_items") and st["rss_mib"]:
            r["items_per_mib"] = round(stats["curr_items"] / st["rss_mib"], 1)
            breakdown = bytes_per_item(server, stats, st)
            if breakdown:
                r["bytes_per_item"] = breakdown
        if not server.alive():
            raise BenchError(f"{target.name} died during {name}; log:\n{server.log_tail()}")
        return r
    finally:
        server.stop()


def kache_metrics(server) -> dict:
    """kache-node's /metrics (store gauges), {} for memcached or without an admin port."""
    argv = list(server.procs[0].args)
    if "--admin-port" not in argv:
        return {}
    port = argv[argv.index("--admin-port") + 1]
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("kache_store_"):
            name, _, value = line.partition(" ")
            out[name[len("kache_store_"):]] = float(value)
    return out


def bytes_per_item(server, stats: dict, status: dict) -> dict | None:
    """Where kache's resident bytes go, per item held: records (header, key, value), hash
    table, segment room not holding a linked record (open segments' free tails, dead
    records, free segments) and the rest of the process (code, runtime, buffers)."""
    m = kache_metrics(server)
    items = stats.get("curr_items")
    if not m or not items:
        return None
    seg = m["segment_bytes"] * (m["segments_in_use"] + m["segments_free"])
    rss = status["rss_mib"] * MIB
    return {"record": round(stats["bytes"] / items, 1),
            "table": round(m["index_bytes"] / items, 1),
            "segment_room": round((seg - stats["bytes"]) / items, 1),
            "process": round((rss - seg - m["index_bytes"]) / items, 1),
            "total": round(rss / items, 1)}


def ratio(a, b):
    return None if a is None or not b else round(a / b, 3)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kache-bin")
    p.add_argument("--memcached-bin", default="memcached")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--memory-mb", type=int, help="-m for the fill workloads (default 256, quick 64)")
    p.add_argument("--volume", type=float, default=2.0, help="bytes written per phase, in -m")
    p.add_argument("--ttl-seconds", type=float, help="duration of the ttl workload (default 60, quick 15)")
    p.add_argument("--zipf-memory-mb", type=int, help="-m for the Zipf run (default 64, quick 32)")
    p.add_argument("--zipf-objects", type=int, help="distinct keys (default 1000000, quick 400000)")
    p.add_argument("--zipf-requests", type=int, help="requests (default 3000000, quick 1200000)")
    p.add_argument("--zipf-value", type=int, default=200)
    p.add_argument("--server-threads", type=int, default=2)
    p.add_argument("--kache-arg", action="append", default=[],
                   help="extra kache-node argument (repeatable)")
    p.add_argument("--json-out")
    a = p.parse_args(argv)
    q = a.quick
    a.memory_mb = a.memory_mb or (64 if q else 256)
    a.ttl_seconds = a.ttl_seconds or (15.0 if q else 60.0)
    a.zipf_memory_mb = a.zipf_memory_mb or (32 if q else 64)
    a.zipf_objects = a.zipf_objects or (400_000 if q else 1_000_000)
    a.zipf_requests = a.zipf_requests or (1_200_000 if q else 3_000_000)
    a.max_conns = 1024
    a.workloads = [w.strip() for w in a.only.split(",")] if a.only else list(WORKLOADS)
    return a


def make_target(kind: str, args, memory_mb: int, workdir: str):
    ns = argparse.Namespace(**vars(args))
    ns.memory_mb = memory_mb
    if kind == "memcached":
        binary = shutil.which(args.memcached_bin)
        if not binary:
            raise BenchError("memcached not found; apt-get install memcached")
        return compare.MemcachedTarget("memcached", binary, ns, workdir)
    binary = compare.resolve_kache_bin(args)

    class Kache(compare.KacheTarget):
        def argv(self, port):
            return super().argv(port) + list(args.kache_arg)

    return Kache("kache", binary, ns, workdir)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    workdir = tempfile.mkdtemp(prefix="kache-membench-")
    results: dict = {}
    goals: list[tuple[str, bool, str]] = []
    try:
        for name in args.workloads:
            if name not in WORKLOADS:
                raise BenchError(f"unknown workload {name}")
            if name == "stalled":
                row = results[name] = run_stalled(args, workdir)
                for kind in ("memcached", "kache"):
                    r = row[kind]
                    log(f"  stalled  {kind:10s} -m {STALLED_M}: {STALLED_SETS} x 1 MB sets"
                        + (" with the replica stopped" if kind == "kache" else "")
                        + f": peak RSS {r['peak_rss_mib']} MiB [{r['seconds']}s]")
                continue
            row = results[name] = {}
            trace = None
            m = args.zipf_memory_mb if name == "zipf" else args.memory_mb
            if name == "zipf":
                t0 = time.monotonic()
                trace, source = zipf_trace(args)
                warm = len(trace) // 3
                row["trace"] = {"source": source, "objects": args.zipf_objects,
                                "requests": len(trace), "value": args.zipf_value}
                row["lru_reference"] = round(lru_reference(trace, m * MIB, args.zipf_value, warm), 4)
                log(f"== zipf: {len(trace)} requests over {args.zipf_objects} keys ({source}, "
                    f"{time.monotonic() - t0:.0f}s); LRU of {m} MiB of values: "
                    f"hit ratio {row['lru_reference']:.4f}")
            for kind in ("memcached", "kache"):
                r = run_one(make_target(kind, args, m, workdir), name, args, trace)
                row[kind] = r
                log(f"  {name:8s} {kind:10s} -m {m}: peak RSS {r['peak_rss_mib']} MiB "
                    f"({r['peak_over_m']:.2f}x -m), RSS {r['rss_mib']} MiB, items {r.get('curr_items')}, "
                    f"items/MiB {r.get('items_per_mib')}, evictions {r.get('evictions')}"
                    + (f", hit ratio {r['hit_ratio']:.4f}" if "hit_ratio" in r else "")
                    + (f", newest keys hit {r['newest_hit_ratio']:.4f}" if "newest_hit_ratio" in r else "")
                    + f" [{r['seconds']}s]")
                if "bytes_per_item" in r:
                    b = r["bytes_per_item"]
                    log(f"  {'':8s} {'':10s} bytes of RSS per item: {b['total']} = record {b['record']}"
                        f" + table {b['table']} + unused segment room {b['segment_room']}"
                        f" + process {b['process']}")
            if name == "zipf":
                mc = row["memcached"]
                kache_fixed = row["kache"]["idle_rss_mib"]
                m_eq = max(8, int(mc["peak_rss_mib"] - kache_fixed))
                r = run_one(make_target("kache", args, m_eq, workdir), name, args, trace)
                row["kache_equal_rss"] = r
                log(f"  {name:8s} kache@eq   -m {m_eq}: peak RSS {r['peak_rss_mib']} MiB "
                    f"(memcached {mc['peak_rss_mib']}), hit ratio {r['hit_ratio']:.4f} "
                    f"(memcached {mc['hit_ratio']:.4f}, LRU {row['lru_reference']:.4f})")
        # ------------------------------------------------------------- report
        log()
        log("=" * 100)
        log(f"memory benchmark: -m {args.memory_mb} (zipf -m {args.zipf_memory_mb}), "
            f"{args.volume:g} x -m of values per phase; memcached {compare.run([shutil.which(args.memcached_bin), '-V'], 5).stdout.strip()}")
        log(f"{'workload':<10}{'':<16}{'peak RSS/-m':>12}{'peak MiB':>10}{'RSS MiB':>9}{'items':>10}"
            f"{'items/MiB':>11}{'hit ratio':>11}")
        for name, row in results.items():
            if name == "stalled":
                k, mc = row["kache"], row["memcached"]
                log(f"{'stalled':<10}{'memcached':<16}{mc['peak_rss_mib'] / STALLED_M:>12.2f}{mc['peak_rss_mib']:>10.1f}")
                log(f"{'stalled':<10}{'kache':<16}{k['peak_rss_mib'] / STALLED_M:>12.2f}{k['peak_rss_mib']:>10.1f}")
                goals.append((f"stalled replica: kache writer peak RSS {k['peak_rss_mib']} MiB <= -m + 64 = "
                              f"{STALLED_M + 64} (memcached, no replica: {mc['peak_rss_mib']})",
                              k["peak_rss_mib"] <= STALLED_M + 64, ""))
                continue
            for kind in ("memcached", "kache", "kache_equal_rss"):
                r = row.get(kind)
                if not r:
                    continue
                hr = r.get("hit_ratio", r.get("newest_hit_ratio"))
                log(f"{name:<10}{kind:<16}{r['peak_over_m']:>12.2f}{r['peak_rss_mib']:>10.1f}"
                    f"{r['rss_mib']:>9.1f}{r.get('curr_items') or 0:>10}"
                    f"{r.get('items_per_mib') or 0:>11.1f}{'' if hr is None else f'{hr:.4f}':>11}")
            k, mc = row.get("kache"), row.get("memcached")
            if k:
                bound = 1.10 * k["memory_mb"] + 16
                goals.append((f"{name}: kache peak RSS {k['peak_rss_mib']} MiB <= 1.10 x -m + 16 = {bound:.0f} "
                              f"(memcached {mc['peak_rss_mib']})", k["peak_rss_mib"] <= bound, ""))
            if name in ("small", "mixed", "uniform") and k and mc:
                want = {"small": 1.3, "uniform": 1.3, "mixed": 1.0}[name]
                rr = ratio(k.get("items_per_mib"), mc.get("items_per_mib"))
                row["items_per_mib_ratio"] = rr
                goals.append((f"{name}: items/MiB {rr}x memcached (>= {want}x)",
                              rr is not None and rr >= want, ""))
            if name == "shift" and k and mc:
                goals.append((f"shift: newest keys hit {k['newest_hit_ratio']:.2%} "
                              f"(memcached {mc['newest_hit_ratio']:.2%})",
                              k["newest_hit_ratio"] >= max(0.9, mc["newest_hit_ratio"]), ""))
            if name == "zipf" and row.get("kache_equal_rss") and mc:
                e = row["kache_equal_rss"]
                goals.append((f"zipf: hit ratio at equal RSS {e['hit_ratio']:.4f} vs memcached "
                              f"{mc['hit_ratio']:.4f} (same -m: {k['hit_ratio']:.4f}; LRU {row['lru_reference']:.4f})",
                              e["hit_ratio"] >= mc["hit_ratio"], ""))
        log("-" * 100)
        for text, ok, _ in goals:
            log(f"  {'OK    ' if ok else 'MISSED'} {text}")
        log("=" * 100)
        doc = {"bench": "kache-memory", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "config": {k: getattr(args, k) for k in ("quick", "memory_mb", "volume", "ttl_seconds",
                                                        "zipf_memory_mb", "zipf_objects",
                                                        "zipf_requests", "zipf_value", "kache_arg")},
               "results": results, "goals": [{"goal": t, "ok": ok} for t, ok, _ in goals]}
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(doc, f, indent=1)
        print(json.dumps(doc, separators=(",", ":")), flush=True)
        return 0
    except BenchError as e:
        log(f"bench error: {e}")
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for s in list(compare.LIVE_SERVERS):
            s.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
