"""The checker: what a recorded history says about lost writes, stale reads and replicas.

The model is one register per key. Writes store unique values, deletes store "nothing"; the
key starts empty. An operation counts by its outcome (see `workload`):
- "ok" writes and deletes were acknowledged: they happened, between invocation and
  completion;
- "info" ones may have happened at any time after their invocation (a server error, a
  timeout: the value may still surface later), so they can explain anything after it;
- "fail" reads say nothing.

Real-time order is all the checker relies on (never the versions the servers assign):
operation A precedes B when A completed before B was invoked.

- A read is **stale** when it returns a value whose write precedes some acknowledged write
  (or delete) that completed before the read began: a register that kept acknowledged writes
  could no longer hold that value. A miss is stale unless some delete (acknowledged or not)
  could explain it that way.
- An acknowledged write or delete is **lost** when the key's final value, read from every
  owner after the faults healed and the replicas settled, comes from a write that precedes
  it: the cluster settled on something older than what it acknowledged. A delete is lost
  when the key comes back with a value written before the delete.
- A read returning a value no write produced, or a write invoked after the read completed,
  is **unexplained** (corruption, or a broken checker).

Divergence: from the observer's polls of every owner's own copy, how long after a heal each
key's owners disagreed, and how long the longest run of disagreement of any key lasted.
"""
import bisect
import json
from dataclasses import dataclass, field

INF = float("inf")


def load(paths):
    """The operations recorded in the given JSON-lines files."""
    history = []
    for path in paths:
        with open(path) as f:
            history.extend(json.loads(line) for line in f if line.strip())
    return history


def mutates(op):
    return op["f"] in ("write", "delete")


def effective_end(op):
    """When an operation's effect is known to have happened by: its completion if it was
    acknowledged, never otherwise (an unknown outcome may take effect at any later time)."""
    return op["t1"] if op["r"] == "ok" else INF


class KeyHistory:
    """The operations on one key, indexed for the questions the checker asks."""

    def __init__(self, ops):
        self.ops = ops
        acked = sorted((op for op in ops if mutates(op) and op["r"] == "ok"),
                       key=lambda op: op["t1"])
        self.acked = acked
        self._ends = [op["t1"] for op in acked]
        # Latest invocation among the acknowledged mutations completed by each point.
        self._latest_start = []
        latest = -INF
        for op in acked:
            latest = max(latest, op["t0"])
            self._latest_start.append(latest)
        self.writes = {}
        for op in ops:
            if op["f"] == "write" and op["r"] != "fail":
                self.writes[op["v"]] = op
        self.deletes = [op for op in ops if op["f"] == "delete" and op["r"] != "fail"]

    def newest_required(self, t):
        """The latest invocation time of an acknowledged mutation completed before `t`: any
        value whose write ended before that is too old to be read at `t`."""
        i = bisect.bisect_left(self._ends, t)
        return self._latest_start[i - 1] if i else -INF

    def explain(self, value, before):
        """How late the write that produced `value` (None: a delete, or the initial empty
        state) can be taken to have happened, choosing the best explanation among the
        operations invoked before `before`. None when nothing explains it."""
        if value is not None:
            op = self.writes.get(value)
            if op is None or op["t0"] > before:
                return None
            return effective_end(op)
        ends = [effective_end(d) for d in self.deletes if d["t0"] < before]
        return max(ends, default=-INF)


@dataclass
class Tally:
    ops: int = 0
    acked_writes: int = 0
    unknown_writes: int = 0
    reads: int = 0
    failed_reads: int = 0
    lost: int = 0
    stale_reads: int = 0
    unexplained: int = 0
    examples: list = field(default_factory=list)

    def note(self, kind, op, detail):
        if len(self.examples) < 5:
            self.examples.append({"kind": kind, "op": op, "detail": detail})


def check(history, final_values, phase_of=lambda t: 0):
    """Tallies per phase (`phase_of` maps an invocation time to a phase) for a history and
    the final value of each key (None: absent). Keys missing from `final_values` are not
    checked for lost writes."""
    tallies = {}
    by_key = {}
    for op in history:
        by_key.setdefault(op["k"], []).append(op)
    for key, ops in by_key.items():
        kh = KeyHistory(ops)
        for op in ops:
            tally = tallies.setdefault(phase_of(op["t0"]), Tally())
            tally.ops += 1
            if mutates(op):
                if op["r"] == "ok":
                    tally.acked_writes += 1
                else:
                    tally.unknown_writes += 1
                continue
            tally.reads += 1
            if op["r"] != "ok":
                tally.failed_reads += 1
                continue
            produced = kh.explain(op["v"], op["t1"])
            if produced is None:
                tally.unexplained += 1
                tally.note("unexplained", op, "no write produced this value by then")
            elif produced < kh.newest_required(op["t0"]):
                tally.stale_reads += 1
                tally.note("stale", op, "an acknowledged newer write completed before it")
        if key not in final_values:
            continue
        final = kh.explain(final_values[key], INF)
        for op in kh.acked:
            if final is None or final < op["t0"]:
                tally = tallies.setdefault(phase_of(op["t0"]), Tally())
                tally.lost += 1
                tally.note("lost", op, f"final value {final_values[key]!r}")
    return tallies


def total(tallies):
    out = Tally()
    for t in tallies.values():
        for name in ("ops", "acked_writes", "unknown_writes", "reads", "failed_reads", "lost",
                     "stale_reads", "unexplained"):
            setattr(out, name, getattr(out, name) + getattr(t, name))
        out.examples.extend(t.examples[:5 - len(out.examples)])
    return out


def agreeing(poll, owners, key):
    """Whether `key`'s owners all answered in `poll` and hold the same thing; None when an
    owner did not answer."""
    states = [poll["nodes"].get(n) for n in owners[key]]
    if any(s is None for s in states):
        return None
    return all(s.get(key) == states[0].get(key) for s in states[1:])


def settle_time(polls, owners, since):
    """Seconds from `since` until every key's owners had agreed at least once (each key's
    first agreeing poll after `since`); None if some key never did."""
    worst = 0.0
    for key in owners:
        first = next((p["t"] for p in polls
                      if p["t"] >= since and agreeing(p, owners, key)), None)
        if first is None:
            return None
        worst = max(worst, first - since)
    return worst


def all_agree_at(polls, owners, since):
    """The time of the first poll after `since` in which every key's owners agree."""
    for p in polls:
        if p["t"] >= since and all(agreeing(p, owners, k) for k in owners):
            return p["t"]
    return None


def longest_divergence(polls, owners):
    """The longest stretch (seconds) any key's owners, all answering, disagreed."""
    longest = 0.0
    for key in owners:
        started = None
        for p in polls:
            agreed = agreeing(p, owners, key)
            if agreed is False and started is None:
                started = p["t"]
            elif agreed and started is not None:
                longest = max(longest, p["t"] - started)
                started = None
        if started is not None and polls:
            longest = max(longest, polls[-1]["t"] - started)
    return longest
