"""The gateway's pool of large request buffers: what it keeps, and its bound."""

from __future__ import annotations

from pathlib import Path

from csnap_common.allocator import MMAP_THRESHOLD
from csnap_nbd.buffers import POOL_BYTES, BufferPool

DOCS = Path(__file__).resolve().parents[2] / "docs"
BACKUP_READ = 256 << 10


def test_a_buffer_given_back_is_the_next_one_taken_of_its_size() -> None:
    pool = BufferPool()
    first = pool.take(BACKUP_READ)
    first[:4] = b"data"
    pool.give(first)
    assert pool.kept == BACKUP_READ
    again = pool.take(BACKUP_READ)
    assert again is first
    assert again[:4] == b"data"  # not zeroed: its taker fills it
    assert pool.kept == 0
    assert pool.take(BACKUP_READ) is not first  # none left: a new one


def test_buffers_the_allocator_does_not_map_are_not_kept() -> None:
    pool = BufferPool()
    pool.give(bytearray(MMAP_THRESHOLD))
    pool.give(bytearray(4096))
    assert pool.kept == 0


def test_the_pool_keeps_two_queues_of_backup_reads_and_no_more() -> None:
    # A connection holds a few buffers more than its client's 16 requests in
    # flight: all of them must come back to the pool, and the pool is bounded.
    pool = BufferPool()
    held = [pool.take(BACKUP_READ) for _ in range(2 * 16 + 4)]
    for buffer in held:
        pool.give(buffer)
    assert pool.kept == 2 * 16 * BACKUP_READ == POOL_BYTES
    # Every buffer taken again comes from the pool, whatever order they went back in.
    again = {id(pool.take(BACKUP_READ)) for _ in range(2 * 16)}
    assert again <= {id(buffer) for buffer in held}
    assert pool.kept == 0


def test_the_docs_state_the_pools_bound() -> None:
    stated = f"{POOL_BYTES >> 20} MiB"
    assert f"(at most {stated} of them)" in (DOCS / "nbd.md").read_text()
    assert f"keeps up to {stated} of freed request buffers" in " ".join(
        (DOCS / "operations.md").read_text().split()
    )
