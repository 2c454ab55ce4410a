"""csnap-check finds damage to each kind of metadata block in a real store
file, --repair salvages every readable mapping into a store that checks
clean, and every snapshot then reads its own data or, where the mapping was
lost, an error (docs/operations.md, "Repairing a store").
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from csnap_format import LOST_CHUNK, Geometry, decode_superblock
from csnapd.engine import FileDevice, MemoryDevice
from csnapd.engine.check import check_store
from csnapd.engine.journal import scan_journal
from tests.crash.repair_support import (
    ROOT,
    Built,
    assert_true_or_error,
    build,
    check_cli,
    erase_journal_copies,
    flip,
    lost_chunks,
    read_all,
    read_block,
    tree,
    write_block,
)
from tests.engine.helpers import CutDevice
from tests.engine.test_check import populated


def _survives(built: Built, damaged: tuple[int, int] | None) -> None:
    """Every exception outside the damaged range is in the repaired tree."""
    engine = built.engine()
    try:
        after = set(engine.exceptions(0, built.g.origin_chunks))
    finally:
        engine.close()
    for chunk, share, target in built.before:
        if damaged is None or not damaged[0] <= chunk < damaged[1]:
            assert (chunk, share, target) in after, f"chunk {chunk}'s mapping was not kept"


def _repair_and_read(built: Built) -> dict[int, set[int]]:
    code, report = check_cli(built.store, "--repair")
    assert code == 1, report
    assert all(p["repaired"] for p in report["problems"]) and not report["remaining"]
    assert check_cli(built.store)[0] == 0
    lost = lost_chunks(report)
    reads = read_all(built)
    assert_true_or_error(built, reads)
    for tag, chunks in reads.items():
        errors = {c for c, data in chunks.items() if data is None}
        assert errors == lost.get(tag, set()), f"snapshot {tag}: errors where nothing was lost"
    return lost


def test_a_flipped_byte_in_a_leaf_is_salvaged_from_the_journal(tmp_path: Path) -> None:
    built = build(tmp_path)
    _, children = tree(built)
    address, _, _ = children[-1]
    flip(built.store, address * built.g.block_size + 2000)
    code, report = check_cli(built.store, "--repair")
    assert code == 1 and report["recovered_from_scan"] > 0
    _survives(built, None)  # the journal's image of the leaf gave every copy back
    assert_true_or_error(built, read_all(built))


def test_a_flipped_byte_in_a_leaf(tmp_path: Path) -> None:
    built = build(tmp_path)
    _, children = tree(built)
    address, lo, hi = children[len(children) // 2]
    flip(built.store, address * built.g.block_size + 2000)
    erase_journal_copies(built, address)  # no other copy of the leaf survives

    code, report = check_cli(built.store)
    assert code == 4
    finding = next(p for p in report["problems"] if p["block"] == address)
    assert finding["area"] == "btree" and finding["rule"] == "block-decodes"
    assert finding["chunks"] == [lo, hi - 1] and finding["snapshots"] == [1, 2, 3]

    lost = _repair_and_read(built)
    _survives(built, (lo, hi))
    # Only the damaged leaf's range lost anything, and every copy it held is
    # lost for a snapshot that used it.
    assert lost and all(lo <= c < hi for chunks in lost.values() for c in chunks)
    for chunk, share, _ in built.before:
        if lo <= chunk < hi:
            for bit in range(3):
                if share >> bit & 1:
                    assert chunk in lost[bit + 1]


def test_a_flipped_byte_in_an_index_node(tmp_path: Path) -> None:
    built = build(tmp_path)
    root, children = tree(built)
    # The second entry's child address (entries of key, child, summary: 24 bytes
    # each from byte 48): that child is no longer reached.
    _, lo, hi = children[1]
    flip(built.store, root * built.g.block_size + 48 + 24 + 8, 0x01)

    code, report = check_cli(built.store)
    assert code == 4
    assert any(p["block"] == root and p["rule"] == "block-decodes" for p in report["problems"])

    lost = _repair_and_read(built)
    # The scan found the unreached leaf: no mapping is lost, only chunks of
    # its range that had no copy are marked (nothing can vouch for them).
    _survives(built, None)
    assert all(lo <= c < hi for chunks in lost.values() for c in chunks)


def test_a_zeroed_index_node(tmp_path: Path) -> None:
    built = build(tmp_path)
    root, _ = tree(built)
    write_block(built.store, built.g, root, bytes(built.g.block_size))

    code, report = check_cli(built.store)
    assert code == 4
    assert any("never written" in p["message"] for p in report["problems"]), report
    _repair_and_read(built)
    _survives(built, None)  # every leaf was found by the scan


def test_a_flipped_byte_in_a_bitmap_block(tmp_path: Path) -> None:
    built = build(tmp_path)
    flip(built.store, built.g.data_bitmap_start * built.g.block_size + 40 + 700)

    code, report = check_cli(built.store)
    assert code == 4
    assert any(
        p["area"] == "bitmap" and p["block"] == built.g.data_bitmap_start
        for p in report["problems"]
    )
    assert _repair_and_read(built) == {}
    _survives(built, None)


def test_a_flipped_byte_in_the_snapshot_table(tmp_path: Path) -> None:
    built = build(tmp_path)
    flip(built.store, 1024 + 48 + 8)  # snapshot 2's use count

    code, report = check_cli(built.store)
    assert code == 4
    finding = next(p for p in report["problems"] if p["area"] == "superblock")
    assert "checksum" in finding["message"] and "copy in the journal" in finding["message"]
    assert _repair_and_read(built) == {}
    _survives(built, None)
    sb = decode_superblock(read_block(built.store, built.g, 0))
    assert [r.tag for r in sb.snapshots if r is not None] == [1, 2, 3]


def test_a_flipped_byte_in_the_journal(tmp_path: Path) -> None:
    built = build(tmp_path)
    # Two transactions the next start would replay (the second writes no
    # data, so no sync made the first's home writes durable): damage the first.
    engine = built.engine()
    engine.origin_write([(1000, 5)])
    engine.commit()
    engine.create_snapshot(4)
    engine.commit()
    device = FileDevice(built.store, writable=False)
    scan = scan_journal(device, built.g)
    device.close()
    del engine  # a crash: the engine never closes
    first = min(seq for seq, (_, n) in scan.spans.items() if n > 1)
    slot = scan.spans[first][0]
    flip(built.store, (built.g.journal_start + slot + 1) * built.g.block_size + 100)

    code, report = check_cli(built.store)
    assert code == 4
    assert any(p["area"] == "journal" for p in report["problems"]), report
    code, report = check_cli(built.store, "--repair")
    assert code == 1, report
    assert check_cli(built.store)[0] == 0


def test_a_repair_cut_at_any_write_leaves_the_store_as_before_or_repaired() -> None:
    """A power cut at each write and sync of a salvage: the store checks as
    it did before the repair, or clean with the same mapping as a whole
    repair gives."""
    store, g, _ = populated()
    before, repaired = damage_a_leaf(store, g)
    rng = random.Random(5)
    outcomes = {"before": 0, "repaired": 0}
    budget = 0
    while True:
        cut = CutDevice(store.snapshot_copy(), budget)
        report = check_store(cut, repair=True)
        if not cut.cut:
            assert report.exit_code == 1
            break
        after = cut.inner.random_crash(rng)
        again = check_store(after.snapshot_copy())
        if again.exit_code == 0:
            assert _mapping(after) == repaired
            outcomes["repaired"] += 1
        else:
            assert sorted(map(str, again.problems)) == before
            outcomes["before"] += 1
        budget += 1
        assert budget < 2000
    assert outcomes["before"] and outcomes["repaired"], outcomes


def damage_a_leaf(store: MemoryDevice, g: Geometry) -> tuple[list[str], set[tuple[int, int, int]]]:
    """Flip a byte in the store's first leaf; what a check then finds, and
    the mapping a whole repair gives."""
    leaf = next(
        a
        for a in range(g.meta_start, g.meta_end)
        if store.read(a * g.block_size, g.block_size)[4:6] == b"\x05\x00"
    )
    store.write(leaf * g.block_size + 3000, b"\xee")
    store.sync()
    before = sorted(map(str, check_store(store.snapshot_copy()).problems))
    whole = store.snapshot_copy()
    assert check_store(whole, repair=True).exit_code == 1
    return before, _mapping(whole)


def _mapping(device: MemoryDevice) -> set[tuple[int, int, int]]:
    from csnapd.engine.dump import dump_store

    doc = dump_store(device.snapshot_copy())
    return {(c, s, LOST_CHUNK if t is None else t) for c, s, t in doc["exceptions"]}


def _changed(path: Path, offset: int, original: bytes) -> bool:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(len(original)) != original


def test_csnap_check_killed_during_repair(tmp_path: Path) -> None:
    """kill -9 a real --repair as soon as it has written into each area in
    turn (the new tree's blocks, the journal, the superblock): each time the
    store checks as before or clean; a repair then finishes the job."""
    built = build(tmp_path)
    g = built.g
    _, children = tree(built)
    address, _, _ = children[0]
    flip(built.store, address * g.block_size + 2500)
    pristine = built.store.read_bytes()
    before = check_cli(built.store)[1]["problems"]
    areas = {
        "tree": (g.meta_start * g.block_size, g.meta_blocks * g.block_size),
        "journal": (g.journal_start * g.block_size, g.journal_blocks * g.block_size),
        "superblock": (0, g.block_size),
    }
    outcomes = []
    for offset, length in areas.values():
        built.store.write_bytes(pristine)
        original = pristine[offset : offset + length]
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "csnap-check"), "--repair", str(built.store)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            if _changed(built.store, offset, original):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=30)
        code, report = check_cli(built.store)
        if code == 0:
            outcomes.append("repaired")
        else:
            assert code == 4 and report["problems"] == before, report
            outcomes.append("before")
    assert check_cli(built.store, "--repair")[0] in (0, 1)
    assert check_cli(built.store)[0] == 0
    print("kill -9 outcomes:", outcomes)


@pytest.mark.parametrize("seed", [11, 12])
def test_dump_after_repair_restores_to_the_same_metadata(tmp_path: Path, seed: int) -> None:
    built = build(tmp_path, seed)
    _, children = tree(built)
    flip(built.store, children[-1][0] * built.g.block_size + 1000)
    assert check_cli(built.store, "--repair")[0] == 1
    dump = tmp_path / "meta.json"
    assert check_cli(built.store, "--dump", str(dump))[0] == 0
    assert check_cli(built.store, "--restore", str(dump))[0] == 0
    again = tmp_path / "again.json"
    assert check_cli(built.store, "--dump", str(again))[0] == 0
    assert dump.read_text() == again.read_text()
    assert check_cli(built.store)[0] == 0


def test_progress_shows_on_stderr_when_asked(tmp_path: Path) -> None:
    built = build(tmp_path, writes=1)
    shim = str(ROOT / "tools" / "csnap-check")
    quiet = subprocess.run(
        [sys.executable, shim, str(built.store)], capture_output=True, text=True, check=False
    )
    shown = subprocess.run(
        [sys.executable, shim, "--progress", str(built.store)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert quiet.returncode == shown.returncode == 0
    assert quiet.stderr == "" and "checking [" in shown.stderr
    assert quiet.stdout == shown.stdout
