"""A revert in progress refuses what would change what it copies, waits for
read locks on its chunks, and leaves the snapshot reverted to as it was."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from csnapd.engine import (
    Engine,
    MemoryDevice,
    Ranges,
    RevertInProgressError,
    SnapshotNotFoundError,
    SnapshotUnavailableError,
)
from tests.engine.helpers import assert_clean, new_store, read_snapshot, reverting

CHUNKS = 64


def _reverting() -> tuple[Engine, MemoryDevice, MemoryDevice]:
    """Snapshots 1 and 2; the origin changed since; a revert to 1 started."""
    engine, store, origin, _ = reverting(CHUNKS)
    return engine, store, origin


def test_a_revert_refuses_what_would_change_what_it_copies() -> None:
    engine, store, _ = _reverting()
    refused: list[Callable[[], object]] = [
        lambda: engine.create_snapshot(3),
        lambda: engine.start_revert(2),
        lambda: engine.delete_snapshot(1),
        lambda: engine.snapshot_write(1, [(0, 1)]),
    ]
    for request in refused:
        with pytest.raises(RevertInProgressError, match="reverted to snapshot 1"):
            request()
    assert not engine.pending
    # The snapshot reverted to is never squashed; others may be.
    assert engine.squash_order() == [2]
    # What does not touch it goes on.
    engine.snapshot_write(2, [(10, 1)])
    engine.commit()
    engine.finish_revert()
    engine.create_snapshot(3)
    engine.commit()
    engine.close()
    assert_clean(store)


def test_a_revert_step_waits_for_read_locks_on_its_chunks() -> None:
    engine, _, origin = _reverting()
    before = origin.read(0, CHUNKS * 4096)
    asked: list[list[tuple[int, int]]] = []

    def locked(ranges: Ranges) -> bool:
        asked.append(list(ranges))
        return True

    assert engine.revert_step(locked=locked)
    assert asked == [[(0, 8)]]
    progress = engine.revert_progress
    assert progress is not None and (progress.cursor, progress.restored) == (0, 0)
    assert origin.read(0, CHUNKS * 4096) == before
    engine.finish_revert()
    assert engine.revert_progress is None
    assert origin.read(0, CHUNKS * 4096) != before


def test_only_a_live_snapshot_is_reverted_to() -> None:
    store, origin, _ = new_store(store_bytes=8 << 20, origin_bytes=CHUNKS * 4096)
    engine = Engine.open(store, origin)
    with pytest.raises(SnapshotNotFoundError):
        engine.start_revert(5)
    engine.create_snapshot(5)
    engine.commit()
    engine.squash_for_reserve()
    engine.commit()
    with pytest.raises(SnapshotUnavailableError):
        engine.start_revert(5)
    assert engine.revert_progress is None


def test_the_snapshot_survives_and_reads_as_the_origin() -> None:
    engine, store, origin = _reverting()
    engine.finish_revert()
    size = engine.chunk_size
    origin_now = [origin.read(c * size, size) for c in range(CHUNKS)]
    assert read_snapshot(engine, store, origin, 1, 0, CHUNKS) == origin_now
    info = engine.snapshot(1)
    assert (info.state, info.shared_chunks) == ("live", 8)  # its copies, shared with 2
