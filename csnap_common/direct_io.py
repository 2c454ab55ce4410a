"""Positioned I/O that bypasses the page cache (O_DIRECT), for devices that
several hosts share.

Two hosts that open one disk each keep their own page cache of it: a page
one host cached stays in its cache after the other host rewrites the disk,
and the first host would read the old bytes. O_DIRECT moves data between
the caller's buffer and the device with no cache in between, so every read
sees the disk. The price: every offset, length and buffer address must be a
multiple of the device's alignment, and nothing is served from memory.

  choose_direct   whether a descriptor goes direct: always for a block
                  device, for a regular file only on request
  DirectFile      an O_DIRECT descriptor's reads and writes at any offset
                  and length: aligned through page-aligned bounce buffers
                  (mmap), and writes that cover a block only partly done as
                  read-modify-write of that block, one at a time per file

Read-modify-write rewrites the rest of the partly covered block with what
it held a moment earlier; two such writes at once in one process are
serialised here, so they cannot undo each other. The alignment is the
device's logical block size (usually 512 for disks, so sector-aligned
writes, what block-layer clients send, never need it) and 4096 for files.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from collections.abc import Sequence

__all__ = [
    "FILE_ALIGNMENT",
    "DirectFile",
    "DirectIOError",
    "choose_direct",
    "logical_block_size",
]

#: Alignment for O_DIRECT on a regular file: a multiple of every block size
#: a local file system asks for.
FILE_ALIGNMENT = 4096
#: ioctl BLKSSZGET: a block device's logical block size (int).
_BLKSSZGET = 0x1268
#: Bounce buffers up to this size are kept per thread for reuse; bigger ones
#: are made for one call.
_KEPT_BOUNCE = 1 << 20
_PAGE = mmap.PAGESIZE


class DirectIOError(OSError):
    """A descriptor cannot go direct (the file system refuses O_DIRECT, or a
    file's size is not a multiple of the alignment)."""


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def choose_direct(fd: int, requested: bool | None) -> bool:
    """Whether `fd` should go direct: never if `requested` is False; else a
    block device always (it may be shared between hosts), a file only if
    `requested` is True."""
    if requested is False:
        return False
    return requested is True or is_block_device(fd)


def logical_block_size(fd: int) -> int:
    """The smallest unit O_DIRECT may move on `fd`: a block device's logical
    block size, FILE_ALIGNMENT for anything else."""
    if not is_block_device(fd):
        return FILE_ALIGNMENT
    raw = fcntl.ioctl(fd, _BLKSSZGET, struct.pack("i", 0))
    (size,) = struct.unpack("i", raw)
    return max(512, int(size))


class _Bounce(threading.local):
    buffer: mmap.mmap | None = None


_BOUNCE = _Bounce()


def _bounce(length: int) -> mmap.mmap:
    """A page-aligned buffer of at least `length` bytes, private to this thread
    for the duration of one call."""
    if length > _KEPT_BOUNCE:
        return mmap.mmap(-1, -(-length // _PAGE) * _PAGE)
    kept = _BOUNCE.buffer
    if kept is None or len(kept) < length:
        size = max(64 << 10, 1 << (length - 1).bit_length())
        kept = _BOUNCE.buffer = mmap.mmap(-1, size)
    return kept


class DirectFile:
    """Reads and writes at any offset and length on a descriptor that is (or
    is about to be) O_DIRECT.

    The descriptor stays the caller's; `enable` sets O_DIRECT on it.
    Reads past the end of a file come back as zeroes.
    """

    def __init__(self, fd: int, alignment: int, *, what: str):
        if alignment <= 0 or alignment & (alignment - 1) or _PAGE % alignment:
            raise ValueError(f"alignment {alignment} is not a power of two dividing a page")
        self.fd = fd
        self.alignment = alignment
        self.what = what
        #: Writes that needed read-modify-write (partly covered blocks).
        self.partial_writes = 0
        self._rmw = threading.Lock()

    @classmethod
    def enable(cls, fd: int, *, what: str) -> DirectFile:
        """Set O_DIRECT on `fd` and wrap it.

        Raises:
            DirectIOError: the file system does not do O_DIRECT, or a
                regular file's size is not a multiple of the alignment
                (its last block could not be written whole).
        """
        alignment = logical_block_size(fd)
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size % alignment:
            raise DirectIOError(
                errno.EINVAL,
                f"{what}: direct I/O needs a file whose size is a multiple of"
                f" {alignment} bytes, not {st.st_size}",
            )
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError as exc:
            raise DirectIOError(
                exc.errno,
                f"{what}: its file system does not support direct I/O (O_DIRECT):"
                f" {exc.strerror}; put it on one that does, or do not ask for direct I/O",
            ) from exc
        return cls(fd, alignment, what=what)

    def _span(self, offset: int, length: int) -> tuple[int, int]:
        """The aligned range [start, end) covering offset..offset+length."""
        mask = self.alignment - 1
        return offset & ~mask, (offset + length + mask) & ~mask

    def _read_aligned(self, into: memoryview, start: int) -> None:
        """Fill `into` (aligned address and length) from `start`; zeroes past the end."""
        done = 0
        while done < len(into):
            got = os.preadv(self.fd, [into[done:]], start + done)
            if got == 0:
                into[done:] = bytes(len(into) - done)
                return
            done += got
            if done % self.alignment:  # short read at the end of a file
                into[done:] = bytes(len(into) - done)
                return

    def _write_aligned(self, data: memoryview, start: int) -> None:
        done = 0
        while done < len(data):
            wrote = os.pwritev(self.fd, [data[done:]], start + done)
            if wrote <= 0:
                raise OSError(errno.EIO, f"write made no progress at offset {start + done}")
            done += wrote

    def read_into(self, into: memoryview, offset: int) -> None:
        """Fill `into` (any address and length) from `offset`."""
        if not len(into):
            return
        start, end = self._span(offset, len(into))
        buffer = _bounce(end - start)
        with memoryview(buffer) as whole:
            view = whole[: end - start]
            try:
                self._read_aligned(view, start)
                into[:] = view[offset - start : offset - start + len(into)]
            finally:
                view.release()

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset`."""
        out = bytearray(length)
        self.read_into(memoryview(out), offset)
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of `data` at `offset`; a partly covered first or last
        block is read first and written back whole."""
        source = memoryview(data).cast("B")
        length = len(source)
        if not length:
            return
        start, end = self._span(offset, length)
        buffer = _bounce(end - start)
        with memoryview(buffer) as whole:
            view = whole[: end - start]
            try:
                if start == offset and end == offset + length:
                    view[:] = source
                    self._write_aligned(view, start)
                    return
                with self._rmw:
                    self.partial_writes += 1
                    align = self.alignment
                    self._read_aligned(view[:align], start)
                    if end - start > align:
                        self._read_aligned(view[-align:], end - align)
                    view[offset - start : offset - start + length] = source
                    self._write_aligned(view, start)
            finally:
                view.release()

    def writev(self, offset: int, buffers: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write the buffers back to back from `offset`."""
        if len(buffers) == 1:
            self.write(offset, buffers[0])
        else:
            self.write(offset, b"".join(buffers))
