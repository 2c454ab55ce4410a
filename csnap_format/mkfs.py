"""The blocks of a new, empty store (pure: no I/O).

A freshly formatted store is a committed transaction 1 that changed
nothing: its commit record sits in journal slot 0 and every block below is
stamped with sequence 1. mkcsnap writes everything but the superblock,
syncs, then writes the superblock and syncs again, so a store interrupted
while formatting is never mistaken for a valid one.
"""

from __future__ import annotations

from collections.abc import Iterator

from csnap_format.bitmap import BitmapBlock, encode_bitmap
from csnap_format.btree import Leaf, encode_leaf
from csnap_format.constants import GEOMETRY_BACKUP_ADDRESS, HEADER_SIZE, MAX_SNAPSHOTS
from csnap_format.geometry import Geometry, bitmap_bits_per_block
from csnap_format.journal import CommitRecord, encode_commit
from csnap_format.superblock import (
    Superblock,
    encode_geometry_backup,
    encode_superblock,
)

__all__ = ["FORMAT_SEQUENCE", "empty_superblock", "format_blocks", "format_block_count"]

#: The sequence of the format transaction; the first real one is 2.
FORMAT_SEQUENCE = 1


def empty_superblock(g: Geometry) -> Superblock:
    """The superblock of a store with no snapshots and an empty btree."""
    return Superblock(
        geometry=g,
        sequence=FORMAT_SEQUENCE,
        clean=True,
        depth=0,
        root=g.meta_start,
        meta_free=g.meta_blocks - 1,
        data_free=g.data_chunks,
        meta_cursor=g.meta_start + 1 if g.meta_blocks > 1 else g.meta_start,
        data_cursor=g.data_start,
        sweep_cursor=0,
        sweep_mask=0,
        exceptions=0,
        registry=0,
        snapshots=(None,) * MAX_SNAPSHOTS,
    )


def format_block_count(g: Geometry) -> int:
    """How many blocks `format_blocks` yields (for progress reporting)."""
    return 4 + g.meta_bitmap_blocks + g.data_bitmap_blocks


def format_blocks(g: Geometry) -> Iterator[tuple[int, bytes]]:
    """Yield (block address, bytes) for every block of an empty store.

    The superblock comes last; everything else is in address order.
    """
    ctx = g.context
    yield GEOMETRY_BACKUP_ADDRESS, encode_geometry_backup(g)
    yield (
        g.journal_start,
        encode_commit(CommitRecord(g.journal_start, FORMAT_SEQUENCE, FORMAT_SEQUENCE, 0, ()), ctx),
    )
    # Metadata area bitmap: bit i is block meta_start + i; the root leaf is
    # block meta_start.
    yield from _bitmap_blocks(g, g.meta_bitmap_start, g.meta_bitmap_blocks, 1, g.meta_blocks)
    # Data bitmap: bit i is store chunk i; the chunks below the data area
    # hold metadata and stay marked.
    yield from _bitmap_blocks(
        g, g.data_bitmap_start, g.data_bitmap_blocks, g.data_start, g.store_chunks
    )
    yield (
        g.meta_start,
        encode_leaf(Leaf(g.meta_start, FORMAT_SEQUENCE, 0, (), (), (), ()), ctx),
    )
    yield 0, encode_superblock(empty_superblock(g))


def _bitmap_blocks(
    g: Geometry, start: int, count: int, used_below: int, limit: int
) -> Iterator[tuple[int, bytes]]:
    """Bitmap blocks with units below `used_below` and from `limit` on set."""
    ctx = g.context
    bits = bitmap_bits_per_block(g.block_size)
    empty: bytes | None = None
    for index in range(count):
        first, last = index * bits, (index + 1) * bits
        if used_below <= first and last <= limit:
            if empty is None:
                empty = encode_bitmap(BitmapBlock(0, FORMAT_SEQUENCE, bytes(bits // 8)), ctx)
            # Same bits every time: only the header (address, checksum) differs.
            body = empty[HEADER_SIZE:]
        else:
            buf = bytearray(bits // 8)
            _set_bits(buf, 0, max(0, min(used_below, last) - first))
            _set_bits(buf, max(0, limit - first), bits)
            body = bytes(buf)
        yield (
            start + index,
            encode_bitmap(BitmapBlock(start + index, FORMAT_SEQUENCE, body), ctx),
        )


def _set_bits(buf: bytearray, start: int, end: int) -> None:
    """Set bits [start, end) of `buf`, least significant bit first."""
    if start >= end:
        return
    while start < end and start % 8:
        buf[start // 8] |= 1 << (start % 8)
        start += 1
    whole = (end - start) // 8
    buf[start // 8 : start // 8 + whole] = b"\xff" * whole
    start += whole * 8
    while start < end:
        buf[start // 8] |= 1 << (start % 8)
        start += 1
