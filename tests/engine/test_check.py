"""csnap-check finds each planted fault, names its block and chunk, and
--repair fixes the ones a recount can fix.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from csnap_format import (
    BitmapBlock,
    Geometry,
    block_checksum,
    decode_bitmap,
    decode_leaf,
    encode_bitmap,
    encode_leaf,
)
from csnapd.check_cli import main as check_main
from csnapd.engine import Engine, FileDevice, MemoryDevice
from csnapd.engine.check import check_store
from csnapd.engine.journal import scan_journal
from tests.engine.helpers import assert_clean, format_device, new_geometry

ROOT = Path(__file__).resolve().parents[2]


def populated() -> tuple[MemoryDevice, Geometry, Engine]:
    """A store with two snapshots, 600 exceptions in several leaves, closed."""
    g = new_geometry()
    store = MemoryDevice(g.store_bytes)
    format_device(store, g)
    origin = MemoryDevice(g.origin_bytes)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.origin_write([(0, 300)])
    engine.create_snapshot(2)
    engine.origin_write([(200, 300)])
    engine.commit()
    engine.close()
    # Open and close once more: the journal's replay window then holds only
    # superblock updates, so damage planted at home is what the check sees.
    engine = Engine.open(store, origin)
    engine.close()
    return store, g, engine


def leaf_addresses(store: MemoryDevice, g: Geometry) -> list[int]:
    engine = Engine.open(store.snapshot_copy(), MemoryDevice(g.origin_bytes))
    exceptions = engine.exceptions(0, g.origin_chunks)
    assert len(exceptions) > 400
    root = engine.status()  # depth > 0 means several leaves
    del root
    leaves = []
    for address in range(g.meta_start, g.meta_end):
        block = store.read(address * g.block_size, g.block_size)
        if block[4:6] == b"\x05\x00":
            leaves.append(address)
    return leaves


def rewrite(store: MemoryDevice, g: Geometry, address: int, block: bytes) -> None:
    store.write(address * g.block_size, block)
    store.sync()


def test_a_populated_store_is_clean() -> None:
    store, _, _ = populated()
    report = assert_clean(store)
    assert report.exceptions == 600  # chunks 200-299 have a copy per snapshot
    assert report.leaves >= 2 and report.depth >= 1


def test_leaked_chunk_is_found_and_repaired() -> None:
    store, g, _ = populated()
    ctx = g.context
    address = g.data_bitmap_start
    bitmap = decode_bitmap(store.read(address * g.block_size, g.block_size), ctx, address)
    bits = int.from_bytes(bitmap.bits, "little")
    leaked = g.store_chunks - 5
    bits |= 1 << leaked
    image = encode_bitmap(BitmapBlock(address, 9, bits.to_bytes(len(bitmap.bits), "little")), ctx)
    rewrite(store, g, address, image)
    report = check_store(store)
    leaks = [p for p in report.problems if "leaked" in p.message]
    assert leaks and leaks[0].chunk == leaked and leaks[0].block == address
    assert str(leaked) in leaks[0].message
    assert report.exit_code == 4
    repaired = check_store(store, repair=True)
    assert repaired.exit_code == 1 and repaired.repaired
    assert_clean(store)


def share_a_target(store: MemoryDevice, g: Geometry) -> tuple[int, int]:
    """Point the first leaf's second exception at its first one's chunk (btree
    damage only a salvage repairs); returns the leaf's address and that chunk."""
    address = leaf_addresses(store, g)[0]
    leaf = decode_leaf(store.read(address * g.block_size, g.block_size), g.context, address)
    targets = (leaf.targets[0], leaf.targets[0], *leaf.targets[2:])
    rewrite(store, g, address, encode_leaf(dataclasses.replace(leaf, targets=targets), g.context))
    return address, targets[0]


def test_doubly_used_chunk_is_found() -> None:
    store, g, _ = populated()
    address, chunk = share_a_target(store, g)
    report = check_store(store)
    doubles = [p for p in report.problems if "more than one exception" in p.message]
    assert doubles and doubles[0].chunk == chunk and doubles[0].block == address
    assert report.exit_code == 4


def test_flipped_bit_in_a_leaf_is_found() -> None:
    store, g, _ = populated()
    address = leaf_addresses(store, g)[0]
    offset = address * g.block_size + 3000
    store.write(offset, bytes([store.read(offset, 1)[0] ^ 0x08]))
    store.sync()
    report = check_store(store)
    assert any(p.block == address and "checksum mismatch" in p.message for p in report.problems)
    assert report.exit_code == 4
    damaged = next(p for p in report.problems if p.block == address)
    assert damaged.chunks is not None and damaged.chunks[0] == 0 and damaged.snapshots == (1, 2)
    repaired = check_store(store, repair=True)
    assert repaired.exit_code == 1, [str(p) for p in repaired.remaining]
    # The journal still holds the leaf's image: the salvage takes its copies
    # from there, one for snapshot 1 at every chunk of the leaf's range.
    # Snapshot 2 had none there, as its counters prove (docs/rules.md,
    # "salvage marks lost only what may be lost"): nothing is marked lost.
    assert repaired.recovered_from_scan > 0
    assert repaired.lost == {}
    assert check_store(store).exit_code == 0


def test_misdirected_write_is_found() -> None:
    store, g, _ = populated()
    first, second = leaf_addresses(store, g)[:2]
    image = store.read(first * g.block_size, g.block_size)
    rewrite(store, g, second, image)
    report = check_store(store)
    assert any(p.block == second and "misdirected" in p.message for p in report.problems)


def test_stale_block_is_found() -> None:
    g = new_geometry()
    store = MemoryDevice(g.store_bytes)
    format_device(store, g)
    origin = MemoryDevice(g.origin_bytes)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.origin_write([(0, 100)])
    engine.commit()
    engine.close()
    root = g.meta_start
    stale = store.read(root * g.block_size, g.block_size)
    engine = Engine.open(store, origin)
    engine.origin_write([(100, 50)])
    engine.close()
    Engine.open(store, origin).close()  # out of the journal's replay window
    rewrite(store, g, root, stale)  # a lost write: the older version came back
    report = check_store(store)
    assert report.exit_code == 4
    assert any("leaked" in p.message for p in report.problems)
    assert any(p.area == "counter" for p in report.problems)


def test_damage_inside_the_journals_replay_window_is_reported() -> None:
    g = new_geometry()
    store = MemoryDevice(g.store_bytes)
    format_device(store, g)
    engine = Engine.open(store, MemoryDevice(g.origin_bytes))
    engine.create_snapshot(1)
    engine.commit()
    engine.create_snapshot(2)
    engine.commit()
    scan = scan_journal(store, g)
    older = scan.replay[0]
    assert len(scan.replay) >= 2 and older.record.homes
    offset = (g.journal_start + older.slot) * g.block_size + 100
    store.write(offset, b"\xee")
    store.sync()
    report = check_store(store)
    journal = [p for p in report.problems if p.area == "journal"]
    assert (
        journal
        and f"transaction {older.record.sequence} is missing or damaged" in journal[0].message
    )
    assert report.exit_code == 4


def test_not_a_store_cannot_be_checked() -> None:
    report = check_store(MemoryDevice(1 << 20))
    assert report.exit_code == 8 and report.fatal and "not a usable csnap store" in report.fatal


# -- the command line ---------------------------------------------------------


def file_store(tmp_path: Path) -> Path:
    store, g, _ = populated()
    path = tmp_path / "store"
    path.write_bytes(store.read(0, g.store_bytes))
    return path


def test_cli_clean_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = file_store(tmp_path)
    assert check_main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "clean" in out and "600 exceptions" in out


def test_cli_json_and_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = file_store(tmp_path)
    g = new_geometry()
    with path.open("r+b") as f:
        f.seek(g.meta_start * g.block_size)  # clear the root leaf's bit: "used but marked free"
        address = g.meta_bitmap_start
        f.seek(address * g.block_size)
        block = bytearray(f.read(g.block_size))
        block[40] &= 0xFE
        struct.pack_into("<I", block, 8, block_checksum(block))
        f.seek(address * g.block_size)
        f.write(block)
    assert check_main(["--json", str(path)]) == 4
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 4
    problem = report["problems"][0]
    assert problem["area"] == "bitmap" and "used but marked free" in problem["message"]
    assert problem["chunk"] == g.meta_start and problem["repairable"]
    assert check_main(["--repair", str(path)]) == 1
    assert "all repaired" in capsys.readouterr().out
    assert check_main([str(path)]) == 0


def test_cli_refuses_a_store_in_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = file_store(tmp_path)
    holder = FileDevice(path, lock=True)
    try:
        assert check_main([str(path)]) == 8
        assert "in use by a running csnapd" in capsys.readouterr().err
    finally:
        holder.close()


def test_cli_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\x01" * 65536)
    assert check_main([str(path)]) == 8
    assert "cannot check" in capsys.readouterr().out


def test_tools_shim_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "csnap-check"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "exit status: 0 clean, 1" in out
