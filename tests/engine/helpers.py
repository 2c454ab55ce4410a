"""Helpers for engine tests: formatted memory stores, recognisable chunk
contents, a device that loses power on cue, and reading through the engine.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from csnap_format import Geometry, format_blocks, plan_geometry
from csnapd.engine import BlockDevice, DeviceStats, Engine, MemoryDevice
from csnapd.engine.check import CheckReport, check_store

UUID = bytes(range(16))


def still_timer() -> float:
    """A step timer that stands still: background steps end by their counts
    only, so a model run replays exactly however loaded the machine (hypothesis
    needs that)."""
    return 0.0


def new_geometry(
    *,
    store_bytes: int = 32 << 20,
    origin_bytes: int = 8 << 20,
    chunk_size: int = 4096,
    block_size: int = 4096,
    journal_bytes: int | None = 256 << 10,
) -> Geometry:
    return plan_geometry(
        store_bytes=store_bytes,
        origin_bytes=origin_bytes,
        chunk_size=chunk_size,
        block_size=block_size,
        journal_bytes=journal_bytes,
        uuid=UUID,
        created_ns=1_700_000_000_000_000_000,
    )


def format_device(device: BlockDevice, g: Geometry) -> None:
    for address, block in format_blocks(g):
        device.write(address * g.block_size, block)
    device.sync()


def new_store(**kw: int | None) -> tuple[MemoryDevice, MemoryDevice, Geometry]:
    """A formatted memory store and an all-zero memory origin."""
    g = new_geometry(**kw)  # type: ignore[arg-type]
    store = MemoryDevice(g.store_bytes)
    format_device(store, g)
    origin = MemoryDevice(g.origin_bytes)
    return store, origin, g


def pattern(chunk: int, version: int, size: int) -> bytes:
    """Contents of `chunk` at `version`: zeros for version 0, else labelled."""
    if version == 0:
        return bytes(size)
    return struct.pack("<QQ", chunk, version) * (size // 16)


def write_origin(origin: BlockDevice, g: Geometry, chunk: int, version: int) -> None:
    origin.write(chunk * g.chunk_size, pattern(chunk, version, g.chunk_size))


def read_snapshot(
    engine: Engine, store: BlockDevice, origin: BlockDevice, tag: int, start: int, count: int
) -> list[bytes]:
    """Chunk contents of snapshot `tag`, read the way a client would."""
    size = engine.chunk_size
    out: list[bytes] = []
    for segment in engine.snapshot_read(tag, [(start, count)]):
        if segment.store_chunk is None:
            data = origin.read(segment.chunk * size, segment.count * size)
        else:
            data = store.read(segment.store_chunk * size, segment.count * size)
        out.extend(data[i * size : (i + 1) * size] for i in range(segment.count))
    return out


def reverting(chunks: int) -> tuple[Engine, MemoryDevice, MemoryDevice, Geometry]:
    """Snapshots 1 and 2 of an origin of `chunks` chunks; its first 8 chunks
    changed since (copied out for both); a revert to 1 started and committed."""
    store, origin, g = new_store(store_bytes=8 << 20, origin_bytes=chunks * 4096)
    engine = Engine.open(store, origin)
    for chunk in range(chunks):
        write_origin(origin, g, chunk, 1)
    engine.create_snapshot(1)
    engine.create_snapshot(2)
    engine.commit()
    engine.origin_write([(0, 8)])
    engine.commit()
    for chunk in range(8):
        write_origin(origin, g, chunk, 2)
    engine.start_revert(1)
    engine.commit()
    return engine, store, origin, g


def assert_clean(store: BlockDevice) -> CheckReport:
    report = check_store(store)
    assert report.fatal is None, report.fatal
    assert not report.problems, "\n".join(map(str, report.problems))
    return report


class PowerCut(OSError):
    """The simulated power failure."""


@dataclass
class CutDevice:
    """Forwards to a MemoryDevice; the write or sync after `budget` more fails.

    After the cut every call fails, as the machine would be off. The inner
    device's pending writes are what a crash may keep.
    """

    inner: MemoryDevice
    budget: int = 1 << 62

    def __post_init__(self) -> None:
        self.stats = DeviceStats()
        self.cut = False

    @property
    def size(self) -> int:
        return self.inner.size

    def _spend(self) -> None:
        if self.cut or self.budget <= 0:
            self.cut = True
            raise PowerCut(errno.EIO, "simulated power cut")
        self.budget -= 1

    def read(self, offset: int, length: int) -> bytes:
        if self.cut:
            raise PowerCut(errno.EIO, "simulated power cut")
        return self.inner.read(offset, length)

    def read_into(self, offset: int, into: memoryview) -> None:
        # Through read(), so that whatever it does to a read applies here too.
        into[:] = self.read(offset, len(into))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._spend()
        self.inner.write(offset, data)

    def writev(self, offset: int, buffers: Sequence[bytes]) -> None:
        self._spend()
        self.inner.writev(offset, buffers)

    def sync(self) -> None:
        self._spend()
        self.inner.sync()

    def close(self) -> None:
        pass
