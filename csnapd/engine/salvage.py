"""Salvage of a damaged exception btree.

csnap-check --repair gathers every exception it can still read (the leaves
reached from the root, and, when part of the tree cannot be reached, every
leaf of this store found by scanning the metadata area), resolves conflicts
by the rule in docs/rules.md ("salvage keeps the newest readable copy"),
marks the chunks whose mapping could not be recovered as lost (an exception
naming LOST_CHUNK, docs/format.md "Lost copies") for the snapshots that may
have lost it (docs/rules.md, "salvage marks lost only what may be lost":
the superblock's per-snapshot counters prove the others complete), and
hands the result, chunk by chunk in order, to the tree writer
(csnapd.engine.salvage_write), which writes a fresh btree into metadata
blocks nothing refers to and switches the store to it in one journaled
transaction.

Memory: a source is a leaf's address and sequence, not its exceptions (the
merge reads each leaf again); the exceptions kept are packed in arrays
(chunk, share mask, store chunk: 16 bytes, or 24 on a store whose sizes
need 8-byte chunk numbers), in runs of one
source's chunks; which chunks and store chunks are taken is kept in
bitmaps. The merged runs are put in chunk order by sorting the runs, not
the exceptions.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from csnap_format import LOST_CHUNK, BlockType, FormatError, Geometry, Leaf, Superblock, decode_leaf
from csnapd.engine.check_report import Runs
from csnapd.engine.salvage_write import (
    ChunkExceptions,
    SalvageError,
    Written,
    count_masks,
    write_tree,
)

__all__ = [
    "SalvageError",
    "LeafSource",
    "Salvaged",
    "Written",
    "salvage",
    "scan_leaves",
    "write_tree",
    "count_exceptions",
    "Exceptions",
]

#: Logical chunk -> its exceptions as (share mask, store chunk), masks disjoint.
Exceptions = dict[int, list[tuple[int, int]]]


@dataclass(frozen=True, slots=True)
class LeafSource:
    """A readable leaf: where it is, its sequence, whether the superblock's
    tree reaches it, and its image when that is not the block at home (a
    copy in the journal)."""

    address: int
    sequence: int
    reached: bool
    image: bytes | None = None

    @property
    def priority(self) -> tuple[int, int, int]:
        """Higher wins a conflict: reached, then newer, then lower address."""
        return (int(self.reached), self.sequence, -self.address)

    def read(self, read_block: Callable[[int], bytes], g: Geometry) -> Leaf:
        block = self.image if self.image is not None else read_block(self.address)
        return decode_leaf(block, g.context, self.address)


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
        found.append(LeafSource(address, leaf.sequence, reached=False))
    return found


def _bits(mask: int) -> Iterator[int]:
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


@dataclass(slots=True)
class _Run:
    """One source's taken chunks: rows [start, end) of the packed arrays."""

    first: int
    last: int
    start: int
    end: int
    scanned: bool


@dataclass(slots=True)
class Salvaged:
    """What the salvage recovered, dropped and marked lost.

    The exceptions come out of `groups()`, in chunk order, once; the lost
    runs and the counts of dropped copies are complete when it is exhausted.
    """

    #: Share bit -> chunks newly marked lost for that snapshot, as (start, count) runs.
    lost: dict[int, Runs] = field(default_factory=dict)
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
    #: Live share bits not proven complete: lost marks go to them.
    doubtful: int = 0
    chunks: array[int] = field(default_factory=lambda: array("Q"))
    shares: array[int] = field(default_factory=lambda: array("Q"))
    targets: array[int] = field(default_factory=lambda: array("Q"))
    #: How `targets` holds LOST_CHUNK (its words may be 4 bytes wide).
    lost_word: int = LOST_CHUNK
    runs: list[_Run] = field(default_factory=list)
    #: Damaged ranges [lo, hi), sorted and disjoint.
    ranges: list[tuple[int, int]] = field(default_factory=list)
    #: Chunk -> live bits whose copy was dropped in a conflict.
    conflict_bits: dict[int, int] = field(default_factory=dict)

    def groups(self) -> Iterator[ChunkExceptions]:
        """Every chunk's exceptions, lost marks included, in chunk order."""
        los = [lo for lo, _ in self.ranges]
        for chunk, pairs in _interleave(self._rows(), self._doubtful_chunks()):
            i = bisect.bisect_right(los, chunk) - 1
            damaged = self.doubtful if i >= 0 and chunk < self.ranges[i][1] else 0
            have = 0
            for share, _ in pairs:
                have |= share
            missing = (damaged | self.conflict_bits.get(chunk, 0)) & ~have & ~self.complete
            if missing:
                pairs.append((missing, LOST_CHUNK))
                for bit in _bits(missing):
                    runs = self.lost.get(bit)
                    if runs is None:
                        runs = self.lost[bit] = Runs()
                    runs.add(chunk)
            if pairs:
                yield chunk, pairs

    def _doubtful_chunks(self) -> Iterator[int]:
        """The chunks that may need a lost mark, in order (perhaps repeated)."""
        spans = (range(lo, hi) for lo, hi in self.ranges)
        return heapq.merge(itertools.chain.from_iterable(spans), sorted(self.conflict_bits))

    def _rows(self) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        """The taken exceptions grouped by chunk, in chunk order, less the
        bits of complete snapshots on those found only by the scan."""
        for cluster in _clusters(sorted(self.runs, key=lambda run: run.first)):
            if len(cluster) == 1:
                yield from self._run_rows(cluster[0])
            else:  # runs whose chunks interleave: sort their (few) groups
                merged = [group for run in cluster for group in self._run_rows(run)]
                yield from sorted(merged, key=lambda group: group[0])

    def _run_rows(self, run: _Run) -> Iterator[tuple[int, list[tuple[int, int]]]]:
        chunks, shares, targets = self.chunks, self.shares, self.targets
        drop = self.complete if run.scanned else 0
        lost_word = self.lost_word
        at = run.start
        while at < run.end:
            chunk = chunks[at]
            pairs = []
            while at < run.end and chunks[at] == chunk:
                share = shares[at] & ~drop
                if share:
                    target = targets[at]
                    pairs.append((share, LOST_CHUNK if target == lost_word else target))
                else:
                    self.stray += 1
                    self.from_scan -= 1
                at += 1
            yield chunk, pairs


def _clusters(runs: list[_Run]) -> Iterator[list[_Run]]:
    """Runs (sorted by first chunk) grouped where their chunk spans overlap."""
    cluster: list[_Run] = []
    last = -1
    for run in runs:
        if cluster and run.first > last:
            yield cluster
            cluster = []
        cluster.append(run)
        last = max(last, run.last)
    if cluster:
        yield cluster


def _interleave(
    rows: Iterator[tuple[int, list[tuple[int, int]]]], extra: Iterator[int]
) -> Iterator[tuple[int, list[tuple[int, int]]]]:
    """The row groups, with an empty group for each chunk of `extra` (sorted)
    that has none."""
    pending = next(extra, None)
    for chunk, pairs in rows:
        while pending is not None and pending <= chunk:
            if pending < chunk:
                yield pending, []
            last = pending
            while pending is not None and pending == last:
                pending = next(extra, None)
        yield chunk, pairs
    while pending is not None:
        yield pending, []
        last = pending
        while pending is not None and pending == last:
            pending = next(extra, None)


def _union(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        elif lo < hi:
            out.append((lo, hi))
    return out


def salvage(
    sources: Sequence[LeafSource],
    damaged: Sequence[tuple[int, int]],
    sb: Superblock,
    read_block: Callable[[int], bytes],
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
        read_block: reads a metadata block (the sources' leaves are read again).
        in_use: whether the data bitmap marks a store chunk used; a copy
            named only by an unreached leaf counts only when it does (a
            chunk marked free was freed after that leaf was written).
        counters_trusted: the superblock is current and undamaged, so its
            per-snapshot counters count the exceptions of the tree before
            the damage exactly (see `complete_bits`).
    """
    live = sum(1 << bit for bit, r in enumerate(sb.snapshots) if r is not None and r.state == 1)
    g = sb.geometry
    # Four-byte words where the store's sizes allow (a 16 TiB origin of 4 KiB chunks).
    narrow = g.store_chunks < 1 << 32 and g.origin_chunks <= 1 << 32
    result = Salvaged(ranges=_union(damaged))
    if narrow:
        result.chunks, result.targets = array("I"), array("I")
        result.lost_word = (1 << 32) - 1
    reached = _Merge(result, sb, in_use or (lambda _: True)).run(sources, read_block)
    if counters_trusted:
        result.complete = complete_bits(sb, live, reached)
    result.doubtful = live & ~result.complete
    return result


@dataclass(slots=True)
class _Merge:
    """Takes each chunk from its best source (docs/rules.md), packing what it takes."""

    result: Salvaged
    sb: Superblock
    in_use: Callable[[int], bool]
    #: Share masks (of live bits) of the exceptions taken from reached leaves.
    reached: Counter[int] = field(default_factory=Counter)

    allowed: int = 0
    live: int = 0
    los: list[int] = field(default_factory=list)

    def run(
        self, sources: Sequence[LeafSource], read_block: Callable[[int], bytes]
    ) -> Counter[int]:
        sb = self.sb
        g = sb.geometry
        self.allowed = sum(1 << bit for bit, r in enumerate(sb.snapshots) if r is not None)
        self.live = sum(
            1 << bit for bit, r in enumerate(sb.snapshots) if r is not None and r.state == 1
        )
        self.los = [lo for lo, _ in self.result.ranges]
        owned = bytearray((g.origin_chunks + 7) // 8)
        claimed = bytearray((g.store_chunks + 7) // 8)
        for source in sorted(sources, key=lambda s: s.priority, reverse=True):
            self.leaf(source, source.read(read_block, g), owned, claimed)
        return self.reached

    def leaf(self, source: LeafSource, leaf: Leaf, owned: bytearray, claimed: bytearray) -> None:
        result, sb = self.result, self.sb
        allowed, live, ranges, los = self.allowed, self.live, result.ranges, self.los
        scanned = not source.reached
        start = len(result.chunks)
        take_chunk, take_share = result.chunks.append, result.shares.append
        take_target, reached, in_use = result.targets.append, self.reached, self.in_use
        shares, targets, lost_word = leaf.shares, leaf.targets, result.lost_word
        at = 0
        for chunk, count in zip(leaf.chunks, leaf.counts, strict=True):
            first, at = at, at + count
            if owned[chunk >> 3] >> (chunk & 7) & 1:
                continue
            if scanned:
                i = bisect.bisect_right(los, chunk) - 1
                if i < 0 or chunk >= ranges[i][1]:
                    continue
            owned[chunk >> 3] |= 1 << (chunk & 7)
            swept = sb.sweep_mask if chunk < sb.sweep_cursor else 0
            for j in range(first, at):
                share, target = shares[j], targets[j]
                mask = share & allowed & ~swept
                lost = target == LOST_CHUNK
                if not mask or (scanned and not lost and not in_use(target)):
                    result.stray += 1
                elif not lost and claimed[target >> 3] >> (target & 7) & 1:
                    result.conflicts += 1
                    bits = result.conflict_bits.get(chunk, 0) | (mask & live)
                    result.conflict_bits[chunk] = bits
                else:
                    if not lost:
                        claimed[target >> 3] |= 1 << (target & 7)
                    take_chunk(chunk)
                    take_share(mask)
                    take_target(lost_word if lost else target)
                    if scanned:
                        result.from_scan += 1
                    else:
                        reached[mask & live] += 1
        end = len(result.chunks)
        if end > start:
            chunks = result.chunks
            result.runs.append(_Run(chunks[start], chunks[end - 1], start, end, scanned))


def complete_bits(sb: Superblock, live: int, reached: Counter[int]) -> int:
    """The live share bits whose exceptions the reached leaves hold every one of.

    `reached` counts the share masks (live bits only) of the exceptions
    taken from reached leaves. The proof (docs/rules.md, "salvage marks
    lost only what may be lost"): a current, undamaged superblock counts,
    for each bit b, exactly the exceptions of the tree carrying b (unique +
    shared). Every exception taken from a leaf the tree reaches is one of
    them (a reached leaf that decodes and that the journal does not show to
    be stale is the tree's own). So when the exceptions carrying b taken
    from reached leaves are as many as the counters say, b had none
    anywhere else: nothing of b was in a damaged range, and a scanned copy
    carrying b is stale for b. Copies found by the scan are never counted:
    they may be stale (an older image of a leaf, a bit of a deleted
    snapshot whose slot was reused), and a stale copy could stand in for a
    lost one. When any bit counts more from reached leaves than the
    superblock says, the counters are not the tree's and prove nothing.
    """
    per_bit = [0] * 64
    for mask, times in reached.items():
        for bit in _bits(mask):
            per_bit[bit] += times
    complete = 0
    for bit, record in enumerate(sb.snapshots):
        if record is None or not live >> bit & 1:
            continue
        expected = record.unique_chunks + record.shared_chunks
        if per_bit[bit] > expected:
            return 0
        if per_bit[bit] == expected:
            complete |= 1 << bit
    return complete


def count_exceptions(exceptions: Exceptions) -> tuple[int, list[int], list[int]]:
    """(exceptions, unique per bit, shared per bit), as the superblock keeps them."""
    return count_masks(Counter(share for pairs in exceptions.values() for share, _ in pairs))
