"""A repair whose bitmaps take several transactions (docs/format.md,
"State"; docs/operations.md, `repair-finished`): the superblock is marked
repairing before the first, so a power cut at any write between leaves a
store that checks as before, or is refused by csnapd until the repair has
been run again, or is repaired; never the old tree with the new bitmaps
open to a server.
"""

from __future__ import annotations

import random

import pytest

from csnap_format import LOST_CHUNK, decode_superblock, plan_geometry
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.check import check_store
from csnapd.engine.errors import StoreOpenError
from csnapd.engine.journal import Journal
from tests.crash.test_repair import _mapping, damage_a_leaf
from tests.engine.helpers import CutDevice, format_device


def _store_with_wide_bitmaps() -> tuple[MemoryDevice, MemoryDevice]:
    """A store sized to grow to 9 GiB, whose data bitmap then takes more
    blocks than one transaction holds, with two snapshots' copies."""
    g = plan_geometry(
        store_bytes=160 << 20,
        origin_bytes=8 << 20,
        journal_bytes=256 << 10,
        max_store_bytes=9 << 30,
        uuid=bytes(range(16)),
        created_ns=1_700_000_000_000_000_000,
    )
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    engine = Engine.open(store, origin)
    assert g.data_bitmap_blocks + g.meta_bitmap_blocks > engine.max_transaction_blocks
    engine.create_snapshot(1)
    engine.origin_write([(0, 300)])
    engine.create_snapshot(2)
    engine.origin_write([(200, 300)])
    engine.commit()
    engine.close()
    Journal.recover(store, g)[0].checkpoint()
    return store, origin


def test_a_repair_cut_between_its_transactions_is_finished_by_the_next() -> None:
    store, origin = _store_with_wide_bitmaps()
    g = decode_superblock(store.read(0, 4096)).geometry
    before, repaired = damage_a_leaf(store, g)
    rng = random.Random(9)
    outcomes = {"before": 0, "refused": 0, "repaired": 0}
    for budget in range(2000):
        cut = CutDevice(store.snapshot_copy(), budget)
        report = check_store(cut, repair=True)
        if not cut.cut:
            assert report.exit_code == 1
            break
        after = cut.inner.random_crash(rng)
        again = check_store(after.snapshot_copy())
        if any(problem.rule == "repair-finished" for problem in again.problems):
            # Cut between its transactions: nothing opens it but the repair.
            with pytest.raises(StoreOpenError, match="csnap-check --repair"):
                Engine.open(after.snapshot_copy(), origin)
            assert again.exit_code == 4
            finished = check_store(after, repair=True)
            assert finished.exit_code == 1, finished.remaining
            assert check_store(after.snapshot_copy()).exit_code == 0
            # The same copies; the first attempt's leaves, found only by the
            # scan, prove no snapshot complete, so more may read as lost.
            finished_map = _mapping(after)
            assert _copies(finished_map) == _copies(repaired)
            assert finished_map >= repaired
            Engine.open(after, origin).close()
            outcomes["refused"] += 1
        elif again.exit_code == 0:
            assert _mapping(after) == repaired
            outcomes["repaired"] += 1
        else:
            assert sorted(map(str, again.problems)) == before
            outcomes["before"] += 1
    else:
        raise AssertionError("the repair never ended")
    assert all(outcomes.values()), outcomes


def _copies(mapping: set[tuple[int, int, int]]) -> set[tuple[int, int, int]]:
    """The exceptions of `mapping` that are copies, not lost marks."""
    return {entry for entry in mapping if entry[2] != LOST_CHUNK}
