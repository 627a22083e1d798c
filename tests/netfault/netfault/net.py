"""A private network of network namespaces, and the faults injected into it.

Every host (cache node, proxy, client, observer) gets its own network namespace with one
interface, `eth0`, whose veth peer sits on a bridge inside a dedicated "switch" namespace.
Addresses come from 10.213.0.0/24, which exists only inside these namespaces: nothing is
added to the host's interfaces, routes or firewall, so the host's iptables (a Kubernetes
kit's FORWARD rules, say) never see this traffic and this traffic never leaves.

Faults, all inside the hosts' namespaces:
- partitions with iptables DROP rules in a chain of their own (`kf-fault`), at the receiving
  end so senders learn nothing: between two hosts both ways, one way only, or a host cut
  from everyone;
- delay on a host's outgoing packets and loss: `tc netem` when the kernel has it, else an
  NFQUEUE rule whose verdicts `nfqueue_delay` gives late, and an iptables `statistic` rule
  dropping the given share of the host's incoming packets;
- processes: kill -9, SIGSTOP and SIGCONT.

Namespaces are named `kf<pid>-<host>` after the process that made them; `Net.__init__`
removes those of processes that no longer run (a run killed before it could clean up), and
`Net.close` removes its own — killing what runs inside, deleting the namespaces (their veths
and rules go with them) — also when the run failed.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

SUBNET = "10.213.0"
PREFIX = "kf"
SWITCH = "sw"
FAULT_CHAIN = "kf-fault"
SHAPE_CHAIN = "kf-shape"
DELAY_QUEUE = 0
HERE = os.path.dirname(os.path.abspath(__file__))
_NAME = re.compile(rf"^{PREFIX}(\d+)-")


def sh(*argv, check=True, capture=False):
    result = subprocess.run(list(argv), check=False, text=True,
                            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout if capture else result.returncode


def missing_tools():
    """The programs the harness needs that are not installed (see install-test-deps.sh)."""
    return [tool for tool in ("ip", "iptables", "tc") if shutil.which(tool) is None]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces():
    out = sh("ip", "netns", "list", capture=True)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _remove_namespace(ns):
    pids = sh("ip", "netns", "pids", ns, check=False, capture=True) or ""
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    sh("ip", "netns", "del", ns, check=False)


def clean_leftovers():
    """Removes the namespaces of earlier runs whose process is gone."""
    for ns in _namespaces():
        match = _NAME.match(ns)
        if match and not _alive(int(match.group(1))):
            _remove_namespace(ns)


def netem_available():
    """Whether this kernel has the netem qdisc (tried on a throwaway namespace's loopback)."""
    ns = f"{PREFIX}{os.getpid()}-probe"
    sh("ip", "netns", "add", ns)
    try:
        return sh("ip", "-n", ns, "link", "set", "lo", "up", check=False) == 0 and sh(
            "tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
            check=False) == 0
    finally:
        sh("ip", "netns", "del", ns, check=False)


def _exit_cleanly_on_sigterm():
    """A SIGTERM (a CI timeout, say) unwinds like an error, so `close` still runs."""
    def leave(signum, _frame):
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, leave)
        except ValueError:  # not the main thread: leave the default
            pass


class Net:
    """Hosts on one private bridge. Use as a context manager: closing removes everything."""

    def __init__(self, hosts):
        missing = missing_tools()
        if missing:
            raise RuntimeError(f"missing {', '.join(missing)}: run scripts/install-test-deps.sh")
        clean_leftovers()
        _exit_cleanly_on_sigterm()
        self.tag = f"{PREFIX}{os.getpid()}"
        self.hosts = list(hosts)
        self.ips = {h: f"{SUBNET}.{10 + i}" for i, h in enumerate(self.hosts)}
        self.procs = []
        self.delayers = {}
        self.dir = tempfile.mkdtemp(prefix=f"{self.tag}-")
        self.netem = None
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def ns(self, host):
        return f"{self.tag}-{host}"

    def _build(self):
        switch = self.ns(SWITCH)
        sh("ip", "netns", "add", switch)
        sh("ip", "-n", switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", switch, "link", "set", "br0", "up")
        for i, host in enumerate(self.hosts):
            ns = self.ns(host)
            sh("ip", "netns", "add", ns)
            port = f"p{i}"
            # Made inside the switch namespace, the peer end moved straight into the host's:
            # neither end ever exists in the machine's own namespace.
            sh("ip", "-n", switch, "link", "add", port, "type", "veth",
               "peer", "name", "eth0", "netns", ns)
            sh("ip", "-n", switch, "link", "set", port, "master", "br0")
            sh("ip", "-n", switch, "link", "set", port, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ips[host]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for chain in (FAULT_CHAIN, SHAPE_CHAIN):
                self.iptables(host, "-N", chain)
                self.iptables(host, "-A", "INPUT", "-j", chain)
                self.iptables(host, "-A", "OUTPUT", "-j", chain)
        self.netem = netem_available()

    def iptables(self, host, *rule):
        sh("ip", "netns", "exec", self.ns(host), "iptables", "-w", *rule)

    # --- processes -------------------------------------------------------------------------

    def spawn(self, host, argv, log=None, **kwargs):
        """Starts `argv` inside `host`'s namespace (`ip netns exec` execs it: the Popen is
        the program itself, so signals reach it directly)."""
        out = open(log, "ab") if log else subprocess.DEVNULL
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv],
                                stdout=kwargs.pop("stdout", out), stderr=out, **kwargs)
        self.procs.append(proc)
        return proc

    def run(self, host, argv, timeout=60):
        """Runs `argv` in `host`'s namespace to completion; returns its stdout."""
        result = subprocess.run(["ip", "netns", "exec", self.ns(host), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=timeout)
        if result.returncode != 0:
            error = result.stderr.decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"{argv[0]} in {host} failed: {error}")
        # Bytes as they came: memcached replies end in \r\n, which text mode would rewrite.
        return result.stdout.decode(errors="replace")

    @staticmethod
    def kill(proc):
        """kill -9, and reap."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(timeout=10)

    @staticmethod
    def pause(proc):
        proc.send_signal(signal.SIGSTOP)

    @staticmethod
    def resume(proc):
        proc.send_signal(signal.SIGCONT)

    # --- partitions ------------------------------------------------------------------------

    # Every partition drops packets where they arrive, never where they leave: a sender's
    # own OUTPUT drop would fail its send() with EPERM, telling it what a real partition
    # does not. Here packets vanish silently, as on a broken path.

    def block(self, src, dst):
        """Drops what `src` sends to `dst` (a one-way partition)."""
        self.iptables(dst, "-A", FAULT_CHAIN, "-i", "eth0", "-s", self.ips[src], "-j", "DROP")

    def partition(self, side_a, side_b):
        """Cuts every host of `side_a` from every host of `side_b`, both ways."""
        for a in side_a:
            for b in side_b:
                self.block(a, b)
                self.block(b, a)

    def isolate(self, host):
        """Cuts `host` from everyone."""
        self.iptables(host, "-A", FAULT_CHAIN, "-i", "eth0", "-j", "DROP")
        for other in self.hosts:
            if other != host:
                self.block(host, other)

    # --- delay and loss --------------------------------------------------------------------

    def shape(self, host, delay_ms, loss_pct):
        """Delays `host`'s outgoing packets by `delay_ms` and drops `loss_pct` % of the
        packets it receives (at arrival, like partitions: see `block`)."""
        if self.netem:
            sh("tc", "-n", self.ns(host), "qdisc", "replace", "dev", "eth0", "root", "netem",
               "delay", f"{delay_ms}ms", "loss", f"{loss_pct}%")
            return
        if loss_pct:
            self.iptables(host, "-A", SHAPE_CHAIN, "-i", "eth0", "-m", "statistic",
                          "--mode", "random", "--probability", f"{loss_pct / 100:.4f}",
                          "-j", "DROP")
        if delay_ms:
            ready = os.path.join(self.dir, f"delay-{host}.ready")
            proc = self.spawn(host, [sys.executable, os.path.join(HERE, "nfqueue_delay.py"),
                                     "--queue", str(DELAY_QUEUE), "--delay-ms", str(delay_ms),
                                     "--ready-file", ready],
                              log=os.path.join(self.dir, f"delay-{host}.log"))
            deadline = time.monotonic() + 10
            while not os.path.exists(ready):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the delayer in {host} did not start")
                time.sleep(0.01)
            self.delayers[host] = proc
            self.iptables(host, "-A", SHAPE_CHAIN, "-o", "eth0", "-j", "NFQUEUE",
                          "--queue-num", str(DELAY_QUEUE), "--queue-bypass")

    # --- healing and cleanup ---------------------------------------------------------------

    def heal(self):
        """Removes every partition, delay and loss."""
        for host in self.hosts:
            self.iptables(host, "-F", FAULT_CHAIN)
            self.iptables(host, "-F", SHAPE_CHAIN)
            if self.netem:
                sh("tc", "-n", self.ns(host), "qdisc", "del", "dev", "eth0", "root",
                   check=False)
        for proc in self.delayers.values():
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.delayers.clear()

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    self.kill(proc)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        for ns in _namespaces():
            if ns.startswith(f"{self.tag}-"):
                _remove_namespace(ns)
        shutil.rmtree(self.dir, ignore_errors=True)

    def leftovers(self):
        """This run's namespaces still present (for tests of the cleanup)."""
        return [ns for ns in _namespaces() if ns.startswith(f"{self.tag}-")]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
