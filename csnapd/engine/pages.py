"""The engine's in-memory, mutable forms of metadata blocks ("pages").

csnap_format decodes blocks into frozen dataclasses; the engine edits them
in place, so it converts each block once, on load, into a page:

  LeafPage    parallel arrays (compact: about the block's own size in memory)
  IndexPage   three lists: keys, children and subtree summaries
  BitmapPage  the bits as one Python int, plus the bits freed by the open
              transaction, which may not be handed out until it is durable

Pages know how to copy themselves (for per-request rollback) and how to
turn back into format dataclasses for encoding.
"""

from __future__ import annotations

import bisect
from array import array
from dataclasses import dataclass

from csnap_format import (
    ALL_BITS,
    EXCEPTION_BYTES,
    LEAF_ENTRY_BYTES,
    BitmapBlock,
    Geometry,
    IndexNode,
    Leaf,
    Registry,
    encode_bitmap,
    encode_index,
    encode_leaf,
    encode_registry,
    summary_index_capacity,
)

__all__ = ["LeafPage", "IndexPage", "BitmapPage", "RegistryPage", "Page", "encode_page"]


class LeafPage:
    """A leaf: entry i is logical chunk `chunks[i]` with `counts[i]` exceptions.

    The exceptions of all entries follow each other in entry order in
    `shares` and `targets`, so entry i's exceptions are at
    [sum(counts[:i]), sum(counts[:i + 1])).
    """

    __slots__ = ("address", "base", "chunks", "counts", "shares", "targets")

    def __init__(
        self,
        address: int,
        base: int,
        chunks: array[int] | None = None,
        counts: array[int] | None = None,
        shares: array[int] | None = None,
        targets: array[int] | None = None,
    ):
        self.address = address
        self.base = base
        self.chunks = chunks if chunks is not None else array("Q")
        self.counts = counts if counts is not None else array("B")
        self.shares = shares if shares is not None else array("Q")
        self.targets = targets if targets is not None else array("Q")

    @classmethod
    def from_format(cls, leaf: Leaf) -> LeafPage:
        return cls(
            leaf.address,
            leaf.base_chunk,
            array("Q", leaf.chunks),
            array("B", leaf.counts),
            array("Q", leaf.shares),
            array("Q", leaf.targets),
        )

    def to_format(self, sequence: int) -> Leaf:
        return Leaf(
            self.address,
            sequence,
            self.base,
            tuple(self.chunks),
            tuple(self.counts),
            tuple(self.shares),
            tuple(self.targets),
        )

    def copy(self) -> LeafPage:
        return LeafPage(
            self.address,
            self.base,
            array("Q", self.chunks),
            array("B", self.counts),
            array("Q", self.shares),
            array("Q", self.targets),
        )

    @property
    def used(self) -> int:
        """Bytes of the leaf's room taken by entries and exceptions."""
        return LEAF_ENTRY_BYTES * len(self.chunks) + EXCEPTION_BYTES * len(self.shares)

    def find(self, chunk: int) -> tuple[int, bool]:
        """Index of `chunk`'s entry (or where it would go), and whether it exists."""
        i = bisect.bisect_left(self.chunks, chunk)
        return i, i < len(self.chunks) and self.chunks[i] == chunk

    def span(self, i: int) -> tuple[int, int]:
        """Positions in `shares`/`targets` of entry i's exceptions."""
        start = sum(self.counts[:i])
        return start, start + self.counts[i]

    def using_at(self, i: int, at: int) -> int:
        """Union of the share masks of entry i, whose exceptions start at `at`
        (ExceptionTree.entries_of)."""
        mask = 0
        for share in self.shares[at : at + self.counts[i]]:
            mask |= share
        return mask

    def exception_of(self, i: int, bit_mask: int) -> int:
        """Position of entry i's exception whose mask holds `bit_mask`, or -1."""
        return self.exception_at(i, self.span(i)[0], bit_mask)

    def exception_at(self, i: int, at: int, bit_mask: int) -> int:
        """exception_of(i, bit_mask) for an entry whose exceptions start at `at`."""
        shares = self.shares
        for j in range(at, at + self.counts[i]):
            if shares[j] & bit_mask:
                return j
        return -1

    def add(self, i: int, found: bool, chunk: int, share: int, target: int) -> None:
        """Add an exception to chunk `chunk`, whose entry is (or goes) at i."""
        if not found:
            self.chunks.insert(i, chunk)
            self.counts.insert(i, 0)
        end = sum(self.counts[: i + 1])
        self.shares.insert(end, share)
        self.targets.insert(end, target)
        self.counts[i] += 1

    def remove_exception(self, i: int, j: int) -> None:
        """Remove exception j of entry i, and the entry if it was its last."""
        del self.shares[j]
        del self.targets[j]
        self.counts[i] -= 1
        if self.counts[i] == 0:
            del self.chunks[i]
            del self.counts[i]

    def split_off(self, at: int, address: int, base: int) -> LeafPage:
        """Move entries [at:] into a new leaf at `address` with base `base`."""
        first = sum(self.counts[:at])
        right = LeafPage(
            address,
            base,
            self.chunks[at:],
            self.counts[at:],
            self.shares[first:],
            self.targets[first:],
        )
        del self.chunks[at:]
        del self.counts[at:]
        del self.shares[first:]
        del self.targets[first:]
        return right

    @property
    def union(self) -> int:
        """Every share bit used in this leaf: its summary in its parent."""
        mask = 0
        for share in self.shares:
            mask |= share
        return mask

    def absorb(self, right: LeafPage) -> None:
        """Append every entry of `right`, whose chunks all follow ours."""
        self.chunks.extend(right.chunks)
        self.counts.extend(right.counts)
        self.shares.extend(right.shares)
        self.targets.extend(right.targets)


@dataclass(slots=True)
class IndexPage:
    """An index node: `children[i]` covers chunks from `keys[i]`.

    `summaries[i]` holds every share bit used below child i (and maybe
    more: docs/rules.md, "Subtree summaries"). A node read in the legacy
    layout gets ALL_BITS for each; it is written with summaries when it
    fits in the summarised layout, else in the legacy layout again.
    """

    address: int
    level: int
    keys: list[int]
    children: list[int]
    summaries: list[int]

    @classmethod
    def from_format(cls, node: IndexNode) -> IndexPage:
        summaries = (
            list(node.summaries) if node.summaries is not None else [ALL_BITS] * len(node.keys)
        )
        return cls(node.address, node.level, list(node.keys), list(node.children), summaries)

    def to_format(self, sequence: int, capacity: int) -> IndexNode:
        summaries = tuple(self.summaries) if len(self.keys) <= capacity else None
        return IndexNode(
            self.address, sequence, self.level, tuple(self.keys), tuple(self.children), summaries
        )

    def copy(self) -> IndexPage:
        return IndexPage(
            self.address, self.level, list(self.keys), list(self.children), list(self.summaries)
        )

    @property
    def union(self) -> int:
        """Every share bit this node's summaries hold: its own summary in its parent."""
        mask = 0
        for summary in self.summaries:
            mask |= summary
        return mask

    def slot(self, chunk: int) -> int:
        """The child slot whose range holds `chunk`."""
        return bisect.bisect_right(self.keys, chunk) - 1


@dataclass(slots=True)
class BitmapPage:
    """One bitmap block; bit i of `bits` is unit i of this block."""

    address: int
    nbytes: int
    bits: int
    #: Bits freed by the open transaction: clear in `bits`, but not yet free.
    reserved: int = 0

    @classmethod
    def from_format(cls, block: BitmapBlock) -> BitmapPage:
        return cls(block.address, len(block.bits), int.from_bytes(block.bits, "little"))

    def to_format(self, sequence: int) -> BitmapBlock:
        return BitmapBlock(self.address, sequence, self.bits.to_bytes(self.nbytes, "little"))

    def copy(self) -> BitmapPage:
        return BitmapPage(self.address, self.nbytes, self.bits, self.reserved)


@dataclass(slots=True)
class RegistryPage:
    """The client registry: ids of the snapshot clients connected."""

    address: int
    clients: tuple[int, ...]
    overflow: bool

    @classmethod
    def from_format(cls, registry: Registry) -> RegistryPage:
        return cls(registry.address, registry.clients, registry.overflow)

    def to_format(self, sequence: int) -> Registry:
        return Registry(self.address, sequence, self.clients, self.overflow)

    def copy(self) -> RegistryPage:
        return RegistryPage(self.address, self.clients, self.overflow)


Page = LeafPage | IndexPage | BitmapPage | RegistryPage


def encode_page(page: Page, sequence: int, geometry: Geometry) -> bytes:
    """Encode a page into its block, stamped with `sequence`."""
    ctx = geometry.context
    if isinstance(page, LeafPage):
        return encode_leaf(page.to_format(sequence), ctx)
    if isinstance(page, IndexPage):
        capacity = summary_index_capacity(geometry.block_size)
        return encode_index(page.to_format(sequence, capacity), ctx)
    if isinstance(page, RegistryPage):
        return encode_registry(page.to_format(sequence), ctx)
    return encode_bitmap(page.to_format(sequence), ctx)
