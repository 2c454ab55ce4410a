"""The origin and snapshot store files the gateway reads and writes directly,
once csnapd has said where: positional reads and writes, and fdatasync.

One descriptor per file serves every connection (pread/pwrite carry their
own offsets, so they need no lock). Small transfers run on the trio thread,
where a page-cache hit costs microseconds; bigger ones and every sync go to
a worker thread so one slow disk access does not stall other connections,
except reads of up to CACHED_INLINE_BYTES that the page cache holds whole:
those are tried on the trio thread with RWF_NOWAIT, which fails at once
rather than wait for the disk.

A block device is read and written with O_DIRECT (another host may share
it, and this host's page cache would keep bytes the other one replaced);
files too on request. Such a descriptor has no page cache to hit, so
every transfer on it waits for the disk: all of them go to worker
threads, where several overlap, and the data path does not offer them
to the *_now (trio thread) calls. They go through csnap_common.direct_io,
which aligns them (a write that covers a block only partly is a
read-modify-write of that block).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from csnap_common.direct_io import DirectFile, DirectIOError, choose_direct
from csnap_nbd.geometry import Placement

__all__ = ["Backing", "BackingIOError", "Transfer", "INLINE_BYTES", "CACHED_INLINE_BYTES"]

#: Transfers up to this many bytes in total run without a thread hop.
INLINE_BYTES = 128 << 10
#: Reads up to this many bytes run without a thread hop when the page cache
#: holds every byte (RWF_NOWAIT; where it is missing, they go to a thread).
CACHED_INLINE_BYTES = 1 << 20
#: preadv flag: fail with EAGAIN instead of waiting for the disk (0: none here).
_NOWAIT: int = getattr(os, "RWF_NOWAIT", 0)


class BackingIOError(Exception):
    """Reading, writing or syncing the origin or store file failed."""

    def __init__(self, message: str, errno_value: int | None):
        super().__init__(message)
        self.errno = errno_value

    @property
    def no_space(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


@dataclass(frozen=True, slots=True)
class Transfer:
    """Placements in one file (`fd`), with a label for errors."""

    fd: int
    what: str
    placements: Sequence[Placement]


class Backing:
    """The origin and the store, open for the gateway's lifetime.

    `direct`: O_DIRECT for block devices only (None), for files too (True),
    or never (False). Opening raises BackingIOError where the file system
    refuses O_DIRECT.
    """

    def __init__(self, origin: str, store: str, *, read_only: bool, direct: bool | None = None):
        flags = os.O_RDONLY if read_only else os.O_RDWR
        origin_fd = _open(origin, flags)
        try:
            store_fd = _open(store, flags)
        except BaseException:
            os.close(origin_fd)
            raise
        self._setup(origin_fd, store_fd, origin=origin, store=store, direct=direct)

    @classmethod
    def adopt(
        cls,
        origin_fd: int,
        store_fd: int,
        *,
        origin: str,
        store: str,
        direct: bool | None = None,
    ) -> Backing:
        """A Backing over descriptors already opened (and checked) by the caller;
        they are closed if it cannot be made."""
        backing = cls.__new__(cls)
        backing._setup(origin_fd, store_fd, origin=origin, store=store, direct=direct)
        return backing

    def _setup(
        self, origin_fd: int, store_fd: int, *, origin: str, store: str, direct: bool | None
    ) -> None:
        self._syncs: dict[tuple[bool, bool], _SyncGroup] = {}
        self.origin_path, self.store_path = origin, store
        self.origin, self.store = origin_fd, store_fd
        #: The descriptors read and written with O_DIRECT.
        self.direct: dict[int, DirectFile] = {}
        try:
            for fd, path in ((origin_fd, origin), (store_fd, store)):
                if choose_direct(fd, direct):
                    self.direct[fd] = DirectFile.enable(fd, what=path)
        except DirectIOError as exc:
            self.close()
            raise BackingIOError(str(exc.strerror), exc.errno) from exc
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.origin, self.store):
            os.close(fd)

    async def read(self, transfers: Sequence[Transfer], into: bytearray) -> None:
        """Fill `into` at each placement's buffer offset from its file position."""
        total = _total(transfers)
        if total <= INLINE_BYTES and not self.goes_direct(transfers):
            _read_all(transfers, into, self.direct)
        elif total > CACHED_INLINE_BYTES or not self.read_cached(transfers, into):
            await trio.to_thread.run_sync(_read_all, transfers, into, self.direct)

    def goes_direct(self, transfers: Sequence[Transfer]) -> bool:
        """Whether a transfer touches an O_DIRECT file: it waits for the disk
        every time, so it goes to a thread (with others in flight meanwhile)."""
        return any(t.fd in self.direct for t in transfers)

    def read_now(self, transfers: Sequence[Transfer], into: bytearray) -> None:
        """`read` on this thread, for callers that know the transfer is small."""
        _read_all(transfers, into, self.direct)

    def read_span_now(self, fd: int, what: str, position: int, into: bytearray) -> None:
        """Fill `into` from `fd` at `position` on this thread (not O_DIRECT):
        read_now for one placement, without building one."""
        _read_span(fd, what, position, memoryview(into), 0)

    def read_cached(self, transfers: Sequence[Transfer], into: bytearray) -> bool:
        """`read` on this thread if the page cache holds every byte; else False.

        After False, `into` may hold part of the data: read it all again.
        """
        if not _NOWAIT or self.goes_direct(transfers):
            return False  # no page cache to hit
        try:
            _read_all(transfers, into, self.direct, _NOWAIT)
        except BackingIOError as exc:
            if exc.errno in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
                return False
            raise
        return True

    async def write(self, transfers: Sequence[Transfer], data: memoryview) -> None:
        """Write `data` at each placement's buffer offset to its file position."""
        if _total(transfers) <= INLINE_BYTES and not self.goes_direct(transfers):
            _write_all(transfers, data, self.direct)
        else:
            await trio.to_thread.run_sync(_write_all, transfers, data, self.direct)

    def write_now(self, transfers: Sequence[Transfer], data: memoryview) -> None:
        """`write` on this thread, for callers that know the transfer is small."""
        _write_all(transfers, data, self.direct)

    def write_origin_now(self, position: int, data: memoryview) -> None:
        """All of `data` at byte `position` of the origin, on this thread: the
        inline rewrite's one piece, without placements. Only for an origin
        not opened with O_DIRECT (its caller checks): one that is takes
        aligned writes, through `write`.

        Raises:
            BackingIOError: the write failed.
        """
        _pwrite_all(self.origin, "origin", position, data)

    async def sync(self, *, origin: bool = True, store: bool = True) -> None:
        """fdatasync: every write that returned before this call is durable after it.

        Concurrent callers share syncs: a caller waits for the first sync of
        the same files that starts after it called, and starts it if none
        is running; it gets that sync's error, if any.
        """
        fds: list[tuple[int, str]] = []
        if origin:
            fds.append((self.origin, "origin"))
        if store:
            fds.append((self.store, "store"))
        key = (origin, store)
        group = self._syncs.get(key)
        if group is None:
            group = self._syncs[key] = _SyncGroup(fds)
        await group.sync()


class _SyncRound:
    """One fdatasync of a group's files, and how it ended."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BackingIOError | None = None

    def check(self) -> None:
        if self.error is not None:
            raise BackingIOError(str(self.error), self.error.errno) from self.error


class _SyncGroup:
    """fdatasyncs of one set of files, shared by the callers that wait together.

    A sync running when a caller comes may have started before the caller's
    writes returned, so the caller waits for the next one to start, which
    every caller that came meanwhile shares, and gets its error if it fails.
    """

    def __init__(self, fds: list[tuple[int, str]]):
        self._fds = fds
        self._running: _SyncRound | None = None
        self._pending: _SyncRound | None = None

    async def sync(self) -> None:
        running = self._running
        if running is not None:
            if self._pending is None:
                self._pending = _SyncRound()
            mine = self._pending
            while running is not None:
                await running.done.wait()
                # Read again after each wait: another caller's sync may have
                # started meanwhile (a type narrowed before an await is not
                # the attribute's after it).
                running = self._running
            if not self._claim(mine):
                # Another caller of this round started it.
                await mine.done.wait()
                mine.check()
                return
        else:
            mine = _SyncRound()
        self._running = mine
        try:
            await trio.to_thread.run_sync(_sync_all, self._fds)
        except BackingIOError as exc:
            mine.error = exc
        finally:
            self._running = None
            mine.done.set()
        mine.check()

    def _claim(self, pending: _SyncRound) -> bool:
        """Whether this caller starts the `pending` round, which no other
        caller of it has started while it waited."""
        if self._pending is not pending:
            return False
        self._pending = None
        return True


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        raise BackingIOError(f"cannot open {path}: {exc.strerror}", exc.errno) from exc


def _total(transfers: Sequence[Transfer]) -> int:
    return sum(p.size for t in transfers for p in t.placements)


def _read_all(
    transfers: Sequence[Transfer],
    into: bytearray,
    direct: Mapping[int, DirectFile],
    flags: int = 0,
) -> None:
    view = memoryview(into)
    for transfer in transfers:
        aligned = direct.get(transfer.fd)
        if aligned is not None:
            for p in transfer.placements:
                try:
                    aligned.read_into(view[p.buffer : p.buffer + p.size], p.position)
                except OSError as exc:
                    raise BackingIOError(
                        f"reading the {transfer.what} at {p.position}: {exc.strerror}", exc.errno
                    ) from exc
            continue
        for p in transfer.placements:
            _read_span(
                transfer.fd, transfer.what, p.position, view[p.buffer : p.buffer + p.size], flags
            )


def _read_span(fd: int, what: str, position: int, view: memoryview, flags: int) -> None:
    done = 0
    size = len(view)
    while done < size:
        target = view[done:] if done else view
        try:
            got = os.preadv(fd, [target], position + done, flags)
        except OSError as exc:
            raise BackingIOError(
                f"reading the {what} at {position + done}: {exc.strerror}", exc.errno
            ) from exc
        if got == 0:
            # Past the end of a file shorter than the export: reads as
            # zeroes (the buffer may be a reused one).
            target[:] = bytes(len(target))
            return
        done += got


def _write_all(
    transfers: Sequence[Transfer], data: memoryview, direct: Mapping[int, DirectFile]
) -> None:
    for transfer in transfers:
        aligned = direct.get(transfer.fd)
        if aligned is not None:
            for p in transfer.placements:
                try:
                    aligned.write(p.position, data[p.buffer : p.buffer + p.size])
                except OSError as exc:
                    raise BackingIOError(
                        f"writing the {transfer.what} at {p.position}: {exc.strerror}", exc.errno
                    ) from exc
            continue
        for p in transfer.placements:
            _pwrite_all(transfer.fd, transfer.what, p.position, data[p.buffer : p.buffer + p.size])


def _pwrite_all(fd: int, what: str, position: int, data: memoryview) -> None:
    """pwrite all of `data` at `position` of `fd` (`what` names it in errors)."""
    done, size = 0, len(data)
    while done < size:
        try:
            done += os.pwrite(fd, data[done:] if done else data, position + done)
        except OSError as exc:
            raise BackingIOError(
                f"writing the {what} at {position + done}: {exc.strerror}", exc.errno
            ) from exc


def _sync_all(fds: Sequence[tuple[int, str]]) -> None:
    for fd, what in fds:
        try:
            os.fdatasync(fd)
        except OSError as exc:
            raise BackingIOError(f"syncing the {what}: {exc.strerror}", exc.errno) from exc
