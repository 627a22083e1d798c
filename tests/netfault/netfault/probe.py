"""Small requests run inside a namespace of the fault network (the test process itself
lives outside it): wait for ports, send one raw memcached request, read a /metrics counter.

  probe.py wait IP:PORT [IP:PORT ...]     until each accepts connections (10 s at most)
  probe.py send IP:PORT 'raw request'     prints the reply (up to END / one line)
  probe.py metric IP:PORT NAME            prints the counter's value (0 when absent)
  probe.py items IP:PORT KEY              prints the node's own copy (GET /cluster/items)
"""
import json
import socket
import sys
import time
import urllib.request


def address(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def wait(targets, timeout=10.0):
    deadline = time.monotonic() + timeout
    for target in targets:
        while True:
            try:
                socket.create_connection(address(target), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    print(f"{target} did not open", file=sys.stderr)
                    return 1
                time.sleep(0.05)
    return 0


def send(target, request):
    data = request.encode().decode("unicode_escape").encode()
    with socket.create_connection(address(target), timeout=5) as s:
        s.sendall(data)
        reply = b""
        ends = (b"END\r\n", b"STORED\r\n", b"DELETED\r\n", b"NOT_FOUND\r\n", b"ERROR\r\n")
        while not reply.endswith(ends) and not (reply.startswith(b"SERVER_ERROR")
                                                and reply.endswith(b"\r\n")):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    sys.stdout.write(reply.decode(errors="replace"))
    return 0


def metric(target, name):
    with urllib.request.urlopen(f"http://{target}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"kache_{name}_total ") or line.startswith(f"kache_{name} "):
                print(line.split()[1])
                return 0
    print(0)
    return 0


def items(target, key):
    with urllib.request.urlopen(f"http://{target}/cluster/items?key={key}", timeout=5) as r:
        print(json.dumps(json.loads(r.read())["items"][0]))
    return 0


def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "wait":
        return wait(args)
    if command == "send":
        return send(args[0], args[1])
    if command == "metric":
        return metric(args[0], args[1])
    if command == "items":
        return items(args[0], args[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
