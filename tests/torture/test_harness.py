"""The crash harness itself: cases where a wrong verdict would hide a bug or
raise a false alarm, found by the long enumeration.
"""

from __future__ import annotations

import itertools
import struct

from csnapd.engine import Engine, MemoryDevice
from tests.crash.harness import Event, Workload, crash_geometry, enumerate_crashes
from tests.engine.helpers import format_device, pattern


def test_a_tag_deleted_and_created_again_in_one_commit_is_told_apart() -> None:
    """One commit deletes snapshot 6 and creates a new snapshot 6 after the
    origin changed. Whether that commit landed shows only in the snapshot's
    creation time; the two snapshots read differently."""
    g = crash_geometry()
    size = g.chunk_size
    base = MemoryDevice(g.store_bytes)
    format_device(base, g)
    trace: list[Event] = []
    store = base.durable_copy()
    store.log = trace
    origin = MemoryDevice(g.origin_bytes)
    ticks = itertools.count(1)
    engine = Engine.open(store, origin, clock=lambda: next(ticks))
    effects = {}

    first = engine.create_snapshot(6)
    engine.commit()
    trace.append(("ack", 1, b""))
    effects[1] = [("create", 6, first.created_ns)]

    engine.origin_write([(2, 1)])
    engine.commit()
    trace.append(("ack", 2, b""))
    effects[2] = []
    trace.append(("origin", 2, struct.pack("<Q", 1)))
    origin.write(2 * size, pattern(2, 1, size))

    engine.delete_snapshot(6)
    second = engine.create_snapshot(6)
    engine.commit()
    trace.append(("ack", 3, b""))
    effects[3] = [("delete", 6, first.created_ns), ("create", 6, second.created_ns)]
    engine.close()

    stats = enumerate_crashes(Workload(g, base, trace, effects))
    assert stats.in_flight_landed > 0 and stats.states > 20
