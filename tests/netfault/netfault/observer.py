"""Reads every key from every one of its owners directly, from a namespace of its own.

`poll` mode: every `--interval` seconds asks each node's admin endpoint
(`GET /cluster/items?key=...`, the node's own copy: no read-through from peers, which would
repair what it measures) what it holds for every key, and writes one JSON line per round:
  {"t": monotonic time, "nodes": {node: {key: [version, value] or null} or null}}
(null for a key: absent or deleted; null for a node: unreachable this round). Runs until
`--until`; with `--settle-from T`, stops earlier at the first round after T in which every
key's owners all answered and agree.

`final` mode: reads every key of `--keys-file` from each node over the memcached protocol
(`gets`) and prints {"nodes": {node: {key: [cas, value] or null}}, "owners": {key: [...]}}
once (with `--through-ketama`, as a ketama client sees them: {"client": {...}}).
"""
import argparse
import concurrent.futures
import http.client
import json
import sys
import time
import urllib.parse


def fetch_items(ip, port, keys, timeout):
    query = "&".join("key=" + urllib.parse.quote(k) for k in keys)
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        conn.request("GET", f"/cluster/items?{query}")
        body = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    state = {}
    for item in body["items"]:
        held = item["found"] and not item["deleted"]
        state[item["key"]] = [item["version"], item["value"]] if held else None
    return state


def owners_of(ip, port, keys, timeout):
    owners = {}
    for key in keys:
        conn = http.client.HTTPConnection(ip, port, timeout=timeout)
        try:
            conn.request("GET", f"/cluster/owners?key={urllib.parse.quote(key)}")
            owners[key] = json.loads(conn.getresponse().read())["owners"]
        finally:
            conn.close()
    return owners


def agree(nodes, owners):
    """Whether every key's owners answered and hold the same thing."""
    for key, names in owners.items():
        states = [nodes.get(n) for n in names]
        if any(s is None for s in states):
            return False
        if any(s[key] != states[0][key] for s in states[1:]):
            return False
    return True


def poll(args, nodes, keys):
    owners = None
    pool = concurrent.futures.ThreadPoolExecutor(len(nodes))
    with open(args.out, "w") as out:
        while time.monotonic() < args.until:
            started = time.monotonic()
            if owners is None:
                for ip in nodes.values():
                    try:
                        owners = owners_of(ip, args.admin_port, keys, args.timeout)
                        out.write(json.dumps({"owners": owners}) + "\n")
                        break
                    except OSError:
                        continue

            def one(ip):
                try:
                    return fetch_items(ip, args.admin_port, keys, args.timeout)
                except (OSError, ValueError, KeyError):
                    return None

            states = dict(zip(nodes, pool.map(one, nodes.values())))
            t = time.monotonic()
            out.write(json.dumps({"t": t, "nodes": states}) + "\n")
            out.flush()
            if (args.settle_from is not None and t >= args.settle_from and owners
                    and agree(states, owners)):
                break
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    return 0


def final(args, nodes, keys):
    if args.through_ketama:
        return final_through_ketama(args, nodes, keys)
    from pymemcache.client.base import Client

    result = {}
    for name, ip in nodes.items():
        client = Client((ip, args.port), connect_timeout=args.timeout, timeout=args.timeout)
        held = {}
        for at in range(0, len(keys), 100):
            got = client.gets_many(keys[at:at + 100])
            held.update({k: [int(cas), value.decode()] for k, (value, cas) in got.items()})
        result[name] = {k: held.get(k) for k in keys}
        client.close()
    owners = owners_of(next(iter(nodes.values())), args.admin_port, keys, args.timeout)
    print(json.dumps({"nodes": result, "owners": owners}))
    return 0


def final_through_ketama(args, nodes, keys):
    """What a ketama client (as the baseline's clients) reads for every key."""
    import pylibmc

    client = pylibmc.Client([f"{ip}:{args.port}" for ip in nodes.values()],
                            behaviors={"ketama_weighted": True})
    got = client.get_multi(keys)
    text = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in got.items()}
    print(json.dumps({"client": {k: [0, text[k]] if k in text else None for k in keys}}))
    return 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["poll", "final"])
    parser.add_argument("--nodes", required=True, help="comma-separated name=ip")
    parser.add_argument("--keys", type=int, required=True, help="hot keys key-000...")
    parser.add_argument("--keys-file", help="the keys to read, one a line (final mode)")
    parser.add_argument("--admin-port", type=int, default=11280)
    parser.add_argument("--port", type=int, default=11211)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--timeout", type=float, default=0.5)
    parser.add_argument("--until", type=float, help="monotonic time to stop polling")
    parser.add_argument("--settle-from", type=float)
    parser.add_argument("--out")
    parser.add_argument("--through-ketama", action="store_true",
                        help="final: read through a ketama client instead of each node")
    args = parser.parse_args()
    nodes = dict(pair.split("=") for pair in args.nodes.split(","))
    keys = [f"key-{i:03d}" for i in range(args.keys)]
    if args.keys_file:
        with open(args.keys_file) as f:
            keys = [line.strip() for line in f if line.strip()]
    return poll(args, nodes, keys) if args.mode == "poll" else final(args, nodes, keys)


if __name__ == "__main__":
    sys.exit(main())
