"""Block devices: where the engine's bytes go.

The engine sees a store and an origin through the small BlockDevice
interface: positioned reads and writes, and a sync that makes every earlier
write durable. Two implementations:

  FileDevice    a regular file or a block device, with pread, pwrite and
                fdatasync, and an exclusive flock on request (rule: one server per store).
                A block device is read and written with O_DIRECT (another host
                may share it, and a page cache would keep bytes it replaced);
                a file too on request (csnap_common.direct_io).
  MemoryDevice  a sparse in-memory device that records every write and sync,
                and can "crash": keep everything synced, and any chosen
                subset of the unsynced writes, some torn at 512-byte sectors.

Devices raise OSError; the engine translates it at its own boundary.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import stat
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from csnap_common.direct_io import DirectFile, choose_direct
from csnapd.engine.errors import StoreLockedError

__all__ = [
    "BlockDevice",
    "FileDevice",
    "MemoryDevice",
    "PendingWrite",
    "DeviceStats",
    "SECTOR",
]

#: Unit of torn writes: a write may persist partly, but whole sectors at a time.
SECTOR = 512
_PAGE = 4096  # MemoryDevice storage granularity
_ZERO_PAGE = bytes(_PAGE)


@dataclass(slots=True)
class DeviceStats:
    """Counts of what a device was asked to do."""

    reads: int = 0
    writes: int = 0
    syncs: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class BlockDevice(Protocol):
    """What the engine needs from a store or origin device."""

    stats: DeviceStats

    @property
    def size(self) -> int:
        """Size in bytes."""
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Read exactly `length` bytes at `offset`."""
        ...

    def read_into(self, offset: int, into: memoryview) -> None:
        """Fill all of `into` from `offset` (a buffer the caller reuses)."""
        ...

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `offset`."""
        ...

    def writev(self, offset: int, buffers: Sequence[bytes]) -> None:
        """Write the buffers back to back from `offset`."""
        ...

    def sync(self) -> None:
        """Make every write issued so far durable."""
        ...

    def close(self) -> None:
        """Release the device."""
        ...


class FileDevice:
    """A regular file or block device, accessed with pread/pwrite/fdatasync.

    `direct`: None goes direct (O_DIRECT) for a block device only, True for
    a file too, False never. Opening raises DirectIOError (an OSError) where
    the file system refuses O_DIRECT.

    `random_reads`: the page cache reads nothing ahead for this descriptor.
    csnapd reads the origin only where a copy-out needs it; what readahead
    adds is read for nothing, and it lands in the page cache as large
    folios, into which every later small write of the gateway costs more
    (docs/performance-log.md, "Origin pages without readahead").
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        writable: bool = True,
        lock: bool = False,
        direct: bool | None = None,
        random_reads: bool = False,
    ):
        self.path = os.fspath(path)
        self.stats = DeviceStats()
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        self._fd = os.open(self.path, flags)
        #: Set when the device is read and written with O_DIRECT.
        self.direct: DirectFile | None = None
        try:
            if lock:
                try:
                    fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError as exc:
                    raise StoreLockedError(
                        f"{self.path} is locked by another csnapd (one server per store)"
                    ) from exc
            self._block_device = stat.S_ISBLK(os.fstat(self._fd).st_mode)
            if choose_direct(self._fd, direct):
                self.direct = DirectFile.enable(self._fd, what=self.path)
            elif random_reads:
                os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_RANDOM)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        """Size in bytes now: measured at each call, since an administrator
        may grow the file or device under a running server (csnap resize)."""
        if self._block_device:
            return os.lseek(self._fd, 0, os.SEEK_END)
        return os.fstat(self._fd).st_size

    @property
    def regular_file(self) -> bool:
        """Whether this is a regular file (which csnapd may grow itself)."""
        return not self._block_device

    def read(self, offset: int, length: int) -> bytes:
        self.stats.reads += 1
        self.stats.bytes_read += length
        if self.direct is not None:
            return self.direct.read(offset, length)
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        parts = [data]
        got = len(data)
        while got < length:
            more = os.pread(self._fd, length - got, offset + got)
            if not more:
                raise OSError(
                    errno.EIO,
                    f"short read: {got} of {length} bytes at offset {offset}",
                    self.path,
                )
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def read_into(self, offset: int, into: memoryview) -> None:
        length = len(into)
        self.stats.reads += 1
        self.stats.bytes_read += length
        if self.direct is not None:
            self.direct.read_into(into, offset)
            return
        got = 0
        while got < length:
            done = os.preadv(self._fd, [into[got:]], offset + got)
            if not done:
                raise OSError(
                    errno.EIO,
                    f"short read: {got} of {length} bytes at offset {offset}",
                    self.path,
                )
            got += done

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        if self.direct is not None:
            self.direct.write(offset, data)
            return
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            if done <= 0:
                raise OSError(errno.EIO, f"write made no progress at offset {offset}", self.path)
            view = view[done:]
            offset += done

    def writev(self, offset: int, buffers: Sequence[bytes]) -> None:
        total = sum(len(b) for b in buffers)
        if self.direct is not None:
            self.stats.writes += 1
            self.stats.bytes_written += total
            self.direct.writev(offset, buffers)
            return
        done = os.pwritev(self._fd, buffers, offset) if buffers else 0
        self.stats.writes += 1
        self.stats.bytes_written += total
        if done < total:  # short write: finish the rest plainly
            rest = b"".join(buffers)[done:]
            self.stats.writes -= 1
            self.stats.bytes_written -= len(rest)
            self.write(offset + done, rest)

    def sync(self) -> None:
        self.stats.syncs += 1
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True, slots=True)
class PendingWrite:
    """A write a MemoryDevice has not yet made durable."""

    offset: int
    data: bytes
    #: Made durable by its writer already (see MemoryDevice.write_through):
    #: a crash always keeps it, in its place in the order.
    durable: bool = False

    @property
    def sectors(self) -> int:
        """How many 512-byte sectors the write touches (for tearing)."""
        first = self.offset // SECTOR
        last = (self.offset + len(self.data) - 1) // SECTOR
        return last - first + 1


class MemoryDevice:
    """A sparse in-memory device that can simulate a crash.

    Durable contents live in 4 KiB pages; writes since the last sync are kept
    in order as PendingWrite records and are visible to reads. `crash()`
    returns a new device holding the durable contents plus a chosen subset of
    the pending writes, some of them torn. Pages are immutable bytes shared
    between a device and its crash images, so an image costs little.
    """

    def __init__(self, size: int, *, log: list[tuple[str, int, bytes]] | None = None):
        self._size = size
        self.stats = DeviceStats()
        self._pages: dict[int, bytes] = {}
        self.pending: list[PendingWrite] = []
        #: A commit's writes and sync may run in another thread than the
        #: reads of lookups (csnapd answers lookups while it commits): a
        #: read must not see a sync half done.
        self._lock = threading.Lock()
        #: If given, every ("write" | "durable", offset, data) and ("sync", 0,
        #: b"") is appended to it, in order.
        self.log = log

    @property
    def size(self) -> int:
        return self._size

    def resize_to(self, size: int) -> None:
        """Change the size, as an administrator growing a device would."""
        self._size = size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or offset + length > self._size:
            raise OSError(errno.EIO, f"access at {offset}+{length} beyond {self._size} bytes")

    def _durable_read(self, offset: int, length: int) -> bytes | bytearray:
        first, inner = divmod(offset, _PAGE)
        if inner == 0 and length % _PAGE == 0:  # whole pages: join, no copying loop
            pages = self._pages
            return b"".join(pages.get(n, _ZERO_PAGE) for n in range(first, first + length // _PAGE))
        out = bytearray(length)
        at = offset
        end = offset + length
        while at < end:
            page_no, inner = divmod(at, _PAGE)
            step = min(_PAGE - inner, end - at)
            page = self._pages.get(page_no)
            if page is not None:
                out[at - offset : at - offset + step] = page[inner : inner + step]
            at += step
        return out

    def _durable_write(self, offset: int, data: bytes | memoryview) -> None:
        at = 0
        while at < len(data):
            page_no, inner = divmod(offset + at, _PAGE)
            step = min(_PAGE - inner, len(data) - at)
            if step == _PAGE:
                self._pages[page_no] = bytes(data[at : at + step])
            else:
                page = bytearray(self._pages.get(page_no, bytes(_PAGE)))
                page[inner : inner + step] = data[at : at + step]
                self._pages[page_no] = bytes(page)
            at += step

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            return self._read(offset, length)

    def read_into(self, offset: int, into: memoryview) -> None:
        into[:] = self.read(offset, len(into))

    def _read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        durable = self._durable_read(offset, length)
        end = offset + length
        out: bytearray | None = None
        for write in self.pending:
            w_end = write.offset + len(write.data)
            if write.offset < end and w_end > offset:
                if out is None:
                    out = bytearray(durable)
                lo = max(offset, write.offset)
                hi = min(end, w_end)
                out[lo - offset : hi - offset] = write.data[lo - write.offset : hi - write.offset]
        return bytes(durable) if out is None else bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        record = PendingWrite(offset, bytes(data))
        with self._lock:
            self.pending.append(record)
        if self.log is not None:
            self.log.append(("write", offset, record.data))

    def writev(self, offset: int, buffers: Sequence[bytes]) -> None:
        self.write(offset, b"".join(buffers))

    def write_through(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A write already durable when this returns, as a client's write
        followed by its own flush: no crash loses or reorders it."""
        self._check(offset, len(data))
        self.stats.writes += 1
        self.stats.bytes_written += len(data)
        record = PendingWrite(offset, bytes(data), durable=True)
        with self._lock:
            self.pending.append(record)
        if self.log is not None:
            self.log.append(("durable", offset, record.data))

    def sync(self) -> None:
        self.stats.syncs += 1
        with self._lock:
            for write in self.pending:
                self._durable_write(write.offset, write.data)
            self.pending.clear()
        if self.log is not None:
            self.log.append(("sync", 0, b""))

    def close(self) -> None:
        pass

    # -- crash simulation ----------------------------------------------------

    def crash(self, kept: Mapping[int, Iterable[int] | None]) -> MemoryDevice:
        """A new device as after a power cut now.

        Args:
            kept: for each index into `pending` that reached the disk, None
                when the whole write did, or the indexes of the 512-byte
                sectors (counted from the write's first sector) that did.
                Writes not named were lost. Kept writes land in issue order.
        """
        survivor = MemoryDevice(self._size)
        survivor._pages = dict(self._pages)
        for index, write in enumerate(self.pending):
            if write.durable:
                survivor._durable_write(write.offset, write.data)
                continue
            if index not in kept:
                continue
            sectors = kept[index]
            if sectors is None:
                survivor._durable_write(write.offset, write.data)
                continue
            base = write.offset // SECTOR
            for sector in sectors:
                lo = max(write.offset, (base + sector) * SECTOR)
                hi = min(write.offset + len(write.data), (base + sector + 1) * SECTOR)
                if lo < hi:
                    survivor._durable_write(lo, write.data[lo - write.offset : hi - write.offset])
        return survivor

    def random_crash(self, rng: random.Random, *, tear: float = 0.2) -> MemoryDevice:
        """Crash keeping a random subset of pending writes, some torn."""
        kept: dict[int, list[int] | None] = {}
        for index, write in enumerate(self.pending):
            if write.durable:
                continue
            roll = rng.random()
            if roll < 0.4:
                continue
            if roll < 0.4 + tear and write.sectors > 1:
                kept[index] = [s for s in range(write.sectors) if rng.random() < 0.5]
            else:
                kept[index] = None
        return self.crash(kept)

    def durable_copy(self) -> MemoryDevice:
        """A device holding exactly what is durable now (every pending write lost)."""
        return self.crash({})

    def snapshot_copy(self) -> MemoryDevice:
        """A device holding everything written so far, as if synced."""
        return self.crash(dict.fromkeys(range(len(self.pending))))
