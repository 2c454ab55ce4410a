"""Offline verification and repair of a store: every block reachable from
the superblock is decoded and checked, and every chunk and block is
recounted against the bitmaps.

What is checked (docs/operations.md, "Checking a store"):
  superblock   decodes (geometry, state, snapshot table)
  journal      the transactions a server would replay; checked as replayed
  btree        each node decodes; levels, key order and key ranges agree
               with the parent; leaf bases equal their keys; no block is
               reached twice; share masks hold only bits of live, squashed
               or not-yet-swept deleted snapshots
  recount      every node and every exception's chunk is marked in its
               bitmap exactly once; nothing marked is unreferenced (leak);
               layout-reserved bits are set; free counts, the exception
               count and each snapshot's unique/shared counts are exact

  journal      committed images still in the journal: no block in use is
               older than one (a lost write), none newer than the journal
               (lost transactions)

The check reads the store as the server would see it after replay, without
writing anything unless asked (--replay writes the replay home; --repair
rewrites bitmaps and counters from the recount, through the journal, and
salvages a damaged btree, registry or superblock with salvage.py), then
checks again to learn which problems the repair fixed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from csnap_format import (
    HEADER_SIZE,
    LOST_CHUNK,
    BlockType,
    FormatError,
    Geometry,
    Registry,
    SnapshotState,
    Superblock,
    bitmap_bits_per_block,
    block_checksum,
    decode_bitmap,
    decode_index,
    decode_leaf,
    decode_registry,
    decode_superblock,
    encode_superblock,
)
from csnapd.engine.check_registry import RULE as REGISTRY_RULE
from csnapd.engine.check_registry import registry_version_problem
from csnapd.engine.device import BlockDevice
from csnapd.engine.engine import read_geometry
from csnapd.engine.errors import EngineError, StoreIOError, StoreOpenError
from csnapd.engine.journal import Journal, JournalScan, committed_images, scan_journal
from csnapd.engine.pages import BitmapPage, encode_page
from csnapd.engine.salvage import LeafSource, SalvageError, salvage, scan_leaves, write_tree
from csnapd.engine.state import StoreState, bits_of

__all__ = [
    "Problem",
    "CheckReport",
    "check_store",
    "EXIT_CLEAN",
    "EXIT_REPAIRED",
    "EXIT_ERRORS",
    "EXIT_FAILED",
]

#: Exit codes, as fsck's.
EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_ERRORS = 4
EXIT_FAILED = 8


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the store."""

    #: "superblock", "btree", "bitmap", "counter", "journal".
    area: str
    message: str
    #: Metadata block the problem is in, where there is one.
    block: int | None = None
    #: Logical or store chunk concerned, where there is one.
    chunk: int | None = None
    #: Whether --repair can fix it (every problem but an unreadable store).
    repairable: bool = False
    #: Logical chunks affected, first and last, where known.
    chunks: tuple[int, int] | None = None
    #: Tags of the snapshots affected, where known.
    snapshots: tuple[int, ...] = ()
    #: The rule broken, a short stable name (docs/operations.md, "Checking a store").
    rule: str = ""

    def __str__(self) -> str:
        where = f" (block {self.block})" if self.block is not None else ""
        extra = []
        if self.chunks is not None:
            first, last = self.chunks
            extra.append(f"chunks {first}..{last}" if last != first else f"chunk {first}")
        if self.snapshots:
            extra.append("snapshots " + ", ".join(map(str, self.snapshots)))
        affects = f"; affects {'; '.join(extra)}" if extra else ""
        rule = f" [{self.rule}]" if self.rule else ""
        return f"{self.area}{where}{rule}: {self.message}{affects}"

    def as_json(self) -> dict[str, object]:
        return {
            "area": self.area,
            "rule": self.rule,
            "message": self.message,
            "block": self.block,
            "chunk": self.chunk,
            "chunks": list(self.chunks) if self.chunks is not None else None,
            "snapshots": list(self.snapshots),
            "repairable": self.repairable,
        }


@dataclass(slots=True)
class CheckReport:
    """What a check found."""

    geometry: Geometry | None = None
    problems: list[Problem] = field(default_factory=list)
    #: Transactions in the journal's replay window (replayed at next open).
    journal_transactions: int = 0
    journal_newest: int = 0
    replayed: bool = False
    #: What --repair rewrote; empty when it rewrote nothing.
    repaired: list[str] = field(default_factory=list)
    #: Problems the repair fixed (a check after it found them gone).
    fixed: set[Problem] = field(default_factory=set)
    #: Problems a check after the repair still found.
    remaining: list[Problem] = field(default_factory=list)
    #: Snapshot tag -> logical chunks the repair marked lost, as (start, count) runs.
    lost: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: Exceptions that name a lost copy (marked by a repair, now or before).
    lost_marks: int = 0
    #: Snapshot tag -> chunks the store marks lost for it, as (start, count) runs.
    marked_lost: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    #: Exceptions the repair recovered from leaves the tree no longer reached.
    recovered_from_scan: int = 0
    #: Why --repair rewrote nothing although some problems were repairable.
    repair_refused: str | None = None
    depth: int = 0
    leaves: int = 0
    index_nodes: int = 0
    exceptions: int = 0
    data_used: int = 0
    meta_used: int = 0
    fatal: str | None = None

    @property
    def exit_code(self) -> int:
        if self.fatal is not None:
            return EXIT_FAILED
        if self.problems:
            left = [p for p in self.problems if not self.was_repaired(p)]
            return EXIT_ERRORS if left or self.remaining else EXIT_REPAIRED
        return EXIT_CLEAN

    def was_repaired(self, problem: Problem) -> bool:
        """Whether --repair fixed this problem: a check after it found it gone."""
        return problem in self.fixed

    def as_json(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "fatal": self.fatal,
            "problems": [{**p.as_json(), "repaired": self.was_repaired(p)} for p in self.problems],
            "remaining": [p.as_json() for p in self.remaining],
            "lost": {
                str(tag): [list(run) for run in runs] for tag, runs in sorted(self.lost.items())
            },
            "lost_marks": self.lost_marks,
            "marked_lost": {
                str(tag): [list(run) for run in runs]
                for tag, runs in sorted(self.marked_lost.items())
            },
            "recovered_from_scan": self.recovered_from_scan,
            "journal": {
                "transactions": self.journal_transactions,
                "newest_sequence": self.journal_newest,
                "replayed": self.replayed,
            },
            "repaired": self.repaired,
            "repair_refused": self.repair_refused,
            "btree": {
                "depth": self.depth,
                "leaves": self.leaves,
                "index_nodes": self.index_nodes,
                "exceptions": self.exceptions,
            },
            "data_chunks_used": self.data_used,
            "metadata_blocks_used": self.meta_used,
        }


class _Overlay:
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


class _Checker:
    def __init__(
        self,
        view: _Overlay,
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
                stack.extend(self.damaged_index(address, level, lo, hi, str(exc)))
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

    def damaged_index(
        self, address: int, level: int, lo: int, hi: int, error: str
    ) -> list[tuple[int, int, int, int]]:
        """An index node that fails its checks: keep the entries its children vouch for.

        A node whose only fault is its checksum (a flipped bit in a key or a
        child) still names its children; an entry counts only when the block
        it names decodes as a node of the level below whose lower bound is
        the entry's key. Every other entry's range is damaged.
        """
        self.lose(lo, hi, address, "block-decodes", error)
        lost = self.damaged.pop()  # re-added below for the entries not vouched for
        block = bytearray(self.view.block(address))
        block[8:12] = block_checksum(block).to_bytes(4, "little")
        try:
            node = decode_index(block, self.ctx, address)
        except FormatError:
            self.damaged.append(lost)
            return []
        if node.level != level or node.keys[0] != lo or node.keys[-1] >= hi:
            self.damaged.append(lost)
            return []
        children = []
        bounds = [*node.keys[1:], hi]
        for key, child, end in zip(node.keys, node.children, bounds, strict=True):
            if self.vouches(child, level - 1, key) and self.mark_meta(child, address, key, end):
                children.append((child, level - 1, key, end))
            else:
                self.damaged.append((key, end))
        return list(reversed(children))

    def vouches(self, address: int, level: int, key: int) -> bool:
        """Whether `address` holds a node of `level` whose lower bound is `key`."""
        if not self.g.meta_start <= address < self.g.meta_end:
            return False
        try:
            if level == 0:
                return decode_leaf(self.view.block(address), self.ctx, address).base_chunk == key
            node = decode_index(self.view.block(address), self.ctx, address)
        except FormatError:
            return False
        return node.level == level and node.keys[0] == key

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
            self.sources.append(LeafSource(leaf, reached=True))
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
        if share & (share - 1) == 0:
            self.unique[share.bit_length() - 1] += 1
        else:
            for bit in bits_of(share):
                self.shared[bit] += 1
        if target == LOST_CHUNK:
            self.report.lost_marks += 1
            for bit in bits_of(share):
                if bit in self.tags:
                    runs = self.report.marked_lost.setdefault(self.tags[bit], [])
                    if runs and sum(runs[-1]) == chunk:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((chunk, 1))
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
                shown = ", ".join(str(first + lo + p) for p in positions)
                more = f" and {total - 8} more" if total > 8 else ""
                unit = "blocks" if name == "metadata" else "chunks"
                self.problem(
                    "bitmap",
                    f"{name} {unit} {kind}: {shown}{more}",
                    block=address,
                    chunk=first + lo + positions[0],
                    rule="bitmap-leaked" if diff == leaked else "bitmap-in-use-free",
                )
        return fixes

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


def _home_sequence(block: bytes) -> int | None:
    """The sequence of an intact block of this format, None if it is not one."""
    if block[:4] != b"CSNP" or int.from_bytes(block[8:12], "little") != block_checksum(block):
        return None
    return int.from_bytes(block[32:40], "little")


def _replay_images(
    store: BlockDevice, g: Geometry, scan: JournalScan
) -> tuple[dict[int, bytes], list[Problem]]:
    """The images replay would write, less those older than their home.

    A home block newer than the journal's newest intact transaction (or than
    the image replay would write over it) means the journal lost committed
    transactions: replaying would put older blocks over newer ones.
    """
    newest = scan.newest.record.sequence
    keep: dict[int, bytes] = {}
    problems = []
    homes = {0, *scan.images}
    for home in sorted(homes):
        try:
            current = store.read(home * g.block_size, g.block_size)
        except OSError as exc:
            raise StoreIOError(f"reading block {home}: {exc.strerror or exc}") from exc
        sequence = _home_sequence(current)
        image = scan.images.get(home)
        limit = newest if image is None else int.from_bytes(image[32:40], "little")
        if sequence is not None and sequence > limit:
            problems.append(
                Problem(
                    "journal",
                    f"block {home} is from transaction {sequence}, newer than the journal's"
                    f" {'image of it' if image is not None else 'newest transaction'}"
                    f" ({limit}): the journal lost committed transactions",
                    home,
                    repairable=True,
                    rule="journal-behind",
                )
            )
        elif image is not None:
            keep[home] = image
    return keep, problems


def _replay_newer(
    store: BlockDevice, g: Geometry, scan: JournalScan, images: dict[int, bytes]
) -> None:
    """Replay only images not older than their home, then empty the replay window."""
    try:
        for home, image in images.items():
            store.write(home * g.block_size, image)
        store.sync()
    except OSError as exc:
        raise StoreIOError(f"replaying the journal: {exc.strerror or exc}") from exc
    try:
        Journal(store, g, scan).checkpoint()
    except OSError as exc:
        raise StoreIOError(f"writing a journal checkpoint: {exc.strerror or exc}") from exc


def _superblock(
    view: _Overlay, store: BlockDevice, g: Geometry, committed: dict[int, tuple[int, bytes]]
) -> tuple[Superblock, str | None]:
    """The superblock; when block 0 does not decode, its newest copy in the journal.

    Returns the superblock and, for a copy, what was wrong with block 0.

    Raises:
        FormatError: block 0 is damaged and the journal holds no copy.
    """
    try:
        home = decode_superblock(view.block(0))
    except FormatError as first:
        size = g.block_size
        try:
            raw = store.read(g.journal_start * size, g.journal_blocks * size)
        except OSError as exc:
            raise StoreIOError(f"reading the journal: {exc.strerror or exc}") from exc
        best: Superblock | None = None
        for slot in range(g.journal_blocks):
            block = raw[slot * size : (slot + 1) * size]
            if int.from_bytes(block[4:6], "little") != BlockType.SUPERBLOCK:
                continue
            try:
                copy = decode_superblock(block)
            except FormatError:
                continue
            # A resize changes sizes only (csnapd.engine.resize): the same store.
            if _same_layout(copy.geometry, g) and (best is None or copy.sequence > best.sequence):
                best = copy
        if best is None:
            raise
        return best, (
            f"{first}; using its newest copy in the journal, from transaction {best.sequence}"
            " (snapshots created or deleted after it are not known to it)"
        )
    newer = committed.get(0)
    if newer is not None and newer[0] > home.sequence:
        try:
            copy = decode_superblock(newer[1])
        except FormatError:
            return home, None
        return copy, (
            f"block is from transaction {home.sequence}, but the journal holds its image"
            f" from transaction {newer[0]}: a write was lost; using that image"
        )
    return home, None


def _same_layout(a: Geometry, b: Geometry) -> bool:
    """Whether two geometries are of one store, perhaps resized between them."""
    return (
        dataclasses.replace(
            a, store_chunks=b.store_chunks, origin_chunks=b.origin_chunks, data_chunks=b.data_chunks
        )
        == b
    )


def check_store(
    store: BlockDevice,
    *,
    replay: bool = False,
    repair: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> CheckReport:
    """Check a store that no server has open; optionally replay and repair.

    Args:
        store: the store device (opened writable if replay or repair).
        replay: write the journal's replay home (as opening would).
        repair: fix what was found: bitmaps, free counts and counters from
            the recount; a damaged btree, registry or superblock by a
            salvage (csnapd/engine/salvage.py). A check after the repair
            decides which problems count as repaired.
        progress: called with (exceptions checked, exceptions expected).
    """
    report = CheckReport()
    try:
        geometry = read_geometry(store)
        report.geometry = geometry
        scan = scan_journal(store, geometry)
    except (StoreOpenError, StoreIOError) as exc:
        report.fatal = str(exc)
        return report
    report.journal_newest = scan.newest.record.sequence
    # Transactions with blocks to write home (the format's own has none).
    report.journal_transactions = sum(1 for txn in scan.replay if txn.record.homes)
    if scan.problem:
        report.problems.append(Problem("journal", scan.problem, repairable=True, rule="replay"))
    try:
        images, behind = _replay_images(store, geometry, scan)
        report.problems.extend(behind)
        if replay or repair:
            if behind:
                _replay_newer(store, geometry, scan, images)
            else:
                Journal.recover(store, geometry)
            report.replayed = True
            images = {}
    except (StoreOpenError, StoreIOError) as exc:
        report.fatal = f"replaying the journal: {exc}"
        return report
    view = _Overlay(store, images, geometry.block_size)
    try:
        committed = committed_images(store, geometry, report.journal_newest)
        sb, copied = _superblock(view, store, geometry, committed)
    except (FormatError, StoreIOError, StoreOpenError) as exc:
        report.fatal = f"superblock: {exc}"
        return report
    # Block 0's first sector may predate a resize the journal carries.
    geometry = report.geometry = sb.geometry
    if copied is not None:
        rule = "stale-block" if "write was lost" in copied else "block-decodes"
        report.problems.append(Problem("superblock", copied, 0, repairable=True, rule=rule))
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, sb.exceptions)

    checker = _Checker(view, sb, report, advance, collect=repair, committed=committed)
    try:
        checker.walk()
        checker.registry()
        meta_fix, data_fix = checker.bitmaps()
        checker.counters()
    except StoreIOError as exc:
        report.fatal = str(exc)
        return report
    report.exceptions = checker.exceptions
    if repair and report.problems:
        _repair_and_verify(store, geometry, sb, checker, meta_fix + data_fix, report)
    return report


def _repair_and_verify(
    store: BlockDevice,
    geometry: Geometry,
    sb: Superblock,
    checker: _Checker,
    fixes: list[tuple[int, int]],
    report: CheckReport,
) -> None:
    """Repair what the check found, then check again to see what is fixed."""
    structural = any(p.area in _STRUCTURAL for p in report.problems)
    try:
        if structural:
            _salvage(store, geometry, sb, checker, report)
        else:
            _repair(store, geometry, sb, checker, fixes, report)
    except SalvageError as exc:
        report.repair_refused = str(exc)
        return
    except EngineError as exc:
        # The store is as a crash mid-repair would leave it: the switch to
        # the repair is one journaled transaction, so the next check or
        # server start finds it whole or not at all.
        report.repaired.clear()
        report.lost.clear()
        report.fatal = f"repairing: {exc}"
        return
    after = check_store(store)
    if after.fatal is not None:
        report.fatal = f"checking the repaired store: {after.fatal}"
    report.remaining = after.problems
    if not after.problems and after.fatal is None:
        report.fixed = set(report.problems)


def _data_bitmap(view: _Overlay, g: Geometry) -> Callable[[int], bool] | None:
    """Whether the data bitmap marks a store chunk used; None if a block is unreadable."""
    parts = []
    for index in range(g.data_bitmap_blocks):
        address = g.data_bitmap_start + index
        try:
            parts.append(decode_bitmap(view.block(address), g.context, address).bits)
        except FormatError:
            return None
    # Each block holds a whole number of bytes of bits, so they join end to end.
    marks = b"".join(parts)
    return lambda chunk: bool(marks[chunk >> 3] >> (chunk & 7) & 1)


def _journal_leaves(committed: dict[int, tuple[int, bytes]], g: Geometry) -> list[LeafSource]:
    """The leaves among the journal's committed images: salvage sources too."""
    out = []
    for home, (_, image) in committed.items():
        if g.meta_start <= home < g.meta_end and image[4:6] == b"\x05\x00":
            try:
                out.append(LeafSource(decode_leaf(image, g.context, home), reached=False))
            except FormatError:
                continue
    return out


#: Areas whose problems only a salvage (a rebuilt btree) repairs.
_STRUCTURAL = frozenset({"btree", "registry", "superblock"})


def _salvage(
    store: BlockDevice,
    geometry: Geometry,
    sb: Superblock,
    checker: _Checker,
    report: CheckReport,
) -> None:
    """Rebuild the btree from every readable leaf and switch the store to it."""
    g = geometry
    marks = checker.meta_refs
    reached = {
        g.meta_start + (at << 3) + bit
        for at, byte in enumerate(marks)
        if byte
        for bit in range(8)
        if byte >> bit & 1
    }
    sources = list(checker.sources)
    if checker.damaged:
        sources += scan_leaves(checker.view.block, g, reached)
        sources += _journal_leaves(checker.committed, g)
    # Counters prove snapshots complete only in a superblock found whole and
    # current, with a journal whose replay agrees with the blocks at home.
    trusted = not any(p.area in ("superblock", "journal") for p in report.problems)
    result = salvage(
        sources, checker.damaged, sb, _data_bitmap(checker.view, g), counters_trusted=trusted
    )
    avoid = reached | {source.leaf.address for source in sources}
    registry: Registry | None = None
    keep = False
    if checker.registry_block is not None and not checker.registry_damaged:
        registry, keep = checker.registry_block, True
    elif sb.registry:
        # Which clients were connected is unknown: the overflow flag makes
        # the next server wait the whole grace period for their locks.
        registry = Registry(0, 0, (), overflow=True)
    blocks = write_tree(
        store, g, sb, result.exceptions, avoid=avoid, registry=registry, keep_registry=keep
    )
    tags = checker.tags
    report.lost = {tags[bit]: runs for bit, runs in sorted(result.lost.items())}
    report.recovered_from_scan = result.from_scan
    scanned = sum(1 for source in sources if not source.reached)
    total = sum(len(pairs) for pairs in result.exceptions.values())
    report.repaired.append(
        f"rebuilt the btree from {len(sources) - scanned} reached and {scanned} scanned leaves:"
        f" {total} exceptions ({result.from_scan} recovered by the scan,"
        f" {result.conflicts} dropped as conflicts, {result.stray} of no snapshot dropped)"
        f" in {blocks} blocks; rewrote the bitmaps, free counts and snapshot counters"
    )
    if registry is not None and not keep:
        report.repaired.append("wrote an empty client registry that makes the server wait")


def _repair(
    store: BlockDevice,
    geometry: Geometry,
    sb: Superblock,
    checker: _Checker,
    fixes: list[tuple[int, int]],
    report: CheckReport,
) -> None:
    """Rewrite the given bitmap blocks and the counters, through the journal."""
    journal, _ = Journal.recover(store, geometry)
    state = StoreState.from_superblock(sb)
    state.meta_free = geometry.meta_blocks - report.meta_used
    state.data_free = geometry.data_chunks - report.data_used
    state.exceptions = checker.exceptions
    for bit, record in enumerate(state.snapshots):
        if record is not None:
            state.unique[bit], state.shared[bit] = (
                checker.unique[bit],
                checker.shared[bit],
            )
    nbytes = geometry.block_size - HEADER_SIZE
    pages = [BitmapPage(address, nbytes, bits) for address, bits in fixes]
    per = journal.max_blocks - 1
    for start in range(0, max(len(pages), 1), per):
        batch = pages[start : start + per]
        encode = functools.partial(_encode_repair, batch, state, geometry)
        journal.commit(len(batch) + 1, encode, data_written=False)
    journal.sync()
    report.repaired.append(
        f"rewrote {len(fixes)} bitmap blocks, the free counts and the snapshot counters"
    )


def _encode_repair(
    batch: list[BitmapPage], state: StoreState, geometry: Geometry, sequence: int
) -> list[tuple[int, bytes]]:
    images = [(page.address, encode_page(page, sequence, geometry)) for page in batch]
    images.append((0, encode_superblock(state.to_superblock(geometry, sequence))))
    return images
