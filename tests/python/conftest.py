"""pytest fixtures: real memcached (the reference) and kache-node on free ports.

Run with:
    KACHE_NODE_BIN=/work/main/target/release/kache-node /usr/bin/python3 -m pytest -q tests/python

KACHE_NODE_BIN is mandatory.  (For developing the tests themselves only,
KACHE_TEST_NODE_IS_MEMCACHED=1 without KACHE_NODE_BIN runs memcached in the
node's place; node-only features are then skipped with that reason.)
"""

from __future__ import annotations

import os
import signal

import pytest

import kache_testlib as kt

PER_TEST_TIMEOUT = 90  # seconds; hard stop so no test can hang the run


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): per-test wall clock limit (default %d)" % PER_TEST_TIMEOUT)
    if not kt.memcached_bin():
        raise pytest.UsageError(
            "memcached (the reference server) is not installed: run `make deps` "
            "(or apt-get install memcached libmemcached-tools python3-pymemcache python3-pylibmc python3-pytest)"
        )
    binary = kt.node_bin()
    if binary:
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise pytest.UsageError(
                f"KACHE_NODE_BIN={binary!r} is not an executable file: build it with "
                "`cargo build --release -p kache-node` (or `make build`)"
            )
    elif not kt.standin_mode():
        raise pytest.UsageError(
            "KACHE_NODE_BIN is not set: it must point at the kache-node binary under test, e.g.\n"
            "  make python-test\n"
            "or\n"
            "  cargo build --release -p kache-node && "
            "KACHE_NODE_BIN=$PWD/target/release/kache-node /usr/bin/python3 -m pytest -q tests/python"
        )


def pytest_report_header(config):
    if kt.standin_mode():
        return "kache tests: node = memcached STAND-IN (KACHE_TEST_NODE_IS_MEMCACHED=1; dev mode only)"
    return f"kache tests: node = {kt.node_bin()}, reference = {kt.memcached_bin()}"


# ---------------------------------------------------------------- timeouts


class TestTimeout(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    m = item.get_closest_marker("timeout")
    limit = int(m.args[0]) if m else PER_TEST_TIMEOUT

    def on_alarm(signum, frame):
        raise TestTimeout(f"test exceeded its {limit}s wall-clock limit")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------- server output on failure


def _servers_of(value):
    if isinstance(value, kt.ServerProc):
        return [value]
    out = []
    for attr in ("servers",):
        for s in getattr(value, attr, ()) or ():
            if isinstance(s, kt.ServerProc):
                out.append(s)
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    seen = set()
    for value in getattr(item, "funcargs", {}).values():
        for s in _servers_of(value):
            if id(s) in seen:
                continue
            seen.add(id(s))
            tail = s.stderr_tail()
            rc = s.proc.poll() if s.proc else None
            status = "running" if rc is None else f"exited rc={rc}"
            rep.sections.append((f"{s.name} on port {s.port} ({status}) output", tail or "<no output>"))


# ---------------------------------------------------------------- fixtures


class Pair:
    """A fresh memcached (reference) and a fresh kache-node, same settings."""

    def __init__(self, mc: kt.ServerProc, node: kt.ServerProc):
        self.mc = mc
        self.node = node
        self.servers = [mc, node]


@pytest.fixture
def pair():
    mc = node = None
    try:
        mc = kt.start_memcached()
        node = kt.start_node()
        yield Pair(mc, node)
    finally:
        kt.stop_all(mc, node)


class Factory:
    """Starts servers with custom options; everything is killed at teardown."""

    def __init__(self):
        self.servers = []

    def node(self, **kw) -> kt.ServerProc:
        s = kt.start_node(**kw)
        self.servers.append(s)
        return s

    def memcached(self, **kw) -> kt.ServerProc:
        s = kt.start_memcached(**kw)
        self.servers.append(s)
        return s


@pytest.fixture
def servers():
    f = Factory()
    try:
        yield f
    finally:
        kt.stop_all(*f.servers)


@pytest.fixture
def node():
    s = kt.start_node()
    try:
        yield s
    finally:
        kt.stop_all(s)


@pytest.fixture
def memcached():
    s = kt.start_memcached()
    try:
        yield s
    finally:
        kt.stop_all(s)


@pytest.fixture
def needs_admin():
    if kt.standin_mode():
        pytest.skip("memcached stand-in has no admin HTTP port (dev mode only)")
