"""Small origin writes that need csnapd's grant, asked for together.

At a queue depth of 16, the first writes after a snapshot come several at
a time, and each needs a grant from csnapd (which copies out what a
snapshot still shares). One task per connection asks for every such write
waiting with one `query_write` naming all their chunks, writes them all
inside that grant, without awaiting, and queues their replies; those with
FUA wait for one sync of the origin after the batch. One request to
csnapd, one sync, and no task per write. (A FUA rewrite of chunks the
client knows unique needs no grant: it goes alone, so that its write
overlaps the sync before it.) A batch csnapd refuses or that
fails in any way is served again write by write, each in a task of its
own, so each write gets its own answer (a refusal means csnapd did
nothing; a write done twice writes the same bytes to the same place).

One task asks at a time: the writes that arrive while csnapd commits a
batch's copies make the next batch, whole (with two asking, batches halve
and both processes' CPU per write grows by a fifth). A grant that does not
come within `PATIENCE` (csnapd parks a write while a snapshot reader holds
a read lock on one of its chunks, or a create barrier runs) is given up,
and its writes are served alone: one write to a locked chunk then holds up
no other. A shared grant given up is forgotten when it comes: it is never
written under, and a create barrier does not wait for it (csnap_client
answers barriers for the grants it holds). A batch writes at most
`BATCH_BYTES` without yielding.

A write waiting here holds its connection slot and budget until answered,
as a task would.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import trio

from csnap_nbd.buffers import BUFFERS
from csnap_nbd.datapath import DataPath, IOFailedError
from csnap_nbd.replies import ReplyWriter
from csnap_nbd.stats import ExportStats
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import CommandFlag

__all__ = ["GatheredWrites", "PATIENCE", "BATCH_BYTES"]

log = logging.getLogger("csnap.nbd.commands")

_FUA = int(CommandFlag.FUA)

#: Seconds a shared grant may take before its writes are served alone
#: (a commit takes milliseconds; a parked write, up to a lease).
PATIENCE = 0.25
#: Most bytes one batch writes.
BATCH_BYTES = 2 << 20

#: Serves one request in a task of its own (Transmission._serve).
Serve = Callable[[tx.Request, bytearray | None, int], Awaitable[None]]


class _Waiting(NamedTuple):
    req: tx.Request
    payload: bytearray
    held: int
    #: perf_counter() when it was taken, for the request latency.
    taken: float
    #: The chunks it touches.
    chunks: range
    #: It carries FUA: its reply waits for a sync after the batch.
    fua: bool


class GatheredWrites:
    """The writes of one connection waiting for a shared grant."""

    def __init__(
        self,
        path: DataPath,
        writer: ReplyWriter,
        slots: trio.Semaphore,
        stats: ExportStats,
        serve: Serve,
    ):
        self._path = path
        self._writer = writer
        self._slots = slots
        self._stats = stats
        self._serve = serve
        self._waiting: deque[_Waiting] = deque()
        #: A task is asking (one at a time; module docstring).
        self._asking = False

    def add(self, req: tx.Request, payload: bytearray, held: int, nursery: trio.Nursery) -> None:
        """Take a WRITE the path gathers (DataPath.gathers); its reply follows
        the grant. The caller holds a slot for it, released here once answered."""
        chunks = self._path.chunks_of(req.offset, req.length)
        fua = bool(req.flags & _FUA)
        self._waiting.append(_Waiting(req, payload, held, time.perf_counter(), chunks, fua))
        if not self._asking:
            self._asking = True
            nursery.start_soon(self._ask, nursery)

    async def _ask(self, nursery: trio.Nursery) -> None:
        try:
            while self._waiting:
                batch = self._take()
                done = False
                # Given up at PATIENCE: only the wait for the grant can be
                # cancelled, since nothing awaits once the writes start.
                with trio.move_on_after(PATIENCE) as patience:
                    writes = [(w.req.offset, w.payload) for w in batch]
                    done = await self._written(batch, self._path.write_gathered, writes)
                if patience.cancelled_caught:
                    log.debug("a grant for %d gathered writes is slow; each goes alone", len(batch))
                if not done:
                    self._alone(batch, nursery)
                    continue
                durable = [w for w in batch if w.fua]
                for waiting in batch:
                    if not waiting.fua:
                        self._answer(waiting)
                if durable and not await self._written(durable, self._path.sync_gathered):
                    self._alone(durable, nursery)
                    continue
                for waiting in durable:
                    self._answer(waiting)
        finally:
            self._asking = False

    def _alone(self, batch: list[_Waiting], nursery: trio.Nursery) -> None:
        for waiting in batch:
            nursery.start_soon(self._serve, waiting.req, waiting.payload, waiting.held)

    @staticmethod
    async def _written(
        batch: list[_Waiting],
        step: Callable[..., Awaitable[None]],
        *args: object,
    ) -> bool:
        """Whether `step` for `batch` succeeded (a failure is logged)."""
        try:
            await step(*args)
        except IOFailedError as exc:
            log.debug("%d gathered writes: %s; each goes alone", len(batch), exc)
            return False
        except Exception:
            # A fault of the gateway itself: the writes go the long way.
            log.exception("%d gathered writes failed; each goes alone", len(batch))
            return False
        return True

    def _take(self) -> list[_Waiting]:
        """The oldest writes whose chunks fit one query and whose bytes fit
        BATCH_BYTES (at least one write)."""
        limit = self._path.gather_limit()
        chunks: set[int] = set()
        size = 0
        batch: list[_Waiting] = []
        while self._waiting:
            first = self._waiting[0]
            joined = chunks.union(first.chunks)
            size += len(first.payload)
            if batch and (len(joined) > limit or size > BATCH_BYTES):
                break
            chunks = joined
            batch.append(self._waiting.popleft())
        return batch

    def _answer(self, waiting: _Waiting) -> None:
        self._slots.release()
        self._stats.written_bytes += len(waiting.payload)
        self._stats.timed(waiting.req.command, time.perf_counter() - waiting.taken)
        self._writer.put(tx.simple_reply(waiting.req.cookie), held=waiting.held)
        BUFFERS.give(waiting.payload)
