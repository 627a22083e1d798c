"""libmemcached's protocol conformance checker (`memccapable -a`, ASCII only)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import kache_testlib as kt

RUN_TIMEOUT = 60

# The ASCII tests memccapable (libmemcached 1.x) runs; each must report [pass].
EXPECTED_ASCII_TESTS = {
    "version", "quit", "verbosity", "set", "set noreply", "get", "gets", "mget",
    "flush", "flush noreply", "add", "add noreply", "replace", "replace noreply",
    "cas", "cas noreply", "delete", "delete noreply", "incr", "incr noreply",
    "decr", "decr noreply", "append", "append noreply", "prepend", "prepend noreply",
    "stat",
}

LINE_RE = re.compile(r"^ascii (.+?)\s+\[(\w+)\]\s*$")


def run_memccapable(port: int):
    exe = shutil.which("memccapable")
    if not exe:
        pytest.fail("memccapable is not installed (package libmemcached-tools): run `make deps`")
    try:
        p = subprocess.run(
            [exe, "-a", "-t", "5", "-h", kt.HOST, "-p", str(port)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=RUN_TIMEOUT,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode("utf-8", "replace") + (e.stderr or b"").decode("utf-8", "replace")
        pytest.fail(f"memccapable did not finish within {RUN_TIMEOUT}s; output so far:\n{out}")
    out = p.stdout.decode("utf-8", "replace") + p.stderr.decode("utf-8", "replace")
    results = {}
    for line in out.splitlines():
        m = LINE_RE.match(line.strip())
        if m:
            results[m.group(1)] = m.group(2)
    return p.returncode, results, out


def check(port: int):
    rc, results, out = run_memccapable(port)
    failed = {t: r for t, r in results.items() if r != "pass"}
    missing = EXPECTED_ASCII_TESTS - set(results)
    assert rc == 0 and not failed and not missing and "All tests passed" in out, (
        f"memccapable rc={rc}; failed={failed}; not run={sorted(missing)}\n--- output ---\n{out}"
    )


@pytest.mark.timeout(RUN_TIMEOUT + 15)
def test_memccapable_ascii_kache(node):
    check(node.port)


@pytest.mark.timeout(RUN_TIMEOUT + 15)
def test_memccapable_ascii_reference_memcached(memcached):
    """Sanity: the checker and this harness agree that real memcached passes."""
    check(memcached.port)


SLAP_COUNTERS = ("get_misses", "verify_misses", "verify_failed", "expired_get", "unexpired_unget")


def run_memcaslap(port: int):
    exe = shutil.which("memcaslap")
    if not exe:
        pytest.fail("memcaslap is not installed (package libmemcached-tools): run `make deps`")
    argv = [exe, "-s", f"{kt.HOST}:{port}", "-t", "2s", "-T", "2", "-c", "16",
            "-v", "0.1", "-e", "0.05", "-d", "4", "-b"]  # verify 10% of gets, 5% with TTL, multi-get 4
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"memcaslap did not finish within {RUN_TIMEOUT}s; output so far:\n{(e.stdout or b'').decode()}")
    out = p.stdout.decode("utf-8", "replace") + p.stderr.decode("utf-8", "replace")
    counters = {k: int(v) for k, v in re.findall(r"(?m)^(\w+): (\d+)$", out)}
    return p.returncode, counters, out


@pytest.mark.timeout(RUN_TIMEOUT + 15)
@pytest.mark.parametrize("which", ["kache", "memcached"])
def test_memcaslap_load_with_verification(servers, which):
    """2 s of 16 concurrent clients (90% multi-get) with value verification: no misses, no corruption.

    memcaslap's working set (16 connections x 10k-key windows of ~1 KiB values) exceeds the
    default -m 64, and evictions would show as misses on either server: both get 1 GiB."""
    if which == "kache":
        srv = servers.node(memory_mb=1024)
    else:
        srv = servers.memcached(memory_mb=1024)
    rc, counters, out = run_memcaslap(srv.port)
    bad = {k: counters.get(k) for k in SLAP_COUNTERS if counters.get(k) != 0}
    assert rc == 0 and counters.get("cmd_get", 0) > 1000 and not bad, f"memcaslap rc={rc}, bad counters {bad}\n{out}"
