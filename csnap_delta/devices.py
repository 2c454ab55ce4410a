"""The store, origin and image a delta command reads and writes, opened by
the rule csnapd and csnap-nbd follow for shared devices.

A block device may be a disk other hosts write: read through this host's
page cache it could give back bytes another host has since replaced, so it
goes O_DIRECT by default; a file does only on request (`--direct`, for
files on storage several hosts share), and `--no-direct` keeps the page
cache for both. A direct device is read and written through the aligned
buffers of csnap_common.direct_io; its callers see plain positioned reads
and writes either way.
"""

from __future__ import annotations

import os

from csnap_common.direct_io import DirectFile, choose_direct

__all__ = ["Device"]


class Device:
    """One open file or block device: positioned reads and writes, through
    O_DIRECT when `direct` is set."""

    def __init__(self, fd: int, direct: DirectFile | None):
        self.fd = fd
        self.direct = direct
        #: Its size when opened: reads past it come back short, as os.pread's do.
        self.size = os.lseek(fd, 0, os.SEEK_END)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool, direct: bool | None) -> Device:
        """Open `path`; `direct` True asks O_DIRECT for a file too, False never,
        None for block devices only.

        Raises:
            OSError: it cannot be opened; DirectIOError (an OSError) when it
                must go direct and cannot (the file system refuses O_DIRECT,
                or a file's size is not a multiple of 4096).
        """
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            mode = None
            if choose_direct(fd, direct):
                mode = DirectFile.enable(fd, what=os.fspath(path))
            return cls(fd, mode)
        except BaseException:
            os.close(fd)
            raise

    def pread(self, size: int, position: int) -> bytes:
        """Up to `size` bytes from `position`: fewer at the end, as os.pread."""
        if self.direct is None:
            return os.pread(self.fd, size, position)
        return self.direct.read(position, max(0, min(size, self.size - position)))

    def pwrite(self, data: bytes | bytearray | memoryview, position: int) -> int:
        """Write `data` at `position`; how many bytes were written."""
        if self.direct is None:
            return os.pwrite(self.fd, data, position)
        self.direct.write(position, data)
        return memoryview(data).nbytes

    def fsync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
