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
from csnapd.engine import Engine, InvalidRequestError, MemoryDevice
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


# -- snapshot writes that bring their bytes -----------------------------------


def _laid(old: bytes, at: int, new: bytes) -> bytes:
    return old[:at] + new + old[at + len(new) :]


def test_a_snapshot_data_write_costs_one_sync_and_lands_in_the_copy() -> None:
    store, origin, engine, _ = _copy_out_store()
    size = engine.chunk_size
    syncs = store.stats.syncs
    data = b"\xa5" * 1024
    segments, written = engine.snapshot_write_data(1, 2 * size + 512, data)
    assert written
    assert [(s.chunk, s.count) for s in segments] == [(2, 1)]
    engine.commit()
    # One sync: the copy's CRC covers the written bytes; nothing is handed out.
    assert store.stats.syncs - syncs == 1
    assert not engine.pending
    crashed = store.durable_copy()
    recovered = Engine.open(crashed, origin)
    assert recovered.recovery.uncommitted is None
    assert read_snapshot(recovered, crashed, origin, 1, 2, 1) == [
        _laid(pattern(2, 1, size), 512, data)
    ]
    assert read_snapshot(recovered, crashed, origin, 1, 1, 1) == [pattern(1, 1, size)]
    recovered.close()
    assert_clean(crashed)


def test_a_snapshot_data_write_across_chunks_shared_with_another_snapshot() -> None:
    store, origin, engine, _ = _copy_out_store()
    size = engine.chunk_size
    engine.create_snapshot(2)
    engine.commit()
    # Chunks 0..1 are copied out once, shared by snapshots 1 and 2.
    engine.origin_write([(0, 2)])
    engine.commit()
    write_origin(origin, engine.geometry, 0, 5)
    write_origin(origin, engine.geometry, 1, 5)
    data = bytes(range(256)) * 16
    offset = size - 1024  # the last KiB of chunk 0, the first 3 KiB of chunk 1
    segments, written = engine.snapshot_write_data(1, offset, data)
    assert written
    assert sum(s.count for s in segments) == 2
    engine.commit()
    crashed = store.durable_copy()
    recovered = Engine.open(crashed, origin)
    view = b"".join(read_snapshot(recovered, crashed, origin, 1, 0, 2))
    old = pattern(0, 1, size) + pattern(1, 1, size)
    assert view == _laid(old, offset, data)
    # Snapshot 2 still reads the copy they shared, untouched.
    assert b"".join(read_snapshot(recovered, crashed, origin, 2, 0, 2)) == old
    recovered.close()
    assert_clean(crashed)


def test_a_snapshot_data_write_reads_only_the_chunks_it_covers_in_part() -> None:
    store, origin, engine, _ = _copy_out_store()
    size = engine.chunk_size
    # From byte 512 of chunk 0 to byte 512 of chunk 3: chunks 1 and 2 are
    # overwritten whole, so only chunks 0 and 3 need their old contents.
    data = bytes(range(251)) * (3 * size // 251 + 1)
    data = data[: 3 * size]
    reads, read_bytes = origin.stats.reads, origin.stats.bytes_read
    segments, written = engine.snapshot_write_data(1, 512, data)
    assert written
    assert [(s.chunk, s.count) for s in segments] == [(0, 4)]
    assert origin.stats.reads - reads == 2
    assert origin.stats.bytes_read - read_bytes == 2 * size
    engine.commit()
    crashed = store.durable_copy()
    recovered = Engine.open(crashed, origin)
    old = b"".join(pattern(chunk, 1, size) for chunk in range(4))
    assert b"".join(read_snapshot(recovered, crashed, origin, 1, 0, 4)) == _laid(old, 512, data)
    recovered.close()
    assert_clean(crashed)

    # Whole chunks: nothing old is read at all.
    store, origin, engine, _ = _copy_out_store()
    reads = origin.stats.reads
    _, written = engine.snapshot_write_data(1, size, data[: 2 * size])
    assert written
    assert origin.stats.reads == reads
    engine.commit()
    view = b"".join(read_snapshot(engine, store, origin, 1, 0, 4))
    assert view == _laid(old, size, data[: 2 * size])


def test_a_snapshot_data_write_to_an_owned_chunk_hands_it_out() -> None:
    store, origin, engine, _ = _copy_out_store()
    size = engine.chunk_size
    engine.snapshot_write_data(1, 2 * size, b"x" * 100)
    engine.commit()
    syncs = store.stats.syncs
    # The snapshot owns chunk 2 alone now: nothing is written, the chunk is
    # handed out, and its copy (the newest record's) is sealed first.
    segments, written = engine.snapshot_write_data(1, 2 * size + 8, b"y" * 100)
    assert not written
    engine.commit()
    assert store.stats.syncs - syncs == 1
    [segment] = segments
    store.write_through(segment.store_chunk * size + 8, b"y" * 100)
    crashed = store.durable_copy()
    recovered = Engine.open(crashed, origin)
    assert recovered.recovery.uncommitted is None
    expected = _laid(_laid(pattern(2, 1, size), 0, b"x" * 100), 8, b"y" * 100)
    assert read_snapshot(recovered, crashed, origin, 1, 2, 1) == [expected]


def test_a_snapshot_data_write_that_missed_its_sync_left_nothing() -> None:
    store, origin, engine, g = _copy_out_store()
    size = engine.chunk_size

    def write() -> None:
        engine.snapshot_write_data(1, size, b"z" * 4096)
        engine.commit()

    image = _unsynced_writes(store, write)
    copies = _data_writes(image, g)
    assert copies
    kept: dict[int, list[int] | None] = {
        i: None for i in range(len(image.pending)) if i not in copies
    }
    recovered = Engine.open(image.crash(kept), origin)
    assert recovered.recovery.uncommitted is not None
    assert recovered.snapshot(1).unique_chunks == 0


@pytest.mark.parametrize(
    ("where", "length", "refused"),
    [
        ("start", 0, "no bytes"),
        ("end", 1, "not inside"),
        ("end-1", 2, "not inside"),
        ("-1", 1, "negative"),
    ],
)
def test_a_snapshot_data_write_is_refused_before_it_does_anything(
    where: str, length: int, refused: str
) -> None:
    _, _, engine, _ = _copy_out_store()
    end = engine.snapshot_chunks(1) * engine.chunk_size
    offset = {"start": 0, "end": end, "end-1": end - 1, "-1": -1}[where]
    with pytest.raises(InvalidRequestError, match=refused):
        engine.snapshot_write_data(1, offset, b"q" * length)
    assert not engine.pending
    assert engine.snapshot(1).unique_chunks == 0
