"""A chunk marked lost (docs/format.md, "Lost copies") reads and writes as an
error on the snapshots that lost it, counts as their own copy for origin
writes, and goes away with them when they are deleted and swept.
"""

from __future__ import annotations

import pytest

from csnapd.engine import Engine, MemoryDevice, StoreCorruptError
from csnapd.engine.dump import dump_store, restore_store
from tests.engine.helpers import assert_clean, format_device, new_geometry

G = new_geometry(store_bytes=16 << 20, origin_bytes=2 << 20)


def _store_with_lost_chunk() -> tuple[MemoryDevice, MemoryDevice]:
    """Snapshots 1 and 2; chunk 5's copy lost for both, chunk 6's for 1 only."""
    store, origin = MemoryDevice(G.store_bytes), MemoryDevice(G.origin_bytes)
    format_device(store, G)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.origin_write([(0, 10)])
    engine.commit()
    engine.close()
    doc = dump_store(store)
    rows = doc["exceptions"]
    for row in rows:
        if row[0] == 5:
            row[2] = None
    rows.append([6, 1, None])
    rows.sort(key=lambda row: row[0])
    for row in rows:
        if row[0] == 6 and row[2] is not None:
            row[1] = 2  # chunk 6: snapshot 2 keeps the copy, snapshot 1 lost it
    doc["snapshots"][0].update(unique_chunks=1, shared_chunks=9)
    doc["snapshots"][1].update(unique_chunks=1, shared_chunks=9)
    restore_store(store, doc)
    assert_clean(store)
    return store, origin


def test_a_lost_chunk_reads_and_writes_as_an_error_only_where_it_was_lost() -> None:
    store, origin = _store_with_lost_chunk()
    engine = Engine.open(store, origin)
    for tag in (1, 2):
        with pytest.raises(StoreCorruptError, match="was lost"):
            engine.snapshot_read(tag, [(0, 10)])
        with pytest.raises(StoreCorruptError, match="was lost"):
            engine.snapshot_write(tag, [(5, 1)])
    with pytest.raises(StoreCorruptError, match="snapshot 1 chunk 6"):
        engine.snapshot_read(1, [(6, 1)])
    [segment] = engine.snapshot_read(2, [(6, 1)])
    assert segment.store_chunk is not None
    assert engine.snapshot_read(1, [(4, 1)])[0].store_chunk is not None
    # Beyond the copied range the snapshots share the origin, as before.
    assert engine.snapshot_read(1, [(20, 4)])[0].store_chunk is None
    # An origin write finds the lost mark as the snapshots' own copy.
    assert engine.origin_write([(5, 1)]).copied == 0
    engine.commit()
    engine.close()
    assert_clean(store)


def test_deleting_the_snapshots_clears_their_lost_marks() -> None:
    store, origin = _store_with_lost_chunk()
    engine = Engine.open(store, origin)
    engine.delete_snapshot(1)
    engine.delete_snapshot(2)
    engine.commit()
    for _ in range(100):
        if not engine.sweep():
            break
        engine.commit()
    assert engine.exceptions(0, G.origin_chunks) == []
    engine.close()
    assert_clean(store)


def test_a_revert_skips_a_lost_chunk_and_restores_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, origin = _store_with_lost_chunk()
    size = G.chunk_size
    engine = Engine.open(store, origin)
    origin.write(0, b"\x99" * (10 * size))  # the origin changed since (copies exist)
    engine.start_revert(1)
    engine.commit()
    engine.finish_revert()
    assert engine.revert_progress is None
    # Chunks 5 and 6 were lost for snapshot 1: the origin keeps its own data.
    assert [origin.read(c * size, size) == bytes(size) for c in range(10)] == [
        c not in (5, 6) for c in range(10)
    ]
    assert "chunk 5's copy was lost" in caplog.text and "chunk 6's copy was lost" in caplog.text
    engine.close()
    assert_clean(store)
