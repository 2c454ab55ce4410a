"""A copy-out commit makes its data and its record durable with one sync
(docs/rules.md, "data before pointers"): a record whose copies did not all
reach the disk recovers as not committed, and a copy handed to a client for
writing is sealed by a later record first, so the client's write never
undoes the commit that made it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from csnap_format import CommitRecord, DataRun, Geometry, decode_commit, encode_commit
from csnap_format.errors import FormatError
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.journal import scan_journal
from tests.engine.helpers import assert_clean, new_store, pattern, read_snapshot, write_origin


def _unsynced_writes(store: MemoryDevice, work: Callable[[], object]) -> MemoryDevice:
    """The store as a power cut during the first sync of `work` could leave
    it: what was durable before, plus `work`'s writes up to that sync, all
    pending."""
    replay = store.durable_copy()
    trace: list[tuple[str, int, bytes]] = []
    store.log = trace
    try:
        work()
    finally:
        store.log = None
    for kind, offset, data in trace:
        if kind == "sync":
            break
        replay.write(offset, data)
    return replay


def _copy_out_store() -> tuple[MemoryDevice, MemoryDevice, Engine, Geometry]:
    """A store with snapshot 1 over an origin whose chunks 0..3 hold data,
    open, with nothing pending."""
    store, origin, g = new_store()
    for chunk in range(4):
        write_origin(origin, g, chunk, 1)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    return store, origin, engine, g


def _data_writes(device: MemoryDevice, g: Geometry) -> list[int]:
    """Indexes of the pending writes that went to the data area."""
    data_at = g.data_start * g.chunk_size
    return [i for i, write in enumerate(device.pending) if write.offset >= data_at]


@pytest.mark.parametrize("loss", ["lost", "torn"])
def test_a_copy_out_whose_data_missed_the_sync_is_not_committed(loss: str) -> None:
    store, origin, engine, g = _copy_out_store()
    size = engine.chunk_size

    def copy_out() -> None:
        engine.origin_write([(0, 2)])
        engine.commit()

    image = _unsynced_writes(store, copy_out)
    copies = _data_writes(image, g)
    assert copies, "the copy-out wrote no data before its sync"
    journal = [i for i in range(len(image.pending)) if i not in copies]
    kept: dict[int, list[int] | None] = dict.fromkeys(journal)
    if loss == "torn":
        kept.update({i: [0] for i in copies})  # one sector of each copy landed
    crashed = image.crash(kept)
    # The record and its images are all there: only the copies betray it.
    assert not scan_journal(crashed, g).newest.record.data
    recovered = Engine.open(crashed, origin)
    assert recovered.recovery.uncommitted is not None
    assert "not committed" in recovered.recovery.uncommitted
    assert recovered.snapshot(1).unique_chunks == 0  # as before the copy-out
    assert read_snapshot(recovered, crashed, origin, 1, 0, 2) == [
        pattern(chunk, 1, size) for chunk in range(2)
    ]
    recovered.close()
    assert_clean(crashed)


def test_a_copy_out_with_all_its_writes_landed_is_committed() -> None:
    store, origin, engine, g = _copy_out_store()
    size = engine.chunk_size

    def copy_out() -> None:
        engine.origin_write([(0, 2)])
        engine.commit()

    image = _unsynced_writes(store, copy_out)
    assert _data_writes(image, g)
    crashed = image.crash(dict.fromkeys(range(len(image.pending))))
    recovered = Engine.open(crashed, origin)
    assert recovered.recovery.uncommitted is None
    assert recovered.snapshot(1).unique_chunks == 2
    assert read_snapshot(recovered, crashed, origin, 1, 0, 2) == [
        pattern(chunk, 1, size) for chunk in range(2)
    ]


def test_an_origin_copy_out_costs_one_sync() -> None:
    store, _, engine, _ = _copy_out_store()
    syncs = store.stats.syncs
    assert engine.origin_write([(0, 1)]).copied == 1
    engine.commit()
    assert store.stats.syncs - syncs == 1


def test_a_snapshot_write_is_sealed_before_its_client_writes() -> None:
    store, origin, engine, _ = _copy_out_store()
    size = engine.chunk_size
    syncs = store.stats.syncs
    [segment] = engine.snapshot_write(1, [(2, 1)])
    engine.commit()
    # The copy's commit, then the seal that lets the client write into it.
    assert store.stats.syncs - syncs == 2
    store.write_through(segment.store_chunk * size, pattern(2, 7, size))
    crashed = store.durable_copy()
    recovered = Engine.open(crashed, origin)
    assert recovered.recovery.uncommitted is None
    assert read_snapshot(recovered, crashed, origin, 1, 2, 1) == [pattern(2, 7, size)]


def test_handing_out_a_copy_of_the_newest_record_seals_it_first() -> None:
    store, origin, engine, _ = _copy_out_store()
    size = engine.chunk_size
    engine.origin_write([(3, 1)])
    engine.commit()
    syncs = store.stats.syncs
    # Snapshot 1 owns the copy alone: an owned reply lets its client write
    # there, so it needs a record after the copy's before it goes out.
    owned, _ = engine.snapshot_owned(1, [(3, 1)])
    assert engine.pending
    engine.commit()
    assert store.stats.syncs - syncs == 1
    [(_, _, target)] = owned
    store.write_through(target * size, pattern(3, 9, size))
    # Asking again needs no seal: the copy's record is no longer the newest.
    engine.snapshot_owned(1, [(3, 1)])
    assert not engine.pending
    crashed = store.durable_copy()
    recovered = Engine.open(crashed, origin)
    assert recovered.recovery.uncommitted is None
    assert read_snapshot(recovered, crashed, origin, 1, 3, 1) == [pattern(3, 9, size)]


def test_a_record_carries_its_data_runs_and_one_without_reads_as_before() -> None:
    _, _, g = new_store()
    ctx = g.context
    first = g.data_start
    runs = (DataRun(first, 3, 0x12345678), DataRun(first + 9, 1, 7))
    record = CommitRecord(g.journal_start, 5, 4, 0, (0,), runs)
    block = encode_commit(record, ctx)
    assert decode_commit(block, ctx, g.journal_start) == record
    bare = CommitRecord(g.journal_start, 5, 4, 0, (0,))
    # A record without runs has zeros after its addresses, as always.
    assert encode_commit(bare, ctx)[64:] == bytes(g.block_size - 64)
    assert decode_commit(encode_commit(bare, ctx), ctx, g.journal_start).data == ()
    outside = CommitRecord(g.journal_start, 5, 4, 0, (0,), (DataRun(first - 1, 1, 0),))
    with pytest.raises(FormatError, match="data area"):
        decode_commit(encode_commit(outside, ctx), ctx, g.journal_start)
