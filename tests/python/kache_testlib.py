"""Shared helpers for the kache-node Python test suite.

Starting servers (real memcached and kache-node) on free ports, raw protocol
connections with bounded waits, and a reply parser/normaliser used by the
differential tests.  Nothing in here may block without a timeout.
"""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

HOST = "127.0.0.1"
# Seconds a server gets to listen on its ports. Generous: the suites share two cores with
# compilers, and a server that really fails to start exits (and is reported) long before.
START_TIMEOUT = 30.0
IO_TIMEOUT = 5.0  # seconds for any single socket read/write
STOP_TIMEOUT = 5.0

# Dev-only escape hatch: run the whole suite with memcached standing in for the
# node (useful to validate the tests themselves).  Never set by the Makefile.
STANDIN_ENV = "KACHE_TEST_NODE_IS_MEMCACHED"


def node_bin() -> str | None:
    return os.environ.get("KACHE_NODE_BIN") or None


def standin_mode() -> bool:
    return not node_bin() and os.environ.get(STANDIN_ENV) == "1"


def memcached_bin() -> str | None:
    return shutil.which("memcached") or (
        "/usr/bin/memcached" if os.access("/usr/bin/memcached", os.X_OK) else None
    )


# Ports are picked below the kernel's ephemeral range (from which every client socket
# takes its source port, and bind(0) its "free" port) and above the registered ones, so a
# connection made between choosing a port and the server binding it cannot take it; ports
# 30000-32767 are left to Kubernetes NodePorts.
PORT_RANGE = (10000, 30000)
_ports_handed_out: set[int] = set()
_port_rng = random.Random()
ADDRESS_IN_USE = "Address already in use"


def free_port() -> int:
    """A loopback port nothing listens on now, never handed out before by this process.

    Another process may still take it before the server binds it: servers that find their
    port taken exit with ADDRESS_IN_USE, which ServerProc.start reports as PortTaken so the
    caller can try other ports (start_on_free_ports)."""
    for _ in range(1000):
        port = _port_rng.randrange(*PORT_RANGE)
        if port in _ports_handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        _ports_handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORT_RANGE}")


def listening_ports(pid: int) -> set[int] | None:
    """The TCP ports process `pid` itself listens on (its sockets in LISTEN state, from
    /proc), or None when /proc cannot tell.  A port that merely accepts connections may
    belong to some other process that took it first."""
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
        ports = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # local_address is HEXIP:HEXPORT; state 0A is LISTEN; field 9 the inode
                    if fields[3] == "0A" and fields[9] in inodes:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        return ports
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return None


def accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=1.0):
            return True
    except OSError:
        return False


class PortTaken(RuntimeError):
    """The server exited at start-up because another process holds one of its ports."""


def wait_listening(proc: subprocess.Popen, ports, timeout: float, describe) -> None:
    """Waits until `proc` itself listens on every port of `ports` (and the first accepts a
    connection).  Raises PortTaken if it exits because a port was taken, RuntimeError if it
    exits otherwise or is still not listening after `timeout` seconds; `describe()` gives
    the server's output for the message."""
    ports = set(ports)
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            output = describe()
            kind = PortTaken if ADDRESS_IN_USE in output else RuntimeError
            raise kind(f"exited with code {rc} during startup (ports {sorted(ports)})\n--- output ---\n{output}")
        mine = listening_ports(proc.pid)
        if (mine is None or ports <= mine) and accepts(min(ports)):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"not listening on {sorted(ports - (mine or set()))} within {timeout}s "
                f"(listening on {sorted(mine or ())})\n--- output ---\n{describe()}")
        time.sleep(0.02)


_LIVE: "set[ServerProc]" = set()


@atexit.register
def _cleanup_leftovers() -> None:
    """Last resort (e.g. Ctrl-C): never leave servers or log files behind."""
    for srv in list(_LIVE):
        srv.cleanup()


class ServerProc:
    """A server child process with its stderr captured to a file."""

    def __init__(self, name: str, argv: list[str], port: int, admin_port: int | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.admin_port = admin_port
        self._errf = tempfile.NamedTemporaryFile(prefix=f"kache-{name}-", suffix=".log", delete=False)
        self.stderr_path = self._errf.name
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        _LIVE.add(self)

    @property
    def addr(self) -> tuple[str, int]:
        return (HOST, self.port)

    def start(self, timeout: float = START_TIMEOUT) -> "ServerProc":
        """Starts the server and waits until it listens on its ports (PortTaken: one of them
        was taken meanwhile; see start_on_free_ports)."""
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._errf,
            stderr=self._errf,
            start_new_session=True,
        )
        ports = [self.port] + ([self.admin_port] if self.admin_port else [])
        try:
            wait_listening(self.proc, ports, timeout, self.stderr_tail)
        except RuntimeError as e:
            self.kill()
            raise type(e)(f"{self.name}: {e}\nargv: {' '.join(self.argv)}") from None
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        return self.returncode

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            self.returncode = self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass

    def stderr_tail(self, limit: int = 8000) -> str:
        try:
            self._errf.flush()
            with open(self.stderr_path, "rb") as f:
                data = f.read()
        except OSError as e:
            return f"<cannot read {self.stderr_path}: {e}>"
        if len(data) > limit:
            data = b"...(truncated)...\n" + data[-limit:]
        return re.sub(r"\x1b\[[0-9;]*m", "", data.decode("utf-8", "replace"))  # drop ANSI colours

    def cleanup(self) -> None:
        _LIVE.discard(self)
        self.kill()
        try:
            self._errf.close()
            os.unlink(self.stderr_path)
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<{self.name} {self.addr}>"


def _root_args() -> list[str]:
    return ["-u", "root"] if os.geteuid() == 0 else []


def memcached_argv(port: int, memory_mb: int = 64, conns: int = 1024, extra: list[str] | None = None) -> list[str]:
    return (
        [memcached_bin() or "memcached"]
        + _root_args()
        + ["-l", HOST, "-p", str(port), "-U", "0", "-t", "2", "-m", str(memory_mb), "-I", "1m", "-c", str(conns)]
        + list(extra or [])
    )


def start_on_free_ports(make, attempts: int = 5) -> ServerProc:
    """`make()` builds a ServerProc on newly chosen free ports; it is started, and built
    again on other ports if one was taken before the server could bind it."""
    for attempt in range(attempts):
        srv = make()
        try:
            return srv.start()
        except PortTaken:
            srv.cleanup()
            if attempt == attempts - 1:
                raise


def start_memcached(memory_mb: int = 64, conns: int = 1024, extra: list[str] | None = None, name="memcached") -> ServerProc:
    def make():
        port = free_port()
        return ServerProc(name, memcached_argv(port, memory_mb, conns, extra), port)

    return start_on_free_ports(make)


def start_node(memory_mb: int = 64, conns: int = 1024, extra: list[str] | None = None, name="kache-node") -> ServerProc:
    """Start kache-node (or memcached in explicit stand-in mode)."""
    if standin_mode():
        return start_memcached(memory_mb, conns, extra, name=name + "(memcached stand-in)")
    binary = node_bin()
    if not binary:
        raise RuntimeError("KACHE_NODE_BIN is not set")

    def make():
        port, aport = free_port(), free_port()
        argv = [
            binary, "-l", HOST, "-p", str(port), "--admin-port", str(aport),
            "-m", str(memory_mb), "-I", "1m", "-t", "2", "-c", str(conns), "-v",
        ] + list(extra or [])
        return ServerProc(name, argv, port, aport)

    return start_on_free_ports(make)


# --------------------------------------------------------------------------
# Raw connections
# --------------------------------------------------------------------------

EOF_MARK = b"<EOF>"
TIMEOUT_MARK = b"<TIMEOUT>"
RESET_MARK = b"<RESET>"


class Conn:
    """A raw TCP connection with bounded reads."""

    def __init__(self, addr, timeout: float = IO_TIMEOUT):
        self.addr = addr
        self.timeout = timeout
        self.sock = socket.create_connection(addr, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.closed_by_peer = False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send(self, data: bytes, chunk: int | None = None, pause: float = 0.0):
        try:
            if not chunk:
                self.sock.sendall(data)
                return
            for i in range(0, len(data), chunk):
                self.sock.sendall(data[i : i + chunk])
                if pause:
                    time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            self.closed_by_peer = True

    def _recv(self, deadline: float) -> bytes | None:
        """One recv; returns b'' on EOF, None on timeout."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        self.sock.settimeout(min(remaining, self.timeout))
        try:
            d = self.sock.recv(1 << 20)
        except socket.timeout:
            return None
        except (ConnectionResetError, BrokenPipeError):
            self.closed_by_peer = True
            return RESET_MARK
        if not d:
            self.closed_by_peer = True
        return d

    def read_until(self, done, timeout: float | None = None) -> bytes:
        """Read until done(buf) is true, EOF, or timeout.

        EOF/timeout are appended as markers so they show up in comparisons.
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while not done(self.buf):
            d = self._recv(deadline)
            if d is None:
                out, self.buf = self.buf + TIMEOUT_MARK, b""
                return out
            if d == RESET_MARK or d == b"":
                out, self.buf = self.buf + (EOF_MARK if d == b"" else RESET_MARK), b""
                return out
            self.buf += d
        out, self.buf = self.buf, b""
        return out

    def read_eof(self, timeout: float = 3.0) -> bytes:
        return self.read_until(lambda b: False, timeout)

    def read_idle(self, idle: float = 0.3, timeout: float | None = None) -> bytes:
        """Read until the peer has been silent for `idle` seconds (or EOF)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        out = self.buf
        self.buf = b""
        while True:
            d = self._recv(min(deadline, time.monotonic() + idle))
            if d is None:
                return out
            if d == b"":
                return out + EOF_MARK
            if d == RESET_MARK:
                return out + RESET_MARK
            out += d

    def read_sentinel(self, count: int = 1, timeout: float | None = None) -> bytes:
        """Read until the reply stream ends with `count` MN lines (meta no-op replies)."""
        return self.read_until(lambda b: reply_complete(b, count), timeout)

    def request(self, data: bytes, timeout: float | None = None) -> bytes:
        """Send data + 'mn', return the reply without the trailing MN line."""
        n = count_mn(data) + 1
        self.send(data + b"mn\r\n")
        out = self.read_sentinel(n, timeout)
        if out.endswith(b"MN\r\n"):
            out = out[:-4]
        return out

    def line(self, data: bytes) -> bytes:
        """Send one command line (CRLF appended) and return the reply minus MN."""
        return self.request(data + b"\r\n")


def count_mn(data: bytes) -> int:
    """How many `mn` commands (each answered by MN) a script contains."""
    n = 0
    for ln in data.split(b"\n"):
        toks = ln.rstrip(b"\r").split()
        if toks and toks[0] == b"mn":
            n += 1
    return n


# --------------------------------------------------------------------------
# Reply parsing / normalisation
# --------------------------------------------------------------------------

_VALUE_RE = re.compile(rb"^VALUE (\S+) (\S+) (\d+)(?: (\S+))?$")
_VA_RE = re.compile(rb"^VA (\d+)(.*)$")


def parse_reply(buf: bytes):
    """Split a reply stream into items.

    Returns (items, rest) where items is a list of (kind, bytes) with kind in
    {"line", "data"}; a "line" includes its terminator, "data" is the data
    block including its trailing CRLF.  `rest` is any incomplete tail.
    """
    items = []
    pos = 0
    n = len(buf)
    while pos < n:
        nl = buf.find(b"\n", pos)
        if nl < 0:
            break
        line = buf[pos : nl + 1]
        body = line.rstrip(b"\r\n")
        want = None
        m = _VALUE_RE.match(body)
        if m:
            want = int(m.group(3))
        else:
            m = _VA_RE.match(body)
            if m:
                want = int(m.group(1))
        if want is not None:
            if nl + 1 + want + 2 > n:
                break  # data block incomplete
            items.append(("line", line))
            items.append(("data", buf[nl + 1 : nl + 1 + want + 2]))
            pos = nl + 1 + want + 2
        else:
            items.append(("line", line))
            pos = nl + 1
    return items, buf[pos:]


def reply_complete(buf: bytes, mn_count: int) -> bool:
    if not buf.endswith(b"MN\r\n"):
        return False
    items, rest = parse_reply(buf)
    if rest:
        return False
    seen = sum(1 for k, v in items if k == "line" and v == b"MN\r\n")
    return seen >= mn_count and items[-1] == ("line", b"MN\r\n")


_META_CODES = {b"HD", b"VA", b"EN", b"NS", b"EX", b"NF", b"MN"}


class Approx:
    """A numeric token that matches another within a tolerance."""

    def __init__(self, prefix: bytes, value: int, tol: int):
        self.prefix, self.value, self.tol = prefix, value, tol

    def __eq__(self, other):
        return (
            isinstance(other, Approx)
            and other.prefix == self.prefix
            and abs(other.value - self.value) <= max(self.tol, other.tol)
        )

    def __repr__(self):
        return f"{self.prefix.decode()}{self.value}(±{self.tol})"


class CasNames:
    """Names one server's CAS values by order of first appearance (`<cas#0>`, `<cas#1>`...).

    Two servers number CAS differently (memcached counts from 1, kache mixes in a clock
    and a node id), but within one conversation the same item version must show the same
    CAS and a new version a new one: naming values in order of appearance compares
    exactly that.  One instance per server, shared by every step of a case.
    """

    def __init__(self):
        self.names: dict[int, bytes] = {}

    def __call__(self, value: bytes) -> bytes:
        n = self.names.setdefault(int(value), b"%d" % len(self.names))
        return b"<cas#" + n + b">"


def _cas_token(value: bytes, cas: "CasNames | None") -> bytes:
    return cas(value) if cas is not None else b"<cas>"


def _norm_meta_flag(tok: bytes, time_tol: int, cas: "CasNames | None"):
    if len(tok) < 2:
        return tok
    f, rest = tok[:1], tok[1:]
    if f == b"c" and rest.isdigit():
        return b"c" + _cas_token(rest, cas)
    if f in (b"t", b"l") and re.fullmatch(rb"-?\d+", rest):
        v = int(rest)
        if f == b"t" and v == -1:
            return tok  # "no expiry" is exact
        return Approx(f, v, time_tol)
    return tok


def _norm_meta_debug(body: bytes, time_tol: int, cas: "CasNames | None"):
    """`ME <key> exp=.. la=.. cas=.. fetch=.. cls=.. size=..`: every field is compared;
    the two clock-derived ones (exp, la) within the time tolerance, cas by CasNames."""
    parts = body.split(b" ")
    out = [b"ME", parts[1] if len(parts) > 1 else b""]
    for p in parts[2:]:
        k, eq, v = p.partition(b"=")
        if eq and k in (b"exp", b"la") and re.fullmatch(rb"-?\d+", v) and v != b"-1":
            out.append(Approx(k + b"=", int(v), time_tol))
        elif eq and k == b"cas" and v.isdigit():
            out.append(b"cas=" + _cas_token(v, cas))
        else:
            out.append(p)
    return tuple(out)


def normalise_line(body: bytes, time_tol: int = 2, cas: "CasNames | None" = None):
    """Normalise one reply line (without terminator) into a comparable tuple.

    Replaced: the VERSION string (kache's names its own release); CAS values (by `cas`'s
    names, or all alike as `<cas>` without it); TTLs and ages (meta `t`/`l`, `me`'s exp
    and la) match within `time_tol` seconds.  Everything else is compared as sent.
    """
    if body.startswith(b"VERSION "):
        return (b"VERSION", b"<version>")
    m = _VALUE_RE.match(body)
    if m:
        out = [b"VALUE", m.group(1), m.group(2), m.group(3)]
        if m.group(4) is not None:
            out.append(_cas_token(m.group(4), cas) if m.group(4).isdigit() else m.group(4))
        return tuple(out)
    if body.startswith(b"ME "):
        return _norm_meta_debug(body, time_tol, cas)
    toks = body.split(b" ")
    if toks[0] in _META_CODES:
        out = [toks[0]]
        rest = toks[1:]
        if toks[0] == b"VA" and rest:
            out.append(rest[0])
            rest = rest[1:]
        out.extend(_norm_meta_flag(t, time_tol, cas) for t in rest)
        return tuple(out)
    return (body,)


_PADDED_NUM = re.compile(rb"^(\d+) +\r\n$")


def normalise(buf: bytes, time_tol: int = 2, lenient_padding: bool = False, cas: "CasNames | None" = None):
    """Turn a raw reply stream into a list of comparable items (see normalise_line).

    lenient_padding: memcached only space-pads a shrinking incr/decr result
    when it can rewrite the item in place (no other reference to it, e.g. from
    a not-yet-flushed pipelined get), so in pipelined random scripts "9 " and
    "9" are both valid; this strips such padding (and the matching lengths).
    """
    items, rest = parse_reply(buf)
    out = []
    for kind, raw in items:
        if kind == "data":
            m = _PADDED_NUM.match(raw) if lenient_padding else None
            if m and out and out[-1][0] == "line":
                raw = m.group(1) + b"\r\n"
                _, toks, term = out[-1]
                toks = list(toks)
                if toks[0] == b"VALUE":
                    toks[3] = b"%d" % len(m.group(1))
                elif toks[0] == b"VA":
                    toks[1] = b"%d" % len(m.group(1))
                out[-1] = ("line", tuple(toks), term)
            out.append(("data", raw))
        else:
            body = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            term = raw[len(body) :]
            toks = normalise_line(body, time_tol, cas)
            if lenient_padding and toks and toks[0] in _META_CODES:
                toks = tuple(b"s<size>" if isinstance(t, bytes) and re.fullmatch(rb"s\d+", t) else t for t in toks)
            out.append(("line", toks, term))
    if rest:
        out.append(("tail", rest))
    return out


def extract_cas(buf: bytes) -> int | None:
    """Last CAS value mentioned in a reply (gets VALUE lines or meta c flag)."""
    cas = None
    items, _ = parse_reply(buf)
    for kind, raw in items:
        if kind != "line":
            continue
        body = raw.rstrip(b"\r\n")
        m = _VALUE_RE.match(body)
        if m and m.group(4) is not None and m.group(4).isdigit():
            cas = int(m.group(4))
            continue
        toks = body.split(b" ")
        if toks and toks[0] in _META_CODES:
            for t in toks[1:]:
                if t.startswith(b"c") and t[1:].isdigit():
                    cas = int(t[1:])
    return cas


def show(b: bytes, limit: int = 600) -> str:
    s = repr(b)
    if len(s) > limit:
        s = s[: limit // 2] + f" ...({len(b)} bytes)... " + s[-limit // 2 :]
    return s


# --------------------------------------------------------------------------
# Misc
# --------------------------------------------------------------------------


def stats(conn: Conn, sub: bytes = b"") -> dict[str, str]:
    cmd = b"stats" + ((b" " + sub) if sub else b"")
    raw = conn.request(cmd + b"\r\n")
    assert raw.endswith(b"END\r\n"), f"stats reply does not end with END: {show(raw)}"
    out = {}
    for ln in raw.split(b"\r\n"):
        if ln.startswith(b"STAT "):
            parts = ln.decode().split(" ", 2)
            out[parts[1]] = parts[2] if len(parts) > 2 else ""
    return out


def http_get(port: int, path: str, timeout: float = 5.0):
    """Return (status, body) for GET http://127.0.0.1:port/path."""
    req = urllib.request.Request(f"http://{HOST}:{port}{path}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", "replace")


def metric(admin_port: int, name: str) -> int:
    """A counter or gauge from a node's (or proxy's) admin /metrics; 0 if not listed."""
    status, body = http_get(admin_port, "/metrics")
    assert status == 200, f"/metrics answered {status}"
    for line in body.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return 0


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    """Polls `predicate` until it holds; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def stop_all(*servers: ServerProc) -> None:
    for s in servers:
        if s is not None and s.alive():
            try:
                s.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
    for s in servers:
        if s is not None:
            s.cleanup()
