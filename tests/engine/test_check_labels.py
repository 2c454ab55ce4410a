"""csnap-check --repair labels each problem by what happened to it: [repaired]
only beside a problem a check after the repair no longer finds, [not
repaired] beside every other; the exit status is fsck's (1 all repaired, 4
problems left).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csnap_format import BitmapBlock, decode_bitmap, decode_superblock, encode_bitmap
from csnapd.check_cli import main as check_main
from csnapd.engine import Engine, FileDevice, MemoryDevice
from csnapd.engine.check import check_store
from csnapd.engine.journal import Journal
from tests.engine.helpers import format_device, new_geometry
from tests.engine.test_check import populated, rewrite, share_a_target
from tests.torture.faulty import Fault, FaultyDevice


def _leak_a_chunk(store: MemoryDevice) -> None:
    """Mark a free data chunk used: a problem --repair can fix."""
    _, g, _ = populated()
    address = g.data_bitmap_start
    bitmap = decode_bitmap(store.read(address * g.block_size, g.block_size), g.context, address)
    bits = int.from_bytes(bitmap.bits, "little") | 1 << (g.store_chunks - 5)
    image = encode_bitmap(
        BitmapBlock(address, 9, bits.to_bytes(len(bitmap.bits), "little")), g.context
    )
    rewrite(store, g, address, image)


def _share_a_target(store: MemoryDevice) -> None:
    """Point two exceptions at one chunk: btree damage --repair cannot fix."""
    _, g, _ = populated()
    share_a_target(store, g)


def _to_file(store: MemoryDevice, tmp_path: Path) -> Path:
    _, g, _ = populated()
    path = tmp_path / "store"
    path.write_bytes(store.read(0, g.store_bytes))
    return path


def _problem_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("problem:")]


def test_a_salvaged_btree_labels_its_problems_repaired_and_names_what_was_lost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _, _ = populated()
    _leak_a_chunk(store)
    _share_a_target(store)
    path = _to_file(store, tmp_path)

    assert check_main([str(path)]) == 4
    capsys.readouterr()
    assert check_main(["--repair", str(path)]) == 1
    out = capsys.readouterr().out
    lines = _problem_lines(out)
    assert any("leaked" in line for line in lines), out
    assert any("more than one exception" in line for line in lines), out
    assert lines and all(line.endswith(" [repaired]") for line in lines), out
    assert "lost: snapshot" in out and "all repaired" in out
    assert check_main(["--json", str(path)]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["lost_marks"] >= 1
    # A later check still names, per snapshot, the chunks marked lost.
    assert after["marked_lost"] and set(after["marked_lost"]) <= {"1", "2"}
    assert check_main([str(path)]) == 0
    assert "marked lost by a repair" in capsys.readouterr().out


def test_nothing_is_labelled_repaired_when_the_salvage_has_no_room(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A large, barely written origin: the last leaf covers nearly all of it,
    # and marking every chunk of its range lost needs more metadata blocks
    # than the store has. The snapshot's one exception makes its counters
    # prove nothing (docs/rules.md, "salvage marks lost only what may be lost").
    g = new_geometry(store_bytes=8 << 20, origin_bytes=512 << 20)
    store = MemoryDevice(g.store_bytes)
    format_device(store, g)
    origin = tmp_path / "origin"
    with origin.open("wb") as f:
        f.truncate(g.origin_bytes)
    engine = Engine.open(store, FileDevice(origin, writable=False))
    engine.create_snapshot(1)
    engine.commit()
    engine.origin_write([(0, 1)])
    engine.commit()
    engine.close()
    journal, _ = Journal.recover(store, g)
    journal.checkpoint()  # the leaf at home is then the only copy
    root = decode_superblock(store.read(0, g.block_size)).root
    store.write(root * g.block_size + 100, b"\xff")
    store.sync()
    path = tmp_path / "store"
    path.write_bytes(store.read(0, g.store_bytes))

    assert check_main(["--repair", str(path)]) == 4
    out = capsys.readouterr().out
    lines = _problem_lines(out)
    assert lines and all(line.endswith(" [not repaired]") for line in lines), out
    assert "[repaired]" not in out and "all repaired" not in out
    assert "repaired nothing: the metadata area has no room" in out
    assert check_main(["--repair", "--json", str(path)]) == 4
    report = json.loads(capsys.readouterr().out)
    assert report["repaired"] == [] and not any(p["repaired"] for p in report["problems"])


def test_each_repaired_problem_is_labelled_repaired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, _, _ = populated()
    _leak_a_chunk(store)
    path = _to_file(store, tmp_path)

    assert check_main([str(path)]) == 4
    out = capsys.readouterr().out
    assert _problem_lines(out) and "repaired]" not in out  # no repair asked: no labels

    assert check_main(["--repair", str(path)]) == 1
    out = capsys.readouterr().out
    lines = _problem_lines(out)
    assert lines and all(line.endswith(" [repaired]") for line in lines), out
    assert "all repaired" in out
    assert check_main([str(path)]) == 0


def test_a_repair_that_cannot_write_is_an_operational_error() -> None:
    # The writes --repair makes before its own (replaying the journal), on a
    # twin store: the fault lets those through and fails every later one.
    twin, _g, _ = populated()
    _leak_a_chunk(twin)
    counting = FaultyDevice(twin)
    check_store(counting, replay=True)
    store, _g, _ = populated()
    _leak_a_chunk(store)
    faulty = FaultyDevice(store, lose_on_failed_sync=False)
    faulty.arm(Fault("write", nth=counting.counts["write"], times=1 << 20))
    report = check_store(faulty, repair=True)
    assert report.fatal is not None and report.fatal.startswith("repairing:")
    assert report.exit_code == 8 and not report.repaired
    assert not any(report.was_repaired(p) for p in report.problems)
    # Nothing reached the store: it still has the problem, and repairs now.
    assert check_store(store).exit_code == 4
    assert check_store(store, repair=True).exit_code == 1
