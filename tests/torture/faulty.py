"""FaultyDevice: a block device that fails on cue, the way disks and Linux do.

It wraps any BlockDevice (a MemoryDevice for crash-state work, a FileDevice
when the test is about real files and real fdatasync) and injects:

  * EIO (or any errno) on a chosen read, write or sync;
  * ENOSPC on a write, as a full filesystem under a sparse store file does;
  * short writes: part of the data lands, then the call fails.

A failed sync behaves as Linux's writeback does (peers.md §5, "fsync-failure
studies"): the error is reported once, the dirty pages are dropped, and the
next sync reports success. Here that means the writes issued since the last
good sync are each kept, lost or torn at 512-byte sectors, and the device is
then consistent with that choice. An engine that retried the sync would see
success over lost data: the device records every write and sync issued after
a failed sync, so a test can insist that there are none.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from csnapd.engine import BlockDevice, DeviceStats
from csnapd.engine.device import SECTOR

__all__ = ["Fault", "FaultyDevice", "Injected"]

_KINDS = ("read", "write", "sync")


@dataclass
class Fault:
    """One planned failure.

    The `nth` operation of kind `op` from the moment the fault is armed
    (counted from 0, among those that touch `where` when it is given) fails
    with `code`, and so do the next `times - 1` such operations.
    """

    op: str
    nth: int = 0
    code: int = errno.EIO
    #: A write lands partly (a random prefix) before it fails.
    short: bool = False
    #: Only operations touching bytes [lo, hi) count; None: all of them.
    where: tuple[int, int] | None = None
    times: int = 1

    def __post_init__(self) -> None:
        if self.op not in _KINDS:
            raise ValueError(f"no such operation {self.op!r}")
        if self.short and self.op != "write":
            raise ValueError("only a write can be short")


@dataclass(frozen=True)
class Injected:
    """A failure that happened."""

    op: str
    offset: int
    length: int
    code: int
    #: Bytes of a short write that landed before the error.
    landed: int = 0


@dataclass
class _Armed:
    fault: Fault
    seen: int = 0
    fired: int = 0


@dataclass
class FaultyDevice:
    """Forwards to `inner`, failing where the armed faults say."""

    inner: BlockDevice
    seed: int = 0
    #: After a failed sync, lose (or tear) a random part of the writes issued
    #: since the last good sync, as Linux drops the pages it could not write.
    lose_on_failed_sync: bool = True
    injected: list[Injected] = field(default_factory=list)
    #: Writes and syncs issued after a sync failed: there must be none.
    after_failed_sync: list[str] = field(default_factory=list)
    #: Operations of each kind issued so far, failed ones included.
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_KINDS, 0))

    def __post_init__(self) -> None:
        self.stats = DeviceStats()
        self._rng = random.Random(self.seed)
        self._armed: list[_Armed] = []
        self.sync_failed = False
        # Writes since the last good sync, and what their sectors held before.
        self._epoch: list[tuple[int, bytes]] = []
        self._before: dict[int, bytes] = {}

    def arm(self, fault: Fault) -> None:
        self._armed.append(_Armed(fault))

    @property
    def size(self) -> int:
        return self.inner.size

    # -- the operations ----------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self._count("read")
        fault = self._due("read", offset, length)
        if fault is not None:
            self._fail("read", offset, length, fault.code)
        self.stats.reads += 1
        self.stats.bytes_read += length
        return self.inner.read(offset, length)

    def read_into(self, offset: int, into: memoryview) -> None:
        # Through read(), so that whatever it does to a read applies here too.
        into[:] = self.read(offset, len(into))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._count("write")
        data = bytes(data)
        fault = self._due("write", offset, len(data))
        if fault is not None:
            landed = 0
            if fault.short and len(data) > 1:
                landed = self._rng.randrange(1, len(data))
                self._write(offset, data[:landed])
            self._fail("write", offset, len(data), fault.code, landed)
        self._write(offset, data)

    def writev(self, offset: int, buffers: Sequence[bytes]) -> None:
        self.write(offset, b"".join(buffers))

    def sync(self) -> None:
        self._count("sync")
        fault = self._due("sync", 0, self.size)
        if fault is not None:
            self.sync_failed = True
            if self.lose_on_failed_sync:
                self._lose_epoch()
            self._fail("sync", 0, 0, fault.code)
        self.stats.syncs += 1
        self.inner.sync()
        self._epoch.clear()
        self._before.clear()

    def close(self) -> None:
        self.inner.close()

    # -- machinery -----------------------------------------------------------------

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        if self.sync_failed and kind != "read":
            self.after_failed_sync.append(kind)

    def _due(self, kind: str, offset: int, length: int) -> Fault | None:
        for armed in self._armed:
            fault = armed.fault
            if fault.op != kind:
                continue
            if fault.where is not None:
                lo, hi = fault.where
                if offset >= hi or offset + max(length, 1) <= lo:
                    continue
            armed.seen += 1
            if armed.seen > fault.nth and armed.fired < fault.times:
                armed.fired += 1
                return fault
        return None

    def _fail(self, kind: str, offset: int, length: int, code: int, landed: int = 0) -> None:
        self.injected.append(Injected(kind, offset, length, code, landed))
        raise OSError(code, f"injected {kind} failure: {os.strerror(code)}")

    def _write(self, offset: int, data: bytes) -> None:
        if self.lose_on_failed_sync:
            self._remember(offset, len(data))
            self._epoch.append((offset, data))
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        self.inner.write(offset, data)

    def _remember(self, offset: int, length: int) -> None:
        """Keep what the sectors of a write held before this sync epoch."""
        first = offset // SECTOR
        last = (offset + length - 1) // SECTOR
        if all(s in self._before for s in range(first, last + 1)):
            return
        lo = first * SECTOR
        hi = min((last + 1) * SECTOR, self.size)
        old = self.inner.read(lo, hi - lo)
        for sector in range(first, last + 1):
            if sector not in self._before:
                at = sector * SECTOR - lo
                self._before[sector] = old[at : at + SECTOR]

    def _lose_epoch(self) -> None:
        """Leave the device as the failed writeback did: each write of the epoch
        kept, lost, or (one of them) torn at sectors; then make that durable."""
        image = {sector: bytearray(old) for sector, old in self._before.items()}
        rng = self._rng
        torn = rng.randrange(len(self._epoch)) if self._epoch else -1
        for number, (offset, data) in enumerate(self._epoch):
            roll = rng.random()
            if roll < 0.4:
                continue  # lost
            first = offset // SECTOR
            last = (offset + len(data) - 1) // SECTOR
            for sector in range(first, last + 1):
                if number == torn and rng.random() < 0.5:
                    continue  # this sector of the torn write never landed
                lo = max(offset, sector * SECTOR)
                hi = min(offset + len(data), (sector + 1) * SECTOR)
                at = lo - sector * SECTOR
                image[sector][at : at + hi - lo] = data[lo - offset : hi - offset]
        run: list[bytes] = []
        start = -1
        for sector in sorted(image):
            if run and sector == start + len(run):
                run.append(bytes(image[sector]))
                continue
            if run:
                self.inner.write(start * SECTOR, b"".join(run))
            run, start = [bytes(image[sector])], sector
        if run:
            self.inner.write(start * SECTOR, b"".join(run))
        self.inner.sync()
        self._epoch.clear()
        self._before.clear()
