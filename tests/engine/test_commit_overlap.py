"""A commit written in another thread while lookups are applied
(Engine.prepare_commit, CommitWrite.write, Engine.settle_commit; docs/rules.md,
"lookups during a commit"): lookups see the committed batch's changes, a
request that would change the store meanwhile is refused with RuntimeError
and changes nothing, and the settled commit is durable.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from csnapd.engine import Engine, EngineFailedError, MemoryDevice
from tests.engine.helpers import (
    CutDevice,
    PowerCut,
    assert_clean,
    new_store,
    pattern,
    read_snapshot,
    write_origin,
)


class HeldSync:
    """Forwards to a MemoryDevice; a sync waits until the test lets it go,
    so that what the test does meanwhile runs while a commit is written."""

    def __init__(self, inner: MemoryDevice):
        self.inner = inner
        self.stats = inner.stats
        self.syncing = threading.Event()
        self.release = threading.Event()

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def read_into(self, offset: int, into: memoryview) -> None:
        # Through read(), so that whatever it does to a read applies here too.
        into[:] = self.read(offset, len(into))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(offset, data)

    def writev(self, offset: int, buffers: Sequence[bytes]) -> None:
        self.inner.writev(offset, buffers)

    def sync(self) -> None:
        self.syncing.set()
        assert self.release.wait(30), "the test never let the sync go"
        self.inner.sync()

    def close(self) -> None:
        pass


def _store_with_snapshot() -> tuple[MemoryDevice, HeldSync, MemoryDevice, Engine, int]:
    store, origin, g = new_store()
    for chunk in range(64):
        write_origin(origin, g, chunk, 1)
    device = HeldSync(store)
    device.release.set()
    engine = Engine.open(device, origin, cache_bytes=64 * 4096)
    engine.create_snapshot(1)
    engine.commit()
    return store, device, origin, engine, g.chunk_size


def test_lookups_run_while_a_commit_is_written_and_changes_wait() -> None:
    store, device, origin, engine, size = _store_with_snapshot()
    engine.origin_write([(0, 16)])  # copies chunks 0..15 out for snapshot 1
    device.release.clear()
    device.syncing.clear()
    commit = engine.prepare_commit()
    writer = threading.Thread(target=commit.write)
    writer.start()
    assert device.syncing.wait(30)
    # The commit's sync waits: lookups now run while it is being written,
    # and see what it commits.
    for _ in range(20):
        segments = engine.snapshot_read(1, [(0, 32)])
        assert [(s.chunk, s.count, s.store_chunk is None) for s in segments] == [
            (0, 16, False),
            (16, 16, True),
        ]
        assert engine.origin_copied([(0, 32)]) == [(0, 16)]
    # A request that changes the store is a defect then, refused before it
    # changes anything; so is handing out chunks to write into, whose seal
    # would be owed to a commit already written.
    with pytest.raises(RuntimeError, match="while a commit was being written"):
        engine.origin_write([(40, 1)])
    with pytest.raises(RuntimeError, match="while a commit was being written"):
        engine.create_snapshot(2)
    with pytest.raises(RuntimeError, match="handed out while a commit was being written"):
        engine.snapshot_owned(1, [(0, 4)])
    # A lookup is checked as a request then, the state included: one that
    # changed it (a defect) is refused and the change put back.
    exceptions = engine._state.exceptions

    def changes_the_state() -> None:
        engine._state.exceptions += 1

    with pytest.raises(RuntimeError, match="while a commit was being written"):
        engine._txn.lookup(changes_the_state)
    assert engine._state.exceptions == exceptions
    assert writer.is_alive()
    device.release.set()
    writer.join(timeout=30)
    assert not writer.is_alive()
    assert commit.error is None
    assert engine.settle_commit(commit) is not None
    assert not engine.pending
    assert [s.tag for s in engine.snapshots()] == [1]
    assert engine.origin_copied([(40, 1)]) == []
    # What the commit carried is durable: a store reopened from the durable
    # bytes alone reads the copies.
    for chunk in range(16):
        write_origin(origin, engine.geometry, chunk, 2)
    engine.origin_write([(40, 1)])
    engine.commit()
    reopened = Engine.open(store.durable_copy(), origin)
    assert read_snapshot(reopened, store, origin, 1, 0, 16) == [
        pattern(chunk, 1, size) for chunk in range(16)
    ]
    assert reopened.origin_copied([(0, 64)]) == [(0, 16), (40, 1)]
    reopened.close()
    engine.close()
    assert_clean(store)


def test_a_failed_write_fails_the_engine_at_settle_and_not_before() -> None:
    store, origin, _geometry = new_store()
    device = CutDevice(store)
    engine = Engine.open(device, origin)
    engine.create_snapshot(1)
    engine.commit()
    engine.origin_write([(0, 4)])
    commit = engine.prepare_commit()
    device.budget = 0  # the commit's first write fails
    commit.write()  # keeps the failure: the thread that wrote raises nothing
    assert isinstance(commit.error, PowerCut)
    with pytest.raises(EngineFailedError, match="commit failed"):
        engine.settle_commit(commit)
    with pytest.raises(EngineFailedError, match="reopen the store"):
        engine.origin_write([(8, 1)])
