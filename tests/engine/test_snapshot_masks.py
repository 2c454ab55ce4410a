"""The share masks derived from the snapshot table (StoreState.masks) follow
every change of the table at once: create, delete, the sweep's release,
squash, a request rolled back, a resize followed by a create, and a journal
replay; a revert, which changes no snapshot, leaves them right. Each is
seen through what the engine does next, within the same open transaction:
which origin writes copy, which chunks are shared, which tags resolve, and
whether space awaits the sweep.
"""

from __future__ import annotations

import pytest

from csnap_format import SnapshotRecord, SnapshotState, decode_superblock
from csnapd.engine import Engine, SnapshotNotFoundError
from csnapd.engine.state import StoreState
from tests.engine.helpers import new_store, pattern, read_snapshot, write_origin

MIB = 1 << 20


def _sweep_all(engine: Engine) -> None:
    engine.commit()
    for _ in range(1_000):
        if not engine.sweep():
            break
        engine.commit()
    engine.commit()
    assert not engine.sweep_pending


def test_create_and_delete_change_the_masks_within_one_transaction() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    assert engine.origin_write([(0, 1)]).copied == 0  # masks of the empty table
    engine.create_snapshot(1)
    assert engine.live_mask != 0
    assert engine.origin_write([(1, 1)]).copied == 1
    engine.create_snapshot(2)
    assert engine.origin_write([(1, 1)]).copied == 1  # snapshot 2's own copy
    assert engine.origin_write([(2, 1)]).copied == 1  # one copy for both
    assert engine.origin_shared([(0, 4)]) == [(0, 1), (3, 1)]
    engine.delete_snapshot(2)
    assert engine.sweep_pending  # it holds exceptions
    with pytest.raises(SnapshotNotFoundError):
        engine.snapshot_read(2, [(1, 1)])
    assert engine.origin_write([(3, 1)]).copied == 1  # for snapshot 1 alone
    engine.delete_snapshot(1)
    assert engine.live_mask == 0
    assert engine.origin_write([(4, 1)]).copied == 0
    assert engine.origin_shared([(0, 8)]) == []
    _sweep_all(engine)  # the sweep frees both slots
    assert engine.snapshots() == []
    engine.create_snapshot(1)  # the tag again, in a freed slot
    assert engine.origin_write([(1, 1)]).copied == 1
    assert engine.snapshot_read(1, [(1, 1)])[0].store_chunk is not None
    engine.close()


def test_a_squash_leaves_the_live_mask_and_joins_the_reclaim() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    assert engine.origin_write([(0, 2)]).copied == 2
    engine.commit()
    squashed = engine.squash_for_reserve()
    assert squashed is not None and squashed.tag == 1
    assert engine.live_mask == 0
    assert engine.origin_write([(5, 1)]).copied == 0
    assert engine.sweep_pending  # the squashed snapshot's two exceptions
    _sweep_all(engine)
    assert engine.origin_write([(6, 1)]).copied == 0
    engine.close()


def test_a_rolled_back_table_brings_its_masks_back() -> None:
    store, _, _ = new_store()
    state = StoreState.from_superblock(decode_superblock(store.read(0, 4096)))
    assert state.live_mask == 0 and state.bit_of(7) is None
    saved = state.copy()
    state.set_snapshot(
        3,
        SnapshotRecord(
            tag=7,
            state=SnapshotState.LIVE,
            priority=0,
            use_count=0,
            created_ns=1,
            origin_chunks=16,
        ),
    )
    assert state.live_mask == 1 << 3 and state.bit_of(7) == 3
    assert state.live_masks.at(15) == 1 << 3 and state.live_masks.at(16) == 0
    assert saved.live_mask == 0  # the copy keeps its own table
    state.assign(saved)
    assert state.live_mask == 0 and state.bit_of(7) is None
    assert state.live_masks.at(15) == 0


def test_a_snapshot_taken_after_the_origin_grew_covers_the_new_chunks() -> None:
    store, origin, _ = new_store(origin_bytes=2 * MIB)
    engine = Engine.open(store, origin)
    old_chunks = engine.origin_chunks
    engine.create_snapshot(1)
    engine.commit()
    origin.resize_to(4 * MIB)
    engine.resize(origin_bytes=4 * MIB)
    new_chunk = old_chunks + 3
    assert engine.origin_write([(new_chunk, 1)]).copied == 0  # snapshot 1 has no such chunk
    engine.create_snapshot(2)
    write_origin(origin, engine.geometry, new_chunk + 1, 1)
    assert engine.origin_write([(new_chunk + 1, 1)]).copied == 1  # for snapshot 2 only
    assert engine.origin_write([(5, 1)]).copied == 1  # one copy shared by both
    assert engine.snapshot_read(2, [(new_chunk + 1, 1)])[0].store_chunk is not None
    engine.close()


def test_replay_reads_the_table_it_committed() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    assert engine.origin_write([(0, 1)]).copied == 1
    engine.delete_snapshot(2)
    engine.commit()
    # No close: the next open replays the journal.
    replayed = Engine.open(store, origin)
    assert replayed.origin_write([(1, 1)]).copied == 1  # for snapshot 1
    assert replayed.sweep_pending  # snapshot 2 is still being deleted
    with pytest.raises(SnapshotNotFoundError):
        replayed.snapshot_read(2, [(0, 1)])
    replayed.delete_snapshot(1)
    assert replayed.origin_write([(2, 1)]).copied == 0
    replayed.close()


def test_a_revert_keeps_both_snapshots_live_and_copies_for_the_other_first() -> None:
    store, origin, g = new_store(store_bytes=8 << 20, origin_bytes=64 * 4096)
    engine = Engine.open(store, origin)
    for chunk in range(64):
        write_origin(origin, g, chunk, 1)
    engine.create_snapshot(1)
    assert engine.origin_write([(0, 8)]).copied == 8
    for chunk in range(8):
        write_origin(origin, g, chunk, 2)
    engine.create_snapshot(2)
    engine.commit()
    engine.start_revert(1)
    engine.commit()
    for _ in range(100):  # bounded
        more = engine.revert_step()
        engine.commit()
        if not more:
            break
    assert engine.revert_progress is None
    size = g.chunk_size
    assert read_snapshot(engine, store, origin, 2, 0, 8) == [pattern(c, 2, size) for c in range(8)]
    assert origin.read(0, 8 * size) == b"".join(pattern(c, 1, size) for c in range(8))
    assert engine.origin_write([(0, 8)]).copied == 0  # both have their copies
    assert engine.origin_write([(20, 1)]).copied == 1  # one copy for both
    engine.close()
