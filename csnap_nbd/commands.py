"""The transmission phase of one connection: read requests, run each in its
own task (replies may go out of order, so a slow copy-out does not hold up
reads behind it), and send simple or structured replies.

Replies go out through csnap_nbd.replies: the reader sends those it
queued itself before it waits, a writer task the others. Small origin
reads, which need no csnapd round trip, are answered by the reader itself
without a task. Snapshot reads of chunks the owned map
places, some of them on the origin, are read by the reader too, and one
task confirms every such read waiting with csnapd at once before their
replies go; after a confirmation's answers, it waits for the client's
refill of its queue as gathered writes do (csnap_nbd.gathered, RefillWait),
so that a backup's queue of reads shares one query_map. Small origin
writes that need csnapd's grant wait for one they share (csnap_nbd.gathered).

Memory per connection is bounded twice: at most `max_in_flight` requests,
and at most `connection_budget` bytes of READ/WRITE data held at once, from
the moment a request is read until its reply is sent (the reader waits
before taking a request that would go over). A request is checked before
any I/O; an unknown command or flag gets EINVAL and the connection goes on.
Broken framing (bad magic) or a client that vanishes ends only this
connection.
"""

from __future__ import annotations

import logging
import time

import trio
import trio.lowlevel

from csnap_common.logs import chunk_range
from csnap_nbd.buffers import BUFFERS
from csnap_nbd.connection import Connection, PeerClosedError
from csnap_nbd.datapath import ExportGoneError, IOFailedError, UnconfirmedRead
from csnap_nbd.exports import Exports
from csnap_nbd.gathered import GatheredWrites, RefillWait
from csnap_nbd.negotiation import Negotiated
from csnap_nbd.replies import Budget, ReplyWriter
from csnap_nbd.runs import Runs
from csnap_nbd.settings import Settings
from csnap_nbd.stats import ExportStats
from csnap_nbd.wire import NbdProtocolError
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import Command, CommandFlag, Errno
from csnap_nbd.wire.contexts import BASE_ALLOCATION, CSNAP_EXCEPTIONS

__all__ = ["Transmission"]

log = logging.getLogger("csnap.nbd.commands")

_READ = int(Command.READ)
_WRITE = int(Command.WRITE)
_DISC = int(Command.DISC)
_FUA = int(CommandFlag.FUA)
_REQ_ONE = int(CommandFlag.REQ_ONE)
#: Budget every request holds until its reply is sent, on top of its data.
_REPLY_COST = 1024


class Transmission:
    """Serve one negotiated connection until DISC, EOF, an ended export or stop()."""

    def __init__(
        self,
        conn: Connection,
        negotiated: Negotiated,
        exports: Exports,
        settings: Settings,
        stats: ExportStats | None = None,
    ):
        self.conn = conn
        #: This export's counters, for the metrics.
        self.stats = ExportStats() if stats is None else stats
        self.neg = negotiated
        self.path = negotiated.path
        self.exports = exports
        self.settings = settings
        self.structured = negotiated.structured
        self.shape = tx.ExportShape(
            size=self.path.size,
            flags=negotiated.flags,
            structured=negotiated.structured,
            contexts=len(negotiated.contexts),
            max_payload=settings.max_payload,
        )
        self._budget = Budget(settings.connection_budget)
        self._writer = ReplyWriter(conn, self._budget)
        self._slots = trio.Semaphore(settings.max_in_flight)
        #: Reads done that wait for csnapd's confirmation, and whether a task asks for it.
        self._unconfirmed: list[tuple[tx.Request, int, UnconfirmedRead]] = []
        self._confirming = False
        #: Chunks the reads waiting touch (overlaps counted twice).
        self._unconfirmed_chunks = 0
        #: Small origin writes waiting for a grant they share.
        self._gathered = GatheredWrites(
            self.path,
            self._writer,
            self._slots,
            self.stats,
            self._serve,
            in_flight=self._in_flight,
        )
        #: After a batch is confirmed, its refill is waited for as for writes.
        self._confirm_refill = RefillWait(self._in_flight, self._confirm_batch_full)
        self._reading = trio.CancelScope()
        #: Small reads and rewrites answered in runs, straight from the receive buffer.
        self._runs = Runs(
            conn, self.path, self.shape, self._writer, self._budget, self.stats, _REPLY_COST
        )

    def _in_flight(self) -> int:
        return self.settings.max_in_flight - self._slots.value

    def stop(self) -> None:
        """Take no more requests; those in flight finish and are answered."""
        self._reading.cancel()

    async def run(self) -> None:
        """Serve requests; returns once every request taken has been answered.

        Raises:
            NbdProtocolError: the client broke the framing.
            PeerClosedError: the client went away mid-message.
        """
        failure: Exception | None = None
        async with trio.open_nursery() as outer:
            outer.start_soon(self._writer.run)
            watching = trio.CancelScope()
            outer.start_soon(self._stop_when_broken, watching)
            try:
                async with trio.open_nursery() as handlers:
                    with self._reading:
                        try:
                            await self._read(handlers)
                        except (PeerClosedError, NbdProtocolError, trio.BrokenResourceError) as exc:
                            # Requests already taken still run to the end: a
                            # write half done when the client vanished is
                            # finished, not torn.
                            failure = exc
            finally:
                # The writer sends what is queued, then ends the nursery.
                self._writer.close()
                watching.cancel()
        if failure is not None:
            raise failure

    async def _stop_when_broken(self, scope: trio.CancelScope) -> None:
        with scope:
            await self._writer.broken.wait()
            self.stop()

    async def _read(self, nursery: trio.Nursery) -> None:
        try:
            await self._read_requests(nursery)
        finally:
            self._gathered.reader_stopped()
            self._confirm_refill.closed()
            # The replies the reader queued itself wake nobody: they go now,
            # not when the requests still running end (DISC, bad framing, stop).
            self._writer.send_now()

    async def _read_requests(self, nursery: trio.Nursery) -> None:
        header_size = tx.REQUEST.size
        conn = self.conn
        budget = self._budget
        counts = self.stats.requests
        writer = self._writer
        writer.reader = trio.lowlevel.current_task()
        answer_runs = self._runs.answer if self._runs.commands else _no_runs
        while True:
            if answer_runs():
                # What has come of the next request is one a run takes:
                # wait for the rest, and take it in the next run.
                writer.send_now()
                await conn.fill()
                continue
            # Without an await when the header is already received: most
            # requests at a queue depth above one come several to a receive.
            req = conn.parse_now(header_size, tx.parse_request)
            if req is None:
                writer.send_now()
                req = tx.parse_request(await conn.receive_exactly(header_size))
            command = req.command
            counts[command] = counts.get(command, 0) + 1
            if command == _DISC:
                log.debug("disconnect requested")
                return
            if command == _WRITE and req.length > self.settings.max_payload:
                writer.send_now()
                await self._drain(req)
                continue
            # Every reply costs a little until it is sent, and a READ or
            # WRITE its data too: a client that sends without reading its
            # replies stops being read instead of growing the queue.
            held = _REPLY_COST
            if command in (_READ, _WRITE) and req.length <= self.shape.max_payload:
                held += req.length
            if not budget.acquire_now(held):
                writer.send_now()
                await budget.acquire(held)
            payload = await self._payload(req) if command == _WRITE else None
            refusal = tx.check_request(req, self.shape)
            if refusal is not None:
                self._error(req, refusal.error, refusal.message, held)
                continue
            if command in (_READ, _WRITE) and self._answered_now(req, payload, held):
                continue
            await self._take_slot()
            if self._served_later(req, payload, held, nursery):
                continue
            nursery.start_soon(self._serve, req, payload, held)

    async def _payload(self, req: tx.Request) -> bytearray:
        """The data of a WRITE, received whole."""
        payload = BUFFERS.take(req.length)
        if not self.conn.receive_now(payload):
            self._writer.send_now()
            await self.conn.receive_into(payload)
        return payload

    async def _take_slot(self) -> None:
        # Without a checkpoint while one is free: the request reaches its
        # place before anyone else runs, so the slots in use never count one
        # still on its way (GatheredWrites waits for a queue to fill).
        await trio.lowlevel.checkpoint_if_cancelled()  # stop() takes no more
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            self._writer.send_now()  # replies free no slot, but they should not wait
            await self._slots.acquire()

    def _answered_now(self, req: tx.Request, payload: bytearray | None, held: int) -> bool:
        """Serve a READ or WRITE here, without a task, if the export can at once."""
        path = self.path
        try:
            if payload is None:
                data = path.read_now(req.offset, req.length)
                return data is not None and self._read_reply(req, data, held)
            if not path.write_now(req.offset, payload, fua=bool(req.flags & _FUA)):
                return False
        except IOFailedError as exc:
            return self._error(req, exc.error, str(exc), held)
        self.stats.written_bytes += len(payload)
        self._writer.put(tx.simple_reply(req.cookie), held=held)
        BUFFERS.give(payload)
        return True

    def _served_later(
        self, req: tx.Request, payload: bytearray | None, held: int, nursery: trio.Nursery
    ) -> bool:
        """Take a request that needs csnapd without a task of its own, if it
        can be: a READ read here and confirmed later, or a small origin WRITE
        that waits to share a grant with others. It holds a slot until answered."""
        if payload is None:
            return req.command == _READ and self._read_unconfirmed(req, held, nursery)
        if self.path.gathers(req.offset, req.length, fua=bool(req.flags & _FUA)):
            self._gathered.add(req, payload, held, nursery)
            return True
        return False

    def _read_unconfirmed(self, req: tx.Request, held: int, nursery: trio.Nursery) -> bool:
        """Read here data that counts once csnapd confirms it (origin chunks read
        unlocked); its reply waits for the confirmation, which one task asks
        for every read waiting at once. False: serve it in a task of its own.

        Holds a slot until answered, as a task would.
        """
        try:
            read = self.path.read_unconfirmed(req.offset, req.length)
        except IOFailedError:
            return False  # the task's path reports it, as for any read
        if read is None:
            return False
        self._unconfirmed.append((req, held, read))
        self._unconfirmed_chunks += len(self.path.chunks_of(req.offset, req.length))
        self._confirm_refill.added()
        if not self._confirming:
            self._confirming = True
            nursery.start_soon(self._confirm, nursery)
        return True

    async def _confirm(self, nursery: trio.Nursery) -> None:
        """Confirm the reads waiting, in batches, until none is left; a read
        not confirmed is served again in a task of its own."""
        try:
            while self._unconfirmed:
                await self._confirm_refill.linger()
                batch, self._unconfirmed = self._unconfirmed, []
                self._unconfirmed_chunks = 0
                answers: list[bool] = []
                try:
                    answers = await self.path.confirm_reads([read for _, _, read in batch])
                except IOFailedError as exc:
                    log.debug("confirming %d reads: %s", len(batch), exc)
                except Exception:
                    # A fault of the gateway itself: the reads go the long way.
                    log.exception("confirming %d reads failed", len(batch))
                for number, (req, held, read) in enumerate(batch):
                    if number < len(answers) and answers[number]:
                        self._slots.release()
                        self._read_reply(req, read.data, held)
                    else:
                        BUFFERS.give(read.data)
                        nursery.start_soon(self._serve, req, None, held)
                self._confirm_refill.answered()
        finally:
            self._confirming = False

    def _confirm_batch_full(self) -> bool:
        """The reads waiting touch as many chunks as one query_map may name."""
        return self._unconfirmed_chunks >= self.path.gather_limit()

    async def _drain(self, req: tx.Request) -> None:
        """A WRITE longer than advertised: skip its payload if we can, refuse it.

        Past `max_drain` the payload is not worth reading (no client sends
        one; the spec lets a server hang up on a payload that large), and
        without reading it the stream cannot be followed: the connection ends.
        """
        if req.length > self.settings.max_drain:
            raise NbdProtocolError(f"a WRITE of {req.length} bytes")
        await self.conn.discard(req.length)
        refusal = tx.check_request(req, self.shape)
        assert refusal is not None, "a WRITE over the maximum block size is refused"
        self._error(req, refusal.error, refusal.message)

    async def _serve(self, req: tx.Request, payload: bytearray | None, held: int) -> None:
        reply = _Reply(self, req, held)
        started = time.perf_counter()
        try:
            await self._dispatch(req, payload, reply)
        except ExportGoneError as exc:
            log.info(
                "export %s ended: %s",
                self.neg.export.name,
                exc,
                extra={
                    "event": "nbd.export_ended",
                    "export": self.neg.export.name,
                    "snapshot": self.neg.export.tag,
                },
            )
            reply.error(exc.error, str(exc))
            # Nothing on this export will work again: answer what is in
            # flight and close, so clients do not wait on a dead export.
            self.exports.gone(self.path)
            self.stop()
        except IOFailedError as exc:
            log.warning(
                "%s on %s failed: %s",
                _name(req.command),
                self.neg.export.name,
                exc,
                extra={
                    "event": "nbd.request_failed",
                    "export": self.neg.export.name,
                    "snapshot": self.neg.export.tag,
                    "request": req.cookie,
                    "chunks": chunk_range(req.offset, req.length, self.exports.geometry.chunk_size),
                },
            )
            reply.error(exc.error, str(exc))
        except Exception as exc:
            # A fault of the gateway itself: this request fails, but the
            # connection and the requests in flight on it go on.
            log.exception("%s on %s failed", _name(req.command), self.neg.export.name)
            reply.error(Errno.EIO, f"internal error: {type(exc).__name__}")
        finally:
            if not reply.sent:
                self._budget.release(held)
            self._slots.release()
            self.stats.timed(req.command, time.perf_counter() - started)
            if payload is not None:
                BUFFERS.give(payload)

    async def _dispatch(self, req: tx.Request, payload: bytearray | None, reply: _Reply) -> None:
        """Run one request and queue its reply (which releases its budget)."""
        fua = bool(req.flags & _FUA)
        command = req.command
        if command == _READ:
            data = await self.path.read(req.offset, req.length, reply.read)
            reply.read(data)
            return
        if command == _WRITE:
            assert payload is not None
            await self.path.write(req.offset, memoryview(payload), fua=fua)
            self.stats.written_bytes += len(payload)
        elif command == Command.WRITE_ZEROES:
            await self.path.zero(req.offset, req.length, fua=fua)
        elif command == Command.FLUSH:
            await self.path.flush()
        elif command == Command.BLOCK_STATUS:
            reply.put(await self._block_status(req))
            return
        # TRIM and CACHE are hints: the contents after TRIM are whatever they
        # were, which the spec allows, and there is no cache to warm.
        reply.put(tx.simple_reply(req.cookie))

    async def _block_status(self, req: tx.Request) -> bytes:
        req_one = bool(req.flags & _REQ_ONE)
        chunks: list[bytes] = []
        contexts = self.neg.contexts
        for number, context in enumerate(contexts):
            if context is BASE_ALLOCATION:
                extents = await self.path.allocation(req.offset, req.length, req_one=req_one)
            elif context is CSNAP_EXCEPTIONS:
                extents = await self.path.exceptions(req.offset, req.length, req_one=req_one)
            elif context.base is not None:
                extents = await self.path.differences(
                    context.base, req.offset, req.length, req_one=req_one
                )
            else:  # pragma: no cover - select_contexts returns no other context
                raise AssertionError(context)
            done = number == len(contexts) - 1
            chunks.append(tx.block_status_chunk(req.cookie, context.id, extents, done=done))
        return b"".join(chunks)

    # -- replies -------------------------------------------------------------

    def _read_reply(self, req: tx.Request, data: bytearray, held: int) -> bool:
        self.stats.read_bytes += len(data)
        if not self.structured:
            self._writer.put(tx.simple_reply(req.cookie), data, held)
        elif req.length == 0:
            self._writer.put(tx.none_chunk(req.cookie), held=held)
        else:
            header = tx.offset_data_header(req.cookie, req.offset, len(data), done=True)
            self._writer.put(header, data, held)
        return True

    def _error(self, req: tx.Request, error: Errno, message: str, held: int = 0) -> bool:
        log.debug("%s refused: %s (%s)", _name(req.command), error.name, message)
        self.stats.error(error.name)
        if self.structured:
            self._writer.put(tx.error_chunk(req.cookie, error, message), held=held)
        else:
            self._writer.put(tx.simple_reply(req.cookie, error), held=held)
        return True


class _Reply:
    """The one reply of a request: whichever comes first is sent, later ones
    are dropped (a read may be answered before its csnapd bookkeeping ends,
    and an error found after that must not make a second reply)."""

    __slots__ = ("held", "req", "sent", "transmission")

    def __init__(self, transmission: Transmission, req: tx.Request, held: int):
        self.transmission = transmission
        self.req = req
        self.held = held
        self.sent = False

    def put(self, header: bytes) -> None:
        if not self.sent:
            self.sent = True
            self.transmission._writer.put(header, held=self.held)

    def read(self, data: bytearray) -> None:
        if not self.sent:
            self.sent = True
            self.transmission._read_reply(self.req, data, self.held)

    def error(self, error: Errno, message: str) -> None:
        if not self.sent:
            self.sent = True
            self.transmission._error(self.req, error, message, self.held)
        else:
            log.warning("%s failed after its reply: %s", _name(self.req.command), message)


def _no_runs() -> bool:
    """Runs.answer for a connection that has none."""
    return False


def _name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"
