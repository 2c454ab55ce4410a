"""The read-lock table gives its memory back when the locks go, and counts
locks (a chunk locked twice counts twice) so callers can bound it.
"""

from __future__ import annotations

import tracemalloc

from csnapd.engine.locks import LockTable


def test_counts_follow_holds_and_releases() -> None:
    table: LockTable[str] = LockTable()
    table.hold("a", [(0, 10), (5, 1)])
    table.hold("b", [(5, 2)])
    assert (table.locks_of("a"), table.locks_of("b"), table.total) == (11, 2, 13)
    assert table.missing("a", [(5, 1), (5, 1), (5, 1)]) == [5]
    assert table.missing("a", [(5, 1), (5, 1), (9, 1)]) == []
    table.release("a", [(5, 1)])
    assert (table.locks_of("a"), table.total) == (10, 12)
    assert table.release_all("b") == 2
    assert table.release_all("a") == 10
    assert (table.total, table.holders, table.locked_chunks) == (0, 0, 0)


def test_memory_returns_when_the_locks_go() -> None:
    tracemalloc.start()
    try:
        table: LockTable[int] = LockTable()
        baseline = tracemalloc.get_traced_memory()[0]
        for holder in range(4):
            for piece in range(16):
                start = (holder * 16 + piece) * 4096
                table.hold(holder, [(start, 4096)])
        held = tracemalloc.get_traced_memory()[0] - baseline
        assert table.total == 4 * 16 * 4096
        for holder in range(3):
            table.release_all(holder)
        # The last holder releases its locks one request at a time.
        for piece in range(16):
            table.release(3, [((48 + piece) * 4096, 4096)])
        left = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert (table.total, table.holders, table.locked_chunks) == (0, 0, 0)
    assert held > 10 << 20
    assert left < 64 << 10, f"{left} bytes still held after every lock went"
