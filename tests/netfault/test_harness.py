"""The fault harness itself: faults do what they say, and nothing it made outlives it."""
import os
import subprocess
import sys
import time

import pytest

from netfault import net as netmod
from netfault.net import Net

UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9000)); s.settimeout(1.0)
n = 0
try:
    while True:
        s.recv(100); n += 1
except socket.timeout:
    print(n)
"""

UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(int(sys.argv[2])):
    s.sendto(b"x", (sys.argv[1], 9000)); time.sleep(0.001)
"""

TCP_ECHO = """
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 9001)); s.listen()
while True:
    c, _ = s.accept()
    while (d := c.recv(100)):
        c.sendall(d)
    c.close()
"""

RTT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 9001), timeout=5)
best = 1e9
for _ in range(5):
    t = time.monotonic(); c.sendall(b"x"); c.recv(10); best = min(best, time.monotonic() - t)
print(best)
"""


def udp_delivered(net, src, dst, count=50):
    """How many of `count` datagrams from `src` reach `dst`."""
    sink = subprocess.Popen(["ip", "netns", "exec", net.ns(dst), sys.executable, "-c",
                             UDP_SINK], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)  # the sink binds before anything is sent
    net.run(src, [sys.executable, "-c", UDP_SEND, net.ips[dst], str(count)])
    out, _ = sink.communicate(timeout=30)
    return int(out)


def test_partitions_drop_exactly_what_they_name():
    with Net(["a", "b", "c"]) as net:
        assert udp_delivered(net, "a", "b") == 50
        net.block("a", "b")
        assert udp_delivered(net, "a", "b") == 0
        assert udp_delivered(net, "b", "a") == 50  # one way only
        assert udp_delivered(net, "a", "c") == 50
        net.heal()
        net.isolate("c")
        assert udp_delivered(net, "a", "c") == 0
        assert udp_delivered(net, "c", "b") == 0
        assert udp_delivered(net, "a", "b") == 50
        net.heal()
        net.partition(["a"], ["b", "c"])
        assert (udp_delivered(net, "b", "a"), udp_delivered(net, "a", "c")) == (0, 0)
        assert udp_delivered(net, "b", "c") == 50
        net.heal()
        assert udp_delivered(net, "c", "a") == 50


def test_delay_and_loss_shape_outgoing_packets():
    with Net(["a", "b"]) as net:
        net.spawn("b", [sys.executable, "-c", TCP_ECHO])
        net.run("a", [sys.executable, "-c",
                      "import socket,time\nfor _ in range(100):\n try:\n"
                      f"  socket.create_connection(('{net.ips['b']}', 9001)).close(); break\n"
                      " except OSError: time.sleep(0.05)"])
        rtt = lambda: float(net.run("a", [sys.executable, "-c", RTT, net.ips["b"]]))  # noqa: E731
        assert rtt() < 0.1
        net.shape("a", delay_ms=120, loss_pct=0)
        assert 0.12 <= rtt() < 1.0
        net.heal()
        assert rtt() < 0.1
        net.shape("b", delay_ms=0, loss_pct=50)
        delivered = udp_delivered(net, "a", "b", count=400)
        assert 100 < delivered < 300, delivered
        net.heal()
        assert udp_delivered(net, "a", "b") == 50


def test_nothing_outlives_the_harness_even_when_the_run_fails():
    with pytest.raises(RuntimeError, match="boom"):
        with Net(["a", "b"]) as net:
            made = net.leftovers()
            assert len(made) == 3  # the switch and two hosts
            net.spawn("a", [sys.executable, "-c", "import time; time.sleep(600)"])
            net.block("a", "b")
            raise RuntimeError("boom")
    assert net.leftovers() == []
    assert all(p.poll() is not None for p in net.procs)
    assert not os.path.exists(net.dir)


def test_leftovers_of_a_killed_run_are_removed_at_start():
    dead = 4_000_000  # above pid_max's usual range: no such process
    assert not netmod._alive(dead)
    stale = f"{netmod.PREFIX}{dead}-x"
    netmod.sh("ip", "netns", "add", stale)
    with Net(["a"]):
        assert stale not in netmod._namespaces()
