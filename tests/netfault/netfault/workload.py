"""One client of a fault run: random reads, writes and deletes, each recorded with its
invocation and completion time and its result.

Two kinds of keys: a small space of hot keys (`key-NNN`) that every client reads, writes
and deletes, where stale reads show; and keys each written once (`once-C-N`) and read back
later by the same client, where lost writes show (a hot key is overwritten so often that
losing one of its writes is soon hidden).

Run inside a client's network namespace; writes one JSON object per operation to `--out`:
  {"client", "f": "read"|"write"|"delete", "k", "v", "t0", "t1", "r": "ok"|"fail"|"info"}
- a write's `v` is the unique value it wrote; a read's `v` the value it got (null: a miss);
- `r`: "ok" (acknowledged: STORED, a hit or a miss, DELETED or NOT_FOUND), "fail" (a read
  that got an error: it says nothing), "info" (a write or delete that got an error or no
  answer: it may or may not have taken effect, now or later).
Times are CLOCK_MONOTONIC seconds, the same clock in every namespace of the machine.
"""
import argparse
import json
import random
import sys
import time


def kache_client(servers, timeout):
    from pymemcache.client.base import Client

    host, port = servers[0].rsplit(":", 1)
    client = Client((host, int(port)), connect_timeout=timeout, timeout=timeout,
                    default_noreply=False)
    return Ops(read=client.get, write=lambda k, v: client.set(k, v, noreply=False),
               delete=lambda k: client.delete(k, noreply=False), reset=client.close)


def ketama_client(servers, timeout):
    """memcached-style client-side failover: libmemcached's ketama over plain memcached
    nodes, a failing node ejected from the continuum (its keys move to the next node) and
    retried after a while."""
    import pylibmc

    ms = int(timeout * 1000)
    client = pylibmc.Client(servers, behaviors={
        "ketama_weighted": True, "remove_failed": 1, "retry_timeout": 2, "dead_timeout": 2,
        "connect_timeout": ms, "send_timeout": ms * 1000, "receive_timeout": ms * 1000})
    return Ops(read=client.get, write=client.set, delete=client.delete, reset=lambda: None)


class Ops:
    def __init__(self, read, write, delete, reset):
        self.read, self.write, self.delete, self.reset = read, write, delete, reset


def as_text(value):
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=["kache", "ketama"], required=True)
    parser.add_argument("--servers", required=True, help="comma-separated host:port")
    parser.add_argument("--client", type=int, required=True)
    parser.add_argument("--keys", type=int, default=40)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True, help="monotonic time")
    parser.add_argument("--stop-at", type=float, required=True, help="monotonic time")
    parser.add_argument("--think-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed * 1000 + args.client)
    make = kache_client if args.kind == "kache" else ketama_client
    ops = make(args.servers.split(","), args.timeout)
    keys = [f"key-{i:03d}" for i in range(args.keys)]
    written = 0
    once_written = []  # one-shot keys this client wrote and had acknowledged
    while time.monotonic() < args.start_at:
        time.sleep(0.005)
    with open(args.out, "w") as out:
        while time.monotonic() < args.stop_at:
            key = rng.choice(keys)
            roll = rng.random()
            f = ("read" if roll < 0.45 else "write" if roll < 0.75 else
                 "delete" if roll < 0.80 else "write-once" if roll < 0.92 else "read-once")
            if f == "read-once":
                f = "read"
                if once_written:
                    key = rng.choice(once_written)
            value = None
            if f in ("write", "write-once"):
                written += 1
                value = f"c{args.client}-{written}"
                if f == "write-once":
                    f = "write"
                    key = f"once-{args.client}-{written}"
            t0 = time.monotonic()
            try:
                if f == "read":
                    value = as_text(ops.read(key))
                elif f == "write":
                    if not ops.write(key, value):
                        raise RuntimeError("not stored")
                else:
                    ops.delete(key)
                result = "ok"
                if key.startswith("once-") and f == "write":
                    once_written.append(key)
            except Exception:  # any failure: the outcome is unknown
                result = "fail" if f == "read" else "info"
                ops.reset()
            t1 = time.monotonic()
            out.write(json.dumps({"client": args.client, "f": f, "k": key, "v": value,
                                  "t0": t0, "t1": t1, "r": result}) + "\n")
            time.sleep(rng.uniform(0, 2 * args.think_ms) / 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
