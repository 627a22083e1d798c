"""memcached's operations tools against kache-node: Debian's memcached-tool (display,
stats, settings, dump replayed into another node) and pymemcache's own integration suite."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

import kache_testlib as kt

MEMCACHED_TOOL = "/usr/share/memcached/scripts/memcached-tool"
PYMEMCACHE_SUITE = os.path.join(
    os.environ.get("KACHE_TEST_DEPS", os.path.expanduser("~/.cache/kache-test-deps")), "pymemcache-4.0.0")
TOOL_TIMEOUT = 60


def tool(srv, *args: str) -> str:
    if not os.path.exists(MEMCACHED_TOOL):
        pytest.fail(f"{MEMCACHED_TOOL} is missing (Debian package memcached): run `make deps`")
    try:
        p = subprocess.run(["perl", MEMCACHED_TOOL, f"{kt.HOST}:{srv.port}", *args],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"memcached-tool {' '.join(args)} did not finish in {TOOL_TIMEOUT}s")
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


def fill(srv):
    with kt.Conn(srv.addr) as c:
        script = b"".join(b"set small:%d %d 0 5\r\nhello\r\n" % (i, i) for i in range(50))
        script += b"".join(b"set mid:%d 7 3600 700\r\n%s\r\n" % (i, b"m" * 700) for i in range(20))
        script += b"set odd%20key/x 0 0 3\r\nabc\r\n"
        assert c.request(script) == b"STORED\r\n" * 71


def display_rows(text: str) -> dict[int, list[str]]:
    rows = {}
    for line in text.splitlines()[1:]:
        cols = line.split()
        rows[int(cols[0])] = cols
    return rows


def test_memcached_tool_display_lists_the_classes(servers):
    mc, node = servers.memcached(extra=["-o", "no_lru_maintainer"]), servers.node()
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        fill(srv)
        got[name] = display_rows(tool(srv, "display"))
    assert sorted(got["kache"]) == sorted(got["memcached"]) and got["kache"], got
    for cls, ref in got["memcached"].items():
        mine = got["kache"][cls]
        # class, item size, count, evictions and OOM agree; Max_age is seconds (±2); pages
        # are kache's own memory; "Full?" is yes in kache, which has no free chunks.
        assert (mine[0], mine[1], mine[4], mine[6], mine[8]) == (ref[0], ref[1], ref[4], ref[6], ref[8])
        assert abs(int(mine[2].rstrip("s")) - int(ref[2].rstrip("s"))) <= 2
        assert mine[5] == "yes"


def test_memcached_tool_stats_and_settings(servers):
    node = servers.node()
    fill(node)
    stats = tool(node, "stats")
    assert re.search(r"^\s+curr_items\s+71\s*$", stats, re.M), stats
    assert re.search(r"^\s+version\s+1\.6\.18", stats, re.M)
    settings = tool(node, "settings")
    for field in ("item_size_max", "growth_factor", "chunk_size", "lru_crawler", "hashpower_init",
                  "slab_reassign", "idle_timeout", "maxbytes"):
        assert re.search(rf"^\s+{field}\s+\S+\s*$", settings, re.M), (field, settings)


def test_memcached_tool_dump_replays_into_another_node(servers):
    source, target = servers.node(), servers.node()
    fill(source)
    dump = tool(source, "dump")
    assert dump.count("add ") == 71
    with kt.Conn(target.addr) as c:
        replies = c.request(dump.encode())
        assert replies == b"STORED\r\n" * 71, kt.show(replies)
        assert c.request(b"get small:7 mid:3 odd%20key/x\r\n") == (
            b"VALUE small:7 7 5\r\nhello\r\n"
            + b"VALUE mid:3 7 700\r\n" + b"m" * 700 + b"\r\n"
            + b"VALUE odd%20key/x 0 3\r\nabc\r\nEND\r\n")
        # The expiry travels as an absolute time: about an hour left.
        assert 3590 <= int(re.search(rb" t(\d+)", c.request(b"mg mid:3 t\r\n")).group(1)) <= 3600


@pytest.mark.timeout(300)
def test_pymemcache_integration_suite(node):
    """pymemcache 4.0.0's own integration tests (its test_misc runs `stats cachedump`)."""
    suite = os.path.join(PYMEMCACHE_SUITE, "pymemcache", "test", "test_integration.py")
    if not os.path.exists(suite):
        pytest.fail(f"{suite} is missing: run `make deps`")
    p = subprocess.run(
        ["/usr/bin/python3", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", "/dev/null",
         "--rootdir", PYMEMCACHE_SUITE, suite, "-m", "integration",
         "--server", kt.HOST, "--port", str(node.port)],
        cwd=PYMEMCACHE_SUITE, env={**os.environ, "PYTHONPATH": PYMEMCACHE_SUITE},
        stdin=subprocess.DEVNULL, capture_output=True, timeout=280)
    out = p.stdout.decode() + p.stderr.decode()
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    assert p.returncode == 0 and " failed" not in summary, out[-4000:]
    assert re.search(r"\b(\d+) passed", summary) and int(re.search(r"(\d+) passed", summary).group(1)) >= 90, summary
