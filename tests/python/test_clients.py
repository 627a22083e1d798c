"""Real client libraries (pymemcache, pylibmc in text mode) against kache-node.

Every test also runs against real memcached (id suffix [memcached]) so that
the expectations written here are known to hold for the reference server.
Tests share one server per module and use unique keys.
"""

from __future__ import annotations

import itertools
import uuid

import pytest

import kache_testlib as kt

try:
    from pymemcache.client.base import Client as PymemcacheClient
    from pymemcache import serde as pm_serde
    from pymemcache.exceptions import MemcacheIllegalInputError, MemcacheServerError
except ImportError:  # pragma: no cover - reported as a failure below
    PymemcacheClient = None

try:
    import pylibmc
except ImportError:  # pragma: no cover
    pylibmc = None

MIB = 1024 * 1024


@pytest.fixture(scope="module", params=["kache", "memcached"])
def target(request):
    srv = kt.start_node() if request.param == "kache" else kt.start_memcached()
    try:
        yield srv
    finally:
        kt.stop_all(srv)


_counter = itertools.count()


@pytest.fixture
def prefix():
    return f"t{next(_counter)}_{uuid.uuid4().hex[:8]}_"


@pytest.fixture
def pm(target):
    if PymemcacheClient is None:
        pytest.fail("pymemcache is not installed for /usr/bin/python3: run `make deps`")
    c = PymemcacheClient(target.addr, connect_timeout=5, timeout=10, default_noreply=False, serde=pm_serde.pickle_serde)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def lm(target):
    if pylibmc is None:
        pytest.fail("pylibmc is not installed for /usr/bin/python3: run `make deps`")
    c = pylibmc.Client(
        [f"{target.addr[0]}:{target.addr[1]}"],
        binary=False,
        behaviors={
            "tcp_nodelay": True,
            "connect_timeout": 5000,  # ms
            "send_timeout": 10_000_000,  # us
            "receive_timeout": 10_000_000,  # us
            "cas": True,
        },
    )
    try:
        yield c
    finally:
        c.disconnect_all()


# ------------------------------------------------------------------ pymemcache


def test_pm_set_get_delete(pm, prefix):
    k = prefix + "a"
    assert pm.get(k) is None
    assert pm.set(k, b"hello") is True
    assert pm.get(k) == b"hello"
    assert pm.delete(k) is True
    assert pm.delete(k) is False
    assert pm.get(k) is None


def test_pm_set_many_get_many(pm, prefix):
    data = {prefix + str(i): f"value-{i}".encode() for i in range(50)}
    assert pm.set_many(data) == []  # no failed keys
    keys = list(data) + [prefix + "missing1", prefix + "missing2"]
    got = pm.get_many(keys)
    assert got == data
    assert pm.delete_many(list(data)) is True
    assert pm.get_many(list(data)) == {}


def test_pm_add_replace_append_prepend(pm, prefix):
    k = prefix + "k"
    assert pm.replace(k, b"x") is False
    assert pm.add(k, b"mid") is True
    assert pm.add(k, b"other") is False
    assert pm.append(k, b">>") is True
    assert pm.prepend(k, b"<<") is True
    assert pm.get(k) == b"<<mid>>"
    assert pm.replace(k, b"new") is True
    assert pm.get(k) == b"new"
    assert pm.append(prefix + "missing", b"x") is False
    assert pm.prepend(prefix + "missing", b"x") is False


def test_pm_incr_decr(pm, prefix):
    k = prefix + "n"
    assert pm.incr(k, 1) is None
    assert pm.decr(k, 1) is None
    pm.set(k, b"10")
    assert pm.incr(k, 5) == 15
    assert pm.decr(k, 20) == 0
    pm.set(k, b"18446744073709551615")
    assert pm.incr(k, 1) == 0
    pm.set(k, b"100")
    assert pm.decr(k, 1) == 99
    assert pm.get(k).rstrip(b" ") == b"99"
    pm.set(k, b"abc")
    with pytest.raises(Exception, match="non-numeric"):
        pm.incr(k, 1)


def test_pm_gets_cas(pm, prefix):
    k = prefix + "c"
    assert pm.gets(k) == (None, None)
    pm.set(k, b"v1")
    v, cas = pm.gets(k)
    assert v == b"v1" and cas is not None
    assert pm.cas(k, b"v2", cas) is True
    assert pm.cas(k, b"v3", cas) is False  # stale token -> EXISTS
    assert pm.get(k) == b"v2"
    v2, cas2 = pm.gets(k)
    assert cas2 != cas
    assert pm.cas(prefix + "missing", b"x", cas2) is None  # NOT_FOUND
    many = pm.gets_many([k, prefix + "missing"])
    assert list(many) == [k] and many[k][0] == b"v2"


def test_pm_touch(pm, prefix):
    k = prefix + "t"
    assert pm.touch(k, 100) is False
    pm.set(k, b"v")
    assert pm.touch(k, 100) is True
    assert pm.touch(k, -1) is True
    assert pm.get(k) is None


def test_pm_serde_flags_round_trip(pm, prefix):
    values = {
        "int": 42,
        "big_int": 2**70,
        "str": "héllo wörld",
        "bytes": b"\x00\x01binary",
        "dict": {"a": [1, 2, 3], "b": ("x", None)},
        "float": 3.25,
        "list": [1, "two", b"three"],
    }
    for name, v in values.items():
        pm.set(prefix + name, v)
    got = pm.get_many([prefix + n for n in values])
    assert {k[len(prefix):]: v for k, v in got.items()} == values


def test_pm_raw_flags(target, prefix):
    """Flags chosen by a custom serializer come back unchanged."""

    class FlagSerde:
        def serialize(self, key, value):
            return value[1], value[0]

        def deserialize(self, key, value, flags):
            return (flags, value)

    c = PymemcacheClient(target.addr, connect_timeout=5, timeout=10, default_noreply=False, serde=FlagSerde())
    try:
        for i, flags in enumerate([0, 1, 12345, 2**31, 2**32 - 1]):
            c.set(prefix + str(i), (flags, b"v%d" % i))
            assert c.get(prefix + str(i)) == (flags, b"v%d" % i)
    finally:
        c.close()


def test_pm_unicode_keys_rejected_client_side(pm, target, prefix):
    with pytest.raises(MemcacheIllegalInputError):
        pm.set(prefix + "ключ", b"v")
    with pytest.raises(MemcacheIllegalInputError):
        pm.set(prefix + "has space", b"v")
    with pytest.raises(MemcacheIllegalInputError):
        pm.get("x" * 251)
    # the connection is still fine
    pm.set(prefix + "ok", b"v")
    assert pm.get(prefix + "ok") == b"v"
    # with unicode keys allowed, UTF-8 bytes are plain key bytes to the server
    c = PymemcacheClient(target.addr, connect_timeout=5, timeout=10, default_noreply=False, allow_unicode_keys=True)
    try:
        c.set(prefix + "ключ", b"utf8")
        assert c.get(prefix + "ключ") == b"utf8"
    finally:
        c.close()


def test_pm_large_values(pm, prefix):
    k = prefix + "big"
    near = b"\xab" * (MIB - 1024)
    assert pm.set(k, near) is True
    assert pm.get(k) == near
    with pytest.raises(MemcacheServerError, match="too large"):
        pm.set(prefix + "toobig", b"x" * (MIB + 1))
    # the connection survives the rejected value
    assert pm.get(k) == near
    assert pm.get(prefix + "toobig") is None


@pytest.mark.timeout(60)
def test_pm_many_keys(pm, prefix):
    n = 10_000
    data = {f"{prefix}{i}": f"v{i}".encode() * 3 for i in range(n)}
    items = list(data.items())
    for i in range(0, n, 1000):
        assert pm.set_many(dict(items[i : i + 1000])) == []
    got = {}
    keys = list(data)
    for i in range(0, n, 500):
        got.update(pm.get_many(keys[i : i + 500]))
    assert len(got) == n
    assert got == data


def test_pm_version_stats_flush(pm, prefix):
    assert pm.version()
    st = pm.stats()
    assert b"curr_items" in st or "curr_items" in st
    pm.set(prefix + "f", b"1")
    assert pm.flush_all() is True
    assert pm.get(prefix + "f") is None


# ------------------------------------------------------------------ pylibmc


def test_lm_set_get_delete(lm, prefix):
    k = prefix + "a"
    assert lm.get(k) is None
    assert lm.set(k, b"hello")
    assert lm.get(k) == b"hello"
    assert lm.delete(k)
    assert not lm.delete(k)
    assert lm.get(k) is None


def test_lm_multi(lm, prefix):
    data = {prefix + str(i): b"v%d" % i for i in range(100)}
    assert lm.set_multi(data) == []
    got = lm.get_multi(list(data) + [prefix + "nope"])
    assert got == data
    assert lm.delete_multi(list(data))
    assert lm.get_multi(list(data)) == {}


def test_lm_add_replace_append_prepend(lm, prefix):
    k = prefix + "k"
    assert not lm.replace(k, b"x")
    assert lm.add(k, b"mid")
    assert not lm.add(k, b"again")
    assert lm.append(k, b">>")
    assert lm.prepend(k, b"<<")
    assert lm.get(k) == b"<<mid>>"
    assert lm.replace(k, b"r")
    assert lm.get(k) == b"r"
    assert not lm.append(prefix + "missing", b"x")


def test_lm_incr_decr(lm, prefix):
    k = prefix + "n"
    with pytest.raises(pylibmc.NotFound):
        lm.incr(k)
    lm.set(k, 10)  # ints are stored as decimal text with an int flag
    assert lm.incr(k, 5) == 15
    assert lm.decr(k, 100) == 0
    assert lm.get(k) == 0
    lm.set(k, b"abc")
    with pytest.raises(pylibmc.Error):
        lm.incr(k)


def test_lm_gets_cas(lm, prefix):
    k = prefix + "c"
    assert lm.gets(k) == (None, None)
    lm.set(k, b"v1")
    v, cas = lm.gets(k)
    assert v == b"v1"
    assert lm.cas(k, b"v2", cas)
    assert not lm.cas(k, b"v3", cas)
    assert lm.get(k) == b"v2"


def test_lm_touch(lm, prefix):
    k = prefix + "t"
    lm.set(k, b"v")
    assert lm.touch(k, 100)
    assert not lm.touch(prefix + "missing", 100)
    assert lm.get(k) == b"v"


def test_lm_types_round_trip(lm, prefix):
    values = {"int": 7, "str": "unicode ✓", "bytes": b"\x00\xff", "obj": {"a": [1, 2]}, "bool": True, "long": 2**80}
    for n, v in values.items():
        lm.set(prefix + n, v)
    got = lm.get_multi([prefix + n for n in values])
    assert {k[len(prefix):]: v for k, v in got.items()} == values


def test_lm_large_value(lm, prefix):
    k = prefix + "big"
    v = b"z" * (MIB - 1024)
    assert lm.set(k, v)
    assert lm.get(k) == v
    with pytest.raises(pylibmc.Error):
        lm.set(prefix + "toobig", b"z" * (MIB + 1))
    assert lm.get(k) == v


@pytest.mark.timeout(60)
def test_lm_many_keys(lm, prefix):
    n = 10_000
    data = {f"{prefix}{i}": b"x%d" % i for i in range(n)}
    assert lm.set_multi(data) == []
    got = lm.get_multi(list(data))
    assert len(got) == n and got == data


def test_pymemcache_and_pylibmc_interoperate(pm, lm, prefix):
    k = prefix + "shared"
    lm.set(k, b"from-pylibmc")
    assert pm.get(k) == b"from-pylibmc"
    pm.set(k, b"from-pymemcache")
    assert lm.get(k) == b"from-pymemcache"


def test_pm_noreply_mode(target, prefix):
    """pymemcache's default: storage commands sent with noreply, pipelined."""
    c = PymemcacheClient(target.addr, connect_timeout=5, timeout=10)  # default_noreply=True
    try:
        data = {prefix + str(i): b"n%d" % i for i in range(200)}
        c.set_many(data)
        c.delete(prefix + "0")
        c.incr(prefix + "missing", 1)
        c.touch(prefix + "1", 100)
        got = c.get_many(list(data))
        assert prefix + "0" not in got and len(got) == 199
        assert all(got[k] == v for k, v in got.items() if k in data)
    finally:
        c.close()
