"""Writes within max_chunks succeed whatever the number of snapshots, the
chunk size or the journal size: a write whose metadata does not fit one
journal transaction is carried by several (docs/protocol.md, "Requests
larger than one transaction").
"""

from __future__ import annotations

import pytest

from csnapd.engine import BlockDevice, Engine, WriteSegment
from tests.engine.helpers import assert_clean, new_store, pattern, read_snapshot, write_origin

#: Most chunks one request names (csnapd's default max_chunks).
MAX_CHUNKS = 4096
#: Bytes of origin each case writes per round: memory stays small.
ORIGIN_BYTES = 8 << 20


def _write_whole_origin(engine: Engine, origin: BlockDevice, version: int) -> int:
    """Write every origin chunk as a client does, max_chunks at a time; returns copies made."""
    g = engine.geometry
    copied = 0
    for first in range(0, g.origin_chunks, MAX_CHUNKS):
        count = min(MAX_CHUNKS, g.origin_chunks - first)
        copied += engine.origin_write([(first, count)]).copied
        engine.commit()
        for chunk in range(first, first + count):
            write_origin(origin, g, chunk, version)
    return copied


def _write_whole_snapshot(engine: Engine, tag: int) -> None:
    """Give snapshot `tag` its own copy of every chunk, max_chunks at a time."""
    chunks = engine.geometry.origin_chunks
    for first in range(0, chunks, MAX_CHUNKS):
        count = min(MAX_CHUNKS, chunks - first)
        segments: list[WriteSegment] = engine.snapshot_write(tag, [(first, count)])
        engine.commit()
        covered = [s.chunk + k for s in segments for k in range(s.count)]
        assert covered == list(range(first, first + count))


def _assert_holds(
    engine: Engine, store: BlockDevice, origin: BlockDevice, tag: int, v: int
) -> None:
    size, chunks = engine.chunk_size, engine.geometry.origin_chunks
    got = read_snapshot(engine, store, origin, tag, 0, chunks)
    bad = next((c for c, data in enumerate(got) if data != pattern(c, v, size)), None)
    assert bad is None, f"snapshot {tag}: chunk {bad} does not hold version {v}"


@pytest.mark.slow
@pytest.mark.parametrize("snapshots", [1, 4, 12])
@pytest.mark.parametrize("journal_bytes", [256 << 10, 1 << 20])
@pytest.mark.parametrize("chunk_size", [4096, 16384, 65536])
def test_whole_device_writes_succeed_however_many_snapshots(
    chunk_size: int, journal_bytes: int, snapshots: int
) -> None:
    chunks = ORIGIN_BYTES // chunk_size
    store, origin, _ = new_store(
        store_bytes=(snapshots + 6) * ORIGIN_BYTES + (16 << 20),
        origin_bytes=ORIGIN_BYTES,
        chunk_size=chunk_size,
        journal_bytes=journal_bytes,
    )
    engine = Engine.open(store, origin)
    # Snapshot v holds version v of every chunk, each in its own copy.
    for version in range(1, snapshots + 1):
        assert _write_whole_origin(engine, origin, version) == (chunks if version > 1 else 0)
        engine.create_snapshot(version)
    assert _write_whole_origin(engine, origin, snapshots + 1) == chunks
    # Two snapshots of one moment share their copies: a snapshot write
    # copies from the store for one of them, chunk by chunk.
    shared, other, fresh = snapshots + 1, snapshots + 2, snapshots + 3
    engine.create_snapshot(shared)
    engine.create_snapshot(other)
    assert _write_whole_origin(engine, origin, snapshots + 2) == chunks
    _write_whole_snapshot(engine, shared)
    # A snapshot still sharing every chunk with the origin copies from it.
    engine.create_snapshot(fresh)
    _write_whole_snapshot(engine, fresh)
    for tag in range(1, snapshots + 1):
        _assert_holds(engine, store, origin, tag, tag)
    for tag in (shared, other):
        _assert_holds(engine, store, origin, tag, snapshots + 1)
    _assert_holds(engine, store, origin, fresh, snapshots + 2)
    engine.close()
    assert_clean(store)


def test_a_write_too_big_for_a_transaction_is_split_into_pieces_that_fit() -> None:
    # The smallest journal mkcsnap makes: 64 blocks, 19 per transaction.
    store, origin, _ = new_store(
        store_bytes=64 << 20, origin_bytes=16 << 20, journal_bytes=64 * 4096
    )
    engine = Engine.open(store, origin)
    assert engine.max_transaction_blocks == 19
    for version in range(1, 4):
        _write_whole_origin(engine, origin, version)
        engine.create_snapshot(version)
    commits = engine.stats.commits
    assert _write_whole_origin(engine, origin, 4) == engine.geometry.origin_chunks
    assert engine.stats.split_requests > 0
    # Several transactions carried each 4096-chunk write.
    assert engine.stats.commits - commits > 4096 // MAX_CHUNKS * 2
    for tag in range(1, 4):
        _assert_holds(engine, store, origin, tag, tag)
    engine.close()
    assert_clean(store)
