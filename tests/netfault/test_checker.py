"""The checker on hand-made histories: it finds what it must, and nothing more."""
from netfault.checker import (all_agree_at, check, longest_divergence, settle_time,
                              total)


def op(f, k, v, t0, t1, r="ok", client=0):
    return {"client": client, "f": f, "k": k, "v": v, "t0": t0, "t1": t1, "r": r}


def tally(history, final):
    return total(check(history, final))


def test_a_clean_history_has_nothing_to_report():
    history = [
        op("write", "a", "1", 0, 1),
        op("read", "a", "1", 2, 3),
        op("write", "a", "2", 4, 5),
        op("read", "a", "2", 6, 7),
        op("delete", "a", None, 8, 9),
        op("read", "a", None, 10, 11),
        op("read", "b", None, 0, 1),  # never written: a miss is right
    ]
    t = tally(history, {"a": None, "b": None})
    assert (t.ops, t.acked_writes, t.reads) == (7, 3, 4)
    assert (t.lost, t.stale_reads, t.unexplained) == (0, 0, 0)


def test_a_write_the_cluster_forgot_is_lost():
    history = [op("write", "a", "1", 0, 1), op("write", "a", "2", 2, 3)]
    t = tally(history, {"a": "1"})
    assert t.lost == 1
    assert t.examples[0]["op"]["v"] == "2"
    # Ending empty loses both.
    assert tally(history, {"a": None}).lost == 2
    # Keys without a final value are not judged.
    assert tally(history, {}).lost == 0


def test_a_delete_that_did_not_stick_is_lost():
    history = [op("write", "a", "1", 0, 1), op("delete", "a", None, 2, 3)]
    assert tally(history, {"a": "1"}).lost == 1
    assert tally(history, {"a": None}).lost == 0


def test_an_older_value_after_a_newer_acknowledged_write_is_a_stale_read():
    history = [
        op("write", "a", "1", 0, 1),
        op("write", "a", "2", 2, 3),
        op("read", "a", "1", 4, 5),
        op("read", "a", None, 6, 7),  # a miss after acknowledged writes, no delete
    ]
    t = tally(history, {"a": "2"})
    assert t.stale_reads == 2
    assert {e["op"]["v"] for e in t.examples} == {"1", None}


def test_concurrent_writes_may_be_read_in_either_order():
    history = [
        op("write", "a", "1", 0, 10),
        op("write", "a", "2", 5, 15, client=1),
        op("read", "a", "1", 20, 21),
        op("read", "a", "2", 22, 23),
        # A read overlapping a write may see the old value.
        op("write", "a", "3", 30, 40),
        op("read", "a", "2", 35, 36),
    ]
    t = tally(history, {"a": "3"})
    assert (t.stale_reads, t.lost) == (0, 0)


def test_a_write_of_unknown_outcome_may_surface_any_time_later():
    history = [
        op("write", "a", "1", 0, 1),
        op("write", "a", "x", 2, 3, r="info"),  # e.g. SERVER_ERROR: applied on one owner
        op("write", "a", "2", 4, 5),
        op("read", "a", "x", 6, 7),
    ]
    t = tally(history, {"a": "x"})
    assert (t.stale_reads, t.lost, t.unknown_writes) == (0, 0, 1)
    # A delete of unknown outcome can explain a later miss.
    history = [op("write", "a", "1", 0, 1), op("delete", "a", None, 2, 3, r="info"),
               op("read", "a", None, 4, 5)]
    assert tally(history, {"a": None}).stale_reads == 0


def test_failed_reads_say_nothing_and_invented_values_are_unexplained():
    history = [
        op("write", "a", "1", 0, 1),
        op("read", "a", None, 2, 3, r="fail"),
        op("read", "a", "never-written", 4, 5),
        op("read", "a", "2", 6, 7),  # written only after this read completed
        op("write", "a", "2", 8, 9),
    ]
    t = tally(history, {"a": "2"})
    assert (t.failed_reads, t.unexplained, t.stale_reads) == (1, 2, 0)


def test_tallies_go_to_the_phase_of_each_operation():
    history = [op("write", "a", "1", 0, 1), op("write", "a", "2", 12, 13),
               op("read", "a", "1", 14, 15)]
    tallies = check(history, {"a": "1"}, phase_of=lambda t: int(t // 10))
    assert (tallies[0].ops, tallies[1].ops) == (1, 2)
    assert (tallies[1].lost, tallies[1].stale_reads, tallies[0].lost) == (1, 1, 0)


def poll(t, **nodes):
    return {"t": t, "nodes": nodes}


def test_divergence_is_measured_from_the_heal_per_key():
    owners = {"a": ["n0", "n1"], "b": ["n1", "n2"]}
    v1, v2 = [1, "x"], [2, "y"]
    polls = [
        poll(0, n0={"a": v1}, n1={"a": v1, "b": v1}, n2={"b": v1}),
        poll(1, n0={"a": v2}, n1={"a": v1, "b": v1}, n2={"b": v2}),
        poll(2, n0={"a": v2}, n1=None, n2={"b": v2}),  # n1 did not answer
        poll(3, n0={"a": v2}, n1={"a": v2, "b": v1}, n2={"b": v2}),
        poll(4.5, n0={"a": v2}, n1={"a": v2, "b": v2}, n2={"b": v2}),
    ]
    assert settle_time(polls, owners, since=1) == 3.5
    assert all_agree_at(polls, owners, since=1) == 4.5
    assert all_agree_at(polls, owners, since=5) is None
    assert settle_time(polls, owners, since=5) is None
    # b disagreed from t=1 until t=4.5; a from 1 to 3.
    assert longest_divergence(polls, owners) == 3.5
    # Absent and deleted look alike (None): agreement.
    assert settle_time([poll(0, n0={"a": None}, n1={"a": None, "b": None},
                             n2={"b": None})], owners, since=0) == 0
