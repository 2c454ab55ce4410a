"""Store geometry: where the superblock, journal, bitmaps, metadata area and
data area live, and how a geometry is planned from the sizes a user asks for.

Layout, in metadata blocks of `block_size` bytes (docs/format.md, "Layout"):

  block 0                   superblock
  block 1                   geometry backup (written at format and by an upgrade)
  journal                   journal_blocks blocks, a circular log
  metadata bitmap           one bit per block of the metadata area
  data bitmap               one bit per chunk of the whole store
  metadata area             btree nodes, meta_blocks blocks
  data area                 from chunk data_start to the end, in chunks

The metadata area is sized at format time for the worst case (every data
chunk holding an exception, leaves 40% full), so the btree never runs out
of room while data chunks remain. At 4 KiB chunks that is about 1.5% of the
store; at 64 KiB chunks under 0.1%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from csnap_format.constants import (
    HEADER_SIZE,
    JOURNAL_START,
    MAX_BLOCK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_BLOCK_SIZE,
    MIN_CHUNK_SIZE,
    MIN_JOURNAL_BLOCKS,
)
from csnap_format.errors import LayoutError
from csnap_format.header import BlockContext

__all__ = [
    "Geometry",
    "bitmap_bits_per_block",
    "index_capacity",
    "summary_index_capacity",
    "leaf_room",
    "FEATURE_INDEX_SUMMARIES",
    "FEATURE_COPY_CRCS",
    "KNOWN_INCOMPAT_FEATURES",
    "commit_capacity",
    "metadata_blocks_for",
    "default_journal_blocks",
    "plan_geometry",
    "check_unit_sizes",
    "geometry_problems",
    "store_capacity",
    "LEAF_ENTRY_BYTES",
    "EXCEPTION_BYTES",
]

#: One leaf directory entry: u32 relative chunk + u32 offset.
LEAF_ENTRY_BYTES = 8
#: One exception: u64 share mask + u64 store chunk.
EXCEPTION_BYTES = 16
#: Leaf body starts after header + base (8) + count (4) + reserved (4).
LEAF_BODY_OFFSET = HEADER_SIZE + 16
#: Index body starts after header + count (2) + level (2) + reserved (4).
INDEX_BODY_OFFSET = HEADER_SIZE + 8
#: Commit body starts after header + tail (8) + count (4) + payload crc (4).
COMMIT_BODY_OFFSET = HEADER_SIZE + 16
#: Metadata blocks kept beyond the worst-case estimate: room for splits
#: whose freed blocks are not reusable until their transaction is durable.
METADATA_SLACK = 64
#: Default journal: 4 MiB, or a sixteenth of a small store.
DEFAULT_JOURNAL_BYTES = 4 << 20

#: Incompatible feature: index nodes may carry subtree summaries (a reader
#: without it would refuse them as damaged). Set by mkcsnap, and on the first
#: open of an older store by a server that knows it (docs/operations.md).
FEATURE_INDEX_SUMMARIES = 1
#: Incompatible feature: commit records may carry the CRCs of the copy-out
#: data their transaction wrote, which the record's single sync covers (a
#: reader without it would take such a record for a damaged one and lose
#: that transaction). Set like FEATURE_INDEX_SUMMARIES.
FEATURE_COPY_CRCS = 2
#: Every incompatible feature this csnap reads, and sets on the stores it opens.
KNOWN_INCOMPAT_FEATURES = FEATURE_INDEX_SUMMARIES | FEATURE_COPY_CRCS


def bitmap_bits_per_block(block_size: int) -> int:
    """Allocation bits held by one bitmap block."""
    return (block_size - HEADER_SIZE) * 8


def index_capacity(block_size: int) -> int:
    """Children one index node in the legacy layout (no summaries) can hold."""
    return (block_size - INDEX_BODY_OFFSET) // 16


def summary_index_capacity(block_size: int) -> int:
    """Children one index node with subtree summaries can hold."""
    return (block_size - INDEX_BODY_OFFSET) // 24


def leaf_room(block_size: int) -> int:
    """Bytes a leaf has for directory entries and exceptions.

    The body after the fixed fields, less the directory's sentinel entry.
    """
    return block_size - LEAF_BODY_OFFSET - LEAF_ENTRY_BYTES


def commit_capacity(block_size: int) -> int:
    """Home addresses one commit record can list."""
    return (block_size - COMMIT_BODY_OFFSET) // 8


def metadata_blocks_for(data_chunks: int, block_size: int) -> int:
    """Metadata area size that can index `data_chunks` exceptions.

    Worst case: each data chunk holds one exception with a directory entry of
    its own (24 bytes), leaves 40% full, index nodes (with summaries) half full.
    """
    room = leaf_room(block_size)
    per_exception = LEAF_ENTRY_BYTES + EXCEPTION_BYTES
    leaves = max(1, math.ceil(data_chunks * per_exception * 5 / (2 * room)))
    half_fanout = summary_index_capacity(block_size) // 2
    index_nodes, level = 0, leaves
    while level > 1:
        level = math.ceil(level / half_fanout)
        index_nodes += level
    return leaves + index_nodes + METADATA_SLACK


def default_journal_blocks(store_bytes: int, block_size: int) -> int:
    """4 MiB, or a sixteenth of a small store, but never below the minimum."""
    wanted = min(DEFAULT_JOURNAL_BYTES, store_bytes // 16) // block_size
    return max(MIN_JOURNAL_BLOCKS, wanted)


@dataclass(frozen=True, slots=True)
class Geometry:
    """Everything fixed at format time: identity, sizes and region positions.

    Block addresses and counts are in metadata blocks; `data_start`,
    `data_chunks`, `store_chunks` and `origin_chunks` are in data chunks.
    """

    uuid: bytes
    created_ns: int
    block_size: int
    chunk_size: int
    store_chunks: int
    origin_chunks: int
    journal_start: int
    journal_blocks: int
    meta_bitmap_start: int
    meta_bitmap_blocks: int
    data_bitmap_start: int
    data_bitmap_blocks: int
    meta_start: int
    meta_blocks: int
    data_start: int
    data_chunks: int
    #: Incompatible feature flags (FEATURE_INDEX_SUMMARIES).
    features: int = 0

    @property
    def store_id(self) -> int:
        """The id stamped in every block header: the UUID's first 8 bytes."""
        return int.from_bytes(self.uuid[:8], "little")

    @property
    def context(self) -> BlockContext:
        """What the block codecs need to read and write this store's blocks."""
        return BlockContext(
            store_id=self.store_id,
            block_size=self.block_size,
            meta_bitmap_start=self.meta_bitmap_start,
            meta_start=self.meta_start,
            meta_end=self.meta_end,
            data_start=self.data_start,
            store_chunks=self.store_chunks,
            origin_chunks=self.origin_chunks,
        )

    @property
    def meta_end(self) -> int:
        """First block after the metadata area."""
        return self.meta_start + self.meta_blocks

    @property
    def store_bytes(self) -> int:
        """Bytes of the store in use (whole chunks)."""
        return self.store_chunks * self.chunk_size

    @property
    def origin_bytes(self) -> int:
        """Bytes of the origin covered by the store (whole chunks)."""
        return self.origin_chunks * self.chunk_size

    @property
    def metadata_bytes(self) -> int:
        """Bytes below the data area: superblock, journal, bitmaps, btree."""
        return self.data_start * self.chunk_size

    @classmethod
    def canonical(
        cls,
        *,
        uuid: bytes,
        created_ns: int,
        block_size: int,
        chunk_size: int,
        store_chunks: int,
        origin_chunks: int,
        journal_blocks: int,
        meta_blocks: int,
        data_bitmap_blocks: int | None = None,
        features: int = 0,
    ) -> Geometry:
        """The one layout that the given sizes imply (regions packed in order).

        The data bitmap covers the store (`data_bitmap_blocks` None), or is
        given larger: room reserved for the store to grow into.
        """
        bits = bitmap_bits_per_block(block_size)
        meta_bitmap_start = JOURNAL_START + journal_blocks
        meta_bitmap_blocks = math.ceil(meta_blocks / bits)
        data_bitmap_start = meta_bitmap_start + meta_bitmap_blocks
        if data_bitmap_blocks is None:
            data_bitmap_blocks = math.ceil(store_chunks / bits)
        meta_start = data_bitmap_start + data_bitmap_blocks
        meta_end = meta_start + meta_blocks
        data_start = math.ceil(meta_end * block_size / chunk_size)
        return cls(
            uuid=uuid,
            created_ns=created_ns,
            block_size=block_size,
            chunk_size=chunk_size,
            store_chunks=store_chunks,
            origin_chunks=origin_chunks,
            journal_start=JOURNAL_START,
            journal_blocks=journal_blocks,
            meta_bitmap_start=meta_bitmap_start,
            meta_bitmap_blocks=meta_bitmap_blocks,
            data_bitmap_start=data_bitmap_start,
            data_bitmap_blocks=data_bitmap_blocks,
            meta_start=meta_start,
            meta_blocks=meta_blocks,
            data_start=data_start,
            data_chunks=store_chunks - data_start,
            features=features,
        )


def _power_of_two_in(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def geometry_problems(g: Geometry) -> list[str]:
    """Everything wrong with a geometry read from disk (empty if it is sound)."""
    if len(g.uuid) != 16:
        return [f"uuid is {len(g.uuid)} bytes, not 16"]
    try:
        check_unit_sizes(block_size=g.block_size, chunk_size=g.chunk_size)
    except LayoutError as exc:
        return [str(exc)]  # the checks below divide by these sizes
    problems = []
    if g.origin_chunks < 1:
        problems.append("origin has no chunks")
    if g.journal_blocks < MIN_JOURNAL_BLOCKS:
        problems.append(f"journal of {g.journal_blocks} blocks is below {MIN_JOURNAL_BLOCKS}")
    if g.meta_blocks < 1:
        problems.append("metadata area is empty")
    if g.store_chunks * g.chunk_size >= 1 << 64 or g.origin_chunks * g.chunk_size >= 1 << 64:
        problems.append("store or origin larger than 2^64 bytes")
    if problems:
        return problems
    expected = Geometry.canonical(
        uuid=g.uuid,
        created_ns=g.created_ns,
        block_size=g.block_size,
        chunk_size=g.chunk_size,
        store_chunks=g.store_chunks,
        origin_chunks=g.origin_chunks,
        journal_blocks=g.journal_blocks,
        meta_blocks=g.meta_blocks,
        data_bitmap_blocks=g.data_bitmap_blocks,
        features=g.features,
    )
    if g.data_bitmap_blocks < math.ceil(g.store_chunks / bitmap_bits_per_block(g.block_size)):
        problems.append("the data bitmap does not cover the store")
    elif expected != g:
        problems.append("region positions do not follow from the sizes (see docs/format.md)")
    elif g.data_chunks < 1:
        problems.append("no room left for data chunks")
    return problems


def store_capacity(g: Geometry) -> int:
    """The most chunks this store can grow to without moving a region.

    Two things bound it: the data bitmap (one bit per store chunk, its size
    fixed at format) and the metadata area, which must still hold the worst
    case btree for every data chunk (see `metadata_blocks_for`).
    """
    by_bitmap = g.data_bitmap_blocks * bitmap_bits_per_block(g.block_size)
    # metadata_blocks_for grows with its argument: bisect the largest data
    # area the metadata area still covers.
    low, high = 0, by_bitmap
    while low < high:
        middle = (low + high + 1) // 2
        if metadata_blocks_for(middle, g.block_size) <= g.meta_blocks:
            low = middle
        else:
            high = middle - 1
    return max(g.store_chunks, min(by_bitmap, g.data_start + low))


def check_unit_sizes(*, block_size: int, chunk_size: int) -> None:
    """Refuse a chunk or metadata block size the format cannot use.

    Raises:
        LayoutError: with a message fit to show the user as is.
    """
    if not _power_of_two_in(chunk_size, MIN_CHUNK_SIZE, MAX_CHUNK_SIZE):
        raise LayoutError(f"chunk size {chunk_size} is not a power of two between 4K and 1M")
    if not _power_of_two_in(block_size, MIN_BLOCK_SIZE, MAX_BLOCK_SIZE):
        raise LayoutError(
            f"metadata block size {block_size} is not a power of two between 4K and 1M"
        )
    if block_size > chunk_size:
        raise LayoutError(
            f"metadata block size {block_size} is larger than the chunk size {chunk_size}"
        )


def _journal_blocks(journal_bytes: int | None, store_bytes: int, block_size: int) -> int:
    """The journal's length in blocks: as asked, or the default for the store's size.

    Raises:
        LayoutError: the journal asked for is too small.
    """
    if journal_bytes is None:
        return default_journal_blocks(store_bytes, block_size)
    journal_blocks = journal_bytes // block_size
    if journal_blocks < MIN_JOURNAL_BLOCKS:
        raise LayoutError(
            f"journal of {journal_bytes} bytes is too small: it needs at least "
            f"{MIN_JOURNAL_BLOCKS} metadata blocks "
            f"({MIN_JOURNAL_BLOCKS * block_size} bytes at this block size)"
        )
    return journal_blocks


def plan_geometry(
    *,
    store_bytes: int,
    origin_bytes: int,
    block_size: int = 4096,
    chunk_size: int = 4096,
    journal_bytes: int | None = None,
    max_store_bytes: int | None = None,
    uuid: bytes,
    created_ns: int,
) -> Geometry:
    """Plan a new store's geometry from the sizes a user asked for.

    `max_store_bytes` (default: the store size) is what the store may later
    grow to online: the data bitmap and the metadata area are sized for it.

    Raises:
        LayoutError: with a message fit to show the user as is.
    """
    check_unit_sizes(block_size=block_size, chunk_size=chunk_size)
    origin_chunks = origin_bytes // chunk_size
    if origin_chunks < 1:
        raise LayoutError(
            f"origin of {origin_bytes} bytes is smaller than one {chunk_size}-byte chunk"
        )
    journal_blocks = _journal_blocks(journal_bytes, store_bytes, block_size)
    store_chunks = store_bytes // chunk_size
    max_chunks = store_chunks if max_store_bytes is None else max_store_bytes // chunk_size
    if max_chunks < store_chunks:
        raise LayoutError(
            f"maximum store size of {max_store_bytes} bytes is below the store size"
            f" of {store_bytes} bytes"
        )
    geometry = Geometry.canonical(
        uuid=uuid,
        created_ns=created_ns,
        block_size=block_size,
        chunk_size=chunk_size,
        store_chunks=store_chunks,
        origin_chunks=origin_chunks,
        journal_blocks=journal_blocks,
        meta_blocks=metadata_blocks_for(max_chunks, block_size),
        data_bitmap_blocks=math.ceil(max_chunks / bitmap_bits_per_block(block_size)),
        features=KNOWN_INCOMPAT_FEATURES,
    )
    if geometry.data_chunks < 1:
        need = (geometry.data_start + 1) * chunk_size
        raise LayoutError(
            f"store of {store_bytes} bytes is too small to hold its own metadata: "
            f"this chunk size and journal need at least {need} bytes"
        )
    return geometry
