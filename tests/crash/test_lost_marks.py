"""Salvage marks lost only what may be lost (docs/rules.md): after a btree
node of a store built by a random history is destroyed, --repair leaves
every snapshot reading its own data or an error, and a snapshot none of
whose exceptions was under the destroyed node gets no lost mark at all.
"""

from __future__ import annotations

import random

from csnap_format import SnapshotState, decode_superblock
from csnapd.engine.check import check_store
from csnapd.engine.journal import scan_journal
from tests.crash.corruption import History, _read_everything, make_history

SEEDS = tuple(range(11, 17))
#: Nodes destroyed per history.
PER_HISTORY = 6


def _bits(history: History) -> dict[int, int]:
    """Live tag -> its share bit."""
    g, store = history.g, history.store
    images = scan_journal(store, g).images
    sb = decode_superblock(images.get(0) or store.read(0, g.block_size))
    # A deleted snapshot not yet swept keeps its record, perhaps with the tag
    # a newer snapshot took again.
    return {
        r.tag: bit
        for bit, r in enumerate(sb.snapshots)
        if r is not None and r.state == SnapshotState.LIVE
    }


def _under(history: History, address: int) -> list[tuple[int, int, int]]:
    """The exceptions of the leaves below node `address` (itself, if a leaf)."""
    if address in history.leaves:
        return history.leaves[address]
    # An index node: every leaf of the tree, a superset of those below it
    # (so the test exempts fewer snapshots than it could, never more).
    return [e for leaf in history.leaves.values() for e in leaf]


def test_snapshots_proven_complete_get_no_lost_marks() -> None:
    exempted = marked = 0
    for seed in SEEDS:
        history = make_history(seed, operations=80, late=2)
        bits = _bits(history)
        rng = random.Random(seed)
        for address in rng.sample(history.nodes, min(PER_HISTORY, len(history.nodes))):
            damaged = history.store.snapshot_copy()
            size = history.g.block_size
            damaged.write(address * size, bytes(size))
            report = check_store(damaged, repair=True)
            if report.exit_code == 0:  # the journal still held the node's image
                continue
            assert report.exit_code == 1, [str(p) for p in report.remaining]
            assert check_store(damaged.snapshot_copy()).exit_code == 0
            wrong = _read_everything(history, damaged)
            assert not wrong, f"node {address} destroyed: {wrong[:5]} read other data"
            carried = 0
            for _, share, _ in _under(history, address):
                carried |= share
            for tag, bit in bits.items():
                if carried >> bit & 1:
                    marked += tag in report.lost
                    continue
                assert tag not in report.lost, (
                    f"node {address} destroyed: snapshot {tag} had no exception under it"
                    f" but got lost marks {report.lost[tag]}"
                )
                exempted += 1
    # The histories exercise both sides of the rule.
    assert exempted > 0 and marked > 0, (exempted, marked)
