"""A revert cut by a power failure at every write and sync of the store and
the origin, with the unsynced writes lost, kept, or kept in part (some torn):
the store opened again finishes the revert, the origin then equals the
snapshot, every snapshot reads what it read before, and the store checks
clean.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from csnap_format import Geometry
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine import revert as revert_module
from tests.engine.helpers import (
    assert_clean,
    format_device,
    new_geometry,
    pattern,
    read_snapshot,
)

ORIGIN_CHUNKS = 96
#: Chunks a step restores in this test: small, so that a revert takes steps.
STEP_CHUNKS = 16

Event = tuple[str, int, bytes]


class _DeviceLog(list[Event]):
    """A device's write log that also files each event, named, into one shared trace."""

    def __init__(self, name: str, trace: list[tuple[str, Event]]):
        super().__init__()
        self._name = name
        self._trace = trace

    def append(self, event: Event) -> None:
        self._trace.append((self._name, event))


@dataclass
class RevertRun:
    """A recorded history: its trace, where the revert starts, and the truth."""

    g: Geometry
    trace: list[tuple[str, Event]] = field(default_factory=list)
    #: Index in the trace after the commit that started the revert returned.
    started: int = 0
    #: Index in the trace where the revert's request begins.
    requested: int = 0
    #: Tag -> its chunks' contents, before and after the revert.
    snapshots: dict[int, list[bytes]] = field(default_factory=dict)
    #: The origin's contents just before the revert.
    origin_before: list[bytes] = field(default_factory=list)


def _chunks(device: MemoryDevice, g: Geometry) -> list[bytes]:
    size = g.chunk_size
    return [device.read(c * size, size) for c in range(g.origin_chunks)]


def _client_writes(origin: MemoryDevice, g: Geometry, first: int, count: int, version: int) -> None:
    for chunk in range(first, first + count):
        origin.write(chunk * g.chunk_size, pattern(chunk, version, g.chunk_size))


def record_revert() -> RevertRun:
    g = new_geometry(
        store_bytes=2 << 20, origin_bytes=ORIGIN_CHUNKS * 4096, journal_bytes=64 * 4096
    )
    run = RevertRun(g)
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    store.log = _DeviceLog("store", run.trace)
    origin.log = _DeviceLog("origin", run.trace)
    engine = Engine.open(store, origin, cache_bytes=32 * 4096)
    _client_writes(origin, g, 0, ORIGIN_CHUNKS, 1)
    engine.create_snapshot(1)
    engine.commit()
    engine.origin_write([(0, 60)])
    engine.commit()
    _client_writes(origin, g, 0, 60, 2)
    engine.create_snapshot(2)
    engine.commit()
    # Snapshot 1 writes some chunks of its own.
    for segment in engine.snapshot_write(1, [(70, 6)]):
        for k in range(segment.count):
            data = pattern(segment.chunk + k, 3, g.chunk_size)
            store.write_through((segment.store_chunk + k) * g.chunk_size, data)
    engine.commit()
    engine.origin_write([(30, 50)])
    engine.commit()
    _client_writes(origin, g, 30, 50, 4)
    engine.create_snapshot(3)  # shares every origin chunk
    engine.commit()
    origin.sync()
    run.origin_before = _chunks(origin, g)
    for tag in (1, 2, 3):
        run.snapshots[tag] = read_snapshot(engine, store, origin, tag, 0, ORIGIN_CHUNKS)
    run.requested = len(run.trace)
    engine.start_revert(1)
    engine.commit()
    run.started = len(run.trace)
    engine.finish_revert()
    engine.close()
    assert _chunks(origin, g) == run.snapshots[1]
    return run


def _replay(run: RevertRun, upto: int) -> tuple[MemoryDevice, MemoryDevice]:
    """The store and origin as the first `upto` events of the trace left them."""
    g = run.g
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    devices = {"store": store, "origin": origin}
    for name, (kind, offset, data) in run.trace[:upto]:
        device = devices[name]
        if kind == "write":
            device.write(offset, data)
        elif kind == "durable":
            device.write_through(offset, data)
        else:
            device.sync()
    return store, origin


def _crashed(device: MemoryDevice, how: str, rng: random.Random) -> MemoryDevice:
    if how == "lost":
        return device.durable_copy()
    if how == "kept":
        return device.snapshot_copy()
    return device.random_crash(rng, tear=0.5)


def _check_recovered(run: RevertRun, store: MemoryDevice, origin: MemoryDevice, at: int) -> bool:
    """Recover one crash state and check it; whether it reopened mid-revert."""
    g = run.g
    engine = Engine.open(store, origin, cache_bytes=32 * 4096)
    reverting = engine.revert_progress is not None
    if at >= run.started:
        assert reverting or _chunks(origin, g) == run.snapshots[1], f"event {at}"
    engine.finish_revert()
    assert engine.revert_progress is None
    for tag in (1, 2, 3):
        got = read_snapshot(engine, store, origin, tag, 0, ORIGIN_CHUNKS)
        assert got == run.snapshots[tag], f"snapshot {tag} changed, crash at event {at}"
    now = _chunks(origin, g)
    if at >= run.started or reverting:
        assert now == run.snapshots[1], f"origin not reverted, crash at event {at}"
    else:
        # The start was not durable: the origin is as it was.
        assert now == run.origin_before, f"origin touched, crash at event {at}"
    engine.close()
    assert_clean(store)
    return reverting


@pytest.mark.timeout(120)
def test_revert_recovers_from_a_crash_at_every_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revert_module, "RESTORE_CHUNKS_PER_STEP", STEP_CHUNKS)
    run = record_revert()
    rng = random.Random(16)
    resumed = 0
    origin_writes = sum(1 for name, event in run.trace[run.started :] if name == "origin")
    assert origin_writes >= 6  # the revert took several steps
    for at in range(run.requested, len(run.trace) + 1):
        store, origin = _replay(run, at)
        for how in ("lost", "kept", "torn"):
            resumed += _check_recovered(
                run, _crashed(store, how, rng), _crashed(origin, how, rng), at
            )
    # Many crash states fall inside the revert: the reopened store resumed it.
    assert resumed >= origin_writes
