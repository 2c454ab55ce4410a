"""A store whose revert counts more chunks restored than in all (as servers
that applied origin writes during a revert left it) is refused with a
pointer to the repair; csnap-check reports it, and --repair recounts it,
alone or along with a salvage of other damage, so that the store opens and
the revert finishes."""

from __future__ import annotations

import pytest

from csnap_format import Geometry, decode_superblock
from csnapd.engine import Engine, MemoryDevice, StoreOpenError
from csnapd.engine import revert as revert_module
from csnapd.engine.check import check_store
from csnapd.engine.journal import Journal
from tests.engine.helpers import assert_clean, pattern, read_snapshot, reverting

CHUNKS = 64
#: Chunks one revert step restores here: small, so the revert is cut mid-way.
STEP_CHUNKS = 4


def _overcounted(monkeypatch: pytest.MonkeyPatch) -> tuple[MemoryDevice, MemoryDevice, Geometry]:
    """A store closed mid-revert with 12 chunks counted restored of 8."""
    monkeypatch.setattr(revert_module, "RESTORE_CHUNKS_PER_STEP", STEP_CHUNKS)
    engine, store, origin, g = reverting(CHUNKS)
    # What those servers did: applied an origin write while the revert ran,
    # which gave snapshot 1 copies its total (8) never counted.
    engine.origin_write([(8, 16)])
    engine.commit()
    while (progress := engine.revert_progress) is not None and progress.restored <= 8:
        engine.revert_step()
        engine.commit()
    assert progress is not None and progress.restored == 12 and progress.cursor == 12
    engine.set_registered_clients(frozenset({5}))  # a client registry block
    engine.commit()
    engine.close()
    return store, origin, g


def _finishes(store: MemoryDevice, origin: MemoryDevice, g: Geometry) -> None:
    """The repaired store opens, the revert runs to its end, and all is as it was."""
    revert = decode_superblock(store.read(0, g.block_size)).revert
    assert revert is not None and (revert.cursor, revert.restored, revert.total) == (12, 12, 24)
    engine = Engine.open(store, origin)
    engine.finish_revert()
    assert engine.revert_progress is None
    for chunk in range(CHUNKS):
        assert origin.read(chunk * g.chunk_size, g.chunk_size) == pattern(chunk, 1, g.chunk_size)
    assert read_snapshot(engine, store, origin, 1, 0, CHUNKS) == [
        pattern(chunk, 1, g.chunk_size) for chunk in range(CHUNKS)
    ]
    engine.close()
    assert_clean(store)


def test_an_overcounted_revert_is_refused_reported_and_recounted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, origin, g = _overcounted(monkeypatch)
    with pytest.raises(StoreOpenError, match=r"12 chunks restored of 8 \(csnap-check --repair"):
        Engine.open(store, origin)

    report = check_store(store)
    assert report.fatal is None
    [problem] = report.problems
    assert problem.rule == "revert-counts" and problem.repairable
    assert "counts 12 of 8 chunks restored; recount: 12 passed of 24" in problem.message

    repaired = check_store(store, repair=True)
    assert repaired.fatal is None and repaired.fixed == set(repaired.problems)
    assert any("recounted the revert's progress" in line for line in repaired.repaired)
    _finishes(store, origin, g)


@pytest.mark.parametrize("damaged", ["registry", "superblock"])
def test_a_salvage_recounts_an_overcounted_revert_too(
    monkeypatch: pytest.MonkeyPatch, damaged: str
) -> None:
    """Damage only a salvage repairs, beside the overcount: one repair mends
    both. A damaged block 0 is read from its newest copy in the journal."""
    store, origin, g = _overcounted(monkeypatch)
    journal, _ = Journal.recover(store, g)
    journal.checkpoint()  # replay would write the damaged block over
    sb = decode_superblock(store.read(0, g.block_size), revert_overcount=True)
    address = sb.registry if damaged == "registry" else 0
    block = bytearray(store.read(address * g.block_size, g.block_size))
    block[200] ^= 0xFF
    store.write(address * g.block_size, bytes(block))

    report = check_store(store)
    assert report.fatal is None
    assert {p.area for p in report.problems} == {damaged, "counter"}
    assert "revert-counts" in {p.rule for p in report.problems}

    repaired = check_store(store, repair=True)
    assert repaired.fatal is None, repaired.fatal
    assert repaired.fixed == set(repaired.problems), repaired.remaining
    assert any("rebuilt the btree" in line for line in repaired.repaired)
    _finishes(store, origin, g)
