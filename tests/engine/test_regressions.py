"""One deterministic test per way a snapshot store's metadata has been known
to go wrong (docs/rules.md names the rule each proves), plus the chunk freed
and wanted again in one transaction.
"""

from __future__ import annotations

import pytest

from csnapd.engine import Engine, MemoryDevice, StoreFullError
from csnapd.engine.engine import SWEEP_LEAVES_PER_STEP
from csnapd.engine.journal import scan_journal
from tests.engine.helpers import (
    assert_clean,
    new_store,
    pattern,
    read_snapshot,
    write_origin,
)


def sweep_all(engine: Engine) -> None:
    for _ in range(100_000):
        more = engine.sweep()
        engine.commit()
        if not more:
            return
    raise AssertionError("sweep did not finish")


def test_a_new_snapshot_never_inherits_a_deleted_ones_exceptions() -> None:
    store, origin, g = new_store()
    engine = Engine.open(store, origin)
    old = engine.create_snapshot(1)
    engine.origin_write([(0, 10)])
    engine.commit()
    for chunk in range(10):
        write_origin(origin, g, chunk, 7)
    engine.delete_snapshot(1)
    engine.commit()
    # While the sweep has not finished, the bit is not reused.
    during = engine.create_snapshot(2)
    assert during.bit != old.bit
    engine.delete_snapshot(2)
    engine.commit()
    sweep_all(engine)
    new = engine.create_snapshot(3)
    engine.commit()
    assert new.bit == old.bit
    assert (new.unique_chunks, new.shared_chunks) == (0, 0)
    assert engine.exceptions(0, g.origin_chunks) == []
    got = read_snapshot(engine, store, origin, 3, 0, 10)
    assert got == [pattern(c, 7, g.chunk_size) for c in range(10)]
    assert_clean(store)


def test_root_split_then_crash_keeps_the_whole_tree() -> None:
    store, origin, _g = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    # Enough exceptions in one transaction to split the root leaf.
    engine.origin_write([(0, 400)])
    engine.commit()
    assert engine.status().exceptions == 400
    crashed = store.durable_copy()  # every home write of that commit lost
    engine = Engine.open(crashed, origin)
    assert engine.recovery.replayed >= 1
    segments = engine.snapshot_read(1, [(0, 400)])
    assert all(s.store_chunk is not None for s in segments)
    assert sum(s.count for s in segments) == 400
    assert len(engine.exceptions(0, 400)) == 400
    assert_clean(crashed)


def _two_transactions() -> tuple[MemoryDevice, MemoryDevice, int]:
    """A store whose last two transactions are in the journal, homes lost."""
    store, origin, _g = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    engine.create_snapshot(2)
    engine.origin_write([(0, 3)])
    last = engine.commit()
    assert last is not None
    return store.durable_copy(), origin, last


def test_damaged_journaled_block_is_not_replayed() -> None:
    store, origin, last = _two_transactions()
    g = Engine.open(store.snapshot_copy(), origin).geometry
    scan = scan_journal(store, g)
    assert scan.newest.record.sequence == last
    slot, _count = scan.spans[last]
    image_slot = (slot + 1) % g.journal_blocks
    offset = (g.journal_start + image_slot) * g.block_size + 1000
    store.write(offset, bytes([store.read(offset, 1)[0] ^ 0x40]))
    store.sync()
    engine = Engine.open(store, origin)
    # The damaged newest transaction is ignored; the one before it holds.
    assert engine.recovery.newest_sequence == last - 1
    assert {i.tag for i in engine.snapshots()} == {1}
    assert_clean(store)


def test_damaged_commit_record_is_not_replayed() -> None:
    store, origin, last = _two_transactions()
    g = Engine.open(store.snapshot_copy(), origin).geometry
    slot, _ = scan_journal(store, g).spans[last]
    offset = (g.journal_start + slot) * g.block_size + 60
    store.write(offset, b"\xff")
    store.sync()
    engine = Engine.open(store, origin)
    assert engine.recovery.newest_sequence == last - 1
    assert {i.tag for i in engine.snapshots()} == {1}
    assert_clean(store)


def test_several_transactions_replay_in_order() -> None:
    store, origin, g = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    engine.delete_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    crashed = store.durable_copy()
    scan = scan_journal(crashed, g)
    sequences = [txn.record.sequence for txn in scan.replay]
    assert len(sequences) >= 2 and sequences == sorted(sequences)
    engine = Engine.open(crashed, origin)
    assert {i.tag for i in engine.snapshots()} == {2}
    assert_clean(crashed)


def test_a_delete_larger_than_the_journal_survives_a_crash() -> None:
    store, origin, _g = new_store(
        store_bytes=64 << 20, origin_bytes=32 << 20, journal_bytes=64 * 4096
    )
    engine = Engine.open(store, origin)
    free_at_start = engine.status().data_free
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    for start in range(0, 6000, 500):
        engine.origin_write([(start, 500)])
        engine.commit()
    # Every copy is shared by 1 and 2: deleting 1 rewrites every leaf, far
    # more blocks than one transaction of this journal may carry.
    engine.delete_snapshot(1)
    engine.commit()
    steps = 0
    while steps < 2 and engine.sweep():
        engine.commit()
        steps += 1
    assert engine.sweep_pending, "the delete should take more transactions than this"
    # Crash with the last sweep step's home writes lost.
    crashed = store.durable_copy()
    engine = Engine.open(crashed, origin)
    assert [i.tag for i in engine.snapshots()] == [2]
    assert [i.tag for i in engine.status().deleting] == [1]
    assert_clean(crashed)
    sweep_all(engine)
    assert engine.status().deleting == ()
    assert engine.snapshot(2).unique_chunks == 6000
    assert_clean(crashed)
    engine.delete_snapshot(2)
    engine.commit()
    sweep_all(engine)
    assert engine.status().data_free == free_at_start
    assert engine.status().exceptions == 0
    assert_clean(crashed)


def test_chunks_freed_in_a_transaction_are_not_reused_before_it_is_durable() -> None:
    store, origin, g = new_store(store_bytes=2 << 20, journal_bytes=64 * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    engine.origin_write([(0, engine.status().data_chunks)])
    engine.commit()
    assert engine.status().data_free == 0  # every data chunk holds a copy
    engine.delete_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    engine.sweep()  # frees some of snapshot 1's chunks, not yet durably
    freed = engine.status().data_free
    assert freed > 0 and engine.pending
    commits = engine.stats.commits
    # The only free chunks were freed by the open transaction: the engine
    # must make that durable before it hands any of them to a copy-out.
    engine.origin_write([(g.origin_chunks - 1, 1)])
    assert engine.stats.commits == commits + 1
    engine.commit()
    assert engine.status().data_free == freed - 1
    assert_clean(store)
    # And a request larger than everything free, when the store-full policy
    # may not reclaim, is refused, changing nothing.
    with pytest.raises(StoreFullError, match="store is full"):
        engine.origin_write([(0, freed + 5)], reclaim=False)
    assert engine.status().data_free == freed - 1
    assert not engine.pending


def test_a_sweep_step_is_bounded_even_when_nothing_stays_dirty() -> None:
    # A snapshot owning its exceptions alone: swept leaves empty out and merge
    # away, so the dirty-block bound alone would sweep everything in one step
    # (one transaction during which a server answers nobody).
    store, origin, _ = new_store(origin_bytes=64 << 20, store_bytes=160 << 20)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    for first in range(0, 16384, 1024):
        engine.origin_write([(first, 1024)])
        engine.commit()
    # Hundreds of leaves: many more than one step visits.
    assert engine.status().exceptions == 16384 > 20 * SWEEP_LEAVES_PER_STEP
    engine.delete_snapshot(1)
    engine.commit()
    steps = 0
    while engine.sweep():
        engine.commit()
        steps += 1
    engine.commit()
    assert steps >= 2
    assert engine.status().exceptions == 0
    engine.close()
    assert_clean(store)
