"""A stale copy of the client registry block is found by the version the
superblock records for it (docs/format.md, "Client registry state"), even
after the journal has moved past the newer image; --repair replaces it.
A superblock without the field (0) opens and checks as before.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from csnap_format import (
    BlockHeader,
    BlockType,
    FormatError,
    decode_registry,
    decode_superblock,
    encode_superblock,
    read_header,
)
from csnapd.check_cli import main as check_main
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.check import check_store
from csnapd.engine.journal import Journal
from tests.engine.helpers import format_device, new_geometry


def _store_with_registry() -> tuple[MemoryDevice, MemoryDevice, int, bytes]:
    """A store whose registry was written twice; its address and first image.

    Closed and checkpointed, and with every journal slot holding an image of
    the registry zeroed: the journal no longer knows any version of it.
    """
    g = new_geometry()
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    engine = Engine.open(store, origin)
    engine.create_snapshot(1)
    engine.set_registered_clients(frozenset({11, 12, 13}))
    engine.commit()
    address = decode_superblock(_block(store, 0)).registry
    journal_image = _journal_image(store, address)
    engine.set_registered_clients(frozenset({14}))
    engine.commit()
    engine.close()
    journal, _ = Journal.recover(store, g)
    journal.checkpoint()
    for slot in range(g.journal_blocks):
        at = (g.journal_start + slot) * g.block_size
        header = _registry_header(store.read(at, g.block_size))
        if header is not None and header.address == address:
            store.write(at, bytes(g.block_size))
    return store, origin, address, journal_image


def _block(device: MemoryDevice, address: int) -> bytes:
    size = new_geometry().block_size
    return device.read(address * size, size)


def _registry_header(block: bytes) -> BlockHeader | None:
    """The header of a journal slot holding a registry image, else None."""
    try:
        return read_header(block, BlockType.REGISTRY, address=None, store_id=None)
    except FormatError:
        return None


def _journal_image(device: MemoryDevice, address: int) -> bytes:
    """The newest image of block `address` among the journal's slots."""
    g = new_geometry()
    best: tuple[int, bytes] | None = None
    for slot in range(g.journal_blocks):
        block = _block(device, g.journal_start + slot)
        header = _registry_header(block)
        if header is None or header.address != address:
            continue
        if best is None or header.sequence > best[0]:
            best = (header.sequence, block)
    assert best is not None, "the registry's image should be in the journal"
    return best[1]


def test_the_superblock_names_the_registry_version() -> None:
    store, _, address, _ = _store_with_registry()
    sb = decode_superblock(_block(store, 0))
    registry = decode_registry(_block(store, address), sb.geometry.context, address)
    assert registry.clients == (14,)
    assert sb.registry_sequence == registry.sequence > 0
    assert check_store(store).exit_code == 0


def test_a_stale_registry_copy_is_found_and_repaired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, origin, address, stale = _store_with_registry()
    g = new_geometry()
    store.write(address * g.block_size, stale)
    path = tmp_path / "store"
    path.write_bytes(store.read(0, g.store_bytes))

    assert check_main(["--json", str(path)]) == 4
    report = json.loads(capsys.readouterr().out)
    found = [p for p in report["problems"] if p["rule"] == "registry-sequence"]
    assert [p["area"] for p in found] == ["registry"], report["problems"]
    assert found[0]["block"] == address and "write was lost" in found[0]["message"]

    assert check_main(["--repair", "--json", str(path)]) == 1
    repaired = json.loads(capsys.readouterr().out)
    assert repaired["remaining"] == [] and all(p["repaired"] for p in repaired["problems"])
    assert check_main(["--json", str(path)]) == 0
    capsys.readouterr()
    # Which clients were connected is unknown: the next server waits for all.
    fixed = MemoryDevice(g.store_bytes)
    fixed.write(0, path.read_bytes())
    engine = Engine.open(fixed, origin)
    try:
        assert engine.registered_clients() == (frozenset(), True)
    finally:
        engine.close()


def test_a_store_without_the_registry_version_opens_and_checks() -> None:
    store, origin, address, _ = _store_with_registry()
    sb = decode_superblock(_block(store, 0))
    store.write(0, encode_superblock(dataclasses.replace(sb, registry_sequence=0)))
    assert check_store(store.snapshot_copy()).exit_code == 0
    engine = Engine.open(store, origin)
    try:
        assert engine.registered_clients() == (frozenset({14}), False)
        engine.set_registered_clients(frozenset({15}))
        engine.commit()
    finally:
        engine.close()
    assert check_store(store.snapshot_copy()).exit_code == 0
    journal, _ = Journal.recover(store, sb.geometry)
    journal.checkpoint()
    now = decode_superblock(_block(store, 0))
    registry = decode_registry(_block(store, address), sb.geometry.context, address)
    assert registry.clients == (15,)
    assert now.registry_sequence == registry.sequence > sb.registry_sequence
