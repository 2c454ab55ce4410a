"""What a salvage may take from leaves the tree no longer reaches, and how a
damaged index node's keys are read (docs/rules.md, "salvage keeps the newest
readable copy"): a freed block's older image of a leaf never stands in for a
lost leaf, and a flipped bit in an index key loses no mapping.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from csnap_format import FormatError, Geometry, decode_index, decode_leaf, decode_superblock
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.check import check_store
from csnapd.engine.check_index import meta_bitmap
from csnapd.engine.check_report import Runs
from csnapd.engine.check_walk import Overlay
from csnapd.engine.journal import Journal, committed_images, scan_journal
from tests.crash.corruption import History, _map, _read_everything, erase_journal_images
from tests.crash.repair_support import (
    assert_true_or_error,
    build,
    check_cli,
    flip,
    lost_chunks,
    read_all,
    tree,
)
from tests.engine.helpers import format_device, new_geometry, pattern


def _reused_history() -> History:
    """Snapshot 1's copies of chunks 0..599, deleted and swept (its leaves
    merge away, their blocks freed with their images left in them); then
    snapshot 3 takes its share bit again, and its copies, in a store this
    small, reuse the freed store chunks."""
    g = new_geometry(store_bytes=4 << 20, origin_bytes=4 << 20)
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    engine = Engine.open(store, origin)
    size = g.chunk_size
    version = [0] * g.origin_chunks
    truth: dict[int, list[int]] = {}

    def origin_write(start: int, count: int) -> None:
        engine.origin_write([(start, count)])
        engine.commit()
        for chunk in range(start, start + count):
            version[chunk] += 1
            origin.write(chunk * size, pattern(chunk, version[chunk], size))

    engine.create_snapshot(1)
    origin_write(0, 600)
    engine.create_snapshot(2)
    truth[2] = list(version)
    origin_write(0, 200)
    engine.delete_snapshot(1)
    while engine.sweep_pending:
        engine.sweep()
    engine.create_snapshot(3)
    truth[3] = list(version)
    origin_write(700, 300)
    for segment in engine.snapshot_write(3, [(700, 250)]):
        for i in range(segment.count):
            chunk = segment.chunk + i
            store.write((segment.store_chunk + i) * size, pattern(chunk, 5000 + chunk, size))
            truth[3][chunk] = 5000 + chunk
    engine.commit()
    engine.close()
    journal, _ = Journal.recover(store, g)
    journal.checkpoint()
    history = History(store, origin, g, truth, store.snapshot_copy())
    _map(history)
    return history


def test_a_freed_leaf_image_never_stands_in_for_a_lost_leaf() -> None:
    history = _reused_history()
    g, store = history.g, history.store
    used = meta_bitmap(Overlay(store, {}, g.block_size).block, g)
    live_targets = {t for rows in history.leaves.values() for _, _, t in rows}
    freed = []
    for address in range(g.meta_start, g.meta_end):
        block = store.read(address * g.block_size, g.block_size)
        if block[4:6] == b"\x05\x00" and not used(address):
            freed.append(decode_leaf(block, g.context, address))
    # The premise: freed images whose copies live snapshots' exceptions now use.
    stale = [leaf for leaf in freed if set(leaf.targets) & live_targets]
    assert stale, "the history should leave freed leaf images with reused copies"
    base = stale[0].base_chunk
    # Destroy the leaf that now holds the freed images' range, and every
    # other image of it: only the freed images are left to claim the range.
    victim = max(
        (a for a, rows in history.leaves.items() if rows and rows[0][0] <= base),
        key=lambda a: history.leaves[a][0][0],
    )
    damaged = store.snapshot_copy()
    damaged.write(victim * g.block_size, bytes(g.block_size))
    erase_journal_images(damaged, g, victim)
    report = check_store(damaged, repair=True)
    assert report.exit_code == 1, [str(p) for p in report.remaining]
    assert report.recovered_from_scan == 0
    assert check_store(damaged.snapshot_copy()).exit_code == 0
    assert report.lost, "the destroyed leaf's copies are lost, and say so"
    wrong = _read_everything(history, damaged)
    assert not wrong, f"{wrong[:5]} read other data"


@pytest.mark.parametrize(
    ("entry", "bit"),
    [(3, 2), (3, 5)],
    ids=["key-raised", "key-lowered"],
)
def test_a_flipped_bit_in_an_index_key_loses_no_mapping(
    tmp_path: Path, entry: int, bit: int
) -> None:
    built = build(tmp_path)
    root, children = tree(built)
    assert len(children) > entry
    # Entries of key, child, summary (24 bytes each) from byte 48.
    flip(built.store, root * built.g.block_size + 48 + 24 * entry, 1 << bit)
    code, report = check_cli(built.store)
    assert code == 4
    assert any(p["block"] == root and p["rule"] == "block-decodes" for p in report["problems"])
    code, report = check_cli(built.store, "--repair")
    assert code == 1 and not report["remaining"], report
    assert check_cli(built.store)[0] == 0
    # The children vouched for the true keys: the walk reached every leaf.
    assert lost_chunks(report) == {} and report["recovered_from_scan"] == 0
    engine = built.engine()
    try:
        assert sorted(engine.exceptions(0, built.g.origin_chunks)) == sorted(built.before)
    finally:
        engine.close()
    assert_true_or_error(built, read_all(built))


def test_a_store_with_more_lost_marks_than_data_chunks_opens() -> None:
    """Lost marks count as exceptions but take no data chunk: a repair that
    marks many leaves a store whose exceptions outnumber the data area's
    chunks, and the store still opens and reads."""
    history = _reused_history()
    g = history.g
    damaged = history.store.snapshot_copy()
    root = decode_superblock(damaged.read(0, g.block_size)).root
    damaged.write(root * g.block_size, bytes(g.block_size))
    erase_journal_images(damaged, g, root)
    report = check_store(damaged, repair=True)
    assert report.exit_code == 1, [str(p) for p in report.remaining]
    assert decode_superblock(damaged.read(0, g.block_size)).exceptions > g.data_chunks
    assert not _read_everything(history, damaged)


def test_lost_runs_read_the_same_packed_or_as_a_bitmap() -> None:
    """The lost chunks a repair reports are kept as packed runs, or as a
    bitmap once that is smaller (every other chunk lost): both read alike."""
    rng = random.Random(3)
    for density in (0.01, 0.5, 0.97):
        chunks = sorted(c for c in range(5000) if rng.random() < density)
        runs = Runs()
        expected: list[tuple[int, int]] = []
        for chunk in chunks:
            runs.add(chunk)
            if expected and sum(expected[-1]) == chunk:
                expected[-1] = (expected[-1][0], expected[-1][1] + 1)
            else:
                expected.append((chunk, 1))
        assert list(runs) == expected and len(runs) == len(expected)
        assert runs[:8] == expected[:8] and runs[-1] == expected[-1]


def test_a_second_salvage_never_takes_a_ring_image_older_than_the_first_wrote() -> None:
    """The first repair's tree goes to no block with an image in the
    journal's ring: a second repair that finds such a block damaged cannot
    take its older image for it."""
    history = _reused_history()
    g = history.g
    victim = sorted(history.leaves)[-1]
    first = history.store.snapshot_copy()
    first.write(victim * g.block_size, bytes(g.block_size))
    erase_journal_images(first, g, victim)
    assert check_store(first, repair=True).exit_code == 1
    ring = committed_images(first, g, scan_journal(first, g).newest.record.sequence)
    used = meta_bitmap(Overlay(first, {}, g.block_size).block, g)
    rebuilt = [a for a in range(g.meta_start, g.meta_end) if used(a) and _is_node(first, g, a)]
    assert rebuilt and not set(rebuilt) & set(ring), "the rebuilt tree reuses ring homes"
    for address in rebuilt:
        second = first.snapshot_copy()
        second.write(address * g.block_size, bytes(g.block_size))
        check_store(second, repair=True)
        assert _read_everything(history, second) == [], f"block {address} damaged"


def _is_node(store: MemoryDevice, g: Geometry, address: int) -> bool:
    """Whether block `address` holds a btree node, a leaf or an index node."""
    block = store.read(address * g.block_size, g.block_size)
    for decode in (decode_leaf, decode_index):
        try:
            decode(block, g.context, address)
        except FormatError:
            continue
        return True
    return False
