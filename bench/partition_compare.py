#!/usr/bin/python3
"""Fault benchmark: kache's replication against memcached-style client-side failover, under
the same network faults, judged by the same checker.

One invocation runs, on this machine, the fault run of `tests/netfault` (3 nodes, 4
clients for 60 s, one fault of each kind drawn from a seed: one node isolated, a 2|1
split, a one-way partition, 50-200 ms delay with 5% loss, kill -9 and restart, SIGSTOP and
SIGCONT) against:

  kache all  kache nodes (R = 2, --write-acks all) behind `kache-node proxy`
  kache one  the same with --write-acks one (the default)
  ketama     plain memcached nodes; each client a pylibmc (libmemcached) ketama client that
             ejects a failing node and fails over to the next one (no server replication)

and prints, side by side, what the checker found: operations, writes acknowledged and of
unknown outcome, failed reads, acknowledged writes lost, stale reads, and for kache how long
the replicas took to agree after the last heal; then each system's table per fault.

    /usr/bin/python3 bench/partition_compare.py              # full run (~4 min)
    /usr/bin/python3 bench/partition_compare.py --seed 7     # replay a schedule
    /usr/bin/python3 bench/partition_compare.py --quick      # 20 s per system

Runs as root (it creates network namespaces: see tests/netfault/netfault/net.py; every
address lives inside them and everything is removed at the end, also on errors).
"""
import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "netfault"))

from netfault import scenario  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="20 s per system")
    parser.add_argument("--kache-bin", default=os.environ.get(
        "KACHE_NODE_BIN", os.path.join(ROOT, "target", "release", "kache-node")))
    parser.add_argument("--logs", help="directory to keep every process's log in")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    duration = 20.0 if args.quick else args.duration
    systems = [scenario.Kache(args.kache_bin, write_acks="all"),
               scenario.Kache(args.kache_bin, write_acks="one"),
               scenario.Ketama()]
    print(f"seed {seed}, {duration:g} s per system; replay with: "
          f"/usr/bin/python3 bench/partition_compare.py --seed {seed}", flush=True)
    for fault in scenario.schedule(seed, duration):
        print(f"  {fault.start:5.1f}-{fault.end:5.1f} s  {fault.describe()}")
    results = []
    for system in systems:
        started = time.monotonic()
        results.append(scenario.run(system, seed, duration=duration, keep_logs=args.logs))
        print(f"{system.label}: done in {time.monotonic() - started:.0f} s", flush=True)
    print()
    header = (f"{'system':36} {'ops':>6} {'acked':>6} {'unknown':>7} {'reads failed':>12} "
              f"{'lost':>5} {'stale':>6} {'settled':>8}")
    print(header)
    for result in results:
        _, total = result.table()
        settled = ("-" if not result.replicas_known() else
                   "never" if result.settled_after is None else f"{result.settled_after:.1f} s")
        failed = f"{total.failed_reads}/{total.reads}"
        print(f"{result.system:36} {total.ops:>6} {total.acked_writes:>6} "
              f"{total.unknown_writes:>7} {failed:>12} {total.lost:>5} "
              f"{total.stale_reads:>6} {settled:>8}")
    for result in results:
        print()
        print(scenario.format_table(result, examples=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
