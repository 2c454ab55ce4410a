"""Exception btree blocks: leaves and index nodes.

Leaf (docs/format.md, "Leaf"): csnap's layout, made 64-bit clean.

  bytes 0..40    common header
  40  u64        base chunk: the leaf's lower key bound, as in its parent
  48  u32        count: directory entries
  52  u32        reserved, 0
  56  map[count + 1] of {u32 rchunk, u32 offset}   (grows up)
      ...        free space, zero
  exceptions of {u64 share, u64 store chunk}       (grow down to the end)

Directory entry i names logical chunk base + rchunk[i]; its exceptions are
the 16-byte records in [offset[i], offset[i+1]). The sentinel entry
map[count] has rchunk 0 and offset block_size. A leaf holds every exception
of each chunk it names; each exception's share mask has one bit per
snapshot that uses that copy, and the masks of one chunk are disjoint.

Index node:

  bytes 0..40    common header
  40  u16        count: children
  42  u16        level: 1 when the children are leaves
  44  u32        flags: bit 0 (INDEX_SUMMARIES) says the entries carry summaries
  48  {u64 key, u64 child, u64 summary}[count]       with INDEX_SUMMARIES,
      {u64 key, u64 child}[count]                    without (the legacy layout)
      then zero to the end

Child i covers logical chunks [key[i], key[i+1]); key[0] is the node's own
lower bound, the last child reaches the parent's upper bound. A summary is a
superset of the union of the share masks in the child's subtree; a node in
the legacy layout has none, which reads as "every bit" (docs/rules.md,
"Subtree summaries").
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass

from csnap_format._structs import is_zero, u32_array, u64_array
from csnap_format.constants import HEADER_SIZE, LOST_CHUNK, MAX_DEPTH, BlockType
from csnap_format.errors import CorruptBlockError
from csnap_format.geometry import (
    EXCEPTION_BYTES,
    INDEX_BODY_OFFSET,
    LEAF_BODY_OFFSET,
    LEAF_ENTRY_BYTES,
    index_capacity,
    leaf_room,
    summary_index_capacity,
)
from csnap_format.header import BlockContext, read_header, write_header

__all__ = [
    "Leaf",
    "IndexNode",
    "encode_leaf",
    "decode_leaf",
    "encode_index",
    "decode_index",
    "leaf_bytes_used",
    "RCHUNK_LIMIT",
    "INDEX_SUMMARIES",
    "ALL_BITS",
]

#: Directory entries hold chunk numbers relative to the leaf's base in a u32.
RCHUNK_LIMIT = 1 << 32

_LEAF_FIXED = struct.Struct("<QII")
_INDEX_FIXED = struct.Struct("<HHI")

#: Index node flag: every entry carries a summary of its subtree's share masks.
INDEX_SUMMARIES = 1
#: The summary of a legacy entry, which carries none: any bit may be below.
ALL_BITS = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Leaf:
    """A decoded leaf, as flat parallel tuples (structure of arrays).

    Entry i is logical chunk `chunks[i]` with `counts[i]` exceptions; the
    exceptions of all entries follow each other, in entry order, in `shares`
    and `targets` (the store chunk holding that copy).
    """

    address: int
    sequence: int
    base_chunk: int
    chunks: tuple[int, ...]
    counts: tuple[int, ...]
    shares: tuple[int, ...]
    targets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class IndexNode:
    """A decoded index node: `children[i]` covers keys from `keys[i]`.

    `summaries[i]` holds every share bit used in child i's subtree (and
    maybe more); None for a node in the legacy layout, which has no
    summaries (each reads as ALL_BITS).
    """

    address: int
    sequence: int
    level: int
    keys: tuple[int, ...]
    children: tuple[int, ...]
    summaries: tuple[int, ...] | None = None


def leaf_bytes_used(entries: int, exceptions: int) -> int:
    """Room taken by `entries` directory entries and `exceptions` exceptions."""
    return entries * LEAF_ENTRY_BYTES + exceptions * EXCEPTION_BYTES


def encode_leaf(leaf: Leaf, ctx: BlockContext) -> bytes:
    """Encode a leaf into one block.

    Raises:
        ValueError: the leaf does not fit or names chunks out of its range
            (a bug in the caller, never a property of stored bytes).
    """
    size = ctx.block_size
    count, total = len(leaf.chunks), len(leaf.shares)
    if leaf_bytes_used(count, total) > leaf_room(size):
        raise ValueError(f"leaf with {count} entries and {total} exceptions does not fit")
    if len(leaf.counts) != count or sum(leaf.counts) != total or len(leaf.targets) != total:
        raise ValueError("leaf arrays disagree in length")
    block = bytearray(size)
    _LEAF_FIXED.pack_into(block, HEADER_SIZE, leaf.base_chunk, count, 0)
    top = size - total * EXCEPTION_BYTES
    flat = [0] * (2 * count + 2)
    flat[0:-2:2] = [chunk - leaf.base_chunk for chunk in leaf.chunks]
    flat[1::2] = [top + EXCEPTION_BYTES * n for n in itertools.accumulate(leaf.counts, initial=0)]
    pairs = [0] * (2 * total)
    pairs[0::2] = leaf.shares
    pairs[1::2] = leaf.targets
    try:
        u32_array(len(flat)).pack_into(block, LEAF_BODY_OFFSET, *flat)
        u64_array(len(pairs)).pack_into(block, top, *pairs)
    except struct.error as exc:
        raise ValueError(f"leaf field out of range: {exc}") from exc
    write_header(block, BlockType.LEAF, leaf.address, ctx.store_id, leaf.sequence)
    return bytes(block)


def decode_leaf(block: bytes | bytearray | memoryview, ctx: BlockContext, address: int) -> Leaf:
    """Decode and validate a leaf read from `address`.

    Raises:
        FormatError: a subclass naming what is wrong.
    """
    header = read_header(
        block,
        BlockType.LEAF,
        address=address,
        store_id=ctx.store_id,
        block_size=ctx.block_size,
    )
    size = ctx.block_size
    base, count, reserved = _LEAF_FIXED.unpack_from(block, HEADER_SIZE)

    def corrupt(what: str) -> CorruptBlockError:
        return CorruptBlockError(what, block=address, kind="leaf")

    if reserved:
        raise corrupt("reserved field is not zero")
    if count > leaf_room(size) // (LEAF_ENTRY_BYTES + EXCEPTION_BYTES):
        raise corrupt(f"directory count {count} cannot fit in the block")
    flat = u32_array(2 * count + 2).unpack_from(block, LEAF_BODY_OFFSET)
    rchunks, offsets = flat[0::2], flat[1::2]
    map_end = LEAF_BODY_OFFSET + LEAF_ENTRY_BYTES * (count + 1)
    if offsets[count] != size or rchunks[count] != 0:
        raise corrupt("directory sentinel is not {0, block size}")
    low = offsets[0]
    if low < map_end or (size - low) % EXCEPTION_BYTES:
        raise corrupt(f"exception area starts at {low}, inside the directory or misaligned")
    if not is_zero(block, map_end, low):
        raise corrupt("free space between directory and exceptions is not zero")
    counts = tuple((b - a) // EXCEPTION_BYTES for a, b in itertools.pairwise(offsets))
    if any(b - a <= 0 or (b - a) % EXCEPTION_BYTES for a, b in itertools.pairwise(offsets)):
        raise corrupt("directory offsets are not increasing in whole exceptions")
    rel = rchunks[:count]
    if any(a >= b for a, b in itertools.pairwise(rel)):
        raise corrupt("directory chunks are not strictly increasing")
    chunks = tuple(base + r for r in rel)
    if base >= ctx.origin_chunks or (chunks and chunks[-1] >= ctx.origin_chunks):
        raise corrupt(f"names chunks beyond the origin ({ctx.origin_chunks} chunks)")
    total = (size - low) // EXCEPTION_BYTES
    pairs = u64_array(2 * total).unpack_from(block, low)
    shares, targets = pairs[0::2], pairs[1::2]
    problem = _exception_problem(counts, shares, targets, ctx)
    if problem:
        raise corrupt(problem)
    return Leaf(address, header.sequence, base, chunks, counts, shares, targets)


def _exception_problem(
    counts: tuple[int, ...],
    shares: tuple[int, ...],
    targets: tuple[int, ...],
    ctx: BlockContext,
) -> str | None:
    at = 0
    for count in counts:
        seen = 0
        for share in shares[at : at + count]:
            if share == 0:
                return "an exception has an empty share mask"
            if share & seen:
                return "two exceptions of one chunk share a snapshot"
            seen |= share
        at += count
    real = [t for t in targets if t != LOST_CHUNK]
    if real and (min(real) < ctx.data_start or max(real) >= ctx.store_chunks):
        area = f"[{ctx.data_start}, {ctx.store_chunks})"
        return f"an exception points outside the data area {area}"
    return None


def encode_index(node: IndexNode, ctx: BlockContext) -> bytes:
    """Encode an index node into one block.

    Raises:
        ValueError: the node does not fit (a bug in the caller).
    """
    count = len(node.keys)
    summaries = node.summaries
    width = 2 if summaries is None else 3
    capacity = (
        index_capacity(ctx.block_size)
        if summaries is None
        else summary_index_capacity(ctx.block_size)
    )
    if count > capacity or len(node.children) != count:
        raise ValueError(f"index node with {count} keys does not fit or is inconsistent")
    if summaries is not None and len(summaries) != count:
        raise ValueError("index node summaries disagree in length with its keys")
    block = bytearray(ctx.block_size)
    flags = 0 if summaries is None else INDEX_SUMMARIES
    _INDEX_FIXED.pack_into(block, HEADER_SIZE, count, node.level, flags)
    flat = [0] * (width * count)
    flat[0::width] = node.keys
    flat[1::width] = node.children
    if summaries is not None:
        flat[2::width] = summaries
    try:
        u64_array(len(flat)).pack_into(block, INDEX_BODY_OFFSET, *flat)
    except struct.error as exc:
        raise ValueError(f"index field out of range: {exc}") from exc
    write_header(block, BlockType.INDEX, node.address, ctx.store_id, node.sequence)
    return bytes(block)


def decode_index(
    block: bytes | bytearray | memoryview, ctx: BlockContext, address: int
) -> IndexNode:
    """Decode and validate an index node read from `address`.

    Raises:
        FormatError: a subclass naming what is wrong.
    """
    header = read_header(
        block,
        BlockType.INDEX,
        address=address,
        store_id=ctx.store_id,
        block_size=ctx.block_size,
    )
    count, level, flags = _INDEX_FIXED.unpack_from(block, HEADER_SIZE)

    def corrupt(what: str) -> CorruptBlockError:
        return CorruptBlockError(what, block=address, kind="index node")

    if flags & ~INDEX_SUMMARIES:
        raise corrupt(f"unknown flags {flags:#x}")
    summarised = bool(flags & INDEX_SUMMARIES)
    width = 3 if summarised else 2
    capacity = (
        summary_index_capacity(ctx.block_size) if summarised else index_capacity(ctx.block_size)
    )
    if not 1 <= count <= capacity:
        raise corrupt(f"child count {count} out of range")
    if not 1 <= level <= MAX_DEPTH:
        raise corrupt(f"level {level} out of range")
    end = INDEX_BODY_OFFSET + 8 * width * count
    if not is_zero(block, end, len(block)):
        raise corrupt("bytes after the last child are not zero")
    flat = u64_array(width * count).unpack_from(block, INDEX_BODY_OFFSET)
    keys, children = flat[0::width], flat[1::width]
    summaries = flat[2::width] if summarised else None
    if any(a >= b for a, b in itertools.pairwise(keys)):
        raise corrupt("keys are not strictly increasing")
    if keys[-1] >= ctx.origin_chunks:
        raise corrupt(f"key {keys[-1]} is beyond the origin")
    if min(children) < ctx.meta_start or max(children) >= ctx.meta_end:
        raise corrupt("a child lies outside the metadata area")
    if len(set(children)) != count:
        raise corrupt("a child appears twice")
    return IndexNode(address, header.sequence, level, keys, children, summaries)
