"""The read-lock table: counted holds, stray releases, release on disconnect."""

from __future__ import annotations

from csnapd.engine.locks import LockTable


def test_holds_are_counted_per_holder_and_chunk() -> None:
    table: LockTable[str] = LockTable()
    table.hold("a", [(10, 3)])
    table.hold("a", [(11, 1)])
    table.hold("b", [(12, 2)])
    assert table.locked([(0, 11)]) and not table.locked([(0, 10)])
    assert table.release("a", [(10, 3)]) == []
    assert table.locked([(11, 1)])  # a's second hold on 11
    assert table.release("a", [(11, 1)]) == []
    assert not table.locked([(10, 2)])
    assert table.locked([(12, 1)]) and table.held_by("b") == 2
    assert table.locked_chunks == 2


def test_releasing_what_is_not_held_is_reported() -> None:
    table: LockTable[str] = LockTable()
    table.hold("a", [(5, 1)])
    assert table.release("a", [(4, 3)]) == [4, 6]
    assert table.release("b", [(5, 1)]) == [5]
    assert not table.locked([(5, 1)])


def test_release_all_drops_everything_of_one_holder() -> None:
    table: LockTable[str] = LockTable()
    table.hold("a", [(0, 100)])
    table.hold("b", [(50, 1)])
    assert table.release_all("a") == 100
    assert table.locked([(50, 1)]) and not table.locked([(0, 50)])
    assert table.release_all("a") == 0
