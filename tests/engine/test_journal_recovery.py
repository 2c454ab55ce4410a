"""Recovery takes a transaction only when every image in its slots carries the
transaction's own sequence (docs/format.md, "Image sequence rule"): intact
images left in the slots by an earlier use of the journal are stale, even
under a commit record whose payload CRC covers them.
"""

from __future__ import annotations

from csnap_format import CommitRecord, Geometry, encode_commit, payload_crc
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.journal import scan_journal
from tests.engine.helpers import assert_clean, new_store


def _write_slots(store: MemoryDevice, g: Geometry, first: int, blocks: list[bytes]) -> None:
    for i, block in enumerate(blocks):
        slot = (first + i) % g.journal_blocks
        store.write((g.journal_start + slot) * g.block_size, block)
    store.sync()


def _two_creates() -> tuple[MemoryDevice, MemoryDevice, Geometry, list[tuple[int, bytes]]]:
    """A store where snapshot 1 then snapshot 2 were created, one commit each;
    with the (home, image) pairs of snapshot 1's commit."""
    store, origin, g = new_store()
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.commit()
    first = scan_journal(store, g).newest
    older = list(zip(first.record.homes, first.images, strict=True))
    engine.create_snapshot(2)
    engine.commit()
    engine.close()
    return store, origin, g, older


def _next_free(store: MemoryDevice, g: Geometry) -> tuple[int, int]:
    """The slot and sequence a next transaction would take."""
    newest = scan_journal(store, g).newest
    slot = (newest.slot + len(newest.record.homes) + 1) % g.journal_blocks
    return slot, newest.record.sequence + 1


def _forge(
    store: MemoryDevice,
    g: Geometry,
    at: tuple[int, int],
    images: list[tuple[int, bytes]],
    *,
    tail_back: int = 0,
) -> tuple[int, int]:
    """A commit record at slot and sequence `at`, its CRC over `images`, with
    those images behind it; returns the slot and sequence after it."""
    slot, sequence = at
    record = CommitRecord(
        address=g.journal_start + slot,
        sequence=sequence,
        tail_sequence=sequence - tail_back,
        payload_crc=payload_crc(image for _, image in images),
        homes=tuple(home for home, _ in images),
    )
    _write_slots(store, g, slot, [encode_commit(record, g.context), *(i for _, i in images)])
    return (slot + len(images) + 1) % g.journal_blocks, sequence + 1


def test_a_stale_image_under_a_newer_record_is_not_replayed() -> None:
    store, origin, g, older = _two_creates()
    newest = scan_journal(store, g).newest.record.sequence
    # The images of snapshot 1's commit (a superblock without snapshot 2)
    # sit behind a record of the next sequence, whose CRC matches them.
    forged = newest + 1
    _forge(store, g, _next_free(store, g), older)
    scan = scan_journal(store, g)
    assert scan.newest.record.sequence == newest != forged
    engine = Engine.open(store, origin)
    assert engine.recovery.newest_sequence == newest
    assert [info.tag for info in engine.snapshots()] == [1, 2]
    engine.close()
    assert_clean(store)


def test_a_stale_image_inside_the_replay_range_stops_the_replay() -> None:
    store, origin, g, older = _two_creates()
    # Sequence n+1 holds stale images under a matching CRC; n+2, a record with
    # no blocks, names n+1 as its tail, so replay covers n+1.
    at = _next_free(store, g)
    stale = at[1]
    after = _forge(store, g, at, older)
    newest = after[1]
    _forge(store, g, after, [], tail_back=1)
    engine = Engine.open(store, origin)
    assert engine.recovery.newest_sequence == newest
    problem = engine.recovery.problem
    assert problem is not None and f"transaction {stale} is missing or damaged" in problem
    # Nothing of n+1 went home: snapshot 2 is still there.
    assert [info.tag for info in engine.snapshots()] == [1, 2]
    engine.close()
    assert_clean(store)
