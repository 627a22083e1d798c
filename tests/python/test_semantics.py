"""Properties the differential tests cannot see because they normalise them
away (CAS values, timing), plus heavier pipelines.  Each test runs against
kache-node and, as a check of the expectation itself, real memcached.
"""

from __future__ import annotations

import re
import threading
import time

import pytest

import kache_testlib as kt

KINDS = ["kache", "memcached"]


@pytest.fixture(params=KINDS)
def srv(request, servers):
    return servers.node() if request.param == "kache" else servers.memcached()


def _gets_cas(c: kt.Conn, key: bytes) -> int:
    r = c.request(b"gets " + key + b"\r\n")
    m = re.match(rb"VALUE \S+ \d+ \d+ (\d+)\r\n", r)
    assert m, kt.show(r)
    return int(m.group(1))


def _meta_cas(reply: bytes) -> int:
    m = re.search(rb"(?:^| )c(\d+)(?: |\r\n)", reply)
    assert m, kt.show(reply)
    return int(m.group(1))


def test_cas_values_are_consistent_across_commands(srv):
    with kt.Conn(srv.addr) as c:
        r = c.request(b"ms k 1 c\r\nv\r\n")
        cas_ms = _meta_cas(r)
        assert cas_ms > 0
        assert _gets_cas(c, b"k") == cas_ms
        assert _meta_cas(c.request(b"mg k c\r\n")) == cas_ms
        r = c.request(b"gats 100 k\r\n")
        assert re.match(rb"VALUE k 0 1 %d\r\n" % cas_ms, r), kt.show(r)
        # every modification produces a new, unique CAS value
        seen = {cas_ms}
        for cmd in (b"set k 0 0 1\r\nw\r\n", b"append k 0 0 1\r\nx\r\n", b"prepend k 0 0 1\r\ny\r\n",
                    b"replace k 0 0 1\r\n5\r\n", b"incr k 1\r\n", b"decr k 1\r\n", b"ma k\r\n"):
            c.request(cmd)
            cas = _gets_cas(c, b"k")
            assert cas not in seen, f"CAS {cas} reused after {cmd!r}"
            seen.add(cas)
        # reads and touches do not change it
        before = _gets_cas(c, b"k")
        c.request(b"get k\r\ntouch k 100\r\nmg k v\r\ngat 100 k\r\n")
        assert _gets_cas(c, b"k") == before
        # distinct keys get distinct CAS values
        c.request(b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n1\r\n")
        assert _gets_cas(c, b"a") != _gets_cas(c, b"b")


def test_cas_token_round_trip_and_conflict(srv):
    with kt.Conn(srv.addr) as c1, kt.Conn(srv.addr) as c2:
        c1.request(b"set k 0 0 2\r\nv0\r\n")
        t1 = _gets_cas(c1, b"k")
        t2 = _gets_cas(c2, b"k")
        assert t1 == t2
        assert c1.request(b"cas k 0 0 2 %d\r\nv1\r\n" % t1) == b"STORED\r\n"
        assert c2.request(b"cas k 0 0 2 %d\r\nv2\r\n" % t2) == b"EXISTS\r\n"
        assert c2.request(b"get k\r\n") == b"VALUE k 0 2\r\nv1\r\nEND\r\n"
        t3 = _gets_cas(c2, b"k")
        assert c2.request(b"ms k 2 C%d c\r\nv3\r\n" % t3).startswith(b"HD c")
        assert c1.request(b"ms k 2 C%d\r\nv4\r\n" % t3) == b"EX\r\n"
        assert c1.request(b"md k C%d\r\n" % t3) == b"EX\r\n"
        t4 = _gets_cas(c1, b"k")
        assert c1.request(b"md k C%d\r\n" % t4) == b"HD\r\n"


def test_concurrent_cas_exactly_one_winner(srv):
    """N clients race a cas with the same token: exactly one STORED."""
    with kt.Conn(srv.addr) as c:
        c.request(b"set race 0 0 1\r\n0\r\n")
        token = _gets_cas(c, b"race")
    n = 8
    results = [None] * n
    barrier = threading.Barrier(n)

    def go(i):
        with kt.Conn(srv.addr) as cc:
            barrier.wait(5)
            results[i] = cc.request(b"cas race 0 0 1 %d\r\n%d\r\n" % (token, i))

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(15)
    assert sorted(results) == sorted([b"STORED\r\n"] + [b"EXISTS\r\n"] * (n - 1)), results
    winner = results.index(b"STORED\r\n")
    with kt.Conn(srv.addr) as c:
        assert c.request(b"get race\r\n") == b"VALUE race 0 1\r\n%d\r\nEND\r\n" % winner


@pytest.mark.timeout(60)
def test_large_pipeline_with_concurrent_reader(srv):
    """20,000 pipelined commands in one stream while replies are drained concurrently."""
    n = 20000
    payload = b"".join(b"set p%d 0 0 %d\r\n%d\r\nget p%d\r\n" % (i, len(b"%d" % i), i, i) for i in range(n)) + b"mn\r\n"
    with kt.Conn(srv.addr, timeout=20) as c:
        err = []

        def writer():
            try:
                c.sock.sendall(payload)
            except OSError as e:  # pragma: no cover
                err.append(e)

        t = threading.Thread(target=writer)
        t.start()
        reply = c.read_sentinel(1, timeout=40)
        t.join(10)
        assert not err
        expect = b"".join(b"STORED\r\nVALUE p%d 0 %d\r\n%d\r\nEND\r\n" % (i, len(b"%d" % i), i) for i in range(n)) + b"MN\r\n"
        assert reply == expect, f"pipeline reply differs (got {len(reply)} bytes, want {len(expect)}): tail {kt.show(reply[-200:])}"


def test_many_idle_connections(srv):
    conns = [kt.Conn(srv.addr, timeout=5) for _ in range(300)]
    try:
        for i, c in enumerate(conns):
            c.send(b"set idle%d 0 0 1\r\n%d\r\n" % (i, i % 10))
        for i, c in enumerate(conns):
            assert c.read_until(lambda b: b.endswith(b"\r\n"), 5) == b"STORED\r\n"
        with kt.Conn(srv.addr) as c:
            st = kt.stats(c)
            assert int(st["curr_connections"]) >= 301
            assert int(st["curr_items"]) == 300
    finally:
        for c in conns:
            c.close()


def test_stats_reset_clears_counters(srv):
    with kt.Conn(srv.addr) as c:
        c.request(b"set a 0 0 1\r\n1\r\nget a\r\nget b\r\n")
        st = kt.stats(c)
        assert (st["cmd_get"], st["get_hits"], st["get_misses"], st["cmd_set"]) == ("2", "1", "1", "1")
        assert c.request(b"stats reset\r\n") == b"RESET\r\n"
        st = kt.stats(c)
        assert (st["cmd_get"], st["get_hits"], st["get_misses"], st["cmd_set"]) == ("0", "0", "0", "0")
        # items are not touched by a stats reset
        assert st["curr_items"] == "1"
        assert c.request(b"get a\r\n") == b"VALUE a 0 1\r\n1\r\nEND\r\n"


def test_delayed_flush_all_and_ttl(srv):
    """flush_all <delay> invalidates by the deadline; exptime 1 expires (one sleep).

    memcached's clock has 1 s granularity and it applies the delay minus one
    second, so only "still there right away" and "gone after the delay" are
    asserted.
    """
    with kt.Conn(srv.addr) as c:
        r = c.request(
            b"set f1 0 0 1\r\na\r\nset ttl1 0 1 1\r\nb\r\nflush_all 3\r\n"
            b"set after 0 0 1\r\nc\r\nget f1 ttl1 after\r\n"
        )
        assert r == (
            b"STORED\r\nSTORED\r\nOK\r\nSTORED\r\n"
            b"VALUE f1 0 1\r\na\r\nVALUE ttl1 0 1\r\nb\r\nVALUE after 0 1\r\nc\r\nEND\r\n"
        ), kt.show(r)
        time.sleep(3.1)
        # items stored before the deadline (even after the flush_all command) are gone
        assert c.request(b"get f1 ttl1 after\r\n") == b"END\r\n"
        # the flush deadline has passed: new items live normally
        assert c.request(b"set f2 0 0 1\r\nc\r\nget f2\r\n") == b"STORED\r\nVALUE f2 0 1\r\nc\r\nEND\r\n"


def test_concurrent_connections_no_crosstalk(srv):
    """16 clients pipelining their own keys at once each get exactly their own replies."""
    n_clients, n_ops = 16, 400
    errors = []

    def client(cid):
        try:
            with kt.Conn(srv.addr, timeout=20) as c:
                req, exp = [], []
                for i in range(n_ops):
                    k = b"c%d_%d" % (cid, i)
                    v = (b"%d:%d;" % (cid, i)) * (1 + (i % 7) * 50)
                    req.append(b"set %s %d 0 %d\r\n%s\r\nmg %s v f k\r\n" % (k, cid, len(v), v, k))
                    exp.append(b"STORED\r\nVA %d f%d k%s\r\n%s\r\n" % (len(v), cid, k, v))
                got = c.request(b"".join(req), timeout=20)
                if got != b"".join(exp):
                    errors.append((cid, kt.show(got[:300])))
        except Exception as e:  # noqa: BLE001
            errors.append((cid, repr(e)))

    ts = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(40)
    assert not errors, errors[:3]


@pytest.mark.timeout(90)
def test_concurrent_random_workload_stays_well_formed(servers, kind):
    """8 clients fire seeded random classic+meta pipelines at a small (-m 4) cache.

    Contents are not compared (interleaving is nondeterministic), but every
    reply stream must stay well formed and complete, and the server alive.
    """
    import random

    import test_fuzz_differential as tf

    srv = servers.node(memory_mb=4) if kind == "kache" else servers.memcached(memory_mb=4)
    errors = []

    def client(cid):
        rng = random.Random(1000 + cid)
        try:
            with kt.Conn(srv.addr, timeout=10) as c:
                for _ in range(150):
                    batch = b"".join(tf.gen_command(rng, have_cas=True) for _ in range(25)).replace(b"{cas}", b"12345")
                    batch += b"".join(b"set big%d_%d 0 0 60000 noreply\r\n%s\r\n" % (cid, rng.randrange(50), b"b" * 60000) for _ in range(3))
                    r = c.request(batch, timeout=10)
                    items, rest = kt.parse_reply(r)
                    if kt.TIMEOUT_MARK in r or kt.EOF_MARK in r or kt.RESET_MARK in r or rest:
                        errors.append((cid, kt.show(r[-300:])))
                        return
        except Exception as e:  # noqa: BLE001
            errors.append((cid, repr(e)))

    ts = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors[:3]
    assert srv.alive()
    with kt.Conn(srv.addr) as c:
        st = kt.stats(c)
        assert int(st["bytes"]) <= int(st["limit_maxbytes"]) * 2  # sanity; exact bound tested elsewhere
        assert c.request(b"set after 0 0 2\r\nok\r\nget after\r\n") == b"STORED\r\nVALUE after 0 2\r\nok\r\nEND\r\n"


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param
