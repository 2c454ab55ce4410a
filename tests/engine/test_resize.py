"""Online resizing in the engine: the origin and the store grow under an open
store, snapshots keep the size they were taken at, shrinks are refused
unless provably safe, and a refused resize changes nothing.
"""

from __future__ import annotations

import pytest

from csnap_format import (
    decode_geometry,
    decode_superblock,
    format_blocks,
    plan_geometry,
    store_capacity,
)
from csnapd.engine import (
    BeyondCapacityError,
    DeviceTooSmallError,
    Engine,
    FileDevice,
    InvalidRequestError,
    MemoryDevice,
    ShrinkRefusedError,
)
from tests.engine.helpers import (
    UUID,
    assert_clean,
    format_device,
    new_store,
    pattern,
    read_snapshot,
    write_origin,
)

MIB = 1 << 20


def reserved_store(
    store_bytes: int = 8 * MIB,
    max_store_bytes: int = 32 * MIB,
    origin_bytes: int = 2 * MIB,
    journal_bytes: int = 256 << 10,
) -> tuple[MemoryDevice, MemoryDevice, int]:
    """A store formatted to grow to `max_store_bytes`, on devices of that size."""
    g = plan_geometry(
        store_bytes=store_bytes,
        origin_bytes=origin_bytes,
        journal_bytes=journal_bytes,
        max_store_bytes=max_store_bytes,
        uuid=UUID,
        created_ns=1,
    )
    store = MemoryDevice(max_store_bytes)
    format_device(store, g)
    return store, MemoryDevice(4 * origin_bytes), g.chunk_size


def superblock_and_backup(store: MemoryDevice) -> tuple[object, object]:
    sb = decode_superblock(store.read(0, 4096))
    return sb.geometry, decode_geometry(store.read(4096, 4096))


def test_grow_origin_and_store_while_open() -> None:
    store, origin, chunk = reserved_store()
    engine = Engine.open(store, origin)
    old_chunks = engine.origin_chunks
    write_origin(origin, engine.geometry, 5, 1)
    engine.create_snapshot(1)
    engine.commit()
    before = engine.status()
    result = engine.resize(origin_bytes=4 * MIB, store_bytes=16 * MIB)
    assert result.origin_chunks == 4 * MIB // chunk
    assert result.store_chunks == 16 * MIB // chunk
    assert result.store_chunks_before == 8 * MIB // chunk
    assert result.data_free == before.data_free + (8 * MIB // chunk)
    # The origin's new chunks are usable at once; the old snapshot has none of them.
    new_chunk = old_chunks + 3
    assert engine.origin_write([(new_chunk, 1)]).copied == 0
    assert engine.origin_write([(5, 1)]).copied == 1
    write_origin(origin, engine.geometry, 5, 2)
    engine.commit()
    assert engine.snapshot(1).origin_chunks == old_chunks
    assert engine.snapshot_chunks(1) == old_chunks
    assert engine.snapshot_chunks(None) == result.origin_chunks
    with pytest.raises(InvalidRequestError):
        engine.snapshot_read(1, [(new_chunk, 1)])
    assert read_snapshot(engine, store, origin, 1, 5, 1) == [pattern(5, 1, chunk)]
    # A snapshot taken now has the new size, and copies the new chunks.
    engine.create_snapshot(2)
    engine.commit()
    assert engine.snapshot(2).origin_chunks == result.origin_chunks
    assert engine.origin_write([(new_chunk, 1)]).copied == 1
    engine.commit()
    # The new store space is allocatable: fill past the old end.
    engine.close()
    assert_clean(store)
    geometry, backup = superblock_and_backup(store)
    assert geometry == backup
    engine = Engine.open(store, origin)
    assert engine.geometry == geometry
    assert engine.status().store_chunks == 16 * MIB // chunk
    engine.close()


def test_new_store_space_is_used() -> None:
    store, origin, _ = reserved_store(store_bytes=4 * MIB, origin_bytes=8 * MIB)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    free = engine.status().data_free
    engine.resize(store_bytes=12 * MIB)
    # More chunks than the old store had free: only the grown space holds them.
    count = free + 256
    done = 0
    while done < count:
        step = min(512, count - done)
        engine.origin_write([(done, step)], reclaim=False)
        engine.commit()
        done += step
    assert engine.snapshot(1).unique_chunks == count
    engine.close()
    assert_clean(store)


def test_refused_resizes_change_nothing() -> None:
    store, origin, chunk = reserved_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.origin_write([(0, 64)])
    engine.commit()
    image = store.snapshot_copy().read(0, 8 * MIB)
    geometry = engine.geometry
    capacity = store_capacity(geometry)
    refusals = [
        (BeyondCapacityError, {"store_bytes": (capacity + 1) * chunk}),
        (DeviceTooSmallError, {"origin_bytes": 64 * MIB}),
        # Snapshot 1 was taken of the whole origin.
        (ShrinkRefusedError, {"origin_bytes": MIB}),
        # The copies sit just past the metadata: nothing of the data area can go.
        (ShrinkRefusedError, {"store_bytes": (geometry.data_start + 1) * chunk}),
        (ShrinkRefusedError, {"store_bytes": chunk}),
    ]
    for error, sizes in refusals:
        with pytest.raises(error):
            engine.resize(**sizes)  # type: ignore[arg-type]
        assert engine.geometry == geometry
    engine.close()
    assert_clean(store)
    after = Engine.open(store, origin)
    assert after.geometry == geometry
    after.close()
    assert store.read(4096, 4096) == image[4096:8192]


def test_safe_shrinks_are_done() -> None:
    store, origin, chunk = reserved_store()
    engine = Engine.open(store, origin)
    engine.resize(store_bytes=16 * MIB, origin_bytes=4 * MIB)
    engine.create_snapshot(1)
    engine.origin_write([(0, 8)])
    engine.commit()
    # Free space at the end of the store, and an origin no snapshot reaches.
    engine.resize(store_bytes=12 * MIB)
    engine.delete_snapshot(1)
    engine.commit()
    while engine.sweep():
        engine.commit()
    engine.commit()
    engine.resize(origin_bytes=2 * MIB)
    assert engine.origin_chunks == 2 * MIB // chunk
    engine.close()
    assert_clean(store)


def test_unreserved_store_grows_within_its_bitmap() -> None:
    """A store formatted without room reserved opens as it always did and can
    grow only as far as its bitmap and metadata area cover."""
    store, origin, g = new_store()
    engine = Engine.open(store, origin)
    capacity = store_capacity(g)
    assert capacity >= g.store_chunks
    store.resize_to(capacity * g.chunk_size)
    engine.resize(store_bytes=capacity * g.chunk_size)
    with pytest.raises(BeyondCapacityError):
        engine.resize(store_bytes=(capacity + 1) * g.chunk_size)
    engine.close()
    assert_clean(store)


def test_grow_files(tmp_path: object) -> None:
    """With grow_files csnapd extends regular files itself; without, it refuses."""
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    g = plan_geometry(
        store_bytes=4 * MIB,
        origin_bytes=MIB,
        journal_bytes=256 << 10,
        max_store_bytes=16 * MIB,
        uuid=UUID,
        created_ns=1,
    )
    store_path, origin_path = tmp_path / "store", tmp_path / "origin"
    with open(store_path, "wb") as f:
        f.truncate(g.store_bytes)
        for address, block in format_blocks(g):
            f.seek(address * g.block_size)
            f.write(block)
    with open(origin_path, "wb") as f:
        f.truncate(MIB)
    engine = Engine.open(
        FileDevice(store_path, writable=True), FileDevice(origin_path, writable=False)
    )
    with pytest.raises(DeviceTooSmallError, match="--grow-files"):
        engine.resize(store_bytes=8 * MIB)
    result = engine.resize(store_bytes=8 * MIB, origin_bytes=2 * MIB, grow_files=True)
    assert set(result.grown_files) == {"store", "origin"}
    assert store_path.stat().st_size == 8 * MIB
    assert origin_path.stat().st_size == 2 * MIB
    engine.close()


def test_a_growth_larger_than_one_transaction_goes_in_steps() -> None:
    """With the smallest journal one transaction carries 19 blocks: growing
    by almost 5 GiB (40 bitmap blocks at 4K chunks) takes three commits,
    each a consistent store, and ends clean."""
    gib = 1 << 30
    store, origin, _ = reserved_store(
        store_bytes=128 * MIB, max_store_bytes=5 * gib, origin_bytes=MIB, journal_bytes=64 * 4096
    )
    engine = Engine.open(store, origin)
    commits = engine.stats.commits
    engine.resize(store_bytes=5 * gib)
    assert engine.stats.commits - commits == 3
    assert engine.status().store_chunks == 5 * gib // 4096
    engine.close()
    assert_clean(store)
