"""Differential protocol tests: identical raw request bytes are sent to a fresh
real memcached (1.6.18) and a fresh kache-node; the replies must be identical
after this normalisation, and nothing else (kache_testlib.normalise):

- the VERSION string (kache names its own release after memcached's);
- CAS values: each server's values are named in order of first appearance
  across the whole case (`<cas#0>`, `<cas#1>`...), so the same item version
  must show the same CAS and every new version a new one, in the same places;
  `exact_cas=True` cases (the `E` flag sets explicit values) compare them raw;
- times: meta `t` and `l` and `me`'s `exp` and `la` match within 2 seconds
  (`t-1`, no expiry, is exact).

Every other byte is compared: status lines, flags, data blocks, `me`'s key,
fetch, cls and size.  (STAT values are not normalised: no case here prints
counters that change from run to run; test_stats_counters_match_memcached and
test_admin.py compare stats.)

Each case is a list of steps.  By default a step's bytes are sent followed by
`mn\r\n` and the reply is read until the matching `MN\r\n`, so the end of the
reply is known without guessing.  Steps that close the connection read until
EOF instead.  `{cas}` (also `{cas-1}`, `{cas+1}`) in a step is replaced with
the last CAS value that *that* server returned (gets/gats VALUE lines or meta
`c` flag), so success paths of cas/C can be exercised on both servers.

Every case runs against a fresh memcached and a fresh kache-node.  A case with
`memcached_bug=` is one where 1.6.18 is wrong: it also names the `expected`
reply (memcached's after its upstream fix, or protocol.txt's where upstream
has not fixed it), kache must give exactly that, and memcached must still
differ from it (once the reference is fixed the case becomes an ordinary one).
"""

from __future__ import annotations

import base64
import time

import pytest

import kache_testlib as kt

BADCAS = b"987654321987"
MN_LINE = b"MN\r\n"  # ends every sentinel step's reply
MIB = 1024 * 1024


class Step:
    def __init__(
        self,
        data: bytes,
        *,
        mode: str = "sentinel",  # sentinel | eof | idle
        new_conn: bool = False,
        chunk: int | None = None,
        pause: float = 0.0,
        sleep: float = 0.0,
        timeout: float = 5.0,
    ):
        self.data = data
        self.mode = mode
        self.new_conn = new_conn
        self.chunk = chunk
        self.pause = pause
        self.sleep = sleep
        self.timeout = timeout


class Case:
    """A named differential case.

    memcached_bug: why the reference (memcached 1.6.18) is wrong here; then
    `expected` holds the right reply of each step (without the trailing MN),
    which kache is held to instead of memcached's.
    """

    def __init__(self, id: str, *steps, exact_cas: bool = False, reason: str = "", memcached_bug: str = "",
                 expected: list[bytes] | None = None):
        self.id = id
        self.steps = [s if isinstance(s, Step) else Step(s) for s in steps]
        self.exact_cas = exact_cas
        self.reason = reason
        self.memcached_bug = memcached_bug
        self.expected = expected
        if memcached_bug:
            assert expected is not None and len(expected) == len(self.steps), (
                f"case {id!r}: a memcached_bug case names the expected reply of every step")
            assert all(s.mode == "sentinel" for s in self.steps), id


def SET(key: bytes, value: bytes, flags: int = 0, exp: int = 0, cmd: bytes = b"set", extra: bytes = b"") -> bytes:
    line = b"%s %s %d %d %d" % (cmd, key, flags, exp, len(value))
    if extra:
        line += b" " + extra
    return line + b"\r\n" + value + b"\r\n"


def MS(key: bytes, value: bytes, flags: bytes = b"") -> bytes:
    line = b"ms %s %d" % (key, len(value))
    if flags:
        line += b" " + flags
    return line + b"\r\n" + value + b"\r\n"


def b64(k: bytes) -> bytes:
    return base64.b64encode(k)


K250 = b"k" * 250
K251 = b"k" * 251
BIG_OK = b"x" * (MIB - 4096)  # comfortably under the 1 MiB item limit
BIG_TOO = b"y" * (MIB + 1)  # 1 MiB + 1 byte: too large for -I 1m

MIXED_SCRIPT = (
    SET(b"a", b"1")
    + SET(b"b", b"hello", flags=7)
    + b"get a b c\r\n"
    + b"incr a 41\r\n"
    + SET(b"b", b" world", cmd=b"append")
    + SET(b"b", b"<<", cmd=b"prepend")
    + b"append b 6\r\n"  # malformed: missing fields
    + b"cas b 0 0 1 " + BADCAS + b"\r\nx\r\n"
    + b"gets b\r\n"
    + b"add a 0 0 1\r\nz\r\n"
    + b"replace c 0 0 1\r\nz\r\n"
    + b"delete a\r\n"
    + b"delete a\r\n"
    + b"touch b 100\r\n"
    + b"mg b v f k s\r\n"
    + b"ms c 2 T0 F3\r\nhi\r\n"
    + b"mg c v f\r\n"
    + b"ma c\r\n"
    + b"bogus\r\n"
    + b"decr nosuch 1\r\n"
    + b"get a b c\r\n"
)

CASES = [
    # ------------------------------------------------------------ storage
    Case("set_get", SET(b"foo", b"bar", flags=5) + b"get foo\r\n"),
    Case("set_overwrite", SET(b"k", b"one") + SET(b"k", b"second", flags=9) + b"get k\r\n"),
    Case("set_zero_length", SET(b"k", b"") + b"get k\r\n"),
    Case("set_binary_value", SET(b"k", b"a\r\nb\x00c\r\n\xff") + b"get k\r\n"),
    Case("set_value_looks_like_commands", SET(b"k", b"END\r\nVALUE x 0 1\r\nSTORED") + b"get k\r\n"),
    Case("set_flags_max_u32", SET(b"k", b"v", flags=4294967295) + b"get k\r\n"),
    Case("set_flags_over_u32", b"set k 4294967296 0 1\r\nv\r\nget k\r\n"),
    Case("set_flags_negative", b"set k -1 0 1\r\nv\r\nget k\r\n"),
    Case("set_flags_garbage", b"set k abc 0 1\r\nv\r\nget k\r\n"),
    Case("set_exptime_garbage", b"set k 0 abc 1\r\nv\r\nget k\r\n"),
    Case("set_length_garbage", b"set k 0 0 abc\r\nv\r\nget k\r\n"),
    Case("set_length_negative", b"set k 0 0 -1\r\nv\r\nget k\r\n"),
    Case("set_missing_length", b"set k 0 0\r\nget k\r\n"),
    Case("set_missing_key", b"set\r\n"),
    Case("set_noreply", SET(b"k", b"v", extra=b"noreply") + b"get k\r\n"),
    Case("set_too_many_args", b"set k 0 0 1 noreply x\r\nv\r\nget k\r\n"),
    Case("set_bad_noreply_token", b"set k 0 0 1 norepl\r\nv\r\nget k\r\n"),
    Case("set_extra_spaces", b"set   k  3   0 1  \r\nv\r\nget   k  \r\n"),
    Case("set_bare_newlines", b"set k 0 0 1\nv\r\nget k\n"),
    Case("set_value_with_crlf_inside", b"set k 0 0 10\r\nabc\r\nxxxxx\r\nget k\r\n"),
    Case("add_new_and_existing", SET(b"k", b"1", cmd=b"add") + SET(b"k", b"2", cmd=b"add") + b"get k\r\n"),
    Case("add_noreply", SET(b"k", b"1", cmd=b"add", extra=b"noreply") + SET(b"k", b"2", cmd=b"add", extra=b"noreply") + b"get k\r\n"),
    Case("replace_missing_and_existing", SET(b"k", b"1", cmd=b"replace") + SET(b"k", b"0") + SET(b"k", b"2", flags=4, cmd=b"replace") + b"get k\r\n"),
    Case("replace_noreply", SET(b"k", b"0") + SET(b"k", b"2", cmd=b"replace", extra=b"noreply") + b"get k\r\n"),
    Case("append_prepend", SET(b"k", b"mid", flags=3) + SET(b"k", b">>", flags=99, cmd=b"append") + SET(b"k", b"<<", flags=98, cmd=b"prepend") + b"gets k\r\n"),
    Case("append_missing", SET(b"k", b"x", cmd=b"append") + b"get k\r\n"),
    Case("prepend_missing", SET(b"k", b"x", cmd=b"prepend") + b"get k\r\n"),
    Case("append_prepend_noreply", SET(b"k", b"m") + SET(b"k", b"a", cmd=b"append", extra=b"noreply") + SET(b"k", b"p", cmd=b"prepend", extra=b"noreply") + SET(b"zz", b"p", cmd=b"append", extra=b"noreply") + b"get k zz\r\n"),
    Case("append_empty", SET(b"k", b"abc") + SET(b"k", b"", cmd=b"append") + b"get k\r\n"),
    # ------------------------------------------------------------ cas
    Case("cas_missing_key", b"cas k 0 0 1 1\r\nv\r\n"),
    Case("cas_missing_key_noreply", b"cas k 0 0 1 1 noreply\r\nv\r\nget k\r\n"),
    Case("cas_success", SET(b"k", b"v1"), b"gets k\r\n", b"cas k 5 0 2 {cas}\r\nv2\r\ngets k\r\n"),
    Case("cas_bad_value", SET(b"k", b"v1"), b"cas k 0 0 2 " + BADCAS + b"\r\nv2\r\nget k\r\n"),
    Case("cas_stale_after_modify", SET(b"k", b"v1"), b"gets k\r\n", SET(b"k", b"v2") + b"cas k 0 0 2 {cas}\r\nv3\r\nget k\r\n"),
    Case("cas_twice_same_token", SET(b"k", b"v1"), b"gets k\r\n", b"cas k 0 0 2 {cas}\r\nv2\r\ncas k 0 0 2 {cas}\r\nv3\r\nget k\r\n"),
    Case("cas_noreply", SET(b"k", b"v1"), b"gets k\r\n", b"cas k 0 0 2 {cas} noreply\r\nv2\r\ncas k 0 0 2 {cas} noreply\r\nv3\r\nget k\r\n"),
    Case("cas_garbage_token", SET(b"k", b"v1") + b"cas k 0 0 2 abc\r\nv2\r\nget k\r\n"),
    Case("cas_missing_token", SET(b"k", b"v1") + b"cas k 0 0 2\r\nv2\r\nget k\r\n"),
    Case("cas_after_delete", SET(b"k", b"v1"), b"gets k\r\n", b"delete k\r\ncas k 0 0 2 {cas}\r\nv2\r\n"),
    Case("cas_changes_after_append", SET(b"k", b"v1"), b"gets k\r\n", b"append k 0 0 1\r\nx\r\ncas k 0 0 2 {cas}\r\nv2\r\nget k\r\n"),
    Case("cas_changes_after_touch", SET(b"k", b"v1"), b"gets k\r\n", b"touch k 100\r\ncas k 0 0 2 {cas}\r\nv2\r\nget k\r\n"),
    Case("cas_changes_after_incr", SET(b"k", b"1"), b"gets k\r\n", b"incr k 1\r\ncas k 0 0 2 {cas}\r\nv2\r\nget k\r\n"),
    # ------------------------------------------------------------ get / gets
    Case("get_miss", b"get nothing\r\n"),
    Case("get_no_key", b"get\r\n"),
    Case("gets_no_key", b"gets\r\n"),
    Case("get_multi_hits_and_misses", SET(b"a", b"1", flags=1) + SET(b"c", b"333", flags=3) + b"get a b c d a\r\n"),
    Case("gets_multi_hits_and_misses", SET(b"a", b"1", flags=1) + SET(b"c", b"333", flags=3) + b"gets a b c\r\n"),
    Case("get_100_keys", b"".join(SET(b"key%d" % i, b"v%d" % i) for i in range(0, 100, 2)) + b"get " + b" ".join(b"key%d" % i for i in range(100)) + b"\r\n"),
    Case("get_large_multi_reply", b"".join(SET(b"big%d" % i, bytes([65 + i]) * 200000) for i in range(6)) + b"get " + b" ".join(b"big%d" % i for i in range(6)) + b"\r\n"),
    Case("get_key_250", SET(K250, b"v") + b"get " + K250 + b"\r\n"),
    Case("get_key_251", b"get " + K251 + b"\r\n"),
    # memcached drops every not-yet-flushed reply of the pipeline when a get
    # hits a too-long key ("kill any stacked responses"), so the get gets its
    # own round trip; within it, already-found values are dropped too.
    Case("get_multi_with_251_key", SET(b"a", b"1"), b"get a " + K251 + b" a\r\n"),
    Case("get_uppercase_command", SET(b"a", b"1") + b"GET a\r\n"),
    # ------------------------------------------------------------ keys
    Case("set_key_250", SET(K250, b"v") + b"get " + K250 + b"\r\n"),
    Case("set_key_251", SET(K251, b"v"), b"get " + K251 + b"\r\n"),
    Case("delete_key_251", b"delete " + K251 + b"\r\n"),
    Case("incr_key_251", b"incr " + K251 + b" 1\r\n"),
    Case("touch_key_251", b"touch " + K251 + b" 1\r\n"),
    Case("key_with_control_chars", SET(b"a\x01b", b"v") + SET(b"t\tab", b"w") + SET(b"d\x7fel", b"x") + b"get a\x01b t\tab d\x7fel\r\n"),
    Case("key_with_utf8_bytes", SET("ключ".encode(), b"v") + b"get " + "ключ".encode() + b"\r\n"),
    # ------------------------------------------------------------ delete
    Case("delete_hit_and_miss", SET(b"k", b"v") + b"delete k\r\ndelete k\r\nget k\r\n"),
    Case("delete_noreply", SET(b"k", b"v") + b"delete k noreply\r\ndelete k noreply\r\nget k\r\n"),
    Case("delete_legacy_zero", SET(b"k", b"v") + b"delete k 0\r\nget k\r\n"),
    Case("delete_legacy_zero_noreply", SET(b"k", b"v") + b"delete k 0 noreply\r\nget k\r\n"),
    Case("delete_with_time", SET(b"k", b"v") + b"delete k 10\r\nget k\r\n"),
    Case("delete_too_many_args", SET(b"k", b"v") + b"delete k 0 noreply extra\r\nget k\r\n"),
    Case("delete_no_key", b"delete\r\n"),
    # ------------------------------------------------------------ incr / decr
    Case("incr_missing", b"incr nokey 1\r\ndecr nokey 1\r\n"),
    Case("incr_basic", SET(b"n", b"1", flags=5) + b"incr n 1\r\nincr n 10\r\ndecr n 2\r\ngets n\r\n"),
    Case("incr_non_numeric", SET(b"n", b"abc") + b"incr n 1\r\ndecr n 1\r\nget n\r\n"),
    Case("incr_empty_value", SET(b"n", b"") + b"incr n 1\r\n"),
    Case("incr_hex_value", SET(b"n", b"0x10") + b"incr n 1\r\n"),
    Case("incr_negative_value", SET(b"n", b"-1") + b"incr n 1\r\n"),
    Case("incr_value_2_64", SET(b"n", b"18446744073709551616") + b"incr n 1\r\n"),
    Case("incr_invalid_delta", SET(b"n", b"5") + b"incr n abc\r\nincr n -1\r\nincr n 18446744073709551616\r\nincr n\r\nget n\r\n"),
    Case("decr_invalid_delta", SET(b"n", b"5") + b"decr n abc\r\ndecr n -1\r\nget n\r\n"),
    Case("incr_zero_delta", SET(b"n", b"7") + b"incr n 0\r\nget n\r\n"),
    Case("incr_across_signed_boundaries", SET(b"n", b"9223372036854775807") + b"incr n 1\r\nincr n 1\r\ndecr n 1\r\n" + SET(b"m", b"4294967295") + b"incr m 1\r\nincr m 1\r\n" + SET(b"z", b"0") + b"incr z 18446744073709551610\r\nget n m z\r\n"),
    Case("incr_wraps_at_2_64", SET(b"n", b"18446744073709551615") + b"incr n 1\r\nget n\r\n"),
    Case("incr_wraps_by_max", SET(b"n", b"2") + b"incr n 18446744073709551615\r\nget n\r\n"),
    Case("decr_floor_zero", SET(b"n", b"5") + b"decr n 6\r\nget n\r\ndecr n 1\r\nget n\r\n"),
    Case("decr_shrinks_length", SET(b"n", b"10") + b"decr n 1\r\nget n\r\n" + SET(b"m", b"1000") + b"decr m 999\r\nget m\r\n"),
    Case("incr_grows_length", SET(b"n", b"99") + b"incr n 1\r\nget n\r\n" + SET(b"m", b"9 ") + b"incr m 1\r\nget m\r\n"),
    Case("incr_leading_trailing_spaces", SET(b"n", b" 12") + b"incr n 1\r\nget n\r\n" + SET(b"m", b"12  ") + b"incr m 1\r\nget m\r\n" + SET(b"o", b"1 2") + b"incr o 1\r\n"),
    Case("incr_leading_zeros", SET(b"n", b"007") + b"incr n 1\r\nget n\r\n"),
    Case("incr_noreply", SET(b"n", b"1") + b"incr n 5 noreply\r\ndecr n 2 noreply\r\nincr miss 1 noreply\r\nget n\r\n"),
    Case("incr_noreply_errors", SET(b"n", b"x") + b"incr n 1 noreply\r\nincr n abc noreply\r\n"),
    Case("incr_too_many_args", SET(b"n", b"1") + b"incr n 1 2\r\nincr n 1 noreply x\r\nget n\r\n"),
    # ------------------------------------------------------------ touch / gat
    Case("touch_hit_miss", SET(b"k", b"v") + b"touch k 100\r\ntouch nokey 100\r\nmg k t v\r\n"),
    Case("touch_noreply", SET(b"k", b"v") + b"touch k 100 noreply\r\ntouch miss 1 noreply\r\nmg k t\r\n"),
    Case("touch_negative_expires", SET(b"k", b"v") + b"touch k -1\r\nget k\r\n"),
    Case("touch_zero_persists", SET(b"k", b"v", exp=100) + b"touch k 0\r\nmg k t\r\n"),
    Case("touch_bad_exptime", SET(b"k", b"v") + b"touch k abc\r\ntouch k\r\nget k\r\n"),
    Case("gat_hits_misses", SET(b"a", b"1", flags=2) + SET(b"b", b"22") + b"gat 100 a x b\r\nmg a t\r\nmg b t\r\n"),
    Case("gats_hits_misses", SET(b"a", b"1", flags=2) + b"gats 0 a x\r\nmg a t\r\n"),
    Case("gat_negative_expires", SET(b"a", b"1") + b"gat -1 a\r\nget a\r\n"),
    Case("gat_bad_exptime", SET(b"a", b"1") + b"gat abc a\r\n"),
    Case("gat_no_key", b"gat 10\r\ngat\r\ngats 10\r\n"),
    # ------------------------------------------------------------ exptime
    Case("exptime_negative_gone", SET(b"k", b"v", exp=-1) + b"get k\r\n" + SET(b"k2", b"v") + SET(b"k2", b"w", exp=-100) + b"get k2\r\n"),
    Case("exptime_zero_forever", SET(b"k", b"v", exp=0) + b"mg k t v\r\n"),
    Case("exptime_relative_ttl", SET(b"k", b"v", exp=100) + b"mg k t v\r\n"),
    Case("exptime_30_days_is_relative", SET(b"k", b"v", exp=2592000) + b"mg k t v\r\n"),
    Case("exptime_30_days_plus_1_is_absolute_past", SET(b"k", b"v", exp=2592001) + b"get k\r\n"),
    Case("exptime_absolute_past", SET(b"k", b"v", exp=1000000000) + b"get k\r\n"),
    Case("exptime_absolute_future", SET(b"k", b"v", exp=int(time.time()) + 1000) + b"mg k v t\r\n"),
    Case("touch_gat_absolute_past", SET(b"a", b"1") + SET(b"b", b"2") + b"touch a 1000000000\r\ngat 1000000000 b\r\nget a b\r\n"),
    Case("meta_ttl_absolute", MS(b"a", b"1", b"T1000000000") + MS(b"b", b"2", b"T%d" % (int(time.time()) + 500)) + MS(b"c", b"3") + b"mg c T1000000000\r\nmg a v\r\nmg b t\r\nmg c v\r\n"),
    Case("add_over_expired_item", SET(b"k", b"v", exp=-1) + SET(b"k", b"new", cmd=b"add") + b"get k\r\n"),
    # ------------------------------------------------------------ size limits
    Case("value_near_limit", SET(b"big", BIG_OK) + b"get big\r\n"),
    # memcached's exact limit (item header + key + value <= -I); kache matches it
    Case("value_size_boundary_1_byte_key", SET(b"k", b"a" * 1048516) + SET(b"j", b"a" * 1048517) + b"mg k s\r\nmg j s\r\n"),
    Case("value_size_boundary_250_byte_key", SET(K250, b"a" * 1048267) + SET(b"j" * 250, b"a" * 1048268) + b"mg " + K250 + b" s\r\nmg " + b"j" * 250 + b" s\r\n"),
    Case("value_size_boundary_ms", MS(b"k", b"a" * 1048516) + MS(b"j", b"a" * 1048517) + b"mg k s\r\nmg j s\r\n"),
    Case("value_too_large", SET(b"big", BIG_TOO) + b"get big\r\nset after 0 0 2\r\nok\r\nget after\r\n"),
    Case("value_too_large_noreply", SET(b"big", BIG_TOO, extra=b"noreply") + b"get big\r\n"),
    Case("value_too_large_deletes_old", SET(b"k", b"old") + SET(b"k", BIG_TOO) + b"get k\r\n"),
    Case("value_too_large_add_keeps_old", SET(b"k", b"old") + SET(b"k", BIG_TOO, cmd=b"add") + b"get k\r\n"),
    Case("value_too_large_2mib", SET(b"big", b"z" * (2 * MIB)) + b"get big\r\n"),
    Case("bad_data_chunk_too_long", b"set k 0 0 2\r\nabcd\r\nget k\r\n"),
    Case("bad_data_chunk_too_short", b"set k 0 0 5\r\nab\r\n\r\n\r\nget k\r\n"),
    Case("bad_data_chunk_no_crlf", b"set k 0 0 3\r\nabcde\r\nget k\r\n"),
    Case("bad_data_chunk_keeps_old_value", SET(b"k", b"old") + b"set k 0 0 2\r\nabcd\r\nget k\r\n"),
    # ------------------------------------------------------------ errors
    Case("unknown_command", b"bogus\r\nbogus with args\r\n"),
    Case("empty_line", b"\r\n"),
    Case("whitespace_line", b"   \r\n"),
    Case("bare_lf_lines", SET(b"k", b"v") + b"\n\nget k\n   get k\n"),
    Case("cr_inside_key", b"set a\rb 0 0 1\r\nv\r\nget a\rb\r\nget a\r\n"),
    Case("ms_flags_over_u32", MS(b"k", b"v", b"F4294967296") + MS(b"j", b"v", b"F4294967295") + MS(b"i", b"v", b"F-1") + b"mg k f\r\nmg j f\r\nmg i f\r\n"),
    Case("too_many_tokens_set", b"set k 0 0 1 noreply a b c d e f g h i j k l m n o p q r s t u v w x y z\r\nv\r\nget k\r\n"),
    Case("too_many_tokens_get_is_fine", SET(b"k", b"v") + b"get " + b" ".join([b"k"] * 40) + b"\r\n"),
    Case("too_many_tokens_touch", SET(b"k", b"v") + b"touch k 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25\r\n"),
    Case("flush_all", SET(b"a", b"1") + SET(b"b", b"2") + b"flush_all\r\nget a b\r\n" + SET(b"c", b"3") + b"get c\r\n"),
    Case("flush_all_0", SET(b"a", b"1") + b"flush_all 0\r\nget a\r\n"),
    Case("flush_all_noreply", SET(b"a", b"1") + b"flush_all noreply\r\nget a\r\n"),
    Case("flush_all_0_noreply", SET(b"a", b"1") + b"flush_all 0 noreply\r\nget a\r\n"),
    Case("flush_all_garbage", SET(b"a", b"1") + b"flush_all abc\r\nflush_all 0 extra\r\nflush_all noreply extra\r\nget a\r\n"),
    Case("flush_all_delayed", SET(b"a", b"1") + b"flush_all 100\r\nget a\r\n"),
    Case("shutdown_not_enabled", SET(b"k", b"v") + b"shutdown\r\nshutdown graceful\r\nget k\r\n"),
    Case("cache_memlimit", b"cache_memlimit 100\r\ncache_memlimit abc\r\ncache_memlimit\r\ncache_memlimit 100 noreply\r\n"),
    Case("flush_all_absolute_past", SET(b"a", b"1") + b"flush_all 1000000000\r\nget a\r\n" + SET(b"b", b"2") + b"get b\r\n"),
    Case("flush_all_negative", SET(b"a", b"1") + b"flush_all -1\r\nget a\r\n" + SET(b"b", b"2") + b"get b\r\n"),
    Case("incr_delta_leading_zeros", SET(b"n", b"5") + b"incr n 000000000000000000000000001\r\nincr n +1\r\nincr n 1x\r\nget n\r\n"),
    Case("gat_noreply_is_a_key", SET(b"noreply", b"x") + SET(b"k", b"v") + b"gat 100 k noreply\r\ntouch k 10 noreply extra\r\n"),
    Case("verbosity_extra_args", b"verbosity 1 2\r\nverbosity 1 noreply extra\r\nverbosity -1\r\n"),
    Case("version", b"version\r\n"),
    Case("verbosity", b"verbosity 1\r\nverbosity 0\r\nverbosity 1 noreply\r\nverbosity\r\nverbosity abc\r\nverbosity 0\r\n"),
    Case("stats_reset", b"stats reset\r\n"),
    Case(
        "stats_detail",
        b"stats detail dump\r\nstats detail on\r\nstats detail dump\r\n"
        + SET(b"foo:1", b"v") + b"get foo:1 foo:2\r\ndelete foo:1\r\nstats detail dump\r\n"
        + b"stats detail off\r\nstats detail\r\nstats detail bogus\r\n",
    ),
    Case("stats_unknown_subcommand", b"stats bogus\r\nstats items extra\r\n"),
    Case("quit_closes", Step(SET(b"k", b"v") + b"quit\r\nget k\r\n", mode="eof"), Step(b"get k\r\n", new_conn=True)),
    Case("quit_with_args", Step(b"quit now\r\nget k\r\n", mode="eof")),
    # ------------------------------------------------------------ pipelining / framing
    Case("pipelined_mixed", MIXED_SCRIPT),
    Case("byte_by_byte_mixed", Step(MIXED_SCRIPT, chunk=1, pause=0.0005)),
    Case("chunks_of_7_mixed", Step(MIXED_SCRIPT, chunk=7, pause=0.001)),
    Case("split_inside_crlf", Step(SET(b"k", b"v") + b"get k\r", mode="idle"), Step(b"\nget k\r\n")),
    Case("split_inside_data_crlf", Step(b"set k 0 0 3\r\nabc\r", mode="idle"), Step(b"\nget k\r\n")),
    Case("split_inside_data_block", Step(b"set k 0 0 6\r\nabc", mode="idle"), Step(b"def\r\nget k\r\n")),
    Case("byte_by_byte_big_value", Step(SET(b"k", b"0123456789" * 50) + b"get k\r\n", chunk=1)),
    Case("too_large_sent_in_small_writes", Step(SET(b"k", b"old") + SET(b"k", BIG_TOO) + b"get k\r\n" + SET(b"j", b"ok") + b"get j\r\n", chunk=4096)),
    Case("header_byte_by_byte_then_data", Step(b"set k 0 0 10\r\n", chunk=1, mode="idle"), Step(b"0123456789\r\nget k\r\n", chunk=3)),
    Case("get_10000_keys", b"".join(SET(b"key%d" % i, b"%d" % i) for i in range(0, 10000, 97)) + b"get " + b" ".join(b"key%d" % i for i in range(10000)) + b"\r\n"),
    Case("tab_separator", SET(b"k", b"v") + b"get\tk\r\nget k\tk\r\n"),
    Case("double_cr", SET(b"k", b"v") + b"get k\r\r\nget k \r\n"),
    Case("bad_data_chunk_noreply", b"set k 0 0 1 noreply\r\nvv\r\nget k\r\n"),
    Case("negative_length_noreply", b"set k 0 0 -1 noreply\r\nget k\r\n"),
    Case("too_large_cas", SET(b"k", b"v"), b"gets k\r\n", b"cas k 0 0 1048577 {cas}\r\n" + BIG_TOO + b"\r\nget k\r\n"),
    Case("too_large_append", SET(b"k", b"v") + SET(b"k", BIG_TOO, cmd=b"append") + b"get k\r\n"),
    Case("append_grows_past_limit", SET(b"k", BIG_OK) + SET(b"k", b"z" * 8192, cmd=b"append") + b"mg k s\r\n"),
    # ------------------------------------------------------------ meta: mn / mg
    Case("mn", b"mn\r\n"),
    Case("mn_with_args", b"mn foo\r\n"),
    Case("mg_miss", b"mg nokey\r\nmg nokey v\r\n"),
    Case("mg_miss_quiet", b"mg nokey q\r\nmg nokey v q k\r\n"),
    Case("mg_hit_no_flags", SET(b"k", b"v") + b"mg k\r\n"),
    Case("mg_hit_value", SET(b"k", b"val", flags=12) + b"mg k v\r\n"),
    Case("mg_all_return_flags", SET(b"k", b"val", flags=12, exp=100) + b"mg k v k f c s t\r\nmg k s f t k\r\n"),
    Case("mg_hit_quiet_still_returns", SET(b"k", b"val") + b"mg k v q\r\nmg k q\r\n"),
    Case("mg_opaque", SET(b"k", b"v") + b"mg k v O123\r\nmg miss v O456\r\nmg k Oabc k\r\n"),
    Case("mg_opaque_too_long", SET(b"k", b"v") + b"mg k O" + b"x" * 33 + b"\r\nmg k O" + b"x" * 32 + b"\r\n"),
    Case("mg_base64_key", MS(b64(b"bin\x00key"), b"v", b"b") + b"mg " + b64(b"bin\x00key") + b" b v k\r\nmg " + b64(b"bin\x00key") + b" b k O1 q\r\nmg " + b64(b"nokey") + b" b k q\r\n"),
    Case("binary_key_via_base64_meta", MS(b64(b"a b\r\nc"), b"v", b"b F3") + b"mg " + b64(b"a b\r\nc") + b" b v f\r\nma " + b64(b"x y") + b" b N0 J5 v\r\nmd " + b64(b"a b\r\nc") + b" b\r\nmg " + b64(b"a b\r\nc") + b" b v\r\n"),
    Case("meta_base64_invalid", b"ms !!! 1 b\r\nx\r\nmd !!! b\r\nma !!! b\r\n"),
    Case("mg_base64_invalid", b"mg !!!notb64 b v\r\n"),
    Case(
        "meta_b_flag_after_rewrites",
        # (incr/decr/ma are left out: memcached rewrites in place, keeping
        # the flag, only when no LRU bump holds a reference - timing-dependent)
        b"".join(MS(b64(b"k%d" % i), b"1", b"b") for i in range(5))
        + SET(b"k0", b"2", cmd=b"append")
        + SET(b"k1", b"2", cmd=b"prepend")
        + SET(b"k2", b"2")
        + MS(b"k3", b"2")
        + b"touch k4 100\r\n"
        + b"".join(b"mg k%d k\r\n" % i for i in range(5)),
    ),
    Case("meta_b_item_accessed_without_b", MS(b64(b"plain"), b"v", b"b") + b"mg plain k v\r\nme plain\r\nmg " + b64(b"plain") + b" b k\r\nget plain\r\nma " + b64(b"plain") + b" b k\r\n"),
    Case("mg_base64_key_lengths", MS(b64(b"\x01" * 250), b"v", b"b") + b"mg " + b64(b"\x01" * 250) + b" b v\r\nmg " + b64(b"\x01" * 251) + b" b v\r\n"),
    Case("me_base64", MS(b64(b"bin\x03"), b"v", b"b") + b"me " + b64(b"bin\x03") + b" b\r\n"),
    Case("meta_flag_missing_token", MS(b"k", b"1") + b"mg k T\r\nmg k O\r\nms k 1 F\r\nx\r\nma k D\r\nmg k N\r\n"),
    Case("meta_flags_glued", MS(b"k", b"1") + b"mg k vkf\r\nmg k v  k\r\n"),

    Case("mg_hit_and_last_access", SET(b"k", b"v") + b"mg k h l\r\nmg k h l\r\nmg k h l v\r\n"),
    Case("mg_no_bump_u", SET(b"k", b"v") + b"mg k u h\r\nmg k h\r\nmg k h\r\n"),
    Case("mg_touch_T", SET(b"k", b"v") + b"mg k T100 t\r\nmg k t\r\nmg k T-1 v\r\nmg k v\r\n"),
    # Flags are handled in request order: a `t` before `T` (or `ma`'s creating `N`) reports
    # the TTL before it.
    Case("meta_t_before_T_or_N", SET(b"k", b"v") + SET(b"n", b"5") + b"mg k t T100 v\r\nmg k t\r\n"
         b"ma n t T100 v\r\nma n t\r\nma m N50 t J3 v\r\nma m2 t N50 J3 v\r\n"),
    Case("mg_vivify_N", b"mg k N30 s v c t\r\nmg k N30 s v t\r\nmg k v\r\n"),
    Case("mg_vivify_then_set", b"mg k N30 v\r\n" + SET(b"k", b"data") + b"mg k v\r\n"),
    Case("mg_recache_R", SET(b"k", b"v", exp=100) + b"mg k R30 v t\r\nmg k R200 v\r\nmg k R200 v\r\n"),
    Case(
        "hit_flag_after_each_command",
        b"".join(SET(b"k%d" % i, b"1") for i in range(12))
        + b"get k0\r\n"
        + SET(b"k1", b"2", cmd=b"add")
        + b"touch k2 100\r\n"
        + b"gat 100 k3\r\n"
        + SET(b"k4", b"2", cmd=b"append")
        + b"incr k5 1\r\n"
        + b"ma k6\r\n"
        + b"mg k7 u v\r\n"
        + b"mg k8 T100\r\n"
        + SET(b"k9", b"2", cmd=b"replace")
        + b"ms k10 1 MA\r\n2\r\n"
        + b"ms k11 1 ME\r\n2\r\n"
        + b"".join(b"mg k%d h\r\n" % i for i in range(12))
        + b"ma fresh N0\r\nmg fresh h\r\n",
    ),
    Case(
        "mg_vivify_t_before_N",
        b"mg k t N100\r\nmg k t\r\nmg j N100 t\r\n",
        # protocol.txt: N creates the item "with the key and TTL as supplied", t returns
        # the "TTL remaining"; memcached (1.6.18, and upstream's master still) handles the
        # flags in request order and prints t before N has set the TTL.
        memcached_bug="answers t-1 when `t` precedes `N` on the vivifying miss (flag-order dependent)",
        expected=[b"HD t100 W\r\nHD t100 Z\r\nHD t100 W\r\n"],
    ),
    Case(
        "ma_autocreate_quiet",
        b"ma n N0 q\r\nma n q\r\nma m N0 J7 q v\r\nmg n v\r\n",
        # 1.6.18 sets resp->skip for q only when the delta applied, not when N created the
        # item; fixed in 1.6.40 (commit 778cfd6e5, process_marithmetic_cmd in
        # proto_parser.c), which answers only the final mg.
        memcached_bug="ignores q when ma N auto-creates the item (fixed in 1.6.40)",
        expected=[b"VA 1\r\n1\r\n"],
    ),
    Case("mg_compare_cas_C", SET(b"k", b"v"), b"mg k c\r\n", b"mg k C{cas} v\r\nmg k C" + BADCAS + b" v\r\n"),
    Case("mg_E_flag", b"mg k N30 E5555 c\r\nmg k c\r\n", exact_cas=True, reason="1.6.18 rejects E; the reference decides"),
    Case("mg_unknown_flag", SET(b"k", b"v") + b"mg k !\r\nmg k v @\r\n"),
    Case("mg_duplicate_flag", SET(b"k", b"v") + b"mg k v v\r\n"),
    Case("mg_no_key", b"mg\r\n"),
    Case("mg_key_250", SET(K250, b"v") + b"mg " + K250 + b" v\r\n"),
    Case("mg_key_251", b"mg " + K251 + b" v\r\n"),
    Case("mg_bad_numeric_token", SET(b"k", b"v") + b"mg k Tabc\r\nmg k Nabc\r\n"),
    Case("mg_pipelined_quiet", SET(b"a", b"1") + SET(b"c", b"3") + b"mg a v q k\r\nmg b v q k\r\nmg c v q k\r\nmg d v q k\r\n"),
    # ------------------------------------------------------------ meta: ms
    Case("ms_basic", MS(b"k", b"abc") + b"mg k v f t\r\n"),
    Case("ms_flags_ttl", MS(b"k", b"abc", b"F42 T100") + b"mg k v f t\r\nget k\r\n"),
    Case("ms_return_flags", MS(b"k", b"abc", b"k O77 c") + b"mg k v\r\n"),
    Case("ms_quiet", MS(b"k", b"abc", b"q") + b"mg k v\r\n"),
    Case("ms_invalid_flags_I_without_C", MS(b"k", b"abc", b"I") + b"mg k v\r\n"),
    Case("ms_base64", MS(b64(b"bin\x01key"), b"abc", b"b k") + b"get bin\x01key\r\n"),
    Case("ms_bad_datalen", b"ms k abc\r\nabc\r\nms k\r\nms k -1\r\nabc\r\n"),
    Case("ms_no_key", b"ms\r\n"),
    Case("ms_key_251", b"ms " + K251 + b" 1\r\nx\r\n"),
    Case("ms_bad_data_chunk", b"ms k 2\r\nabcd\r\nmg k v\r\n"),
    Case("ms_too_large", MS(b"k", BIG_TOO) + b"mg k v\r\n"),
    Case("ms_mode_add", MS(b"k", b"1", b"ME") + MS(b"k", b"2", b"ME") + b"mg k v\r\n"),
    Case("ms_mode_replace", MS(b"k", b"1", b"MR") + MS(b"k", b"0") + MS(b"k", b"2", b"MR") + b"mg k v\r\n"),
    Case("ms_mode_append_prepend", MS(b"k", b"mid") + MS(b"k", b">", b"MA") + MS(b"k", b"<", b"MP") + b"mg k v\r\n"),
    Case("ms_mode_append_missing", MS(b"k", b">", b"MA") + MS(b"k", b"<", b"MP") + b"mg k v\r\n"),
    Case("ms_mode_append_vivify", MS(b"k", b"seed", b"MA N100") + b"mg k v t\r\n"),
    Case("ms_mode_set_explicit", MS(b"k", b"1", b"MS") + b"mg k v\r\n"),
    Case("ms_mode_lowercase", MS(b"k", b"1", b"Ms") + MS(b"k", b"2", b"Me") + b"mg k v\r\n"),
    Case("ms_mode_invalid", MS(b"k", b"1", b"MX") + b"mg k v\r\n"),
    Case("ms_compare_cas", MS(b"k", b"1"), b"mg k c\r\n", MS(b"k", b"2", b"C{cas}") + MS(b"k", b"3", b"C{cas}") + b"mg k v\r\n"),
    Case("ms_bad_cas_returns_c0", SET(b"k", b"v") + MS(b"k", b"io", b"c C" + BADCAS) + MS(b"nokey", b"io", b"c C" + BADCAS) + MS(b"k", b"io", b"c ME"), exact_cas=True),
    Case(
        "stale_item_lifecycle",
        SET(b"toinv", b"moo"),
        b"md toinv I T30\r\nmg toinv s c v\r\n",
        MS(b"toinv", b"f", b"T90 C0") + MS(b"toinv", b"f", b"I T90 C{cas-1}") + b"mg toinv s v c\r\nmg toinv s v\r\n",
        MS(b"toinv", b"g", b"T90 C{cas}") + b"mg toinv s v t\r\n",
    ),
    Case("ms_compare_cas_missing", MS(b"k", b"1", b"C123") + b"mg k v\r\n"),
    Case("ms_explicit_cas_E", MS(b"k", b"1", b"E777 c") + b"mg k c\r\ngets k\r\n" + MS(b"k", b"2", b"C777 E778 c") + b"mg k c v\r\n", exact_cas=True),
    Case("ms_E_flag", MS(b"k", b"1", b"E100") + b"mg k v\r\n", reason="1.6.18 rejects E; the reference decides"),
    Case("ms_invalidate_I", MS(b"k", b"1") + MS(b"k", b"2"), b"mg k c\r\n", MS(b"k", b"3", b"C{cas-1} I") + b"mg k v c\r\n" + MS(b"k", b"4", b"C{cas-1}") + b"mg k v\r\n"),
    # I only accepts a CAS *older* than the item's; {cas+1} is newer in any numbering
    Case("ms_invalidate_I_with_newer_cas", MS(b"k", b"1"), b"mg k c\r\n", MS(b"k", b"2", b"I C{cas+1}") + MS(b"k", b"3", b"I C{cas+1} q") + b"mg k v\r\n"),
    Case("ms_invalidate_I_then_fresh_set", MS(b"k", b"1") + MS(b"k", b"2"), b"mg k c\r\n", MS(b"k", b"3", b"C{cas-1} I") + MS(b"k", b"5") + b"mg k v\r\n"),
    Case("ms_old_syntax_S_flag", b"ms k S1 T0\r\nx\r\nmg k v\r\n"),
    Case("ms_unknown_flag", MS(b"k", b"1", b"!") + MS(b"k", b"1", b"Z") + b"mg k v\r\n"),
    Case("ms_quiet_failure_shown", MS(b"k", b"1", b"ME q") + MS(b"k", b"2", b"ME q") + MS(b"j", b"2", b"MR q") + b"mg k v\r\n"),
    Case("ms_ttl_negative", MS(b"k", b"1", b"T-1") + b"mg k v\r\n"),
    Case("ms_invalid_flag_token", MS(b"k", b"1", b"Fabc") + MS(b"k", b"1", b"Tabc") + b"mg k v\r\n"),
    Case("ms_return_size_s", MS(b"k", b"abc", b"s") + MS(b"k", b"de", b"MA s") + b"mg k v s\r\n"),
    # ------------------------------------------------------------ meta: md
    Case("md_hit_miss", SET(b"k", b"v") + b"md k\r\nmd k\r\nmg k v\r\n"),
    Case("md_quiet", SET(b"k", b"v") + b"md k q\r\nmd k q\r\nmg k v\r\n"),
    Case("md_opaque_key", SET(b"k", b"v") + b"md k O9 k\r\nmd k O9 k\r\n"),
    Case("md_compare_cas", SET(b"k", b"v"), b"mg k c\r\n", b"md k C" + BADCAS + b"\r\nmd k C{cas}\r\nmg k v\r\n"),
    Case("md_invalidate", SET(b"k", b"v", exp=100), b"md k I T30\r\nmg k v t c\r\nmg k v\r\n" + MS(b"k", b"new") + b"mg k v\r\n"),
    Case("md_invalidate_cas_checks", MS(b"k", b"1") + MS(b"k", b"2"), b"mg k c\r\n", b"md k I C" + BADCAS + b"\r\nmg k v\r\nmd k I C{cas-1}\r\nmg k v\r\nmd k I C{cas}\r\nmg k v\r\n"),
    Case("md_base64", SET(b"bin\x02k", b"v") + b"md " + b64(b"bin\x02k") + b" b\r\nget bin\x02k\r\n"),
    Case("md_no_key", b"md\r\n"),
    Case("md_key_251", b"md " + K251 + b"\r\n"),
    Case("md_remove_value_x", SET(b"k", b"value", flags=5) + b"md k x\r\nmg k v f\r\n"),
    # ------------------------------------------------------------ meta: ma
    Case("ma_miss", b"ma k\r\nma k v\r\n"),
    Case("ma_basic", SET(b"n", b"10") + b"ma n\r\nma n v\r\nma n D5 v\r\nget n\r\n"),
    Case("ma_autocreate", b"ma n N0 J13 v\r\nma n N0 J13 v\r\nmg n v t\r\n"),
    Case("ma_autocreate_ttl", b"ma n N100 v t\r\n"),
    Case("ma_modes", SET(b"n", b"10") + b"ma n MD v\r\nma n M- D2 v\r\nma n MI v\r\nma n M+ D3 v\r\nma n Mx v\r\n"),
    Case("ma_decr_floor", SET(b"n", b"3") + b"ma n MD D10 v\r\n"),
    Case("ma_incr_wrap", SET(b"n", b"18446744073709551615") + b"ma n v\r\n"),
    Case("ma_non_numeric", SET(b"n", b"abc") + b"ma n v\r\n"),
    Case("ma_invalid_delta", SET(b"n", b"1") + b"ma n Dabc v\r\nma n D-1 v\r\n"),
    Case("ma_quiet", SET(b"n", b"1") + b"ma n q\r\nma miss q\r\nmg n v\r\n"),
    Case("ma_opaque_key_cas_ttl", SET(b"n", b"1", exp=100) + b"ma n O5 k c t v\r\n"),
    Case("ma_compare_cas", SET(b"n", b"1"), b"mg n c\r\n", b"ma n C" + BADCAS + b" v\r\nma n C{cas} v\r\n"),
    Case("ma_update_ttl", SET(b"n", b"1") + b"ma n T100 v\r\nmg n t\r\n"),
    Case("ma_shrinking_length", SET(b"n", b"10") + b"ma n MD v\r\nget n\r\n"),
    Case("ma_no_key", b"ma\r\n"),
    Case("meta_no_key_errors", b"mg\r\nms\r\nmd\r\nma\r\nme\r\n"),
    Case("classic_missing_args", b"incr\r\ndecr k\r\ntouch\r\ncas k 0 0\r\ngat\r\n"),
    # ------------------------------------------------------------ meta: me
    Case("me_hit_miss", SET(b"k", b"v") + b"me k\r\nme nokey\r\n"),
    Case("me_after_fetch", SET(b"k", b"v", exp=100) + b"get k\r\nme k\r\n"),
    # cls and size are memcached's class and ITEM_ntotal (flags counted when not zero)
    Case("me_class_and_size", SET(b"k", b"x" * 300, flags=5) + SET(b"j", b"y" * 5000) + SET(b"i", b"z" * 600000) + b"me k\r\nme j\r\nme i\r\n"),
    # ------------------------------------------------------------ noreply everywhere, in one go
    Case(
        "noreply_all_commands",
        SET(b"a", b"1", extra=b"noreply")
        + SET(b"a", b"2", cmd=b"add", extra=b"noreply")
        + SET(b"b", b"2", cmd=b"add", extra=b"noreply")
        + SET(b"a", b"3", cmd=b"replace", extra=b"noreply")
        + SET(b"a", b"4", cmd=b"append", extra=b"noreply")
        + SET(b"a", b"5", cmd=b"prepend", extra=b"noreply")
        + b"cas a 0 0 1 " + BADCAS + b" noreply\r\nx\r\n"
        + b"incr b 10 noreply\r\n"
        + b"decr b 3 noreply\r\n"
        + b"touch b 100 noreply\r\n"
        + b"delete a noreply\r\n"
        + b"get a b\r\n"
        + b"flush_all noreply\r\n"
        + b"get a b\r\n",
    ),
]


def _fill(data: bytes, cas: int | None) -> bytes:
    for ph, delta in ((b"{cas}", 0), (b"{cas-1}", -1), (b"{cas+1}", 1)):
        if ph in data:
            if cas is None:
                # nothing returned a CAS yet: any value will do, it cannot match
                cas = int(BADCAS)
            data = data.replace(ph, str(cas + delta).encode())
    return data


def _run_step(conn: kt.Conn, step: Step, data: bytes) -> bytes:
    if step.mode == "sentinel":
        n = kt.count_mn(data) + 1
        conn.send(data + b"mn\r\n", chunk=step.chunk, pause=step.pause)
        return conn.read_sentinel(n, step.timeout)
    conn.send(data, chunk=step.chunk, pause=step.pause)
    if step.mode == "eof":
        return conn.read_eof(step.timeout)
    if step.mode == "idle":
        return conn.read_idle(0.3, step.timeout)
    raise AssertionError(step.mode)


def _norm(reply: bytes, exact_cas: bool, lenient_padding: bool = False, cas: kt.CasNames | None = None):
    items = kt.normalise(reply, lenient_padding=lenient_padding, cas=cas)
    if exact_cas:
        # re-insert raw CAS values where the normaliser named them
        raw_items, _ = kt.parse_reply(reply)
        fixed = []
        for (kind, raw), norm in zip(raw_items, items):
            if kind == "line":
                fixed.append(("line", (raw.rstrip(b"\r\n"),), norm[2]))
            else:
                fixed.append(norm)
        fixed.extend(items[len(raw_items) :])
        return fixed
    return items


def normalised(transcript, case: Case, lenient_padding: bool = False):
    """Each step's normalised replies, {name: items}; CAS values are named per server
    across all the steps of the case."""
    names = {n: kt.CasNames() for n in transcript[0][1]} if transcript else {}
    return [
        {n: _norm(reply, case.exact_cas, lenient_padding, names[n]) for n, reply in replies.items()}
        for _, replies in transcript
    ]


def run_differential(pair, case: Case):
    names = ("memcached", "kache")
    servers = {"memcached": pair.mc, "kache": pair.node}
    conns = {n: kt.Conn(servers[n].addr) for n in names}
    cas = {n: None for n in names}
    transcript = []  # (request, {name: reply})
    try:
        for step in case.steps:
            if step.sleep:
                time.sleep(step.sleep)
            replies = {}
            for n in names:
                if step.new_conn:
                    conns[n].close()
                    conns[n] = kt.Conn(servers[n].addr)
                data = _fill(step.data, cas[n])
                replies[n] = _run_step(conns[n], step, data)
                c = kt.extract_cas(replies[n])
                if c is not None:
                    cas[n] = c
            transcript.append((step, replies))
            if step.mode == "sentinel" and kt.TIMEOUT_MARK in replies["kache"]:
                break  # kache is stuck: later steps would only add timeouts
    finally:
        for c in conns.values():
            c.close()
    return transcript


def _report(case: Case, transcript, bad_steps, lenient_padding: bool = False, against: str = "memcached") -> str:
    """`against`: what kache was compared with, "memcached" or "expected" (the case's
    expected reply, where memcached is known to be wrong)."""
    lines = [f"differential case {case.id!r}: kache's replies differ from {against}'s at step(s) {bad_steps}"]
    if case.memcached_bug:
        lines.append(f"    (memcached 1.6.18 bug: {case.memcached_bug})")
    norm = normalised(transcript, case, lenient_padding)
    for i, (step, replies) in enumerate(transcript):
        mark = "  <-- MISMATCH" if i in bad_steps else ""
        lines.append(f"--- step {i}{mark}: request {kt.show(step.data, 400)}")
        lines.append(f"    memcached: {kt.show(replies['memcached'], 1200)}")
        if case.expected is not None:
            lines.append(f"    expected : {kt.show(case.expected[i] + MN_LINE, 1200)}")
        lines.append(f"    kache    : {kt.show(replies['kache'], 1200)}")
        if i in bad_steps:
            a = norm[i]["memcached"] if against == "memcached" else _expected(case)[i]
            b = norm[i]["kache"]
            for j in range(max(len(a), len(b))):
                x = a[j] if j < len(a) else "<missing>"
                y = b[j] if j < len(b) else "<missing>"
                if x != y:
                    lines.append(f"    first normalised difference at item {j}:")
                    lines.append(f"      {against:9}: {str(x)[:400]}")
                    lines.append(f"      kache    : {str(y)[:400]}")
                    break
    return "\n".join(lines)


def _expected(case: Case):
    """The normalised expected replies of a memcached_bug case (each ends with the MN)."""
    names = kt.CasNames()
    return [_norm(e + MN_LINE, case.exact_cas, cas=names) for e in case.expected]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_differential(pair, case):
    transcript = run_differential(pair, case)
    # The reference itself must give a complete, well-formed answer; otherwise
    # the case is badly designed (it would only be comparing timeouts).
    for i, (step, replies) in enumerate(transcript):
        ref = replies["memcached"]
        assert kt.TIMEOUT_MARK not in ref or step.mode == "idle", (
            f"case {case.id!r} step {i}: memcached reply incomplete (test bug)"
        )
    norm = normalised(transcript, case)
    if not case.memcached_bug:
        bad = [i for i, n in enumerate(norm) if n["memcached"] != n["kache"]]
        assert not bad, _report(case, transcript, bad)
        return
    # memcached is known to be wrong here: kache must give the expected reply...
    expected = _expected(case)
    bad = [i for i, n in enumerate(norm) if n["kache"] != expected[i]]
    assert not bad, _report(case, transcript, bad, against="expected")
    # ...and the reference must still show the bug, or the note is stale.
    assert any(n["memcached"] != expected[i] for i, n in enumerate(norm)), (
        f"case {case.id!r}: memcached now gives the expected reply; drop memcached_bug "
        f"({case.memcached_bug}) and make it an ordinary case"
    )


# ---------------------------------------------------------------------------
# Stats counters: same operations on both fresh servers, same counter values.
# ---------------------------------------------------------------------------

COUNTERS = [
    "cmd_get", "cmd_set", "cmd_flush", "cmd_touch",
    "get_hits", "get_misses",  # get_expired/get_flushed: racy with memcached's LRU crawler
    "delete_misses", "delete_hits",
    "incr_misses", "incr_hits", "decr_misses", "decr_hits",
    "cas_misses", "cas_hits", "cas_badval",
    "touch_hits", "touch_misses",
    "curr_items", "total_items",
]

# memcached rewrites an incr/decr result in place (not counted in
# total_items) only when nothing else holds a reference to the item, which is
# timing-dependent, so total_items is compared before any arithmetic hit.
STATS_SCRIPT = [
    SET(b"a", b"1"),
    SET(b"b", b"2"),
    SET(b"c", b"x", exp=-1),
    SET(b"a", b"9", cmd=b"add"),
    SET(b"zz", b"9", cmd=b"replace"),
    b"get a b c d\r\n",
    b"gets a\r\n",
    b"incr nope 1\r\n", b"decr nope 1\r\n", b"ma nope\r\n",
    b"cas a 0 0 1 " + BADCAS + b"\r\nq\r\n",
    b"cas nope 0 0 1 1\r\nq\r\n",
    b"touch a 100\r\n", b"touch nope 100\r\n",
    b"gat 100 a nope\r\n",
    b"delete b\r\n", b"delete nope\r\n",
    b"mg a v\r\n", b"mg nope v\r\n",
    MS(b"m", b"meta"),
    b"md m\r\n",
]
ARITH_SCRIPT = [
    b"incr a 1\r\n", b"decr a 1\r\n", b"incr a 100\r\n", b"ma a\r\n", b"ma a MD\r\n",
    b"flush_all\r\n",
    b"get a\r\n",
]


def test_stats_counters_match_memcached(pair):
    got = {}
    for name, srv in (("memcached", pair.mc), ("kache", pair.node)):
        with kt.Conn(srv.addr) as c:
            for cmd in STATS_SCRIPT:
                c.request(cmd)
            first = kt.stats(c)
            for cmd in ARITH_SCRIPT:
                c.request(cmd)
            got[name] = (first, kt.stats(c))
    problems = []
    for phase, counters in ((0, COUNTERS), (1, [k for k in COUNTERS if k != "total_items"])):
        ref, mine = got["memcached"][phase], got["kache"][phase]
        missing = [k for k in counters if k not in mine]
        diffs = {k: (ref.get(k), mine.get(k)) for k in counters if k in mine and ref.get(k) != mine.get(k)}
        if missing or diffs:
            problems.append(f"phase {phase}: missing in kache: {missing}; (memcached, kache): {diffs}")
    assert not problems, "stats counters differ after the same commands:\n" + "\n".join(problems)


SETTINGS = ["maxbytes", "maxconns", "udpport", "inter", "evictions", "num_threads", "cas_enabled", "item_size_max",
            "flush_enabled"]


def test_stats_settings_match_memcached(pair):
    """Same command line, same `stats settings` for the settings both implement."""
    got = {}
    for name, srv in (("memcached", pair.mc), ("kache", pair.node)):
        with kt.Conn(srv.addr) as c:
            got[name] = kt.stats(c, b"settings")
    assert got["kache"].get("tcpport") == str(pair.node.port)
    diffs = {k: (got["memcached"].get(k), got["kache"].get(k)) for k in SETTINGS if got["memcached"].get(k) != got["kache"].get(k)}
    assert not diffs, f"(memcached, kache) stats settings differ: {diffs}"
