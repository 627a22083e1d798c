"""Text-protocol authentication (`-Y` / `--auth-file`), compared with memcached -Y."""
import os
import tempfile
import time

import pytest

import kache_testlib as kt

SCRIPTS = [
    ("unauthenticated_get", [b"get foo\r\n", b"mn\r\n"]),
    ("wrong_password", [b"set x 0 0 10\r\nuser wrong\r\n", b"get foo\r\n"]),
    ("bad_termination", [b"set x 0 0 4\r\nuserXX"]),
    ("bad_token_format", [b"set x 0 0 4\r\nuser\r\n"]),
    ("unknown_user", [b"set x 0 0 11\r\nmallory pw\r\n"]),
    ("good_then_normal_traffic", [b"set auth 1 2 9\r\nuser pass\r\n",
                                  b"set k 0 0 1\r\nv\r\nget k\r\nmn\r\n"]),
    ("second_user", [b"set a 0 0 12\r\nother p:a:ss\r\n", b"version\r\n"]),
]


@pytest.fixture
def authfile():
    fd, path = tempfile.mkstemp(prefix="kache-auth-")
    with os.fdopen(fd, "w") as f:
        f.write("user:pass\nother:p:a:ss\n")
    yield path
    os.unlink(path)


def exchange(server, steps):
    out = []
    with kt.Conn(server.addr) as conn:
        for data in steps:
            conn.send(data)
            out.append(conn.read_idle(idle=0.3))
    return out


@pytest.mark.parametrize("name,steps", SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_auth_replies_match_memcached(servers, authfile, name, steps):
    mc = servers.memcached(extra=["-Y", authfile])
    node = servers.node(extra=["--auth-file", authfile])
    expected = exchange(mc, steps)
    got = exchange(node, steps)
    # VERSION strings legitimately differ.
    norm = [r.split(b"VERSION ")[0] for r in expected], [r.split(b"VERSION ")[0] for r in got]
    assert norm[0] == norm[1], f"memcached {expected!r}\nkache     {got!r}"


def test_auth_is_counted_in_stats(servers, authfile):
    node = servers.node(extra=["-Y", authfile])
    exchange(node, [b"set x 0 0 10\r\nuser wrong\r\n", b"set x 0 0 9\r\nuser pass\r\n"])
    with kt.Conn(node.addr) as conn:
        conn.send(b"set x 0 0 9\r\nuser pass\r\n")
        conn.read_idle(idle=0.2)
        stats = conn.request(b"stats\r\n")
    assert b"STAT auth_cmds 3\r\n" in stats and b"STAT auth_errors 1\r\n" in stats


def test_rotated_auth_file_takes_effect_without_restart(servers, authfile):
    node = servers.node(extra=["--auth-file", authfile])
    assert exchange(node, [b"set x 0 0 9\r\nuser pass\r\n"]) == [b"STORED\r\n"]
    with open(authfile, "w") as f:
        f.write("user:rotated\n")
    os.utime(authfile, (0, 1_900_000_000))

    deadline = time.monotonic() + 15
    while exchange(node, [b"set x 0 0 12\r\nuser rotated\r\n"]) != [b"STORED\r\n"]:
        assert time.monotonic() < deadline, "new credentials never accepted"
        time.sleep(0.5)
    assert exchange(node, [b"set x 0 0 9\r\nuser pass\r\n"]) == [b"CLIENT_ERROR authentication failure\r\n"]
