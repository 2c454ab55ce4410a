"""Every crash state around an online resize recovers: the store opens with
the old geometry or the new one (the new one once the resize was
acknowledged), the geometry backup in block 1 agrees with the superblock
after the open, csnap-check finds nothing wrong, the snapshot taken before
keeps its size and data, and the grown space is usable.
"""

from __future__ import annotations

import random

from csnap_format import FormatError, Geometry, decode_geometry, plan_geometry
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.check import check_store
from tests.crash.harness import Event, crash_states, misplaced_copy
from tests.engine.helpers import UUID, format_device, pattern, read_snapshot

CHUNK = 4096
ORIGIN_CHUNKS = 64
GROWN_ORIGIN = 2 * ORIGIN_CHUNKS
STORE_BYTES = 2 << 20
GROWN_STORE = 3 << 20
MAX_STORE = 4 << 20


def _record() -> tuple[Geometry, MemoryDevice, MemoryDevice, list[Event], dict[str, int]]:
    """Run the workload on a recording store; returns the trace and, by step
    name, how many trace events there were when the step was acknowledged."""
    g = plan_geometry(
        store_bytes=STORE_BYTES,
        origin_bytes=ORIGIN_CHUNKS * CHUNK,
        journal_bytes=64 * CHUNK,
        max_store_bytes=MAX_STORE,
        uuid=UUID,
        created_ns=1,
    )
    base = MemoryDevice(MAX_STORE)
    format_device(base, g)
    origin = MemoryDevice(GROWN_ORIGIN * CHUNK)
    for chunk in range(GROWN_ORIGIN):
        origin.write(chunk * CHUNK, pattern(chunk, 1, CHUNK))
    origin.sync()
    trace: list[Event] = []
    store = base.durable_copy()
    store.log = trace
    ticks = iter(range(1, 1 << 30))
    engine = Engine.open(store, origin, clock=lambda: next(ticks))
    acked: dict[str, int] = {}
    engine.create_snapshot(1)
    engine.commit()
    acked["snapshot"] = len(trace)
    engine.origin_write([(0, 16)])
    engine.commit()
    engine.resize(origin_bytes=GROWN_ORIGIN * CHUNK, store_bytes=GROWN_STORE)
    acked["resize"] = len(trace)
    engine.create_snapshot(2)
    engine.commit()
    engine.origin_write([(ORIGIN_CHUNKS - 4, 40)])
    engine.commit()
    engine.close()
    return g, base, origin, trace, acked


def _verify(image: MemoryDevice, origin: MemoryDevice, old: Geometry, resize_acked: bool) -> None:
    report = check_store(image)
    assert report.fatal is None, report.fatal
    assert not report.problems, "; ".join(map(str, report.problems[:3]))
    engine = Engine.open(image, origin)
    g = engine.geometry
    grown = (g.origin_chunks, g.store_chunks) == (GROWN_ORIGIN, GROWN_STORE // CHUNK)
    assert grown or g == old, f"geometry is neither the old nor the new one: {g}"
    assert grown or not resize_acked, "an acknowledged resize was lost"
    assert decode_geometry(image.read(CHUNK, CHUNK)) == g, "block 1 disagrees after open"
    assert engine.snapshot(1).origin_chunks == ORIGIN_CHUNKS
    got = read_snapshot(engine, image, origin, 1, 0, ORIGIN_CHUNKS)
    assert got == [pattern(chunk, 1, CHUNK) for chunk in range(ORIGIN_CHUNKS)]
    problem = misplaced_copy(engine, image, CHUNK)
    assert problem is None, problem
    if grown:
        engine.origin_write([(GROWN_ORIGIN - 8, 8)])
        engine.commit()
    engine.close()
    after = check_store(image)
    assert after.fatal is None and not after.problems, after.problems[:3]


def _backup_stale(image: MemoryDevice) -> bool:
    """Whether block 1 differs from block 0's geometry, or does not decode."""
    try:
        return decode_geometry(image.read(CHUNK, CHUNK)) != decode_geometry(image.read(0, CHUNK))
    except FormatError:
        return True


def test_every_crash_state_around_a_resize_recovers() -> None:
    g, base, origin, trace, acked = _record()
    rng = random.Random(16)
    replay = base.durable_copy()
    states = grown_states = stale_backups = 0
    for index, (kind, offset, data) in enumerate(trace):
        if kind == "write":
            replay.write(offset, data)
        elif kind == "sync":
            replay.sync()
        else:
            continue
        if index < acked["snapshot"]:
            continue  # snapshot 1 is what every state is checked against
        pending = [i for i, w in enumerate(replay.pending) if not w.durable]
        sectors = [w.sectors for w in replay.pending]
        for label, kept in crash_states(pending, sectors, rng, 4):
            image = replay.crash(kept)
            stale_backups += _backup_stale(image)
            try:
                _verify(image, origin, g, resize_acked=index >= acked["resize"])
            except AssertionError as exc:
                raise AssertionError(
                    f"trace event {index} ({kind}), state {label!r}: {exc}"
                ) from exc
            states += 1
            grown_states += decode_geometry(image.read(0, CHUNK)).origin_chunks == GROWN_ORIGIN
    print(
        f"\n{states} crash states around the resize, {grown_states} with block 0 grown,"
        f" {stale_backups} with block 1 stale or torn"
    )
    assert states >= 150
    assert grown_states > 0 and stale_backups > 0
