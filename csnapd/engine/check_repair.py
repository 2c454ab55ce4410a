"""Repairs a check makes: a salvage of the btree, or rewritten bitmaps and counters.

A store whose btree, registry or superblock is damaged is salvaged: the
btree is rebuilt from every readable leaf (csnapd.engine.salvage) and the
store switched to it in one journaled transaction. Otherwise the bitmap
blocks and counters that disagree with the recount are rewritten through
the journal. Both work from what the walk (csnapd.engine.check_walk) kept.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace

from csnap_format import (
    HEADER_SIZE,
    FormatError,
    Geometry,
    Registry,
    Superblock,
    decode_bitmap,
    decode_leaf,
    encode_superblock,
    revert_overcounted,
)
from csnapd.engine.check_index import meta_bitmap
from csnapd.engine.check_report import CheckReport
from csnapd.engine.check_walk import Checker, Overlay
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import StoreIOError
from csnapd.engine.journal import Journal
from csnapd.engine.pages import BitmapPage, encode_page
from csnapd.engine.salvage import LeafSource, salvage, scan_leaves, write_tree
from csnapd.engine.state import StoreState


def _current(sources: list[LeafSource], used: Callable[[int], bool]) -> list[LeafSource]:
    """The unreached leaves that may be the tree's own: in a block the metadata
    bitmap marks used (a freed block keeps the image of a leaf merged away,
    whose copies may since have been reused), and the newest image of each
    block (the journal may hold an older one)."""
    newest: dict[int, LeafSource] = {}
    for source in sources:
        address = source.address
        if not used(address):
            continue
        kept = newest.get(address)
        if kept is None or source.sequence > kept.sequence:
            newest[address] = source
    return list(newest.values())


def _data_bitmap(view: Overlay, g: Geometry) -> Callable[[int], bool] | None:
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


def _journal_leaves(
    committed: dict[int, tuple[int, bytes]], g: Geometry, reached: set[int]
) -> list[LeafSource]:
    """The leaves among the journal's committed images, but for the leaves
    the walk read (`reached`): salvage sources too."""
    out = []
    for home, (_, image) in committed.items():
        if home in reached:
            continue
        if g.meta_start <= home < g.meta_end and image[4:6] == b"\x05\x00":
            try:
                leaf = decode_leaf(image, g.context, home)
                out.append(LeafSource(home, leaf.sequence, reached=False, image=image))
            except FormatError:
                continue
    return out


#: Areas whose problems only a salvage (a rebuilt btree) repairs.
STRUCTURAL_AREAS = frozenset({"btree", "registry", "superblock"})


def _sources(checker: Checker, g: Geometry) -> tuple[set[int], list[LeafSource]]:
    """The blocks the walk reached, and the leaves a salvage merges: those
    reached, and, when a range is damaged, those of the scan and the journal
    that may be the tree's own (`_current`)."""
    reached = {
        g.meta_start + (at << 3) + bit
        for at, byte in enumerate(checker.meta_refs)
        if byte
        for bit in range(8)
        if byte >> bit & 1
    }
    sources = list(checker.sources)
    if checker.damaged:
        found = scan_leaves(checker.view.block, g, reached)
        decoded = {source.address for source in sources}
        found += _journal_leaves(checker.committed, g, decoded)
        sources += _current(found, meta_bitmap(checker.view.block, g))
    return reached, sources


def salvage_store(
    store: BlockDevice,
    geometry: Geometry,
    sb: Superblock,
    checker: Checker,
    report: CheckReport,
) -> None:
    """Rebuild the btree from every readable leaf and switch the store to it."""
    g = geometry
    reached, sources = _sources(checker, g)
    # Counters prove snapshots complete only in a superblock found whole and
    # current, with a journal whose replay agrees with the blocks at home.
    trusted = not any(p.area in ("superblock", "journal") for p in report.problems)
    result = salvage(
        sources,
        checker.damaged,
        sb,
        checker.view.block,
        _data_bitmap(checker.view, g),
        counters_trusted=trusted,
    )
    avoid = reached | {source.address for source in sources}
    registry: Registry | None = None
    keep = False
    if checker.registry_block is not None and not checker.registry_damaged:
        registry, keep = checker.registry_block, True
    elif sb.registry:
        # Which clients were connected is unknown: the overflow flag makes
        # the next server wait the whole grace period for their locks.
        registry = Registry(0, 0, (), overflow=True)
    written = write_tree(
        store, g, sb, result.groups(), avoid=avoid, registry=registry, keep_registry=keep
    )
    tags = checker.tags
    report.lost = {tags[bit]: runs for bit, runs in sorted(result.lost.items())}
    report.recovered_from_scan = result.from_scan
    scanned = sum(1 for source in sources if not source.reached)
    report.repaired.append(
        f"rebuilt the btree from {len(sources) - scanned} reached and {scanned} scanned leaves:"
        f" {written.exceptions} exceptions ({result.from_scan} recovered by the scan,"
        f" {result.conflicts} dropped as conflicts, {result.stray} of no snapshot dropped)"
        f" in {written.blocks} blocks; rewrote the bitmaps, free counts and snapshot counters"
    )
    if registry is not None and not keep:
        report.repaired.append("wrote an empty client registry that makes the server wait")


def rewrite_counts(
    store: BlockDevice,
    geometry: Geometry,
    sb: Superblock,
    checker: Checker,
    fixes: list[tuple[int, int]],
    report: CheckReport,
) -> None:
    """Rewrite the given bitmap blocks and the counters, through the journal."""
    journal, _ = Journal.recover(store, geometry)
    state = StoreState.from_superblock(sb)
    state.meta_free = geometry.meta_blocks - report.meta_used
    state.data_free = geometry.data_chunks - report.data_used
    state.exceptions = checker.exceptions
    revert = state.revert
    if revert is not None and revert_overcounted(sb):
        total = checker.unique[revert.bit] + checker.shared[revert.bit]
        state.revert = replace(revert, restored=checker.revert_passed, total=total)
    for bit, record in enumerate(state.snapshots):
        if record is not None:
            state.unique[bit], state.shared[bit] = (
                checker.unique[bit],
                checker.shared[bit],
            )
    nbytes = geometry.block_size - HEADER_SIZE
    pages = [BitmapPage(address, nbytes, bits) for address, bits in fixes]
    per = journal.max_blocks - 1
    try:
        for start in range(0, max(len(pages), 1), per):
            batch = pages[start : start + per]
            encode = functools.partial(_encode_repair, batch, state, geometry)
            journal.commit(len(batch) + 1, encode, data_written=False)
        journal.sync()
    except OSError as exc:
        raise StoreIOError(f"writing the repair: {exc.strerror or exc}") from exc
    report.repaired.append(
        f"rewrote {len(fixes)} bitmap blocks, the free counts and the snapshot counters"
        + (", and recounted the revert's progress" if revert_overcounted(sb) else "")
    )


def _encode_repair(
    batch: list[BitmapPage], state: StoreState, geometry: Geometry, sequence: int
) -> list[tuple[int, bytes]]:
    images = [(page.address, encode_page(page, sequence, geometry)) for page in batch]
    images.append((0, encode_superblock(state.to_superblock(geometry, sequence))))
    return images
