"""The writer of a rebuilt btree: a salvage's or a restore's exceptions, in
chunk order, written as a fresh btree and switched to in one journaled
transaction.

Leaves are written as they fill, so the writer holds one leaf's exceptions,
one entry per node of the level above, and bitmaps of the chunks and blocks
it used, never the whole set. The tree goes only into metadata blocks
nothing refers to (`avoid`); the switch (root, counters, bitmaps, registry)
is one transaction, so a write cut short leaves the store as it was.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from csnap_format import (
    FEATURE_INDEX_SUMMARIES,
    HEADER_SIZE,
    LOST_CHUNK,
    RCHUNK_LIMIT,
    Geometry,
    IndexNode,
    Leaf,
    Registry,
    Superblock,
    bitmap_bits_per_block,
    encode_index,
    encode_leaf,
    encode_registry,
    encode_superblock,
    index_capacity,
    leaf_bytes_used,
    leaf_room,
    summary_index_capacity,
)
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import EngineError, StoreIOError
from csnapd.engine.journal import Journal, committed_images
from csnapd.engine.pages import BitmapPage, encode_page
from csnapd.engine.state import StoreState

__all__ = ["SalvageError", "ChunkExceptions", "count_masks", "write_tree"]

#: One logical chunk's exceptions: (chunk, [(share mask, store chunk), ...]).
ChunkExceptions = tuple[int, Sequence[tuple[int, int]]]

#: Leaves and index nodes of a rebuilt tree are filled to this fraction, so
#: the first writes after a repair do not split every node at once.
_FILL = 0.9


class SalvageError(EngineError):
    """The salvaged tree cannot be written (no room, or the store refused)."""

    # Offline only (csnap-check): never on the wire, so the base's symbol.


def count_masks(masks: Counter[int]) -> tuple[int, list[int], list[int]]:
    """(exceptions, unique per bit, shared per bit) from how often each share mask occurs."""
    unique = [0] * 64
    shared = [0] * 64
    for share, times in masks.items():
        if share & (share - 1) == 0:
            unique[share.bit_length() - 1] += times
            continue
        rest = share
        while rest:
            low = rest & -rest
            shared[low.bit_length() - 1] += times
            rest ^= low
    return sum(masks.values()), unique, shared


@dataclass(slots=True)
class _Writer:
    """Writes the leaves of a tree as they fill, and keeps what the switch needs."""

    device: BlockDevice
    g: Geometry
    sequence: int
    free: Iterator[int]
    #: (lower key, block, union of the share masks below) of each leaf written.
    level: list[tuple[int, int, int]] = field(default_factory=list)
    used: list[int] = field(default_factory=list)
    masks: Counter[int] = field(default_factory=Counter)
    data_marks: bytearray = field(default_factory=bytearray)
    #: The share bit of the snapshot a revert in progress restores (0: none)
    #: and its cursor; the chunks below the cursor holding an exception
    #: with that bit, counted as the revert counts them (once per chunk).
    revert_mask: int = 0
    revert_cursor: int = 0
    revert_passed: int = 0

    def take(self) -> int:
        address = next(self.free, None)
        if address is None:
            raise SalvageError("the metadata area has no room for the rebuilt btree")
        self.used.append(address)
        return address

    def put(self, address: int, block: bytes) -> None:
        try:
            self.device.write(address * self.g.block_size, block)
        except OSError as exc:
            raise StoreIOError(f"writing the rebuilt btree: {exc.strerror or exc}") from exc

    def leaves(self, groups: Iterable[ChunkExceptions]) -> None:
        """Group chunks into leaves filled to _FILL, writing each when full."""
        room = int(leaf_room(self.g.block_size) * _FILL)
        chunks: list[int] = []
        counts: list[int] = []
        shares: list[int] = []
        targets: list[int] = []
        base = 0
        masks, marks = self.masks, self.data_marks
        for chunk, pairs in groups:
            if chunk < self.revert_cursor and any(share & self.revert_mask for share, _ in pairs):
                self.revert_passed += 1
            fits = leaf_bytes_used(len(chunks) + 1, len(shares) + len(pairs)) <= room
            if (chunks and not fits) or chunk - base >= RCHUNK_LIMIT:
                self.leaf(base, chunks, counts, shares, targets)
                base, chunks, counts, shares, targets = chunk, [], [], [], []
            chunks.append(chunk)
            counts.append(len(pairs))
            for share, target in pairs:
                shares.append(share)
                targets.append(target)
                masks[share] = masks.get(share, 0) + 1
                if target != LOST_CHUNK:
                    marks[target >> 3] |= 1 << (target & 7)
        self.leaf(base, chunks, counts, shares, targets)

    def leaf(
        self, base: int, chunks: list[int], counts: list[int], shares: list[int], targets: list[int]
    ) -> None:
        address = self.take()
        leaf = Leaf(
            address,
            self.sequence,
            base,
            tuple(chunks),
            tuple(counts),
            tuple(shares),
            tuple(targets),
        )
        self.put(address, encode_leaf(leaf, self.g.context))
        self.level.append((base, address, functools.reduce(operator.or_, shares, 0)))

    def index(self) -> tuple[int, int]:
        """Write the index levels above the leaves; (root, depth)."""
        # A store not yet upgraded (docs/format.md, "Legacy nodes") gets legacy nodes.
        summarised = bool(self.g.features & FEATURE_INDEX_SUMMARIES)
        capacity = summary_index_capacity if summarised else index_capacity
        fan = max(2, int(capacity(self.g.block_size) * _FILL))
        level, depth = self.level, 0
        while len(level) > 1:
            depth += 1
            upper: list[tuple[int, int, int]] = []
            for at in range(0, len(level), fan):
                group = level[at : at + fan]
                address = self.take()
                summaries = tuple(summary for _, _, summary in group)
                keys = tuple(key for key, _, _ in group)
                children = tuple(child for _, child, _ in group)
                node = IndexNode(
                    address, self.sequence, depth, keys, children, summaries if summarised else None
                )
                self.put(address, encode_index(node, self.g.context))
                union = functools.reduce(operator.or_, summaries, 0)
                upper.append((keys[0], address, union))
            level = upper
        return level[0][1], depth


def _bitmap_blocks(
    start: int, count: int, refs: int, units: int, bits: int, nbytes: int
) -> list[BitmapPage]:
    full = (1 << bits) - 1
    pages = []
    for index in range(count):
        lo = index * bits
        expected = (refs >> lo) & full
        if lo + bits > units:
            # Bits past the end of the space stay set, whole blocks of them
            # where the bitmap is sized for a store grown later.
            expected |= full & ~((1 << max(0, units - lo)) - 1)
        pages.append(BitmapPage(start + index, nbytes, expected))
    return pages


def _pages(g: Geometry, meta_used: Iterable[int], data_marks: bytearray) -> list[BitmapPage]:
    """Both bitmaps as the rebuilt tree uses the store."""
    data_refs = int.from_bytes(data_marks, "little") | ((1 << g.data_start) - 1)
    # Marks set in byte arrays: or-ing bits into one big int would copy it
    # once per mark.
    meta_marks = bytearray((g.meta_blocks + 7) // 8)
    for address in meta_used:
        rel = address - g.meta_start
        meta_marks[rel >> 3] |= 1 << (rel & 7)
    meta_refs = int.from_bytes(meta_marks, "little")
    bits = bitmap_bits_per_block(g.block_size)
    nbytes = g.block_size - HEADER_SIZE
    return _bitmap_blocks(
        g.meta_bitmap_start, g.meta_bitmap_blocks, meta_refs, g.meta_blocks, bits, nbytes
    ) + _bitmap_blocks(
        g.data_bitmap_start, g.data_bitmap_blocks, data_refs, g.store_chunks, bits, nbytes
    )


@dataclass(frozen=True, slots=True)
class Written:
    """What write_tree wrote: metadata blocks the tree takes, exceptions in it."""

    blocks: int
    exceptions: int


def write_tree(
    device: BlockDevice,
    g: Geometry,
    sb: Superblock,
    groups: Iterable[ChunkExceptions],
    *,
    avoid: Iterable[int],
    registry: Registry | None,
    keep_registry: bool,
) -> Written:
    """Write `groups` (each chunk's exceptions, in chunk order) as a fresh btree
    and switch the store to it.

    Tree blocks go only to metadata-area blocks outside `avoid` (which must
    hold every block the current superblock may reach and every block the
    caller read exceptions from), then are synced; one journaled
    transaction (or, when the bitmaps do not fit one, several with the
    superblock last) then switches root, bitmaps, counters and registry.

    Args:
        registry: the client registry to keep (`keep_registry`: at its
            address, already written) or to write into a fresh block.

    Raises:
        SalvageError: no room; StoreIOError: a write or sync failed.
    """
    try:
        journal, _ = Journal.recover(device, g)
    except EngineError as exc:
        raise SalvageError(f"replaying the journal: {exc}") from exc
    avoided = set(avoid)
    # Nor a block with an image in the journal's ring: written directly
    # here, it would leave that older image the newest the ring holds, and a
    # later salvage, finding the block damaged, would take the image for it.
    avoided.update(committed_images(device, g, journal.next_sequence - 1))
    if keep_registry and registry is not None:
        avoided.add(registry.address)
    fresh = (a for a in range(g.meta_start, g.meta_end) if a not in avoided)
    writer = _Writer(device, g, journal.next_sequence, fresh)
    writer.data_marks = bytearray((g.store_chunks + 7) // 8)
    if sb.revert is not None:
        writer.revert_mask, writer.revert_cursor = 1 << sb.revert.bit, sb.revert.cursor
    writer.leaves(groups)
    root, depth = writer.index()
    registry_address = _registry_address(g, registry, keep_registry, avoided | set(writer.used))
    meta_used = [*writer.used, *([registry_address] if registry_address else [])]
    try:
        device.sync()
    except OSError as exc:
        raise StoreIOError(f"writing the rebuilt btree: {exc.strerror or exc}") from exc
    state = StoreState.from_superblock(sb)
    state.root, state.depth = root, depth
    state.exceptions, state.unique, state.shared = count_masks(writer.masks)
    state.meta_free = g.meta_blocks - len(meta_used)
    used_chunks = sum(byte.bit_count() for byte in writer.data_marks)
    state.data_free = g.data_chunks - used_chunks
    state.registry = registry_address
    revert = state.revert
    if revert is not None:
        # The revert's total is the snapshot's exceptions when it started;
        # the rebuilt tree may hold fewer, or earlier servers may have left
        # more restored than that (csnap_format.revert_overcounted). Either
        # way both counts become the recount, as csnap-check's counter
        # repair sets them; they only report progress, and the cursor
        # decides what is left.
        total = state.unique[revert.bit] + state.shared[revert.bit]
        if revert.restored > min(revert.total, total):
            state.revert = dataclasses.replace(revert, restored=writer.revert_passed, total=total)
    pages = _pages(g, meta_used, writer.data_marks)
    _switch(journal, g, sb, state, pages, registry, keep_registry)
    return Written(len(writer.used), state.exceptions)


def _switch(
    journal: Journal,
    g: Geometry,
    sb: Superblock,
    state: StoreState,
    pages: list[BitmapPage],
    registry: Registry | None,
    keep_registry: bool,
) -> None:
    """Commit the bitmaps, then the superblock (and a new registry) last;
    when they take several transactions, the superblock is marked
    repairing before the first (docs/format.md, "State")."""
    new_registry = registry if registry is not None and not keep_registry else None
    # A kept registry stays the version it is; a new one is the switch's.
    state.registry_sequence = registry.sequence if keep_registry and registry else 0
    final = 1 + (new_registry is not None)
    per = journal.max_blocks
    encode: Callable[[int], list[tuple[int, bytes]]]
    try:
        if len(pages) + final > per:
            # Marked first: until the switch nothing may open the store,
            # whose old tree the first bitmaps no longer describe.
            journal.commit(1, functools.partial(_marked_repairing, sb), data_written=False)
        while len(pages) + final > per:
            # Bitmaps that do not fit the switch go first: until the switch,
            # they only disagree with the old tree, as the repair's re-run
            # (the only way to open the store now) repairs.
            batch, pages = pages[:per], pages[per:]
            encode = functools.partial(_encode_switch, batch, None, g, None, 0)
            journal.commit(len(batch), encode, data_written=False)
        encode = functools.partial(_encode_switch, pages, state, g, new_registry, state.registry)
        journal.commit(len(pages) + final, encode, data_written=False)
        journal.sync()
    except OSError as exc:
        raise StoreIOError(f"switching to the rebuilt btree: {exc.strerror or exc}") from exc


def _registry_address(g: Geometry, registry: Registry | None, keep: bool, used: set[int]) -> int:
    """Where the registry is (kept) or goes (a block outside `used`); 0 for none."""
    if registry is None:
        return 0
    if keep:
        return registry.address
    address = next((a for a in range(g.meta_start, g.meta_end) if a not in used), 0)
    if not address:
        raise SalvageError("the metadata area has no room for the client registry")
    return address


def _marked_repairing(sb: Superblock, sequence: int) -> list[tuple[int, bytes]]:
    return [(0, encode_superblock(dataclasses.replace(sb, sequence=sequence, repairing=True)))]


def _encode_switch(
    pages: list[BitmapPage],
    state: StoreState | None,
    g: Geometry,
    registry: Registry | None,
    registry_address: int,
    sequence: int,
) -> list[tuple[int, bytes]]:
    images = [(page.address, encode_page(page, sequence, g)) for page in pages]
    if registry is not None:
        fresh = Registry(registry_address, sequence, registry.clients, registry.overflow)
        images.append((registry_address, encode_registry(fresh, g.context)))
        if state is not None:
            state.registry_sequence = sequence
    if state is not None:
        images.append((0, encode_superblock(state.to_superblock(g, sequence))))
    return images
