"""A damaged index node read as far as its children vouch for it, and the
metadata bitmap as the walk and the salvage ask it.

An index node that fails its checksum (a flipped bit in a key or a child)
still names its children; the walk (csnapd.engine.check_walk) goes on below
the entries a child vouches for, and the ranges of the others are damaged
(a salvage then looks for their leaves, csnapd.engine.salvage).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from csnap_format import (
    FormatError,
    Geometry,
    bitmap_bits_per_block,
    block_checksum,
    decode_bitmap,
    decode_index,
    decode_leaf,
)

if TYPE_CHECKING:
    from csnapd.engine.check_walk import Checker


def meta_bitmap(read_block: Callable[[int], bytes], g: Geometry) -> Callable[[int], bool]:
    """Whether the metadata bitmap marks a block used; False where its bitmap
    block is unreadable (nothing then vouches for the block)."""
    per = bitmap_bits_per_block(g.block_size)
    parts = []
    for index in range(g.meta_bitmap_blocks):
        address = g.meta_bitmap_start + index
        try:
            parts.append(decode_bitmap(read_block(address), g.context, address).bits)
        except FormatError:
            parts.append(bytes(per // 8))
    marks = b"".join(parts)

    def used(address: int) -> bool:
        rel = address - g.meta_start
        return 0 <= rel < g.meta_blocks and bool(marks[rel >> 3] >> (rel & 7) & 1)

    return used


def damaged_index(
    checker: Checker, address: int, level: int, lo: int, hi: int, error: str
) -> list[tuple[int, int, int, int]]:
    """An index node that fails its checks: keep the entries its children vouch for.

    A node whose only fault is its checksum (a flipped bit in a key or a
    child) still names its children; an entry counts only when the block
    it names decodes as a node of the level below whose lower bound is
    the entry's key (`true_keys`). Every other entry's range is damaged.
    """
    checker.lose(lo, hi, address, "block-decodes", error)
    lost = checker.damaged.pop()  # re-added below for the entries not vouched for
    block = bytearray(checker.view.block(address))
    block[8:12] = block_checksum(block).to_bytes(4, "little")
    try:
        node = decode_index(block, checker.ctx, address)
    except FormatError:
        checker.damaged.append(lost)
        return []
    if node.level != level or node.keys[0] != lo or node.keys[-1] >= hi:
        checker.damaged.append(lost)
        return []
    keys = true_keys(checker, node.keys, node.children, level - 1, lo, hi)
    children = []
    bounds = [*(key for key, _ in keys[1:]), hi]
    for (key, vouched), child, end in zip(keys, node.children, bounds, strict=True):
        if vouched and checker.mark_meta(child, address, key, end):
            children.append((child, level - 1, key, end))
        else:
            checker.damaged.append((key, end))
    return list(reversed(children))


def true_keys(
    checker: Checker,
    keys: tuple[int, ...],
    children: tuple[int, ...],
    level: int,
    lo: int,
    hi: int,
) -> list[tuple[int, bool]]:
    """The keys of a damaged node's entries, and whether a child vouches for each.

    A child vouches for its entry when it is a node of `level` whose
    lower bound is the key. One whose lower bound is another value
    strictly between the neighbouring keys, in a block the metadata
    bitmap marks used, shows the key was damaged: in a whole tree no
    other node of that level starts there, and a freed block (which may
    hold an older node) is not marked used. Its lower bound is the key.
    """
    used = checker.meta_used()
    out = []
    for i, (key, child) in enumerate(zip(keys, children, strict=True)):
        base = base_of(checker, child, level)
        below = keys[i - 1] if i else lo - 1
        above = keys[i + 1] if i + 1 < len(keys) else hi
        if base == key:
            out.append((key, True))
        elif base is not None and below < base < above and used(child):
            out.append((base, True))
        else:
            out.append((key, False))
    return out


def base_of(checker: Checker, address: int, level: int) -> int | None:
    """The lower bound of the node of `level` at `address`; None if there is none."""
    if not checker.g.meta_start <= address < checker.g.meta_end:
        return None
    try:
        if level == 0:
            return decode_leaf(checker.view.block(address), checker.ctx, address).base_chunk
        node = decode_index(checker.view.block(address), checker.ctx, address)
    except FormatError:
        return None
    return node.keys[0] if node.level == level else None
