"""Space coming back: a chunk freed by a transaction is not written before that
transaction is durable (no reuse before durable), seen from the disk after a power cut rather
than from the engine's counters; and the deletion sweep reaches the origin's
last leaf.
"""

from __future__ import annotations

from csnapd.engine import Engine
from tests.crash.harness import misplaced_copy
from tests.engine.helpers import assert_clean, new_store, write_origin


def test_a_copy_out_never_overwrites_a_chunk_whose_free_is_not_durable() -> None:
    store, origin, g = new_store(store_bytes=2 << 20, journal_bytes=64 * 4096)
    for chunk in range(g.origin_chunks):
        write_origin(origin, g, chunk, 1)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    held = engine.status().data_chunks
    engine.origin_write([(0, held)])  # every data chunk now holds a copy
    engine.commit()
    for chunk in range(held):
        write_origin(origin, g, chunk, 2)
    engine.delete_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    engine.sweep()  # frees copies of snapshot 1 in the open transaction
    assert engine.status().data_free > 0
    # The only free chunks are those the open transaction freed. The copy-out
    # goes to one of them only once their free is durable.
    engine.origin_write([(g.origin_chunks - 1, 1)])
    # A power cut now, with every write issued so far on the disk.
    image = store.snapshot_copy()
    recovered = Engine.open(image, origin)
    assert recovered.recovery.problem is None
    # Every copy the durable btree points at (snapshot 1's are still there
    # unless the sweep step was made durable) holds its own chunk's data.
    assert misplaced_copy(recovered, image, g.chunk_size) is None
    recovered.close()
    assert_clean(image)


def test_the_sweep_clears_the_origins_last_leaf() -> None:
    store, origin, g = new_store(origin_bytes=8 << 20, store_bytes=48 << 20)
    end = g.origin_chunks
    engine = Engine.open(store, origin)
    keep = engine.create_snapshot(1)
    engine.commit()
    for first in range(0, end, 512):
        engine.origin_write([(first, 512)])
        engine.commit()
    leaves = list(engine._tree.leaves())
    assert len(leaves) > 3
    last_leaf_base = leaves[-1][0].base
    free_before = engine.status().data_free
    # Snapshot 2's own copies all sit in the last leaf, up to the last chunk.
    gone = engine.create_snapshot(2)
    engine.commit()
    engine.snapshot_write(2, [(end - 5, 5), (last_leaf_base, 1)])
    engine.commit()
    assert engine.status().data_free == free_before - 6
    engine.delete_snapshot(2)
    engine.commit()
    for _ in range(1000):
        more = engine.sweep()
        engine.commit()
        if not more:
            break
    assert not engine.sweep_pending
    left = engine.exceptions(0, end)
    assert len(left) == end
    assert {share for _, share, _ in left} == {1 << keep.bit}, f"bit {gone.bit} survived"
    assert engine.status().data_free == free_before
    assert engine.status().deleting == ()
    engine.close()
    assert_clean(store)
