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
and both processes' CPU per write grows by a fifth).

A client such as a VM's block layer keeps a queue of writes in flight and
sends the next one as it reads each reply. After a batch is answered, the
first of those refills would find no task asking and go alone, and the
rest wait for its commit: a queue of 16 split into asks of 1 and 15, two
commits where one does. So a write that comes within `REFILL_WINDOW` of a
batch's answers waits while the connection has fewer requests in flight
than the most it had since the answers before (its queue's depth) and
writes keep coming, one at least in every `REFILL_GAP`, for at most
`MOST_LINGER`; a queue full again, or writes enough for a whole batch,
end the wait at once. The depth is what the last cycle (answers to
answers) showed, so a client whose queue shrinks pays once, in the one
cycle after, and one that keeps its queue full reaches its depth in every
cycle, even one the wait cut short (the rest of the refill comes while
csnapd commits): no pattern the wait falls into feeds itself. A client
that sends its next writes only after all its replies waits one gap per
batch it leaves waiting.

A grant that does not
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
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import trio
import trio.lowlevel

from csnap_nbd.buffers import BUFFERS
from csnap_nbd.datapath import DataPath, IOFailedError
from csnap_nbd.replies import ReplyWriter
from csnap_nbd.stats import ExportStats
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import CommandFlag

__all__ = [
    "GatheredWrites",
    "PATIENCE",
    "BATCH_BYTES",
    "MOST_LINGER",
    "REFILL_GAP",
    "REFILL_WINDOW",
    "RefillWait",
]

log = logging.getLogger("csnap.nbd.commands")

_FUA = int(CommandFlag.FUA)

#: Seconds a shared grant may take before its writes are served alone
#: (a commit takes milliseconds; a parked write, up to a lease).
PATIENCE = 0.25
#: Most bytes one batch writes.
BATCH_BYTES = 2 << 20
#: A refill's writes come closer together than this (qemu's 15 to 400 µs
#: apart; trio's timers wake at millisecond steps in any case).
REFILL_GAP = 0.001
#: Longest a gathered write waits for the rest of a refill.
MOST_LINGER = 0.003
#: A write that comes later than this after a batch was answered refills
#: nothing: it is asked for as it comes.
REFILL_WINDOW = 0.005

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


class RefillWait:
    """The wait, after a batch is answered, for the writes a client sends in
    the slots the answers freed (module docstring). Times are trio's clock."""

    def __init__(self, in_flight: Callable[[], int], batch_full: Callable[[], bool]) -> None:
        #: The connection's requests in flight, counting one being added.
        self._in_flight = in_flight
        #: The writes waiting already make a whole batch.
        self._batch_full = batch_full
        #: The most requests in flight since the last answers, and in the
        #: cycle (answers to answers) before.
        self._peak = 0
        self._last_peak = 0
        #: When the last batch was answered.
        self._answered_at = -math.inf
        #: Writes added so far, and set once the wait should end at once.
        self._arrivals = 0
        self._full = trio.Event()
        #: The connection's reader has stopped: nothing more comes.
        self._closed = False

    @property
    def depth(self) -> int:
        """The queue a refill is waited for to fill."""
        return max(self._peak, self._last_peak)

    def added(self) -> None:
        """A write to gather came."""
        self._peak = max(self._peak, self._in_flight())
        self._arrivals += 1
        if not self._waits():
            self._full.set()

    def answered(self) -> None:
        """A batch's replies are queued."""
        self._last_peak, self._peak = self._peak, self._in_flight()
        self._answered_at = trio.current_time()

    def closed(self) -> None:
        """The reader stopped; a wait ends now."""
        self._closed = True
        self._full.set()

    def _waits(self) -> bool:
        """The queue may fill further: no reason to end a wait at once."""
        return not (self._closed or self._in_flight() >= self.depth or self._batch_full())

    async def linger(self) -> None:
        """Wait while the writes of a refill keep coming: until the queue is
        full again, a batch is whole, a gap passes with none, or MOST_LINGER."""
        now = trio.current_time()
        if now - self._answered_at >= REFILL_WINDOW:
            return
        deadline = now + MOST_LINGER
        # An arrival wakes this task only once the wait should end: a look
        # at the count once a gap costs less than a wake-up per write.
        self._full = trio.Event()
        while self._waits():
            arrivals = self._arrivals
            left = deadline - trio.current_time()
            if left <= 0:
                return
            with trio.move_on_after(min(REFILL_GAP, left)) as gap:
                await self._full.wait()
            if gap.cancelled_caught:
                # A reader woken in the same pass of the run loop adds its
                # write before it next yields: let it, before looking.
                await trio.lowlevel.checkpoint()
            if self._arrivals == arrivals:
                return


class GatheredWrites:
    """The writes of one connection waiting for a shared grant."""

    def __init__(
        self,
        path: DataPath,
        writer: ReplyWriter,
        slots: trio.Semaphore,
        stats: ExportStats,
        serve: Serve,
        in_flight: Callable[[], int],
    ):
        self._path = path
        self._writer = writer
        self._slots = slots
        self._stats = stats
        self._serve = serve
        self._waiting: deque[_Waiting] = deque()
        #: A task is asking (one at a time; module docstring).
        self._asking = False
        #: Bytes and chunks (overlaps counted twice) of the writes waiting.
        self._waiting_bytes = 0
        self._waiting_chunks = 0
        self._refill = RefillWait(in_flight, self._batch_full)

    def add(self, req: tx.Request, payload: bytearray, held: int, nursery: trio.Nursery) -> None:
        """Take a WRITE the path gathers (DataPath.gathers); its reply follows
        the grant. The caller holds a slot for it, released here once answered."""
        chunks = self._path.chunks_of(req.offset, req.length)
        fua = bool(req.flags & _FUA)
        self._waiting.append(_Waiting(req, payload, held, time.perf_counter(), chunks, fua))
        self._waiting_bytes += len(payload)
        self._waiting_chunks += len(chunks)
        self._refill.added()
        if not self._asking:
            self._asking = True
            nursery.start_soon(self._ask, nursery)

    async def _ask(self, nursery: trio.Nursery) -> None:
        try:
            while self._waiting:
                await self._refill.linger()
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
                self._refill.answered()
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
            self._waiting_bytes -= len(first.payload)
            self._waiting_chunks -= len(first.chunks)
        return batch

    def _batch_full(self) -> bool:
        """The writes waiting make a whole batch (or more): none could join."""
        return (
            self._waiting_bytes >= BATCH_BYTES or self._waiting_chunks >= self._path.gather_limit()
        )

    def reader_stopped(self) -> None:
        """No more writes come on this connection: the next ask waits for none."""
        self._refill.closed()

    def _answer(self, waiting: _Waiting) -> None:
        self._slots.release()
        self._stats.written_bytes += len(waiting.payload)
        self._stats.timed(waiting.req.command, time.perf_counter() - waiting.taken)
        self._writer.put(tx.simple_reply(waiting.req.cookie), held=waiting.held)
        BUFFERS.give(waiting.payload)
