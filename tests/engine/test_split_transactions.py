# Writes within max_chunks succeed whatever the number of snapshots, the
# chunk size or the journal size: a write whose metadata does not fit one
# journal transaction is carried by several (docs/protocol.md, "Requests
# larger than one transaction").
from __future__ import annotations

import pytest

from csnapd.engine import BlockDevice, Engine
from tests.engine.helpers import assert_clean, new_store, pattern, read_snapshot, write_origin

#: Most chunks one request names (csnapd's default max_chunks).
MAX_CHUNKS = 4096
#: Bytes of origin each case writes per round: memory stays small.
ORIGIN_BYTES = 8 << 20


def _rounds(engine: Engine, origin: BlockDevice, snapshots: int, *, snapshot_writes: bool) -> None:
    """Per round: write every origin chunk (new data), then take a snapshot."""
    g = engine.geometry
    origin_chunks = g.origin_chunks
    for version in range(1, snapshots + 2):
        for first in range(0, origin_chunks, MAX_CHUNKS):
            count = min(MAX_CHUNKS, origin_chunks - first)
            result = engine.origin_write([(first, count)])
            engine.commit()
            if version > 1:
                assert result.copied == count
            for chunk in range(first, first + count):
                write_origin(origin, g, chunk, version)
        if version <= snapshots:
            engine.create_snapshot(version)
            engine.commit()
    if snapshot_writes:
        # Every snapshot but the newest shares nothing with the origin; the
        # oldest gets its own copy of every chunk it shares with others.
        segments = engine.snapshot_write(1, [(0, origin_chunks)])
        engine.commit()
        assert sum(s.count for s in segments) == origin_chunks
        assert [s.chunk for s in segments] == sorted(s.chunk for s in segments)


@pytest.mark.parametrize("snapshots", [1, 4, 12])
@pytest.mark.parametrize("journal_bytes", [256 << 10, 1 << 20])
@pytest.mark.parametrize("chunk_size", [4096, 16384, 65536])
def test_whole_origin_writes_succeed_however_many_snapshots(
    chunk_size: int, journal_bytes: int, snapshots: int
) -> None:
    origin_chunks = ORIGIN_BYTES // chunk_size
    store, origin, _ = new_store(
        store_bytes=(snapshots + 4) * ORIGIN_BYTES + (16 << 20),
        origin_bytes=ORIGIN_BYTES,
        chunk_size=chunk_size,
        journal_bytes=journal_bytes,
    )
    engine = Engine.open(store, origin)
    _rounds(engine, origin, snapshots, snapshot_writes=True)
    # Every snapshot still reads the origin as it was when it was taken.
    for tag in range(1, snapshots + 1):
        got = read_snapshot(engine, store, origin, tag, 0, origin_chunks)
        assert all(data == pattern(c, tag, chunk_size) for c, data in enumerate(got)), tag
    engine.close()
    assert_clean(store)


def test_a_split_write_is_split_and_each_piece_fits_a_transaction() -> None:
    # The smallest journal mkcsnap makes: 64 blocks, 19 per transaction.
    store, origin, _ = new_store(
        store_bytes=64 << 20, origin_bytes=16 << 20, journal_bytes=64 * 4096
    )
    engine = Engine.open(store, origin)
    assert engine.max_transaction_blocks == 19
    _rounds(engine, origin, 3, snapshot_writes=False)
    assert engine.stats.split_requests > 0
    assert engine._journal.stats.blocks <= engine.stats.commits * 19
    engine.close()
    assert_clean(store)
