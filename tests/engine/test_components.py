"""The engine's parts through their public behaviour: devices, allocation,
the bounded cache, deep trees, opening, validation, a full store, and
group commit.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import struct
from pathlib import Path

import pytest

from csnapd.engine import (
    Engine,
    FileDevice,
    InvalidRequestError,
    MemoryDevice,
    SnapshotBusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreFullError,
    StoreLockedError,
    StoreOpenError,
    TooManySnapshotsError,
)
from csnapd.engine.copyout import KEPT_READ_BYTES
from csnapd.engine.device import SECTOR
from tests.engine.helpers import (
    assert_clean,
    format_device,
    new_geometry,
    new_store,
    pattern,
    read_snapshot,
    write_origin,
)

# -- devices --------------------------------------------------------------


def test_memory_crash_keeps_synced_and_chosen_writes() -> None:
    dev = MemoryDevice(1 << 16)
    dev.write(0, b"a" * 4096)
    dev.sync()
    dev.write(0, b"b" * 4096)
    dev.write(4096, b"c" * 4096)
    dev.write_through(8192, b"d" * 4096)
    assert dev.read(0, 1) == b"b"
    lost = dev.crash({})
    assert (lost.read(0, 1), lost.read(4096, 1), lost.read(8192, 1)) == (b"a", b"\0", b"d")
    second_only = dev.crash({1: None})
    assert (second_only.read(0, 1), second_only.read(4096, 1)) == (b"a", b"c")


def test_memory_crash_tears_at_sectors() -> None:
    dev = MemoryDevice(1 << 16)
    dev.write(0, b"x" * 4096)
    torn = dev.crash({0: [0, 3]})
    data = torn.read(0, 4096)
    for sector in range(8):
        expected = b"x" if sector in (0, 3) else b"\0"
        assert data[sector * SECTOR : (sector + 1) * SECTOR] == expected * SECTOR


def test_memory_random_crash_never_reorders_past_a_sync() -> None:
    rng = random.Random(1)
    dev = MemoryDevice(1 << 16)
    dev.write(0, b"1" * 512)
    dev.sync()
    dev.write(0, b"2" * 512)
    for _ in range(50):
        assert dev.random_crash(rng).read(0, 512) in (b"1" * 512, b"2" * 512)


def test_file_device_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    path = tmp_path / "store"
    path.write_bytes(bytes(8192))
    first = FileDevice(path, lock=True)
    try:
        with pytest.raises(StoreLockedError, match="one server per store"):
            FileDevice(path, lock=True)
    finally:
        first.close()
    FileDevice(path, lock=True).close()


def test_file_device_short_read_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    dev = FileDevice(path, writable=False)
    try:
        with pytest.raises(OSError, match="short read"):
            dev.read(50, 100)
        assert dev.read(0, 100) == b"x" * 100
    finally:
        dev.close()


# -- opening ----------------------------------------------------------------


def test_open_refuses_a_device_that_is_not_a_store() -> None:
    with pytest.raises(StoreOpenError, match="not a usable csnap store"):
        Engine.open(MemoryDevice(1 << 20), MemoryDevice(1 << 20))


def test_open_refuses_an_origin_smaller_than_formatted() -> None:
    store, _, g = new_store()
    with pytest.raises(StoreOpenError, match="wrong origin"):
        Engine.open(store, MemoryDevice(g.origin_bytes - 4096))


def test_open_uses_the_geometry_backup_when_block_zero_is_damaged() -> None:
    store, origin, _g = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(5)
    engine.commit()
    engine.close()
    store.write(0, os.urandom(512))  # first sector, geometry included, destroyed
    store.sync()
    engine = Engine.open(store, origin)  # the journal replay rewrites block 0
    assert [info.tag for info in engine.snapshots()] == [5]


def test_open_files_takes_the_store_lock(tmp_path: Path) -> None:
    g = new_geometry()
    store = tmp_path / "store"
    origin = tmp_path / "origin"
    with open(store, "wb") as f:
        f.truncate(g.store_bytes)
    with open(origin, "wb") as f:
        f.truncate(g.origin_bytes)
    dev = FileDevice(store)
    format_device(dev, g)
    dev.close()
    engine = Engine.open_files(store, origin)
    try:
        with pytest.raises(StoreLockedError):
            Engine.open_files(store, origin)
    finally:
        engine.close()
    Engine.open_files(store, origin).close()


#: /proc/kpageflags bits: KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL.
KPF_COMPOUND = (1 << 15) | (1 << 16)


def _page_flags(path: Path, offset: int, length: int) -> list[int]:
    """The page cache's flags of each page of `path` from `offset` (page
    aligned) for `length` bytes, read from /proc/kpageflags through a shared
    mapping of the file (root only). Mapping a cached page reads nothing and
    dirties nothing."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mapping = mmap.mmap(fd, length, offset=offset)
    finally:
        os.close(fd)
    found = []
    try:
        first = ctypes.addressof(ctypes.c_char.from_buffer(mapping)) // mmap.PAGESIZE
        with (
            open("/proc/self/pagemap", "rb", buffering=0) as pagemap,
            open("/proc/kpageflags", "rb", buffering=0) as kpageflags,
        ):
            for page in range(length // mmap.PAGESIZE):
                mapping[page * mmap.PAGESIZE]  # maps the cached page, reading nothing new
                pagemap.seek((first + page) * 8)
                (entry,) = struct.unpack("<Q", pagemap.read(8))
                assert entry >> 63, f"page {page} is not mapped"
                kpageflags.seek((entry & ((1 << 55) - 1)) * 8)
                (flags,) = struct.unpack("<Q", kpageflags.read(8))
                found.append(flags)
    finally:
        mapping.close()
    return found


def _pages_in_large_folios(path: Path, length: int) -> int:
    """How many of the first `length` bytes' pages of `path` the page cache
    holds in large folios (several pages as one)."""
    return sum(bool(flags & KPF_COMPOUND) for flags in _page_flags(path, 0, length))


def test_copy_outs_leave_the_origin_files_pages_in_small_folios(tmp_path: Path) -> None:
    """csnapd reads the origin file without readahead: consecutive copy-outs
    read with it leave the origin's pages in large folios, into which every
    later small write of the gateway costs more (FileDevice random_reads;
    docs/performance-log.md, "Origin pages without readahead")."""
    g = new_geometry(chunk_size=64 << 10)
    store = tmp_path / "store"
    origin = tmp_path / "origin"
    with open(store, "wb") as f:
        f.truncate(g.store_bytes)
    dev = FileDevice(store)
    format_device(dev, g)
    dev.close()
    chunks = 16
    fd = os.open(origin, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
    try:
        os.pwrite(fd, b"\x5a" * g.origin_bytes, 0)
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    engine = Engine.open_files(store, origin)
    try:
        engine.create_snapshot(1)
        for chunk in range(chunks):
            engine.origin_write([(chunk, 1)])
            engine.commit()
    finally:
        engine.close()
    found = _pages_in_large_folios(origin, chunks * g.chunk_size)
    assert found == 0, found


def test_copy_outs_of_every_size_copy_the_right_bytes_through_the_kept_buffer(
    tmp_path: Path,
) -> None:
    """Copy-out reads reuse one buffer up to KEPT_READ_BYTES and take a new one
    beyond: runs smaller, larger and smaller again, on real files, each copy
    holds what the origin held before it was written."""
    g = new_geometry(chunk_size=64 << 10, origin_bytes=16 << 20, store_bytes=64 << 20)
    store_path, origin_path = tmp_path / "store", tmp_path / "origin"
    with open(store_path, "wb") as f:
        f.truncate(g.store_bytes)
    dev = FileDevice(store_path)
    format_device(dev, g)
    dev.close()
    with open(origin_path, "wb") as f:
        f.truncate(g.origin_bytes)
    origin = FileDevice(origin_path)
    for chunk in range(g.origin_chunks):
        write_origin(origin, g, chunk, 1)
    origin.sync()
    runs = [(0, 1), (1, KEPT_READ_BYTES // g.chunk_size + 8), (100, 3), (110, 2)]
    store = FileDevice(store_path)
    engine = Engine.open(store, origin)
    try:
        engine.create_snapshot(1)
        for start, count in runs:
            engine.origin_write([(start, count)])
            engine.commit()
            for chunk in range(start, start + count):
                write_origin(origin, g, chunk, 2)
        for start, count in runs:
            copies = read_snapshot(engine, store, origin, 1, start, count)
            assert copies == [pattern(c, 1, g.chunk_size) for c in range(start, start + count)]
    finally:
        engine.close()
        store.close()
        origin.close()


def test_a_read_into_past_the_end_of_a_file_fails(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"x" * 6000)
    dev = FileDevice(path, writable=False)
    try:
        into = memoryview(bytearray(4096))
        dev.read_into(0, into)
        assert bytes(into) == b"x" * 4096
        with pytest.raises(OSError, match="short read: 1904 of 4096 bytes"):
            dev.read_into(4096, into)
    finally:
        dev.close()


def test_a_clean_close_marks_the_store_clean_and_open_marks_it_busy() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    assert not engine.status().clean
    engine.close()
    engine = Engine.open(store.durable_copy(), origin)
    assert engine.recovery.problem is None


# -- requests ---------------------------------------------------------------


def test_requests_outside_the_origin_are_refused() -> None:
    store, origin, g = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    for bad in ([(g.origin_chunks, 1)], [(-1, 2)], [(0, 0)], [], [(g.origin_chunks - 1, 2)]):
        with pytest.raises(InvalidRequestError, match=r"origin|no chunks"):
            engine.origin_write(bad)
        with pytest.raises(InvalidRequestError):
            engine.snapshot_read(1, bad)
    assert not engine.pending or engine.commit() is not None


def test_snapshot_table_errors() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    with pytest.raises(InvalidRequestError, match="tag"):
        engine.create_snapshot(1 << 32)
    with pytest.raises(InvalidRequestError, match="priority"):
        engine.create_snapshot(1, priority=128)
    engine.create_snapshot(1)
    with pytest.raises(SnapshotExistsError):
        engine.create_snapshot(1)
    with pytest.raises(SnapshotNotFoundError, match="tag 9"):
        engine.delete_snapshot(9)
    assert engine.change_use_count(1, 2).use_count == 2
    with pytest.raises(SnapshotBusyError, match="use count 2"):
        engine.delete_snapshot(1)
    with pytest.raises(InvalidRequestError, match="would become -1"):
        engine.change_use_count(1, -3)
    assert engine.set_priority(1, -5).priority == -5
    for tag in range(2, 65):
        engine.create_snapshot(tag)
    with pytest.raises(TooManySnapshotsError, match="all 64"):
        engine.create_snapshot(100)
    engine.commit()
    assert len(engine.snapshots()) == 64


def test_a_full_store_refuses_copy_outs_and_keeps_serving_reads() -> None:
    """With no snapshot expendable (the only one is in use), store_full."""
    store, origin, g = new_store(store_bytes=2 << 20, journal_bytes=64 * 4096)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.change_use_count(1, 1)
    engine.commit()
    data = engine.status().data_chunks
    engine.origin_write([(0, data)])
    engine.commit()
    for chunk in range(data):
        write_origin(origin, g, chunk, 3)
    with pytest.raises(StoreFullError, match="store is full: 0 free chunks, 1 needed"):
        engine.origin_write([(data, 1)])
    assert not engine.pending
    assert read_snapshot(engine, store, origin, 1, 0, 2) == [bytes(4096)] * 2
    engine.create_snapshot(2)  # other requests go on
    engine.commit()
    assert_clean(store)


def test_group_commit_makes_many_copy_outs_durable_with_one_sync() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    syncs = store.stats.syncs
    for chunk in range(0, 200, 2):
        engine.origin_write([(chunk, 1)])
    engine.commit()
    # The record carries the copies' CRCs: data and record synced together.
    assert store.stats.syncs - syncs == 1
    assert engine.snapshot(1).unique_chunks == 100


def test_an_already_unique_origin_write_changes_nothing() -> None:
    store, origin, _ = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.origin_write([(0, 8)])
    engine.commit()
    writes = store.stats.writes
    assert engine.origin_write([(0, 8)]).copied == 0
    assert not engine.pending
    assert engine.commit() is None
    assert store.stats.writes == writes


def test_snapshot_write_gives_the_snapshot_its_own_copy() -> None:
    store, origin, g = new_store()
    engine = Engine.open(store, origin)
    for chunk in range(4):
        write_origin(origin, g, chunk, 1)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.origin_write([(0, 2)])  # chunks 0-1 copied, shared by 1 and 2
    engine.commit()
    first = engine.snapshot_write(1, [(0, 4)])
    engine.commit()
    assert sum(s.count for s in first) == 4
    again = engine.snapshot_write(1, [(0, 4)])  # now unique: same places
    assert again == first
    assert engine.snapshot(1).unique_chunks == 4
    assert engine.snapshot(2).unique_chunks == 2
    for segment in first:
        for k in range(segment.count):
            store.write((segment.store_chunk + k) * 4096, pattern(segment.chunk + k, 9, 4096))
    got1 = read_snapshot(engine, store, origin, 1, 0, 4)
    got2 = read_snapshot(engine, store, origin, 2, 0, 4)
    assert got1 == [pattern(c, 9, 4096) for c in range(4)]
    assert got2 == [pattern(c, 1, 4096) for c in range(4)]
    assert_clean(store)


# -- cache and deep trees -----------------------------------------------------


def test_the_cache_stays_within_its_bound() -> None:
    store, origin, _g = new_store(store_bytes=64 << 20, origin_bytes=32 << 20)
    engine = Engine.open(store, origin, cache_bytes=32 * 4096)
    engine.create_snapshot(1)
    for start in range(0, 8000, 400):
        engine.origin_write([(start, 400)])
        engine.commit()
    assert engine.status().exceptions == 8000
    for start in range(0, 8000, 400):
        engine.snapshot_read(1, [(start, 400)])
        assert engine.cached_pages <= 32 + 8


@pytest.mark.slow
def test_a_deep_tree_grows_and_shrinks_back() -> None:
    store, origin, _g = new_store(
        store_bytes=768 << 20, origin_bytes=512 << 20, journal_bytes=4 << 20
    )
    engine = Engine.open(store, origin)
    for tag in range(3):
        engine.create_snapshot(tag)
    engine.commit()
    # Every other chunk, so each chunk needs its own directory entry.
    for start in range(0, 2 * 60_000, 2000):
        engine.origin_write([(c, 1) for c in range(start, start + 2000, 2)])
        engine.commit()
    engine.create_snapshot(10)
    engine.commit()
    engine.snapshot_write(10, [(c, 1) for c in range(0, 4000, 2)])
    engine.commit()
    depth = engine._state.depth
    assert depth >= 2
    assert_clean(store)
    for tag in (0, 1, 2, 10):
        engine.delete_snapshot(tag)
    engine.commit()
    while engine.sweep():
        engine.commit()
    engine.commit()
    assert engine.status().exceptions == 0
    assert engine._state.depth == 0
    assert_clean(store)
