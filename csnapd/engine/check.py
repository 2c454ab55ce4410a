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

This module owns check_store: the journal's replay as a check sees it, the
superblock (or its copy in the journal), and the repair's verification. The
walk and recount are in check_walk.py, the repairs in check_repair.py, the
findings in check_report.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from csnap_format import (
    BlockType,
    FormatError,
    Geometry,
    Superblock,
    block_checksum,
    decode_superblock,
)
from csnapd.engine.check_repair import STRUCTURAL_AREAS, rewrite_counts, salvage_store
from csnapd.engine.check_report import (
    EXIT_CLEAN,
    EXIT_ERRORS,
    EXIT_FAILED,
    EXIT_REPAIRED,
    CheckReport,
    Problem,
)
from csnapd.engine.check_summaries import check_summaries
from csnapd.engine.check_walk import Checker, Overlay
from csnapd.engine.device import BlockDevice
from csnapd.engine.engine import read_geometry
from csnapd.engine.errors import EngineError, StoreIOError, StoreOpenError
from csnapd.engine.journal import Journal, JournalScan, committed_images, scan_journal
from csnapd.engine.salvage import SalvageError

__all__ = [
    "Problem",
    "CheckReport",
    "check_store",
    "EXIT_CLEAN",
    "EXIT_REPAIRED",
    "EXIT_ERRORS",
    "EXIT_FAILED",
]


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
    view: Overlay, store: BlockDevice, g: Geometry, committed: dict[int, tuple[int, bytes]]
) -> tuple[Superblock, str | None]:
    """The superblock; when block 0 does not decode, its newest copy in the journal.

    Returns the superblock and, for a copy, what was wrong with block 0.

    Raises:
        FormatError: block 0 is damaged and the journal holds no copy.
    """
    try:
        home = decode_superblock(view.block(0), revert_overcount=True)
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
                copy = decode_superblock(block, revert_overcount=True)
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
            copy = decode_superblock(newer[1], revert_overcount=True)
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
    replayed = _check_journal(store, report, write=replay or repair)
    if replayed is None:
        return report
    geometry, images = replayed
    view = Overlay(store, images, geometry.block_size)
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
    if sb.repairing:
        interrupted = "a repair was interrupted: the bitmaps may not match the btree"
        report.problems.append(
            Problem("superblock", interrupted, 0, repairable=True, rule="repair-finished")
        )
    done = 0

    def advance(count: int) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, sb.exceptions)

    checker = Checker(view, sb, report, advance, collect=repair, committed=committed)
    try:
        checker.walk()
        check_summaries(view.block, sb, checker.problem)
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


def _check_journal(
    store: BlockDevice, report: CheckReport, *, write: bool
) -> tuple[Geometry, dict[int, bytes]] | None:
    """The geometry, and the images replay would write (none once `write` wrote them home).

    Notes the journal's problems in `report`; None when the check cannot go
    on (report.fatal says why).
    """
    try:
        geometry = read_geometry(store)
        report.geometry = geometry
        scan = scan_journal(store, geometry)
    except (StoreOpenError, StoreIOError) as exc:
        report.fatal = str(exc)
        return None
    report.journal_newest = scan.newest.record.sequence
    # Transactions with blocks to write home (the format's own has none).
    report.journal_transactions = sum(1 for txn in scan.replay if txn.record.homes)
    if scan.problem:
        report.problems.append(Problem("journal", scan.problem, repairable=True, rule="replay"))
    try:
        images, behind = _replay_images(store, geometry, scan)
        report.problems.extend(behind)
        if write:
            if behind:
                _replay_newer(store, geometry, scan, images)
            else:
                Journal.recover(store, geometry)
            report.replayed = True
            images = {}
    except (StoreOpenError, StoreIOError) as exc:
        report.fatal = f"replaying the journal: {exc}"
        return None
    return geometry, images


def _repair_and_verify(
    store: BlockDevice,
    geometry: Geometry,
    sb: Superblock,
    checker: Checker,
    fixes: list[tuple[int, int]],
    report: CheckReport,
) -> None:
    """Repair what the check found, then check again to see what is fixed."""
    structural = any(p.area in STRUCTURAL_AREAS for p in report.problems)
    try:
        if structural:
            salvage_store(store, geometry, sb, checker, report)
        else:
            rewrite_counts(store, geometry, sb, checker, fixes, report)
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
