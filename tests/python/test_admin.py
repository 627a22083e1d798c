"""The operations surface, side by side with memcached 1.6.18: `stats slabs|items|sizes|
conns|settings|detail|cachedump`, `lru_crawler`, `watch`, `shutdown`.

Each test runs the same commands against a fresh memcached and a fresh kache-node and
compares what both answer. Values that legitimately differ are normalised, and each place
says why:

- kache has no slab pages: `total_pages` is its memory per class in 1 MiB pages, there are
  no free chunks (`total_chunks` == `used_chunks`, `free_chunks` 0), `total_malloced` is
  its own byte count;
- kache has no LRU maintainer, so memcached runs with `-o no_lru_maintainer` where
  `stats items` is compared (that is the shape memcached prints without one);
- CAS values, connection ids (memcached's are fds) and timestamps differ;
- kache's background sweeper is its crawler and looks at items all the time, so
  `crawler_items_checked` is not compared.
"""

from __future__ import annotations

import re
import socket
import time

import pytest

import kache_testlib as kt


def SET(key: bytes, value: bytes, flags: int = 0, exp: int = 0) -> bytes:
    return b"set %s %d %d %d\r\n%s\r\n" % (key, flags, exp, len(value), value)


# Items of several memcached classes: 61 bytes (class 1), 665 (class 10), 5061 (class 19).
WORKLOAD = (
    SET(b"a", b"1")
    + SET(b"bb", b"x" * 600, flags=5, exp=1000)
    + SET(b"c", b"y" * 5000)
    + b"get a bb nope\r\n"
    + b"gets c\r\n"
    + b"touch a 1000\r\n"
    + b"incr nope 1\r\n"
    + SET(b"n", b"5")
    + b"incr n 2\r\ndecr n 1\r\n"
    + b"cas a 0 0 1 987654321987\r\nq\r\n"
    + b"delete c\r\n"
)


def both(servers, node_extra=(), mc_extra=()):
    mc = servers.memcached(extra=list(mc_extra))
    node = servers.node(extra=list(node_extra))
    return mc, node


def run_workload(srv, script=WORKLOAD):
    with kt.Conn(srv.addr) as c:
        c.request(script)


def per_class(stats: dict[str, str], prefix: str = "") -> dict[int, dict[str, str]]:
    out: dict[int, dict[str, str]] = {}
    for k, v in stats.items():
        m = re.fullmatch(prefix + r"(\d+):(\w+)", k)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = v
    return out


# ------------------------------------------------------------------ stats slabs


# kache's own accounting, not memcached's page allocator (see module docstring).
SLAB_MEMORY_FIELDS = {"total_pages", "total_chunks", "free_chunks"}


def test_stats_slabs_classes_and_counts_match_memcached(servers):
    mc, node = both(servers)
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        run_workload(srv)
        with kt.Conn(srv.addr) as c:
            got[name] = kt.stats(c, b"slabs")
    ref, mine = per_class(got["memcached"]), per_class(got["kache"])
    assert sorted(ref) == sorted(mine)
    for cls, fields in mine.items():
        assert cls in ref, f"kache lists class {cls}, memcached does not: {sorted(ref)}"
        assert set(fields) == set(ref[cls]), (cls, sorted(fields), sorted(ref[cls]))
        same = {k: (ref[cls][k], v) for k, v in fields.items() if k not in SLAB_MEMORY_FIELDS}
        diffs = {k: pair for k, pair in same.items() if pair[0] != pair[1]}
        assert not diffs, f"class {cls} (memcached, kache): {diffs}"
        assert fields["total_chunks"] == fields["used_chunks"] and fields["free_chunks"] == "0"
        # An emptied class (c was deleted) holds no memory in kache: 0 pages.
        assert (int(fields["total_pages"]) >= 1) == (fields["used_chunks"] != "0"), (cls, fields)
    assert sorted(mine) == [1, 10, 19], sorted(mine)
    assert int(got["kache"]["active_slabs"]) == len(mine)
    assert int(got["kache"]["total_malloced"]) > 600


def test_chunked_items_are_reported_in_the_largest_class(servers):
    """An item above slab_chunk_max: memcached chunks it and reports it in its largest
    class (stats items, metadump); kache does the same (and, having no chunks, counts it
    as one used chunk of that class, where memcached also uses a header chunk elsewhere)."""
    mc, node = both(servers)
    for srv in (mc, node):
        run_workload(srv, SET(b"big", b"z" * 700_000))
        with kt.Conn(srv.addr) as c:
            items = per_class(kt.stats(c, b"items"), "items:")
        assert list(items) == [39] and items[39]["mem_requested"] == "700062", (srv.name, items)
        assert metadump(srv)[0].endswith(b" cls=39 size=700062"), srv.name


def test_issue_29_used_chunks_count_empty_values(servers):
    """memcached's t/issue_29.t: an empty value uses one chunk of class 1, two use two."""
    node = servers.node()
    with kt.Conn(node.addr) as c:
        assert c.request(b"set issue29 0 0 0\r\n\r\n") == b"STORED\r\n"
        assert kt.stats(c, b"slabs")["1:used_chunks"] == "1"
        assert c.request(b"set issue29_b 0 0 0\r\n\r\n") == b"STORED\r\n"
        assert kt.stats(c, b"slabs")["1:used_chunks"] == "2"


# ------------------------------------------------------------------ stats items

ITEM_TIME_FIELDS = {"age", "crawler_items_checked"}


def test_stats_items_match_memcached_without_lru_maintainer(servers):
    mc, node = both(servers, mc_extra=["-o", "no_lru_maintainer"])
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        run_workload(srv)
        with kt.Conn(srv.addr) as c:
            got[name] = kt.stats(c, b"items")
    ref, mine = per_class(got["memcached"], "items:"), per_class(got["kache"], "items:")
    assert sorted(ref) == sorted(mine)
    for cls in ref:
        assert list(ref[cls]) == list(mine[cls]), f"class {cls}: field names or order differ"
        diffs = {k: (v, mine[cls][k]) for k, v in ref[cls].items()
                 if k not in ITEM_TIME_FIELDS and v != mine[cls][k]}
        assert not diffs, f"class {cls} (memcached, kache): {diffs}"
        assert abs(int(ref[cls]["age"]) - int(mine[cls]["age"])) <= 2


def test_stats_items_with_memcacheds_default_lru_is_a_subset(servers):
    """memcached's default adds hot/warm/cold fields kache cannot have; the rest agree."""
    mc, node = both(servers)
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        run_workload(srv, SET(b"a", b"1"))
        with kt.Conn(srv.addr) as c:
            got[name] = per_class(kt.stats(c, b"items"), "items:")
    assert set(got["kache"][1]) < set(got["memcached"][1])
    assert got["kache"][1]["number"] == got["memcached"][1]["number"] == "1"
    assert got["kache"][1]["mem_requested"] == got["memcached"][1]["mem_requested"] == "61"


def test_evictions_are_counted_per_class(servers):
    mc, node = servers.memcached(memory_mb=8), servers.node(memory_mb=8)
    value = b"v" * 9000
    script = b"".join(b"set k%d 0 0 %d noreply\r\n%s\r\n" % (i, len(value), value) for i in range(2000))
    for srv in (mc, node):
        run_workload(srv, script)
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            items = per_class(kt.stats(c, b"items"), "items:")
            general = kt.stats(c)
        cls = [n for n, f in items.items() if int(f["number"]) > 0]
        assert len(cls) == 1, (srv.name, items)
        fields = items[cls[0]]
        assert int(fields["evicted"]) > 0 and fields["evicted"] == general["evictions"], (srv.name, fields)
        assert fields["evicted_unfetched"] == fields["evicted"], (srv.name, fields)
        assert int(fields["evicted_time"]) >= 0


# ------------------------------------------------------------------ stats sizes


def test_stats_sizes_match_memcached(servers):
    mc, node = both(servers)
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            assert c.request(b"stats sizes\r\n") == b"STAT sizes_status disabled\r\nEND\r\n"
            # memcached ends these two without END.
            c.send(b"stats sizes_enable\r\n")
            assert c.read_until(lambda b: b.endswith(b"\r\n")) == b"STAT sizes_status enabled\r\n"
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        run_workload(srv, SET(b"a", b"1") + SET(b"b", b"x" * 100) + SET(b"c", b"x" * 100, flags=3) + b"delete b\r\n")
        with kt.Conn(srv.addr) as c:
            got[name] = c.request(b"stats sizes\r\n")
            c.send(b"stats sizes_disable\r\n")
            assert c.read_until(lambda b: b.endswith(b"\r\n")) == b"STAT sizes_status disabled\r\n"
    assert got["kache"] == got["memcached"], (got["memcached"], got["kache"])
    assert got["kache"] == b"STAT 64 1\r\nSTAT 192 1\r\nEND\r\n"


def test_track_sizes_option(servers):
    mc, node = both(servers, node_extra=["-o", "track_sizes"], mc_extra=["-o", "track_sizes"])
    for srv in (mc, node):
        run_workload(srv, SET(b"a", b"1"))
        with kt.Conn(srv.addr) as c:
            assert kt.stats(c, b"settings")["track_sizes"] == "yes"
            assert c.request(b"stats sizes\r\n") == b"STAT 64 1\r\nEND\r\n"


# ------------------------------------------------------------------ stats settings

# Settings kache has no counterpart for, or answers differently on purpose (README):
# kache has no LRU maintainer or segmented LRU; memcached's ext_*/ssl_* lines come from
# its extstore and OpenSSL builds; kache adds `shards`.
# The test harness starts kache-node with -v (for its log) and memcached without.
SETTINGS_DIFFER = {"lru_maintainer_thread", "lru_segmented", "oldest", "tcpport", "verbosity"}


def test_stats_settings_names_and_values_match_memcached(servers):
    flags = ["-A", "-R", "7", "-b", "512", "-f", "1.5", "-n", "64", "-D", "/",
             "-o", "idle_timeout=30,lru_crawler_sleep=200,lru_crawler_tocrawl=5,hashpower=18,"
                   "watcher_logbuf_size=64,slab_chunk_max=262144,tail_repair_time=20,"
                   "slab_automove=2,hot_lru_pct=10,warm_lru_pct=30,temporary_ttl=5"]
    mc, node = both(servers, node_extra=flags, mc_extra=flags)
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        with kt.Conn(srv.addr) as c:
            got[name] = kt.stats(c, b"settings")
    ref, mine = got["memcached"], got["kache"]
    missing = [k for k in ref if k not in mine and not k.startswith(("ext_", "ssl_"))
               and k not in ("slab_automove_freeratio", "ssl_enabled")]
    assert not missing, f"kache's stats settings lack {missing}"
    assert [k for k in mine if k not in ref] == ["shards"]
    diffs = {k: (ref[k], mine[k]) for k in mine if k in ref and k not in SETTINGS_DIFFER and ref[k] != mine[k]}
    assert not diffs, f"(memcached, kache): {diffs}"
    assert mine["lru_maintainer_thread"] == "no" and mine["lru_segmented"] == "no"


# ------------------------------------------------------------------ stats detail


def test_stats_detail_as_memcached_t_stats_detail(servers):
    """The sequence memcached's t/stats-detail.t walks through, on both servers."""
    steps = [
        (b"stats detail dump\r\n", b"END\r\n"),
        (b"stats detail on\r\n", b"OK\r\n"),
        (SET(b"foo:123", b"fooval"), b"STORED\r\n"),
        (b"stats detail dump\r\n", b"PREFIX foo get 0 hit 0 set 1 del 0\r\nEND\r\n"),
        (b"get foo:123\r\n", b"VALUE foo:123 0 6\r\nfooval\r\nEND\r\n"),
        (b"get foo:124\r\n", b"END\r\n"),
        (b"delete foo:125\r\n", b"NOT_FOUND\r\n"),
        (b"stats detail dump\r\n", b"PREFIX foo get 2 hit 1 set 1 del 1\r\nEND\r\n"),
        (b"stats reset\r\n", b"RESET\r\n"),
        (b"stats detail dump\r\n", b"END\r\n"),
        (b"get foo:123\r\n", b"VALUE foo:123 0 6\r\nfooval\r\nEND\r\n"),
        (b"stats detail off\r\n", b"OK\r\n"),
        (b"get foo:123\r\n", b"VALUE foo:123 0 6\r\nfooval\r\nEND\r\n"),
        (b"stats detail dump\r\n", b"PREFIX foo get 1 hit 1 set 0 del 0\r\nEND\r\n"),
    ]
    mc, node = both(servers)
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            for send, want in steps:
                assert c.request(send) == want, (srv.name, send)


def test_dash_D_sets_the_delimiter_and_turns_detail_on(servers):
    mc, node = both(servers, node_extra=["-D", "/"], mc_extra=["-D", "/"])
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            c.request(SET(b"user/1", b"v") + SET(b"plain:1", b"v"))
            assert c.request(b"stats detail dump\r\n") == b"PREFIX user get 0 hit 0 set 1 del 0\r\nEND\r\n"


# ------------------------------------------------------------------ stats conns


def read_stats_block(sock_conn: kt.Conn, command: bytes) -> str:
    sock_conn.send(command)
    return sock_conn.read_until(lambda b: b.endswith(b"END\r\n")).decode()


def test_stats_conns_as_memcached_t_stats_conns(servers):
    mc, node = both(servers)
    for srv in (mc, node):
        with kt.Conn(srv.addr) as busy, kt.Conn(srv.addr) as asker:
            busy.send(b"set foo 0 0 6\r\n")  # a data block still to come
            time.sleep(1.2)  # so secs_since_last_cmd of the busy connection is non-zero
            text = read_stats_block(asker, b"stats conns\r\n")
            assert re.search(r"STAT \d+:state conn_listening\r\n", text), (srv.name, text)
            assert re.search(rf"STAT \d+:addr tcp:127\.0\.0\.1:{srv.port}\r\n", text), (srv.name, text)
            assert re.search(rf"STAT \d+:listen_addr tcp:127\.0\.0\.1:{srv.port}\r\n", text), (srv.name, text)
            assert re.search(r"STAT \d+:state conn_parse_cmd\r\n", text), (srv.name, text)
            assert re.search(r"STAT \d+:state conn_nread\r\n", text), (srv.name, text)
            assert re.search(r"STAT \d+:secs_since_last_cmd [1-9]\d*\r\n", text), (srv.name, text)
            # One addr line per connection: the listener and the two clients.
            assert len(re.findall(r"STAT \d+:addr ", text)) == 3, (srv.name, text)


# ------------------------------------------------------------------ cachedump


def test_cachedump_matches_memcached(servers):
    mc, node = both(servers, mc_extra=["-o", "no_lru_maintainer"])
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        run_workload(srv, SET(b"k1", b"12345") + SET(b"k2", b"1", exp=0) + SET(b"k3", b"v" * 700, flags=1))
        with kt.Conn(srv.addr) as c:
            got[name] = [c.request(b"stats cachedump %d 0\r\n" % cls) for cls in (1, 10, 0, 2)]
            got[name] += [c.request(line) for line in (
                b"stats cachedump 64 0\r\n", b"stats cachedump x 0\r\n", b"stats cachedump 1\r\n")]
    ref, mine = got["memcached"], got["kache"]
    # Same items per class (order within one second may differ: compare as sets).
    for r, k in zip(ref[:4], mine[:4]):
        assert sorted(r.split(b"\r\n")) == sorted(k.split(b"\r\n")), (r, k)
    assert ref[4:] == mine[4:]
    assert mine[0].endswith(b"END\r\n") and b"ITEM k1 [5 b; 0 s]\r\n" in mine[0]


def test_cachedump_limit_keeps_the_most_recent(servers):
    node = servers.node()
    with kt.Conn(node.addr) as c:
        c.request(SET(b"old", b"1"))
        time.sleep(1.1)
        c.request(SET(b"new", b"1"))
        assert c.request(b"stats cachedump 1 1\r\n") == b"ITEM new [1 b; 0 s]\r\nEND\r\n"


def test_dash_X_disables_dumping(servers):
    mc, node = both(servers, node_extra=["-X"], mc_extra=["-X"])
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            assert c.request(b"stats cachedump 1 0\r\n") == b"CLIENT_ERROR stats cachedump not allowed\r\n"
            assert c.request(b"lru_crawler metadump all\r\n") == b"ERROR metadump not allowed\r\n"


# ------------------------------------------------------------------ lru_crawler


def metadump(srv, what: bytes = b"all") -> list[bytes]:
    with kt.Conn(srv.addr, timeout=10) as c:
        c.send(b"lru_crawler metadump " + what + b"\r\n")
        raw = c.read_until(lambda b: b.endswith(b"\r\n") and (b.endswith(b"END\r\n") or not b.startswith(b"key=")), timeout=20)
    # Item lines end with a bare newline, END with CRLF (as memcached writes them).
    if not raw.endswith(b"END\r\n"):
        return [raw]
    return raw[:-5].split(b"\n")[:-1] + [b"END\r\n"]


def norm_meta(line: bytes) -> dict[str, str]:
    fields = dict(p.split("=", 1) for p in line.decode().split(" "))
    return fields


def test_metadump_lines_match_memcached(servers):
    mc, node = both(servers)
    got = {}
    script = SET(b"plain", b"abc") + SET(b"sl/ash", b"x" * 200, flags=9) + SET(b"ex", b"1", exp=500) + b"get plain\r\n"
    for name, srv in (("memcached", mc), ("kache", node)):
        run_workload(srv, script)
        lines = metadump(srv)
        assert lines[-1] == b"END\r\n", (name, lines)
        got[name] = {norm_meta(ln)["key"]: norm_meta(ln) for ln in lines[:-1]}
    assert sorted(got["memcached"]) == sorted(got["kache"]) == ["ex", "plain", "sl%2Fash"]
    for key, ref in got["memcached"].items():
        mine = got["kache"][key]
        assert list(ref) == list(mine), "field names and order"
        for f in ("exp", "fetch", "cls", "size"):
            if f == "exp" and ref[f] != "-1":
                assert abs(int(ref[f]) - int(mine[f])) <= 2, (key, f, ref[f], mine[f])
            else:
                assert ref[f] == mine[f], (key, f, ref[f], mine[f])
        assert abs(int(ref["la"]) - int(mine["la"])) <= 2
        assert mine["cas"].isdigit()


def test_crawler_commands_answer_as_memcached(servers):
    mc, node = both(servers)
    lines = [
        b"lru_crawler metadump 99", b"lru_crawler metadump 0", b"lru_crawler metadump x",
        b"lru_crawler metadump", b"lru_crawler crawl 70", b"lru_crawler crawl hash",
        b"lru_crawler bogus", b"lru_crawler sleep 2000000", b"lru_crawler sleep 100",
        b"lru_crawler tocrawl x", b"lru_crawler tocrawl 0", b"lru_crawler",
        b"lru_crawler metadump all extra", b"lru_crawler enable", b"lru_crawler disable",
        b"lru_crawler crawl 1", b"lru_crawler metadump all", b"lru_crawler enable",
    ]
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        replies = []
        with kt.Conn(srv.addr) as c:
            for ln in lines:
                replies.append(c.request(ln + b"\r\n"))
                if ln.startswith(b"lru_crawler crawl"):
                    # A crawl runs in the background: the next command would find it busy
                    # (BUSY) on a slow machine, in either server. Not what is compared here.
                    deadline = time.monotonic() + 30
                    while kt.stats(c).get("lru_crawler_running", "0") != "0":
                        assert time.monotonic() < deadline, (name, ln)
                        time.sleep(0.02)
        got[name] = replies
    assert got["kache"] == got["memcached"]


def test_metadump_refuses_behind_pipelined_replies(servers):
    """memcached's t/lru-crawler.t: a metadump behind a pipelined reply is refused."""
    mc, node = both(servers)
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            c.send(b"mg foo v\r\nlru_crawler metadump all\r\n")
            got = c.read_until(lambda b: b.count(b"\r\n") >= 2)
            assert got == b"EN\r\nERROR cannot pipeline other commands before metadump\r\n", (srv.name, got)


@pytest.mark.timeout(120)
def test_lru_crawler_as_memcached_t_lru_crawler(servers):
    """What memcached's t/lru-crawler.t checks: crawl reclaims the expired items of a
    class (counted as crawler_reclaimed), metadump lists every live item, `hash` covers
    all classes, settings follow enable/disable."""
    for srv in (servers.memcached(extra=["-o", "no_modern"]), servers.node(extra=["-o", "no_modern"])):
        with kt.Conn(srv.addr, timeout=15) as c:
            assert kt.stats(c, b"settings")["lru_crawler"] == "no"
            script = b"".join(SET(b"ifoo%d" % i, b"ok") for i in range(30))
            script += b"".join(SET(b"lfoo%d" % i, b"ok", exp=3600) for i in range(30))
            script += b"".join(SET(b"sfoo%d" % i, b"ok", exp=1) for i in range(30))
            c.request(script)
            assert kt.stats(c, b"slabs")["1:used_chunks"] == "90"
            time.sleep(2.5)
            assert c.request(b"lru_crawler enable\r\n") == b"OK\r\n"
            assert kt.stats(c, b"settings")["lru_crawler"] == "yes"
            assert c.request(b"lru_crawler crawl 1\r\n") == b"OK\r\n"
            deadline = time.monotonic() + 30
            while kt.stats(c)["lru_crawler_running"] != "0":
                assert time.monotonic() < deadline, srv.name
                time.sleep(0.1)
            assert kt.stats(c, b"slabs")["1:used_chunks"] == "60", srv.name
            assert kt.stats(c, b"items")["items:1:crawler_reclaimed"] == "30", srv.name
        lines = metadump(srv)
        assert lines[-1] == b"END\r\n" and len(lines) - 1 == 60, (srv.name, len(lines))
        with kt.Conn(srv.addr, timeout=15) as c:
            c.request(b"".join(b"set bfoo%d 0 0 1 noreply\r\nz\r\n" % i for i in range(5000)) + SET(b"mfoo", b"x" * 512))
        lines = metadump(srv, b"hash")
        keys = {ln.split(b" ")[0] for ln in lines[:-1]}
        assert len(keys) == 5061 and b"key=bfoo4999" in keys and b"key=mfoo" in keys, (srv.name, len(keys))
        with kt.Conn(srv.addr) as c:
            assert c.request(b"lru_crawler disable\r\n") == b"OK\r\n"
            # memcached's crawler thread notes that it stopped a moment later (its own test
            # retries too).
            deadline = time.monotonic() + 10
            while kt.stats(c, b"settings")["lru_crawler"] != "no":
                assert time.monotonic() < deadline, srv.name
                time.sleep(0.1)


def test_crawler_started_by_option_reclaims(servers):
    for srv in (servers.memcached(extra=["-o", "no_modern,lru_crawler"]), servers.node(extra=["-o", "no_modern,lru_crawler"])):
        with kt.Conn(srv.addr) as c:
            c.request(b"".join(SET(b"sfoo%d" % i, b"ok", exp=1) for i in range(30)))
            time.sleep(2.5)
            assert c.request(b"lru_crawler crawl 1\r\n") == b"OK\r\n"
            deadline = time.monotonic() + 30
            while kt.stats(c)["lru_crawler_running"] != "0":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert kt.stats(c, b"slabs").get("1:used_chunks", "0") == "0", srv.name


# ------------------------------------------------------------------ watch

WATCH_GET = re.compile(r"^ts=\d+\.\d+ gid=\d+ type=item_get key=(\S+) status=(\w+) clsid=(\d+) cfd=\d+ size=(\d+)$")
WATCH_STORE = re.compile(
    r"^ts=\d+\.\d+ gid=\d+ type=item_store key=(\S+) status=(\w+) cmd=(\w+) ttl=(\d+) clsid=(\d+) cfd=\d+ size=(\d+)$")
WATCH_EVICT = re.compile(r"^ts=\d+\.\d+ gid=\d+ type=eviction key=(\S+) fetch=(\w+) ttl=(-?\d+) la=(\d+) clsid=(\d+) size=(\d+)$")


def watch_lines(watcher: kt.Conn, count: int, timeout: float = 5.0) -> list[str]:
    raw = watcher.read_until(lambda b: b.count(b"\n") >= count, timeout)
    return raw.decode().splitlines()[:count]


def test_watch_fetchers_and_mutations_match_memcached(servers):
    """memcached's t/watcher.t: a set logs the lookup (not found, size 0), then the store;
    a get logs the fetch with the value's size."""
    mc, node = both(servers)
    got = {}
    for name, srv in (("memcached", mc), ("kache", node)):
        with kt.Conn(srv.addr) as watcher, kt.Conn(srv.addr) as client:
            watcher.send(b"watch fetchers mutations\r\n")
            assert watcher.read_until(lambda b: b.endswith(b"\r\n")) == b"OK\r\n"
            time.sleep(0.3)  # memcached's workers pick up a new watcher asynchronously
            assert client.request(b"set vfoo 0 100 4\r\nvbar\r\n") == b"STORED\r\n"
            assert client.request(b"get vfoo\r\n") == b"VALUE vfoo 0 4\r\nvbar\r\nEND\r\n"
            lines = watch_lines(watcher, 3)
        got[name] = [
            WATCH_GET.match(lines[0]).groups(),
            WATCH_STORE.match(lines[1]).groups(),
            WATCH_GET.match(lines[2]).groups(),
        ]
    # ttl counts down: compare within a second.
    ref, mine = got["memcached"], got["kache"]
    assert ref[0] == mine[0] == ("vfoo", "not_found", "0", "0")
    assert ref[2] == mine[2] == ("vfoo", "found", "1", "4")
    assert ref[1][:3] == mine[1][:3] == ("vfoo", "stored", "set")
    assert abs(int(ref[1][3]) - int(mine[1][3])) <= 1 and ref[1][4:] == mine[1][4:]


def test_watch_encodes_long_keys(servers):
    """t/watcher.t: a 250-byte key of '#' is logged URI-encoded, 750 bytes."""
    node = servers.node()
    with kt.Conn(node.addr) as watcher, kt.Conn(node.addr) as client:
        watcher.send(b"watch mutations\r\n")
        assert watcher.read_until(lambda b: b.endswith(b"\r\n")) == b"OK\r\n"
        client.request(SET(b"#" * 250, b"memcached"))
        line = watch_lines(watcher, 1)[0]
        assert len(line.split(" ")[3]) == len("key=") + 750


def test_watch_evictions(servers):
    node = servers.node(memory_mb=8)
    with kt.Conn(node.addr, timeout=10) as watcher, kt.Conn(node.addr, timeout=10) as client:
        watcher.send(b"watch evictions\r\n")
        assert watcher.read_until(lambda b: b.endswith(b"\r\n")) == b"OK\r\n"
        value = b"B" * 11000
        client.request(b"".join(b"set n,foo%d 0 0 %d noreply\r\n%s\r\n" % (i, len(value), value) for i in range(1500)))
        m = WATCH_EVICT.match(watch_lines(watcher, 1)[0])
        assert m, "no eviction line"
        assert m.group(1).startswith("n%2Cfoo") and m.group(2) == "no" and m.group(3) == "-1"
        assert m.group(6) == "11000"


@pytest.mark.timeout(120)
def test_slow_watcher_skips_lines_and_never_slows_the_cache(servers):
    """A watcher that does not read: its bounded buffer fills, lines are counted as
    skipped (`log_watcher_skipped`) and announced as `skipped=N` once it reads again; the
    client's requests are answered all along."""
    node = servers.node(extra=["-o", "watcher_logbuf_size=8"])
    watcher = socket.create_connection(node.addr)
    watcher.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    watcher.sendall(b"watch fetchers\r\n")
    with kt.Conn(node.addr) as client:
        spacer = b"X" * 180
        for i in range(200):
            # 100 gets a batch: 20,000 lookups, far more than 8 KiB and socket buffers hold.
            batch = b"".join(b"get foo%d%s\r\n" % (i * 100 + j, spacer) for j in range(100))
            assert client.request(batch) == b"END\r\n" * 100
        stats = kt.stats(client)
        assert int(stats["log_watcher_skipped"]) > 0 and stats["log_watchers"] == "1", stats
        watcher.settimeout(5)
        seen = b""
        deadline = time.monotonic() + 30
        while b"skipped=" not in seen:
            assert time.monotonic() < deadline, "never told of the skipped lines"
            chunk = watcher.recv(65536)
            assert chunk
            seen = (seen + chunk)[-4096:]
            client.request(b"get foo\r\n")  # new lines let the skip notice through
    watcher.close()


def test_watch_refusals_match_memcached(servers):
    mc, node = both(servers, node_extra=["-W"], mc_extra=["-W"])
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            assert c.request(b"watch mutations\r\n") == b"CLIENT_ERROR watch commands not allowed\r\n"
    mc, node = both(servers)
    for srv in (mc, node):
        with kt.Conn(srv.addr) as c:
            assert c.request(b"watch bogus\r\n") == b"ERROR\r\n"
            c.send(b"mg foo v\r\nwatch\r\n")
            got = c.read_until(lambda b: b.count(b"\r\n") >= 2)
            assert got == b"EN\r\nERROR cannot pipeline other commands before watch\r\n", (srv.name, got)


def test_log_watchers_are_counted(servers):
    node = servers.node()
    with kt.Conn(node.addr) as client:
        w1, w2 = kt.Conn(node.addr), kt.Conn(node.addr)
        for w in (w1, w2):
            w.send(b"watch fetchers\r\n")
            assert w.read_until(lambda b: b.endswith(b"\r\n")) == b"OK\r\n"
        assert kt.stats(client)["log_watchers"] == "2"
        w1.close()
        w2.close()
        deadline = time.monotonic() + 5
        while kt.stats(client)["log_watchers"] != "0":
            assert time.monotonic() < deadline
            client.request(b"get x\r\n")  # a logged line lets the server notice the closed sockets
            time.sleep(0.05)
