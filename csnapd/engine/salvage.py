"""Salvage of a damaged exception btree, and the writer of a rebuilt one.

csnap-check --repair gathers every exception it can still read (the leaves
reached from the root, and, when part of the tree cannot be reached, every
leaf of this store found by scanning the metadata area), resolves conflicts
by the rule in docs/rules.md ("salvage keeps the newest readable copy"),
marks the chunks whose mapping could not be recovered as lost (an exception
naming LOST_CHUNK, docs/format.md "Lost copies") for the snapshots that may
have lost it (docs/rules.md, "salvage marks lost only what may be lost":
the superblock's per-snapshot counters prove the others complete), and
writes the result as a
fresh btree into metadata blocks nothing refers to. One journaled
transaction then switches the superblock (root, counters) and the bitmaps to
it, so a repair cut short leaves the store as it was.

csnap-check --restore writes a dumped set of exceptions with the same
writer (`write_tree`).
"""

from __future__ import annotations

import bisect
import functools
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from csnap_format import (
    FEATURE_INDEX_SUMMARIES,
    HEADER_SIZE,
    LOST_CHUNK,
    RCHUNK_LIMIT,
    BlockType,
    FormatError,
    Geometry,
    IndexNode,
    Leaf,
    Registry,
    Superblock,
    bitmap_bits_per_block,
    decode_leaf,
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
from csnapd.engine.journal import Journal
from csnapd.engine.pages import BitmapPage, encode_page
from csnapd.engine.state import StoreState

__all__ = [
    "SalvageError",
    "LeafSource",
    "Salvaged",
    "salvage",
    "scan_leaves",
    "write_tree",
    "Exceptions",
]

#: Logical chunk -> its exceptions as (share mask, store chunk), masks disjoint.
Exceptions = dict[int, list[tuple[int, int]]]

#: Leaves and index nodes of a rebuilt tree are filled to this fraction, so
#: the first writes after a repair do not split every node at once.
_FILL = 0.9


class SalvageError(EngineError):
    """The salvaged tree cannot be written (no room, or the store refused)."""

    # Offline only (csnap-check): never on the wire, so the base's symbol.


@dataclass(frozen=True, slots=True)
class LeafSource:
    """A readable leaf, and whether the superblock's tree reaches it."""

    leaf: Leaf
    reached: bool

    @property
    def priority(self) -> tuple[int, int, int]:
        """Higher wins a conflict: reached, then newer, then lower address."""
        return (int(self.reached), self.leaf.sequence, -self.leaf.address)


@dataclass(slots=True)
class Salvaged:
    """What the salvage recovered, dropped and marked lost."""

    exceptions: Exceptions
    #: Share bit -> chunks newly marked lost for that snapshot, as (start, count) runs.
    lost: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: Exceptions taken from leaves the tree no longer reaches.
    from_scan: int = 0
    #: Exceptions dropped: their copy is claimed by a higher-priority leaf.
    conflicts: int = 0
    #: Exceptions dropped: their mask held only bits no snapshot owns, or
    #: (from an unreached leaf) the bitmap marks their copy free, or only
    #: bits of snapshots proven complete without them.
    stray: int = 0
    #: Share bits of live snapshots the counters prove complete: none of
    #: their exceptions was in a damaged range, so they get no lost marks.
    complete: int = 0


def scan_leaves(
    read_block: Callable[[int], bytes], g: Geometry, skip: Iterable[int]
) -> list[LeafSource]:
    """Every block of the metadata area, outside `skip`, that decodes as a leaf."""
    skipped = set(skip)
    leaf_type = int(BlockType.LEAF).to_bytes(2, "little")
    found = []
    for address in range(g.meta_start, g.meta_end):
        if address in skipped:
            continue
        block = read_block(address)
        if block[4:6] != leaf_type:
            continue
        try:
            leaf = decode_leaf(block, g.context, address)
        except FormatError:
            continue
        found.append(LeafSource(leaf, reached=False))
    return found


def _append(runs: list[tuple[int, int]], chunk: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == chunk:
        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
    else:
        runs.append((chunk, 1))


def salvage(
    sources: Sequence[LeafSource],
    damaged: Sequence[tuple[int, int]],
    sb: Superblock,
    in_use: Callable[[int], bool] | None = None,
    *,
    counters_trusted: bool = False,
) -> Salvaged:
    """Merge readable leaves into one set of exceptions (docs/rules.md).

    Args:
        sources: readable leaves, reached ones and scanned ones.
        damaged: logical chunk ranges [lo, hi) the tree cannot vouch for (a
            node there is unreadable); scanned leaves count only inside them,
            and every live snapshot not proven complete that has no
            recovered copy of a chunk in them gets a lost mark.
        sb: the superblock (snapshot table, sweep state).
        in_use: whether the data bitmap marks a store chunk used; a copy
            named only by an unreached leaf counts only when it does (a
            chunk marked free was freed after that leaf was written).
        counters_trusted: the superblock is current and undamaged, so its
            per-snapshot counters count the exceptions of the tree before
            the damage exactly (see `complete_bits`).
    """
    ranges = sorted(damaged)
    live = sum(1 << bit for bit, r in enumerate(sb.snapshots) if r is not None and r.state == 1)
    result = Salvaged({})
    scanned: set[int] = set()
    lost_bits = _merge(sources, ranges, sb, live, result, in_use or (lambda _: True), scanned)
    if counters_trusted:
        result.complete = complete_bits(sb, live, result.exceptions, scanned)
        _drop_bits(result, scanned, result.complete)
    doubtful = live & ~result.complete
    for lo, hi in ranges:
        for chunk in range(lo, hi):
            have = sum(share for share, _ in result.exceptions.get(chunk, ()))
            if doubtful & ~have:
                lost_bits[chunk] = lost_bits.get(chunk, 0) | (doubtful & ~have)
    for chunk in sorted(lost_bits):
        have = sum(share for share, _ in result.exceptions.get(chunk, ()))
        missing = lost_bits[chunk] & ~have & ~result.complete
        if not missing:
            continue
        result.exceptions.setdefault(chunk, []).append((missing, LOST_CHUNK))
        for bit in range(missing.bit_length()):
            if missing >> bit & 1:
                _append(result.lost.setdefault(bit, []), chunk)
    return result


def _merge(
    sources: Sequence[LeafSource],
    ranges: list[tuple[int, int]],
    sb: Superblock,
    live: int,
    result: Salvaged,
    in_use: Callable[[int], bool],
    scanned: set[int],
) -> dict[int, int]:
    """Take each chunk from its best source; return chunk -> bits lost to conflicts.

    The chunks taken from leaves the tree does not reach go into `scanned`.
    """
    los = [lo for lo, _ in ranges]

    def in_damaged(chunk: int) -> bool:
        i = bisect.bisect_right(los, chunk) - 1
        return i >= 0 and chunk < ranges[i][1]

    allowed = sum(1 << bit for bit, r in enumerate(sb.snapshots) if r is not None)
    owner: set[int] = set()
    targets: set[int] = set()
    lost_bits: dict[int, int] = {}
    for source in sorted(sources, key=lambda s: s.priority, reverse=True):
        leaf = source.leaf
        at = 0
        for chunk, count in zip(leaf.chunks, leaf.counts, strict=True):
            first, at = at, at + count
            if chunk in owner or (not source.reached and not in_damaged(chunk)):
                continue
            owner.add(chunk)
            kept: list[tuple[int, int]] = []
            for j in range(first, at):
                share, target = leaf.shares[j], leaf.targets[j]
                mask = share & allowed & ~(sb.sweep_mask if chunk < sb.sweep_cursor else 0)
                if not mask or (not source.reached and target != LOST_CHUNK and not in_use(target)):
                    result.stray += 1
                elif target != LOST_CHUNK and target in targets:
                    result.conflicts += 1
                    lost_bits[chunk] = lost_bits.get(chunk, 0) | (mask & live)
                else:
                    targets.add(target)
                    kept.append((mask, target))
                    result.from_scan += not source.reached
            if kept:
                result.exceptions[chunk] = kept
                if not source.reached:
                    scanned.add(chunk)
    return lost_bits


def complete_bits(sb: Superblock, live: int, exceptions: Exceptions, scanned: set[int]) -> int:
    """The live share bits whose exceptions the reached leaves hold every one of.

    The proof (docs/rules.md, "salvage marks lost only what may be lost"):
    a current, undamaged superblock counts, for each bit b, exactly the
    exceptions of the tree carrying b (unique + shared). Every exception
    taken from a leaf the tree reaches is one of them (a reached leaf that
    decodes and that the journal does not show to be stale is the tree's
    own). So when the exceptions carrying b taken from reached leaves are
    as many as the counters say, b had none anywhere else: nothing of b
    was in a damaged range, and a scanned copy carrying b is stale for b.
    Copies found by the scan are never counted: they may be stale (an
    older image of a leaf, a bit of a deleted snapshot whose slot was
    reused), and a stale copy could stand in for a lost one. When any bit
    counts more from reached leaves than the superblock says, the counters
    are not the tree's and prove nothing.
    """
    reached = [0] * 64
    for chunk, pairs in exceptions.items():
        if chunk in scanned:
            continue
        for share, _ in pairs:
            rest = share & live
            while rest:
                low = rest & -rest
                reached[low.bit_length() - 1] += 1
                rest ^= low
    complete = 0
    for bit, record in enumerate(sb.snapshots):
        if record is None or not live >> bit & 1:
            continue
        expected = record.unique_chunks + record.shared_chunks
        if reached[bit] > expected:
            return 0
        if reached[bit] == expected:
            complete |= 1 << bit
    return complete


def _drop_bits(result: Salvaged, scanned: set[int], bits: int) -> None:
    """Take `bits` off the exceptions found only by the scan (stale for them)."""
    if not bits:
        return
    for chunk in scanned:
        kept = []
        for share, target in result.exceptions[chunk]:
            if share & ~bits:
                kept.append((share & ~bits, target))
            else:
                result.stray += 1
                result.from_scan -= 1
        if kept:
            result.exceptions[chunk] = kept
        else:
            del result.exceptions[chunk]


# -- writing a tree ------------------------------------------------------------


@dataclass(slots=True)
class _Built:
    root: int
    depth: int
    blocks: list[tuple[int, bytes]]


def _leaves(exceptions: Exceptions, block_size: int) -> list[tuple[int, list[int]]]:
    """Group chunks into leaves: (base chunk, chunks) each."""
    room = int(leaf_room(block_size) * _FILL)
    groups: list[tuple[int, list[int]]] = [(0, [])]
    entries = total = 0
    for chunk in sorted(exceptions):
        n = len(exceptions[chunk])
        base, chunks = groups[-1]
        fits = leaf_bytes_used(entries + 1, total + n) <= room
        if (chunks and not fits) or chunk - base >= RCHUNK_LIMIT:
            groups.append((chunk, []))
            entries = total = 0
        groups[-1][1].append(chunk)
        entries += 1
        total += n
    return groups


def _build(
    exceptions: Exceptions,
    g: Geometry,
    addresses: Iterable[int],
    sequence: int,
) -> _Built:
    ctx = g.context
    free = iter(addresses)

    def take() -> int:
        address = next(free, None)
        if address is None:
            raise SalvageError("the metadata area has no room for the rebuilt btree")
        return address

    blocks: list[tuple[int, bytes]] = []
    # (lower key, block, union of the share masks below) of each node of a level.
    level: list[tuple[int, int, int]] = []
    for base, chunks in _leaves(exceptions, g.block_size):
        address = take()
        counts: list[int] = []
        shares: list[int] = []
        targets: list[int] = []
        for chunk in chunks:
            pairs = exceptions[chunk]
            counts.append(len(pairs))
            shares.extend(share for share, _ in pairs)
            targets.extend(target for _, target in pairs)
        leaf = Leaf(
            address, sequence, base, tuple(chunks), tuple(counts), tuple(shares), tuple(targets)
        )
        blocks.append((address, encode_leaf(leaf, ctx)))
        level.append((base, address, functools.reduce(operator.or_, shares, 0)))
    depth = 0
    # A store not yet upgraded (docs/format.md, "Legacy nodes") gets legacy nodes.
    summarised = bool(g.features & FEATURE_INDEX_SUMMARIES)
    capacity = summary_index_capacity if summarised else index_capacity
    fan = max(2, int(capacity(g.block_size) * _FILL))
    while len(level) > 1:
        depth += 1
        upper: list[tuple[int, int, int]] = []
        for at in range(0, len(level), fan):
            group = level[at : at + fan]
            address = take()
            summaries = tuple(summary for _, _, summary in group)
            node = IndexNode(
                address,
                sequence,
                depth,
                tuple(key for key, _, _ in group),
                tuple(child for _, child, _ in group),
                summaries if summarised else None,
            )
            blocks.append((address, encode_index(node, ctx)))
            upper.append((group[0][0], address, functools.reduce(operator.or_, summaries, 0)))
        level = upper
    return _Built(level[0][1], depth, blocks)


def _bitmap_blocks(
    start: int, count: int, refs: int, units: int, bits: int, nbytes: int
) -> list[BitmapPage]:
    full = (1 << bits) - 1
    pages = []
    for index in range(count):
        lo = index * bits
        expected = (refs >> lo) & full
        if lo + bits > units:  # bits past the end of the space stay set
            expected |= full & ~((1 << (units - lo)) - 1)
        pages.append(BitmapPage(start + index, nbytes, expected))
    return pages


def count_exceptions(exceptions: Exceptions) -> tuple[int, list[int], list[int]]:
    """(exceptions, unique per bit, shared per bit), as the superblock keeps them."""
    total = 0
    unique = [0] * 64
    shared = [0] * 64
    for pairs in exceptions.values():
        for share, _ in pairs:
            total += 1
            if share & (share - 1) == 0:
                unique[share.bit_length() - 1] += 1
            else:
                rest = share
                while rest:
                    low = rest & -rest
                    shared[low.bit_length() - 1] += 1
                    rest ^= low
    return total, unique, shared


def write_tree(
    device: BlockDevice,
    g: Geometry,
    sb: Superblock,
    exceptions: Exceptions,
    *,
    avoid: Iterable[int],
    registry: Registry | None,
    keep_registry: bool,
) -> int:
    """Write `exceptions` as a fresh btree and switch the store to it.

    Tree blocks go only to metadata-area blocks outside `avoid` (which must
    hold every block the current superblock may reach and every block the
    caller read exceptions from), then are synced; one journaled
    transaction (or, when the bitmaps do not fit one, several with the
    superblock last) then switches root, bitmaps, counters and registry.

    Args:
        registry: the client registry to keep (`keep_registry`: at its
            address, already written) or to write into a fresh block.

    Returns:
        the metadata blocks the new tree takes.

    Raises:
        SalvageError: no room; StoreIOError: a write or sync failed.
    """
    try:
        journal, _ = Journal.recover(device, g)
    except EngineError as exc:
        raise SalvageError(f"replaying the journal: {exc}") from exc
    sequence = journal.next_sequence
    avoided = set(avoid)
    if keep_registry and registry is not None:
        avoided.add(registry.address)
    fresh = (a for a in range(g.meta_start, g.meta_end) if a not in avoided)
    built = _build(exceptions, g, fresh, sequence)
    meta_used = {address for address, _ in built.blocks}
    registry_address = _registry_address(g, registry, keep_registry, avoided | meta_used)
    if registry_address:
        meta_used.add(registry_address)
    try:
        for address, block in sorted(built.blocks):
            device.write(address * g.block_size, block)
        device.sync()
    except OSError as exc:
        raise StoreIOError(f"writing the rebuilt btree: {exc.strerror or exc}") from exc
    # Marks set in byte arrays: or-ing bits into one big int would copy it
    # once per copy.
    data_marks = bytearray((g.store_chunks + 7) // 8)
    for pairs in exceptions.values():
        for _, target in pairs:
            if target != LOST_CHUNK:
                data_marks[target >> 3] |= 1 << (target & 7)
    data_refs = int.from_bytes(data_marks, "little") | ((1 << g.data_start) - 1)
    meta_marks = bytearray((g.meta_blocks + 7) // 8)
    for address in meta_used:
        rel = address - g.meta_start
        meta_marks[rel >> 3] |= 1 << (rel & 7)
    meta_refs = int.from_bytes(meta_marks, "little")
    bits = bitmap_bits_per_block(g.block_size)
    nbytes = g.block_size - HEADER_SIZE
    pages = _bitmap_blocks(
        g.meta_bitmap_start, g.meta_bitmap_blocks, meta_refs, g.meta_blocks, bits, nbytes
    ) + _bitmap_blocks(
        g.data_bitmap_start, g.data_bitmap_blocks, data_refs, g.store_chunks, bits, nbytes
    )
    state = StoreState.from_superblock(sb)
    state.root, state.depth = built.root, built.depth
    state.exceptions, state.unique, state.shared = count_exceptions(exceptions)
    state.meta_free = g.meta_blocks - len(meta_used)
    state.data_free = g.data_chunks - (data_refs.bit_count() - g.data_start)
    state.registry = registry_address
    new_registry = registry if registry is not None and not keep_registry else None
    # A kept registry stays the version it is; a new one is the switch's.
    state.registry_sequence = registry.sequence if keep_registry and registry else 0
    final = 1 + (new_registry is not None)
    per = journal.max_blocks
    try:
        while len(pages) + final > per:
            # Bitmaps that do not fit the switch go first: until the switch,
            # they only disagree with the old tree, as a re-run repairs.
            batch, pages = pages[:per], pages[per:]
            journal.commit(
                len(batch),
                functools.partial(_encode_switch, batch, None, g, None, 0),
                data_written=False,
            )
        journal.commit(
            len(pages) + final,
            functools.partial(_encode_switch, pages, state, g, new_registry, registry_address),
            data_written=False,
        )
        journal.sync()
    except OSError as exc:
        raise StoreIOError(f"switching to the rebuilt btree: {exc.strerror or exc}") from exc
    return len(built.blocks)


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
