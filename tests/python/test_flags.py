"""memcached's command line, given to kache-node unchanged and to memcached 1.6.18 side by
side: what starts, what is refused (same message, same exit code) and what each flag does.

Servers here are started with only the flags under test (plus a free port and, for
kache-node, `--admin-port` on a free port), not the suite's usual defaults.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import time

import pytest

import kache_testlib as kt

START_WAIT = 10.0


def kache_argv(port: int, admin_port: int, flags: list[str]) -> list[str]:
    return [kt.node_bin(), "-l", kt.HOST, "-p", str(port), "--admin-port", str(admin_port)] + flags


def memcached_argv(port: int, flags: list[str]) -> list[str]:
    root = ["-u", "root"] if os.geteuid() == 0 and "-u" not in flags else []
    return [kt.memcached_bin(), "-l", kt.HOST, "-p", str(port), "-U", "0"] + root + flags


def start(kind: str, flags: list[str], servers) -> kt.ServerProc:
    def make():
        port = kt.free_port()
        argv = kache_argv(port, kt.free_port(), flags) if kind == "kache" else memcached_argv(port, flags)
        return kt.ServerProc(kind, argv, port)

    srv = kt.start_on_free_ports(make)
    servers.servers.append(srv)
    return srv


def refused(kind: str, flags: list[str]) -> tuple[int, str]:
    """Exit code and last stderr line of a command line that must not start."""
    port = kt.free_port()
    argv = kache_argv(port, kt.free_port(), flags) if kind == "kache" else memcached_argv(port, flags)
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=START_WAIT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kind} {flags} started instead of refusing")
    lines = p.stderr.decode().strip().splitlines()
    return p.returncode, lines[-1] if lines else ""


# ------------------------------------------------------------ the seed's command line


def test_memcacheds_own_command_line_starts_kache_unchanged(servers):
    """`memcached -p 11211 -u memcached -l 127.0.0.1 -m 64`, with a free port for 11211, as
    an unprivileged user (where memcached, too, ignores -u)."""
    nobody = pwd.getpwnam("nobody")
    kache_port, mc_port = kt.free_port(), kt.free_port()
    seed = ["-u", "memcached", "-l", "127.0.0.1", "-m", "64"]
    for argv, port in (([kt.node_bin(), "-p", str(kache_port)] + seed, kache_port),
                       ([kt.memcached_bin(), "-p", str(mc_port)] + seed, mc_port)):
        srv = kt.ServerProc("seed", argv, port)
        servers.servers.append(srv)
        srv.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=srv._errf, stderr=srv._errf,
                                    start_new_session=True, user=nobody.pw_uid, group=nobody.pw_gid,
                                    extra_groups=[])
        deadline = time.monotonic() + START_WAIT
        while True:
            assert srv.proc.poll() is None, f"{argv[0]} exited: {srv.stderr_tail()}"
            try:
                with kt.Conn(srv.addr) as c:
                    assert c.request(b"set k 0 0 1\r\nv\r\nget k\r\n") == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n"
                    assert kt.stats(c, b"settings")["maxbytes"] == str(64 * 1024 * 1024)
                break
            except OSError:
                assert time.monotonic() < deadline, srv.stderr_tail()
                time.sleep(0.02)


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.skipif(os.geteuid() != 0, reason="-u switches users only when started as root")
def test_dash_u_switches_to_the_user_when_root(servers):
    nobody = pwd.getpwnam("nobody").pw_uid
    for kind in ("memcached", "kache"):
        srv = start(kind, ["-u", "nobody"], servers)
        assert uid_of(srv.proc.pid) == nobody, kind
    # A user that does not exist: both refuse, in memcached's words (EX_NOUSER).
    assert refused("kache", ["-u", "memcached-nobody"]) == refused("memcached", ["-u", "memcached-nobody"])
    assert refused("kache", ["-u", "memcached-nobody"]) == (67, "can't find the user memcached-nobody to switch to")


# ------------------------------------------------------------ refusals


REFUSED_ALIKE = [
    ["-o", "bogus"],
    ["-o", "modern,bogus=1"],
    ["-o", "hashpower=5"],
    ["-o", "hashpower=40"],
    ["-o", "hashpower"],
    ["-o", "idle_timeout"],
    ["-o", "lru_crawler_sleep=5000000"],
    ["-o", "lru_crawler_tocrawl=x"],
    ["-o", "slab_automove=3"],
    ["-o", "slab_automove_window=2"],
    ["-o", "tail_repair_time=5"],
    ["-o", "hash_algorithm=md5"],
    ["-o", "hot_lru_pct=90"],
    ["-o", "hot_lru_pct=50,warm_lru_pct=40"],
    ["-o", "no_lru_maintainer,temporary_ttl=5"],
    ["-o", "watcher_logbuf_size=x"],
    ["-o", "slab_sizes=100-104"],
    ["-I", "1000"],
    ["-I", "256m"],
    ["-m", "2", "-I", "2m"],
    ["-I", "1m", "-o", "slab_chunk_max=300000"],
    ["-R", "0"],
    ["-f", "1.0"],
    ["-n", "0"],
    ["-B", "foo"],
]


@pytest.mark.parametrize("flags", REFUSED_ALIKE, ids=lambda f: " ".join(f))
def test_refused_with_memcacheds_message_and_exit_code(flags):
    mine = refused("kache", flags)
    assert mine == refused("memcached", flags)
    assert mine[0] != 0 and mine[1]


def test_item_size_max_as_memcached_t_item_size_max(servers):
    """memcached's t/item_size_max.t: the accepted -I values and what settings report."""
    for flags, want in ((["-I", "1024", "-o", "slab_chunk_max=1024"], "1024"),
                        (["-I", "2097152"], "2097152"),
                        (["-I", "512k", "-o", "slab_chunk_max=16384"], "524288"),
                        (["-m", "256", "-I", "32m"], "33554432"),
                        ([], "1048576")):
        for kind in ("memcached", "kache"):
            srv = start(kind, flags, servers)
            with kt.Conn(srv.addr) as c:
                assert kt.stats(c, b"settings")["item_size_max"] == want, (kind, flags)
            kt.stop_all(srv)


# ------------------------------------------------------------ every flag of memcached -h


# Flags memcached 1.6.18 starts with; kache-node must start with them too. (-d, -s, -S, -Z,
# -B binary are tested on their own.)
STARTS_ALIKE = [
    ["-a", "600"], ["-A"], ["-r"], ["-u", "root"], ["-m", "32"], ["-M"], ["-c", "100"], ["-k"],
    ["-v"], ["-vv"], ["-P", "/tmp/kache-flags-test.pid"], ["-f", "1.5"], ["-n", "64"], ["-L"],
    ["-D", "/"], ["-t", "2"], ["-R", "5"], ["-C"], ["-b", "64"], ["-B", "ascii"], ["-B", "auto"],
    ["-I", "2m"], ["-F"], ["-X"], ["-W"], ["-e", "/tmp/kache-flags-test.mem"], ["-N", "1", "-t", "2"],
    ["-o", "maxconns_fast,no_maxconns_fast,hashpower=16,no_hashexpand,tail_repair_time=30,"
           "hash_algorithm=xxh3,no_lru_crawler,lru_crawler_sleep=10,lru_crawler_tocrawl=5,"
           "read_buf_mem_limit=10,no_lru_maintainer,hot_lru_pct=10,warm_lru_pct=20,"
           "hot_max_factor=0.5,warm_max_factor=3.0,idle_timeout=100,slab_chunk_max=262144,"
           "watcher_logbuf_size=64,track_sizes,modern,sock_cookie_id=5"],
    ["-o", "lru_maintainer,temporary_ttl=30,slab_reassign,slab_automove=2,slab_automove_ratio=0.5,"
           "slab_automove_window=10,no_slab_reassign,no_slab_automove,inline_ascii_resp,"
           "no_inline_ascii_resp,resp_obj_mem_limit=5,drop_privileges,no_drop_privileges,lru_crawler"],
    ["-o", "no_modern"], ["-o", "no_chunked_items"],
    ["-o", "ext_page_size=8,ext_wbuf_size=4,ext_threads=2,ext_item_size=512,ext_item_age=10,"
           "ext_low_ttl=5,ext_drop_unread,ext_recache_rate=100,ext_compact_under=2,ext_drop_under=1,"
           "ext_max_frag=0.5,ext_max_sleep=100,slab_automove_freeratio=0.01"],
]


@pytest.mark.parametrize("flags", STARTS_ALIKE, ids=lambda f: " ".join(f)[:60])
def test_flag_starts_as_with_memcached(servers, flags):
    for kind in ("memcached", "kache"):
        srv = start(kind, flags, servers)
        with kt.Conn(srv.addr) as c:
            assert c.request(b"set k 0 0 1\r\nv\r\nget k\r\n") == b"STORED\r\nVALUE k 0 1\r\nv\r\nEND\r\n", kind
        kt.stop_all(srv)


def test_worker_logbuf_size_is_only_a_buffer_size(servers):
    """memcached 1.6.18 falls through from worker_logbuf_size into slab_sizes (it then
    refuses `worker_logbuf_size=32` as "slab size 32 is out of valid range"); kache reads it
    as the buffer size it documents."""
    assert refused("memcached", ["-o", "worker_logbuf_size=32"]) == (64, "slab size 32 is out of valid range")
    srv = start("kache", ["-o", "worker_logbuf_size=32"], servers)
    with kt.Conn(srv.addr) as c:
        assert kt.stats(c, b"settings")["worker_logbuf_size"] == str(32 * 1024)


def test_accepted_flags_without_effect_say_so(servers):
    srv = start("kache", ["-L", "-o", "modern,hash_algorithm=jenkins"], servers)
    log = srv.stderr_tail()
    assert "-L accepted, not applied" in log
    assert "-o modern accepted, not applied" in log
    assert "-o hash_algorithm=jenkins accepted, not applied" in log


def test_kache_refuses_what_it_cannot_serve():
    """memcached starts with these; kache-node does not serve them and says so (README)."""
    for flags in (["-B", "binary"], ["-S"], ["-s", "/tmp/kache.sock"], ["-Z"]):
        code, message = refused("kache", flags)
        assert code == 64 and message, (flags, code, message)


# ------------------------------------------------------------ what the flags do


def test_dash_M_refuses_instead_of_evicting(servers):
    """memcached's t/dash-M.t: with -M a full cache answers `SERVER_ERROR out of memory
    storing object`, counts it, and keeps everything it stored."""
    for kind in ("memcached", "kache"):
        srv = start(kind, ["-M", "-m", "2"], servers)
        value = b"B" * 8192
        with kt.Conn(srv.addr) as c:
            stored = 0
            while True:
                reply = c.request(b"set dash%d 0 0 %d\r\n%s\r\n" % (stored, len(value), value))
                if reply != b"STORED\r\n":
                    break
                stored += 1
                assert stored < 10_000, kind
            assert reply == b"SERVER_ERROR out of memory storing object\r\n", (kind, reply)
            assert c.request(b"set dash%d 0 0 %d\r\n%s\r\n" % (stored, len(value), value)) == reply
            assert kt.stats(c)["store_no_memory"] == "2", kind
            assert kt.stats(c)["evictions"] == "0", kind
            assert kt.stats(c, b"settings")["evictions"] == "off", kind
            for i in range(stored):
                assert c.request(b"get dash%d\r\n" % i) == b"VALUE dash%d 0 %d\r\n%s\r\nEND\r\n" % (i, len(value), value), (kind, i)
        kt.stop_all(srv)


@pytest.mark.timeout(60)
def test_idle_timeout_as_memcached_t_idle_timeout(servers):
    """memcached's t/idle-timeout.t: busy connections stay, idle ones are closed and counted."""
    for kind in ("memcached", "kache"):
        srv = start(kind, ["-o", "idle_timeout=2"], servers)
        with kt.Conn(srv.addr) as idle, kt.Conn(srv.addr) as busy:
            assert kt.stats(idle)["idle_kicks"] == "0", kind
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:  # commands every 0.2 s keep it open
                assert "version" in kt.stats(busy), kind
                time.sleep(0.2)
            assert idle.read_eof(timeout=10).endswith(kt.EOF_MARK), kind
        with kt.Conn(srv.addr) as c:
            assert int(kt.stats(c)["idle_kicks"]) >= 1, kind
        kt.stop_all(srv)


def test_shutdown_as_memcached_t_shutdown(servers):
    for kind in ("memcached", "kache"):
        srv = start(kind, [], servers)
        with kt.Conn(srv.addr) as c:
            assert c.request(b"shutdown\r\n") == b"ERROR: shutdown not enabled\r\n", kind
        srv = start(kind, ["-A"], servers)
        with kt.Conn(srv.addr) as c:
            assert c.request(b"shutdown foo\r\n").startswith(b"CLIENT_ERROR"), kind
        for command in (b"shutdown\r\n", b"shutdown graceful\r\n"):
            srv = start(kind, ["-A"], servers)
            with kt.Conn(srv.addr) as c:
                c.send(command)
                assert c.read_eof(timeout=10).endswith(kt.EOF_MARK), (kind, command)
            assert srv.wait(10) is not None, f"{kind} still running after {command!r}"


def test_dash_F_disables_flush_all(servers):
    for kind in ("memcached", "kache"):
        srv = start(kind, ["-F"], servers)
        with kt.Conn(srv.addr) as c:
            assert c.request(b"flush_all\r\nflush_all noreply\r\n") == b"CLIENT_ERROR flush_all not allowed\r\n"


def test_dash_R_yields_between_requests(servers):
    for kind in ("memcached", "kache"):
        srv = start(kind, ["-R", "2"], servers)
        with kt.Conn(srv.addr) as c:
            assert c.request(b"get a\r\n" * 50) == b"END\r\n" * 50, kind
            assert int(kt.stats(c)["conn_yields"]) > 0, kind
            assert kt.stats(c, b"settings")["reqs_per_event"] == "2", kind


def test_dash_d_daemonizes_and_writes_the_pidfile(tmp_path):
    pidfile = tmp_path / "kache.pid"
    port = kt.free_port()
    argv = kache_argv(port, kt.free_port(), ["-d", "-P", str(pidfile)])
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=START_WAIT)
    assert p.returncode == 0, p.stderr
    deadline = time.monotonic() + START_WAIT
    while not pidfile.exists():
        assert time.monotonic() < deadline, "no pid file"
        time.sleep(0.02)
    pid = int(pidfile.read_text())
    try:
        assert pid != p.returncode and os.path.exists(f"/proc/{pid}")
        while True:
            try:
                with kt.Conn((kt.HOST, port)) as c:
                    assert c.request(b"version\r\n").startswith(b"VERSION ")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
    finally:
        os.kill(pid, signal.SIGKILL)
