"""The walk of a check: every block reachable from the superblock, recounted.

Checker decodes and checks each btree node and leaf (levels, key order and
ranges, share masks, blocks reached twice, lost writes against the
journal's committed images) and the client registry, then recounts every
node and every exception's chunk against the bitmaps, the free counts and
each snapshot's counters. Overlay is the store as a server would read it
after replay. Problems go into a CheckReport (csnapd.engine.check_report);
check_store (csnapd.engine.check) drives the walk.
"""

from __future__ import annotations

from collections.abc import Callable

from csnap_format import (
    LOST_CHUNK,
    FormatError,
    Registry,
    SnapshotState,
    Superblock,
    bitmap_bits_per_block,
    decode_bitmap,
    decode_index,
    decode_leaf,
    decode_registry,
    revert_overcounted,
)
from csnapd.engine.check_index import damaged_index, meta_bitmap
from csnapd.engine.check_registry import RULE as REGISTRY_RULE
from csnapd.engine.check_registry import registry_version_problem
from csnapd.engine.check_report import CheckReport, Problem, Runs
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import StoreIOError
from csnapd.engine.salvage import LeafSource
from csnapd.engine.state import bits_of


class Overlay:
    """Reads of the store with the journal's replay laid over them."""

    def __init__(self, device: BlockDevice, images: dict[int, bytes], block_size: int):
        self._device = device
        self._images = images
        self._size = block_size

    def block(self, address: int) -> bytes:
        image = self._images.get(address)
        if image is not None:
            return image
        try:
            return self._device.read(address * self._size, self._size)
        except OSError as exc:
            raise StoreIOError(f"reading block {address}: {exc.strerror or exc}") from exc


class Checker:
    """One check's walk over a store, the recount it keeps, and what a salvage needs."""

    def __init__(
        self,
        view: Overlay,
        sb: Superblock,
        report: CheckReport,
        advance: Callable[[int], None],
        *,
        collect: bool = False,
        committed: dict[int, tuple[int, bytes]] | None = None,
    ):
        g = sb.geometry
        self.view = view
        self.sb = sb
        self.g = g
        self.ctx = g.context
        self.report = report
        self.advance = advance
        self.meta_refs = bytearray((g.meta_blocks + 7) // 8)
        self.data_refs = bytearray((g.store_chunks + 7) // 8)
        self.unique = [0] * 64
        self.shared = [0] * 64
        self.exceptions = 0
        revert = sb.revert
        #: The share bit of the snapshot a revert in progress restores, and
        #: its cursor: the recount of the chunks the revert has passed.
        self._revert_mask = 0 if revert is None else 1 << revert.bit
        self._revert_cursor = 0 if revert is None else revert.cursor
        #: Chunks below the revert's cursor where that snapshot holds an exception.
        self.revert_passed = 0
        #: Bits an exception may carry: those of snapshots in the table.
        self.allowed = sum(1 << bit for bit, r in enumerate(sb.snapshots) if r is not None)
        #: Bits the sweep in progress has cleared below its cursor.
        self.swept = sb.sweep_mask
        self.tags = {bit: r.tag for bit, r in enumerate(sb.snapshots) if r is not None}
        self.live_tags = tuple(
            sorted(r.tag for r in sb.snapshots if r is not None and r.state == SnapshotState.LIVE)
        )
        #: Whether to keep what a salvage needs: readable leaves, damaged ranges.
        self.collect = collect
        self.sources: list[LeafSource] = []
        #: Logical ranges [lo, hi) below a node that cannot be read or reached.
        self.damaged: list[tuple[int, int]] = []
        #: The registry as read, None when absent or unreadable.
        self.registry_block: Registry | None = None
        self.registry_damaged = False
        #: Home -> (sequence, image) of the newest committed image in the journal.
        self.committed = committed or {}
        self._meta_used: Callable[[int], bool] | None = None

    def meta_used(self) -> Callable[[int], bool]:
        """Whether the metadata bitmap marks a block used (read once, on first need)."""
        if self._meta_used is None:
            self._meta_used = meta_bitmap(self.view.block, self.g)
        return self._meta_used

    def problem(
        self,
        area: str,
        message: str,
        *,
        block: int | None = None,
        chunk: int | None = None,
        repairable: bool = True,
        chunks: tuple[int, int] | None = None,
        share: int = 0,
        rule: str = "",
    ) -> None:
        if chunks is None and chunk is not None and area == "btree":
            chunks = (chunk, chunk)
        snapshots = tuple(sorted(self.tags[b] for b in bits_of(share) if b in self.tags))
        self.report.problems.append(
            Problem(area, message, block, chunk, repairable, chunks, snapshots, rule)
        )

    def stale(self, address: int, sequence: int) -> str | None:
        """Why the block at `address`, written by `sequence`, lost a later write."""
        newer = self.committed.get(address)
        if newer is None or newer[0] <= sequence:
            return None
        return (
            f"block is from transaction {sequence}, but the journal holds its image from"
            f" transaction {newer[0]}: a write was lost"
        )

    def lose(self, lo: int, hi: int, block: int | None, rule: str, message: str) -> None:
        """A node covering [lo, hi) cannot be used: its range is damaged."""
        self.damaged.append((lo, hi))
        self.report.problems.append(
            Problem(
                "btree",
                message,
                block,
                lo,
                True,
                (lo, max(lo, hi - 1)),
                self.live_tags,
                rule,
            )
        )

    # -- btree ---------------------------------------------------------------

    def mark_meta(self, address: int, parent: int | None, lo: int = 0, hi: int = 0) -> bool:
        rel = address - self.g.meta_start
        if not 0 <= rel < self.g.meta_blocks:
            self.lose(
                lo,
                hi,
                parent,
                "node-address",
                f"node address {address} is outside the metadata area",
            )
            return False
        if self.meta_refs[rel >> 3] >> (rel & 7) & 1:
            self.lose(lo, hi, parent, "node-reached-twice", f"block {address} is reached twice")
            return False
        self.meta_refs[rel >> 3] |= 1 << (rel & 7)
        return True

    def registry(self) -> None:
        address = self.sb.registry
        if not address:
            return
        rel = address - self.g.meta_start
        if self.meta_refs[rel >> 3] >> (rel & 7) & 1:
            self.registry_damaged = True
            self.problem(
                "registry",
                f"block {address} is both the client registry and a btree node",
                block=0,
                rule="registry-shared",
            )
            return
        self.mark_meta(address, 0)
        try:
            self.registry_block = decode_registry(self.view.block(address), self.ctx, address)
        except FormatError as exc:
            self.registry_damaged = True
            self.problem("registry", str(exc), block=address, rule="block-decodes")
            return
        lost_write = self.stale(address, self.registry_block.sequence)
        if lost_write:
            self.registry_damaged = True
            self.problem("registry", lost_write, block=address, rule="stale-block")
        elif mismatch := registry_version_problem(self.sb, self.registry_block):
            self.registry_damaged = True
            self.problem("registry", mismatch, block=address, rule=REGISTRY_RULE)

    def walk(self) -> None:
        sb = self.sb
        self.report.depth = sb.depth
        if not self.mark_meta(sb.root, 0, 0, self.g.origin_chunks):
            return
        stack: list[tuple[int, int, int, int]] = [(sb.root, sb.depth, 0, self.g.origin_chunks)]
        while stack:
            address, level, lo, hi = stack.pop()
            if level == 0:
                self.leaf(address, lo, hi)
                continue
            try:
                node = decode_index(self.view.block(address), self.ctx, address)
            except FormatError as exc:
                stack.extend(damaged_index(self, address, level, lo, hi, str(exc)))
                continue
            self.report.index_nodes += 1
            lost_write = self.stale(address, node.sequence)
            if lost_write:
                self.lose(lo, hi, address, "stale-block", lost_write)
                continue
            if node.level != level:
                self.lose(lo, hi, address, "node-level", f"level {node.level}, expected {level}")
                continue
            if node.keys[0] != lo:
                self.problem(
                    "btree",
                    f"first key {node.keys[0]}, expected its lower bound {lo}",
                    block=address,
                    chunks=(lo, max(lo, hi - 1)),
                    rule="node-bounds",
                )
            if node.keys[-1] >= hi:
                self.problem(
                    "btree",
                    f"key {node.keys[-1]} is not below the upper bound {hi}",
                    block=address,
                    chunks=(lo, max(lo, hi - 1)),
                    rule="node-bounds",
                )
            bounds = [*node.keys[1:], hi]
            children = []
            for key, child, end in zip(node.keys, node.children, bounds, strict=True):
                if self.mark_meta(child, address, key, end):
                    children.append((child, level - 1, key, end))
            stack.extend(reversed(children))

    def leaf(self, address: int, lo: int, hi: int) -> None:
        try:
            leaf = decode_leaf(self.view.block(address), self.ctx, address)
        except FormatError as exc:
            self.lose(lo, hi, address, "block-decodes", str(exc))
            return
        self.report.leaves += 1
        lost_write = self.stale(address, leaf.sequence)
        if lost_write:
            self.lose(lo, hi, address, "stale-block", lost_write)
            return
        if self.collect:
            self.sources.append(LeafSource(address, leaf.sequence, reached=True))
        if leaf.base_chunk != lo:
            self.problem(
                "btree",
                f"base chunk {leaf.base_chunk}, expected {lo}",
                block=address,
                chunks=(lo, max(lo, hi - 1)),
                rule="leaf-bounds",
            )
        if leaf.chunks and (leaf.chunks[0] < lo or leaf.chunks[-1] >= hi):
            self.problem(
                "btree",
                f"holds chunks {leaf.chunks[0]}..{leaf.chunks[-1]}"
                f" outside its range {lo}..{hi - 1}",
                block=address,
                chunks=(leaf.chunks[0], leaf.chunks[-1]),
                rule="leaf-bounds",
            )
        at = 0
        for chunk, count in zip(leaf.chunks, leaf.counts, strict=True):
            for share, target in zip(
                leaf.shares[at : at + count], leaf.targets[at : at + count], strict=True
            ):
                self.exception(address, chunk, share, target)
            at += count
        self.advance(len(leaf.shares))

    def exception(self, address: int, chunk: int, share: int, target: int) -> None:
        self.exceptions += 1
        stray = share & ~self.allowed
        if stray:
            self.problem(
                "btree",
                f"chunk {chunk} has an exception for snapshot bits {bits_of(stray)}"
                " that no snapshot owns",
                block=address,
                chunk=chunk,
                rule="share-of-no-snapshot",
            )
        if share & self.swept and chunk < self.sb.sweep_cursor:
            self.problem(
                "btree",
                f"chunk {chunk} still carries deleted bits {bits_of(share & self.swept)}"
                " that the sweep has passed",
                block=address,
                chunk=chunk,
                share=share & self.swept,
                rule="share-swept",
            )
        if share & self._revert_mask and chunk < self._revert_cursor:
            self.revert_passed += 1
        if share & (share - 1) == 0:
            self.unique[share.bit_length() - 1] += 1
        else:
            for bit in bits_of(share):
                self.shared[bit] += 1
        if target == LOST_CHUNK:
            self.report.lost_marks += 1
            for bit in bits_of(share):
                if bit in self.tags:
                    runs = self.report.marked_lost.get(self.tags[bit])
                    if runs is None:
                        runs = self.report.marked_lost[self.tags[bit]] = Runs()
                    runs.add(chunk)
            return
        if self.data_refs[target >> 3] >> (target & 7) & 1:
            self.problem(
                "btree",
                f"store chunk {target} is used by more than one exception"
                f" (one is for chunk {chunk})",
                block=address,
                chunk=target,
                chunks=(chunk, chunk),
                share=share,
                rule="copy-used-twice",
            )
        self.data_refs[target >> 3] |= 1 << (target & 7)

    # -- recount against the bitmaps -------------------------------------------

    def bitmaps(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Compare bitmaps with the references; return the bits each block should hold."""
        g = self.g
        bits = bitmap_bits_per_block(g.block_size)
        meta_refs = int.from_bytes(self.meta_refs, "little")
        data_refs = int.from_bytes(self.data_refs, "little")
        # Layout-reserved data chunks count as used.
        data_refs |= (1 << g.data_start) - 1
        self.report.meta_used = meta_refs.bit_count()
        self.report.data_used = data_refs.bit_count() - g.data_start
        meta_fix = self.space(
            "metadata",
            g.meta_bitmap_start,
            g.meta_bitmap_blocks,
            meta_refs,
            g.meta_blocks,
            g.meta_start,
            bits,
        )
        data_fix = self.space(
            "data",
            g.data_bitmap_start,
            g.data_bitmap_blocks,
            data_refs,
            g.store_chunks,
            0,
            bits,
        )
        meta_free = g.meta_blocks - self.report.meta_used
        data_free = g.data_chunks - self.report.data_used
        if self.sb.meta_free != meta_free:
            self.problem(
                "counter",
                f"metadata free count is {self.sb.meta_free}, recount {meta_free}",
                block=0,
                rule="free-count",
            )
        if self.sb.data_free != data_free:
            self.problem(
                "counter",
                f"data free count is {self.sb.data_free}, recount {data_free}",
                block=0,
                rule="free-count",
            )
        return meta_fix, data_fix

    def space(
        self,
        name: str,
        start: int,
        blocks: int,
        refs: int,
        units: int,
        first: int,
        bits: int,
    ) -> list[tuple[int, int]]:
        fixes = []
        full = (1 << bits) - 1
        for index in range(blocks):
            address = start + index
            lo = index * bits
            expected = (refs >> lo) & full
            if lo + bits > units:  # bits past the end of the space stay set
                expected |= full & ~((1 << max(0, units - lo)) - 1)
            try:
                bitmap = decode_bitmap(self.view.block(address), self.ctx, address)
            except FormatError as exc:
                self.problem("bitmap", str(exc), block=address, rule="block-decodes")
                fixes.append((address, expected))
                continue
            actual = int.from_bytes(bitmap.bits, "little")
            lost_write = self.stale(address, bitmap.sequence)
            if lost_write:
                self.problem("bitmap", lost_write, block=address, rule="stale-block")
                fixes.append((address, expected))
                if actual == expected:
                    continue
            if actual == expected:
                continue
            if not lost_write:
                fixes.append((address, expected))
            self.bitmap_differs(name, address, first + lo, actual, expected)
        return fixes

    def bitmap_differs(
        self, name: str, address: int, first: int, actual: int, expected: int
    ) -> None:
        """Report the bits of bitmap block `address` (its first bit numbers `first`)
        that are set and should not be, and those clear that should be set."""
        leaked = actual & ~expected
        lost = expected & ~actual
        for kind, diff in (
            ("leaked (marked used, referenced by nothing)", leaked),
            ("used but marked free", lost),
        ):
            if not diff:
                continue
            positions = _lowest_bits(diff, 8)
            total = diff.bit_count()
            shown = ", ".join(str(first + p) for p in positions)
            more = f" and {total - 8} more" if total > 8 else ""
            unit = "blocks" if name == "metadata" else "chunks"
            self.problem(
                "bitmap",
                f"{name} {unit} {kind}: {shown}{more}",
                block=address,
                chunk=first + positions[0],
                rule="bitmap-leaked" if diff == leaked else "bitmap-in-use-free",
            )

    def counters(self) -> None:
        sb = self.sb
        if sb.exceptions != self.exceptions:
            self.problem(
                "counter",
                f"exception count is {sb.exceptions}, recount {self.exceptions}",
                block=0,
                rule="exception-count",
            )
        for bit, record in enumerate(sb.snapshots):
            if record is None:
                continue
            if (record.unique_chunks, record.shared_chunks) != (
                self.unique[bit],
                self.shared[bit],
            ):
                self.problem(
                    "counter",
                    f"snapshot {record.tag} (bit {bit}) counts {record.unique_chunks} unique and"
                    f" {record.shared_chunks} shared chunks,"
                    f" recount {self.unique[bit]} and {self.shared[bit]}",
                    block=0,
                    share=1 << bit,
                    rule="snapshot-counters",
                )
        self._revert_counts()

    def _revert_counts(self) -> None:
        """The revert in progress counts no more chunks restored than in all.

        Only a count past the total is a finding, the one earlier servers
        could leave (csnap_format.revert_overcounted): a salvage that drops
        exceptions may leave the counts apart for good reason, and the
        revert's progress needs them only to report it."""
        revert = self.sb.revert
        if revert is None or not revert_overcounted(self.sb):
            return
        total = self.unique[revert.bit] + self.shared[revert.bit]
        self.problem(
            "counter",
            f"the revert to snapshot {revert.tag} counts {revert.restored} of"
            f" {revert.total} chunks restored; recount: {self.revert_passed} passed"
            f" of {total}",
            block=0,
            share=1 << revert.bit,
            rule="revert-counts",
        )


def _lowest_bits(mask: int, count: int) -> list[int]:
    """The positions of the lowest `count` set bits of a (possibly huge) mask.

    Reads it byte by byte: clearing bits of a huge int one at a time copies
    it each time.
    """
    out: list[int] = []
    for at, byte in enumerate(mask.to_bytes((mask.bit_length() + 7) // 8, "little")):
        while byte and len(out) < count:
            low = byte & -byte
            out.append(8 * at + low.bit_length() - 1)
            byte ^= low
        if len(out) == count:
            break
    return out
