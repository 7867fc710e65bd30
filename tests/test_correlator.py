"""The outbound correlator: one delivery per answer, and a reason for every answer dropped."""

from __future__ import annotations

from protocol.correlator import Correlator, Delivered, Dropped


def test_answer_is_delivered_once_then_duplicate() -> None:
    correlator = Correlator(completed_capacity=8)
    pending = correlator.issue("vm-1", "lookup", {"q": 1}, waiter="w")
    verdict = correlator.resolve(pending.id)
    assert isinstance(verdict, Delivered) and verdict.pending.waiter == "w"
    assert correlator.resolve(pending.id) == Dropped("duplicate", "vm-1")
    assert len(correlator) == 0


def test_ids_are_strings_unique_and_tagged_by_process() -> None:
    one, two = Correlator(8), Correlator(8)
    ids = {one.issue("a", "m", None).id for _ in range(100)}
    assert len(ids) == 100 and all(isinstance(i, str) for i in ids)
    assert not ids & {two.issue("a", "m", None).id for _ in range(100)}


def test_unmatched_for_ids_never_issued() -> None:
    correlator = Correlator(8)
    correlator.issue("vm", "m", None)
    for foreign in ["nope", 17, None, f"{correlator.token}.99", "other.1", f"{correlator.token}.x"]:
        assert correlator.resolve(foreign) == Dropped("unmatched")


def test_abandoned_calls_answer_as_stale() -> None:
    correlator = Correlator(8)
    timed_out = correlator.issue("vm-a", "m", None)
    assert correlator.abandon(timed_out.id) is timed_out
    assert correlator.abandon(timed_out.id) is None
    assert correlator.resolve(timed_out.id) == Dropped("stale", "vm-a")


def test_abandon_owner_takes_only_that_owners_calls() -> None:
    correlator = Correlator(8)
    mine = [correlator.issue("vm-a", "m", None) for _ in range(3)]
    other = correlator.issue("vm-b", "m", None)
    assert {p.id for p in correlator.abandon_owner("vm-a")} == {p.id for p in mine}
    assert [p.id for p in correlator.pending_of("vm-b")] == [other.id]
    assert all(correlator.resolve(p.id) == Dropped("stale", "vm-a") for p in mine)
    assert isinstance(correlator.resolve(other.id), Delivered)


def test_completed_memory_is_bounded_and_forgotten_ids_count_as_stale() -> None:
    correlator = Correlator(completed_capacity=2)
    calls = [correlator.issue("vm", "m", None) for _ in range(5)]
    for call in calls:
        correlator.resolve(call.id)
    assert len(correlator._completed) == 2
    assert correlator.resolve(calls[-1].id) == Dropped("duplicate", "vm")
    # Evicted from memory but provably issued by this process: a late answer, not a stranger's.
    assert correlator.resolve(calls[0].id) == Dropped("stale")
