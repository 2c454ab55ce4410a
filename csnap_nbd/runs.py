"""Small reads and rewrites answered in one loop, straight from the receive buffer.

Owns the gateway's shortest path. A VM reading or rewriting its disk, or a
backup reading a snapshot the store holds, sends plain 4 KiB requests,
several to a receive; each needs one `pread` or `pwrite` and a reply, and
nothing of csnapd: an origin read needs nobody, a rewrite of a chunk the
client knows unique needs no grant (csnap_client's rewrite_window), and a
snapshot read of a chunk the owned map places needs no lookup
(owned_store_chunk). The reader's usual path (csnap_nbd.commands) spends
some forty Python calls on each; a run takes every such request waiting
whole in the buffer in one loop: header, checks, the I/O (a write straight
from the buffer, without a copy into a payload), the reply queued.

A run answers only what it is sure of, and exactly as the usual path would.
It stops at the first request that is not one of these, with no flags,
wholly received, of 1 to INLINE_BYTES bytes inside the export and within
the connection's budget:

- an origin READ (the origin not opened with O_DIRECT);
- an origin WRITE within one chunk known unique, before the lease deadline,
  on a writable export, written in full by one `pwrite`;
- a snapshot READ within one chunk the owned map places in the store (the
  store not opened with O_DIRECT), read in full by one `pread` and
  finished before the lease deadline.

That request, and all after it, go the usual way from their header, which
gives every refusal its error; I/O the run began and did not finish (a
failed or short `pread` or `pwrite`) is done again there, whole: the same
bytes at the same place. Nothing awaits inside a run, so nothing can change
the bitmap or the owned map, end the session or start a barrier between a
check and its I/O.
"""

from __future__ import annotations

import os
import time
from struct import Struct

from csnap_client.client import DataClient
from csnap_client.owned import OwnedMap
from csnap_nbd.backing import INLINE_BYTES
from csnap_nbd.connection import Connection
from csnap_nbd.datapath import DataPath, OriginPath, SnapshotPath
from csnap_nbd.replies import Budget, ReplyWriter
from csnap_nbd.stats import ExportStats
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, Command, TransmissionFlag

__all__ = ["Runs"]

_HEADER = tx.REQUEST.size
#: A request's command and length, from its byte 6 on (cookie and offset skipped).
_COMMAND_LENGTH = Struct(">H16xI")
_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_READ_ONLY = int(TransmissionFlag.READ_ONLY)
#: A successful simple reply up to its cookie, which the request gives.
_REPLY_START = Struct(">II").pack(SIMPLE_REPLY_MAGIC, 0)


class Runs:
    """One connection's runs (see the module docstring)."""

    def __init__(
        self,
        conn: Connection,
        path: DataPath,
        shape: tx.ExportShape,
        writer: ReplyWriter,
        budget: Budget,
        stats: ExportStats,
        reply_cost: int,
    ):
        self._conn = conn
        self._client: DataClient = path.client
        self._size = shape.size
        self._structured = shape.structured
        self._writer = writer
        self._budget = budget
        self._stats = stats
        self._reply_cost = reply_cost
        self._chunk_size = path.chunk_size
        backing = path.backing
        #: The file reads come from: the origin, or the store (whose
        #: chunks the owned map places).
        self._source = -1
        self._owned = isinstance(path, SnapshotPath)
        #: The origin, when rewrites may go in runs; else -1.
        self._origin = -1
        if isinstance(path, OriginPath) and backing.origin not in backing.direct:
            self._source = backing.origin
            if not shape.flags_value & _READ_ONLY:
                self._origin = backing.origin
        elif self._owned and backing.store not in backing.direct:
            self._source = backing.store
        #: The commands that may start a run.
        self.commands = frozenset(
            command for command, fd in ((_READ, self._source), (_WRITE, self._origin)) if fd >= 0
        )

    def answer(self) -> bool:
        """Answer the run at the head of the receive buffer and take it out
        of it. True: what is left has not all come, and as far as it has,
        it is a request a run may take (receive more and answer again)."""
        received = self._conn.received
        end = len(received)
        if end < _HEADER:
            return True
        if self._writer.broken.is_set():
            return False
        # The cheapest look first: most requests that end a run are neither
        # a command nor a length a run takes.
        command, length = _COMMAND_LENGTH.unpack_from(received, 6)
        if command not in self.commands or length > INLINE_BYTES:
            return False
        at = 0
        with memoryview(received) as view:
            while True:
                writes, at = self._writes(view, at, end)
                reads, at = self._reads(received, at, end)
                if not writes and not reads:
                    break
        if at:
            del received[:at]
        return self._incomplete(received)

    def _incomplete(self, received: bytearray) -> bool:
        """Whether the head of `received` is a part of a request a run may
        take: a header not whole, or a plain small WRITE without all its data
        (the usual path would wait for it too, then take it the long way)."""
        if len(received) < _HEADER:
            return True
        magic, flags, command, _, _, length = tx.REQUEST.unpack_from(received)
        return (
            command == _WRITE
            and self._origin >= 0
            and magic == REQUEST_MAGIC
            and not flags
            and 0 < length <= INLINE_BYTES
            and len(received) - _HEADER < length
        )

    def _writes(self, view: memoryview, at: int, end: int) -> tuple[int, int]:
        """Answer the rewrites from `at` on; how many, and where they end."""
        if self._origin < 0:
            return 0, at
        window = self._client.rewrite_window()
        if window is None:
            return 0, at
        bits, deadline = window
        nbits = len(bits) * 8
        budget, queue, reply_cost = self._budget, self._writer.queued, self._reply_cost
        used, limit = budget.used, budget.limit
        origin, size, chunk_size = self._origin, self._size, self._chunk_size
        header, pwrite, clock = tx.REQUEST.unpack_from, os.pwrite, time.perf_counter
        written = answered = 0
        while end - at >= _HEADER:
            magic, flags, command, _, offset, length = header(view, at)
            data = at + _HEADER
            chunk = offset // chunk_size
            held = reply_cost + length
            if (
                command != _WRITE
                or magic != REQUEST_MAGIC
                or flags
                or not 0 < length <= INLINE_BYTES
                or end - data < length
                or offset + length > size
                or (offset + length - 1) // chunk_size != chunk
                or chunk >= nbits
                or not bits[chunk >> 3] & (1 << (chunk & 7))
                or (used and used + held > limit)
                or not clock() < deadline
            ):
                break
            try:
                if pwrite(origin, view[data : data + length], offset) != length:
                    break
            except OSError:
                break  # the usual path writes it again and reports the error
            queue.append((_REPLY_START + view[at + 8 : at + 16], b"", held))
            used += held
            written += length
            answered += 1
            at = data + length
        if answered:
            budget.used = used
            self._stats.ran(_WRITE, answered, written)
            self._client.wrote_now(answered)
        return answered, at

    def _reads(self, received: bytearray, at: int, end: int) -> tuple[int, int]:
        """Answer the reads from `at` on; how many, and where they end."""
        source = self._source
        if source < 0:
            return 0, at
        budget, queue, reply_cost = self._budget, self._writer.queued, self._reply_cost
        used, limit = budget.used, budget.limit
        size, structured = self._size, self._structured
        window = self._client.owned_window() if self._owned else (None, 0.0)
        if window is None:
            return 0, at
        owned, deadline = window
        header, pread, clock = tx.REQUEST.unpack_from, os.pread, time.perf_counter
        sent = answered = 0
        while end - at >= _HEADER:
            magic, flags, command, cookie, offset, length = header(received, at)
            held = reply_cost + length
            if (
                command != _READ
                or magic != REQUEST_MAGIC
                or flags
                or not 0 < length <= INLINE_BYTES
                or offset + length > size
                or (used and used + held > limit)
            ):
                break
            position = offset if owned is None else self._owned_position(owned, offset, length)
            if position < 0:
                break
            try:
                data = pread(source, length, position)
            except OSError:
                break  # the usual path reads it again and reports the error
            if len(data) != length or (owned is not None and not clock() < deadline):
                break
            if structured:
                reply = tx.offset_data_header(cookie, offset, length, done=True)
            else:
                reply = _REPLY_START + received[at + 8 : at + 16]
            queue.append((reply, data, held))
            used += held
            sent += length
            answered += 1
            at += _HEADER
        if answered:
            budget.used = used
            self._stats.ran(_READ, answered, sent)
            if owned is not None:
                self._client.owned_read_now(answered)
        return answered, at

    def _owned_position(self, owned: OwnedMap, offset: int, length: int) -> int:
        """Where in the store bytes offset..offset+length-1 of the snapshot
        are, if within one chunk `owned` places; else -1."""
        chunk, within = divmod(offset, self._chunk_size)
        if within + length > self._chunk_size:
            return -1
        store = owned.store_chunk(chunk)
        if store < 0:
            return -1
        if owned.ahead:
            self._client.owned_placed(owned, chunk)
        return store * self._chunk_size + within
