"""What the repair tests share: store files built by a seeded history of
snapshots and origin writes (with the contents each snapshot must read),
damage planted into their metadata, csnap-check run as a real process, and
every snapshot read back through the engine.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csnap_format import (
    Geometry,
    decode_index,
    decode_superblock,
)
from csnapd.engine import Engine, FileDevice, StoreCorruptError
from csnapd.engine.journal import Journal
from tests.engine.helpers import format_device, new_geometry, pattern, write_origin

ROOT = Path(__file__).resolve().parents[2]
#: csnap-check gets this long before the test fails.
CHECK_TIMEOUT = 120


@dataclass
class Built:
    """A store file, its origin, and what each snapshot must read."""

    store: Path
    origin: Path
    g: Geometry
    #: tag -> version of each chunk when the snapshot was taken.
    versions: dict[int, list[int]] = field(default_factory=dict)
    #: (chunk, share, store chunk) of every exception, before any damage.
    before: list[tuple[int, int, int]] = field(default_factory=list)

    def engine(self) -> Engine:
        return Engine.open(FileDevice(self.store), FileDevice(self.origin, writable=False))


def build(directory: Path, seed: int = 7, *, writes: int = 3) -> Built:
    """Three snapshots, each followed by `writes` origin writes; closed and
    checkpointed, so every metadata block at home is what a check sees."""
    g = new_geometry()
    store, origin = directory / "store.img", directory / "origin.img"
    for path, size in ((store, g.store_bytes), (origin, g.origin_bytes)):
        with path.open("wb") as f:
            f.truncate(size)
    device, origin_device = FileDevice(store), FileDevice(origin)
    format_device(device, g)
    engine = Engine.open(device, origin_device)
    rng = random.Random(seed)
    version = [0] * g.origin_chunks
    built = Built(store, origin, g)
    for tag in (1, 2, 3):
        engine.create_snapshot(tag)
        engine.commit()
        built.versions[tag] = list(version)
        for _ in range(writes):
            count = rng.randrange(40, 120)
            start = rng.randrange(0, g.origin_chunks - count)
            engine.origin_write([(start, count)])
            engine.commit()
            for chunk in range(start, start + count):
                version[chunk] += 1
                write_origin(origin_device, g, chunk, version[chunk])
    built.before = engine.exceptions(0, g.origin_chunks)
    engine.close()
    checkpoint(device, g)
    device.close()
    origin_device.close()
    return built


def checkpoint(device: FileDevice, g: Geometry) -> None:
    """Empty the journal's replay window: damage at home is then real."""
    journal, _ = Journal.recover(device, g)
    journal.checkpoint()


def flip(path: Path, offset: int, mask: int = 0x10) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
        os.fsync(f.fileno())


def write_block(path: Path, g: Geometry, address: int, block: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(address * g.block_size)
        f.write(block)
        os.fsync(f.fileno())


def read_block(path: Path, g: Geometry, address: int) -> bytes:
    with path.open("rb") as f:
        f.seek(address * g.block_size)
        return f.read(g.block_size)


def erase_journal_copies(built: Built, address: int) -> int:
    """Zero every journal slot holding an image of block `address`; how many."""
    g = built.g
    erased = 0
    for slot in range(g.journal_blocks):
        block = read_block(built.store, g, g.journal_start + slot)
        if block[:4] == b"CSNP" and int.from_bytes(block[16:24], "little") == address:
            write_block(built.store, g, g.journal_start + slot, bytes(g.block_size))
            erased += 1
    return erased


def tree(built: Built) -> tuple[int, list[tuple[int, int, int]]]:
    """The root (an index node) and its children as (address, lo, hi)."""
    g = built.g
    sb = decode_superblock(read_block(built.store, g, 0))
    assert sb.depth == 1, "the history should make a two-level tree"
    root = decode_index(read_block(built.store, g, sb.root), g.context, sb.root)
    bounds = [*root.keys[1:], g.origin_chunks]
    return sb.root, list(zip(root.children, root.keys, bounds, strict=True))


def check_cli(store: Path, *args: str) -> tuple[int, dict[str, Any]]:
    """csnap-check --json as a real process: its exit status and report."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "csnap-check"), "--json", *args, str(store)],
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert result.stdout, result.stderr
    return result.returncode, json.loads(result.stdout)


def lost_chunks(report: dict[str, Any]) -> dict[int, set[int]]:
    """tag -> chunks the repair reported lost."""
    return {
        int(tag): {c for start, count in runs for c in range(start, start + count)}
        for tag, runs in report["lost"].items()
    }


def read_all(built: Built) -> dict[int, dict[int, bytes | None]]:
    """Every chunk of every snapshot through the engine; None where it errs."""
    g = built.g
    engine = built.engine()
    origin = FileDevice(built.origin, writable=False)
    store = FileDevice(built.store, writable=False)
    out: dict[int, dict[int, bytes | None]] = {}
    try:
        for tag in built.versions:
            chunks: dict[int, bytes | None] = {}
            for start in range(0, g.origin_chunks, 64):
                try:
                    segments = engine.snapshot_read(tag, [(start, 64)])
                except StoreCorruptError:
                    segments = []
                    for chunk in range(start, start + 64):
                        try:
                            segments += engine.snapshot_read(tag, [(chunk, 1)])
                        except StoreCorruptError as exc:
                            # Only a lost mark may fail a read; any other
                            # corruption shows as data that is not the truth.
                            chunks[chunk] = None if "was lost" in str(exc) else b"?"
                for segment in segments:
                    device = origin if segment.store_chunk is None else store
                    first = segment.chunk if segment.store_chunk is None else segment.store_chunk
                    data = device.read(first * g.chunk_size, segment.count * g.chunk_size)
                    for i in range(segment.count):
                        chunks[segment.chunk + i] = data[i * g.chunk_size : (i + 1) * g.chunk_size]
            out[tag] = chunks
    finally:
        engine.close()
        origin.close()
        store.close()
    return out


def assert_true_or_error(built: Built, reads: dict[int, dict[int, bytes | None]]) -> None:
    """Every chunk reads its snapshot's own data, or an error; never other data."""
    size = built.g.chunk_size
    for tag, chunks in reads.items():
        assert len(chunks) == built.g.origin_chunks
        for chunk, data in chunks.items():
            if data is not None:
                want = pattern(chunk, built.versions[tag][chunk], size)
                assert data == want, f"snapshot {tag} chunk {chunk} reads other data"
