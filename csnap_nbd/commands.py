# The transmission phase of one connection: read requests, run each in its
# own task (replies may go out of order, so a slow copy-out does not hold up
# reads behind it), and send simple or structured replies.
#
# Memory per connection is bounded twice: at most `max_in_flight` requests,
# and at most `connection_budget` bytes of READ/WRITE data held at once (the
# reader waits before taking a request that would go over). A request is
# checked before any I/O; an unknown command or flag gets EINVAL and the
# connection goes on. Broken framing (bad magic) or a client that vanishes
# ends only this connection.
from __future__ import annotations

import logging

import trio
import trio.lowlevel

from csnap_nbd.connection import Connection, PeerClosedError
from csnap_nbd.datapath import ExportGoneError, IOFailedError
from csnap_nbd.exports import Exports
from csnap_nbd.negotiation import Negotiated
from csnap_nbd.settings import Settings
from csnap_nbd.wire import NbdProtocolError
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import Command, CommandFlag, Errno
from csnap_nbd.wire.contexts import BASE_ALLOCATION, CSNAP_EXCEPTIONS

__all__ = ["Transmission"]

log = logging.getLogger("csnap.nbd.commands")


class _Budget:
    """Bytes of request data a connection holds; only its reader acquires."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lot = trio.lowlevel.ParkingLot()

    async def acquire(self, size: int) -> None:
        # A request alone may use the whole budget, whatever its size.
        while self.used and self.used + size > self.limit:
            await self._lot.park()
        self.used += size

    def release(self, size: int) -> None:
        self.used -= size
        self._lot.unpark_all()


class Transmission:
    """Serve one negotiated connection until DISC, EOF, an ended export or stop()."""

    def __init__(
        self, conn: Connection, negotiated: Negotiated, exports: Exports, settings: Settings
    ):
        self.conn = conn
        self.neg = negotiated
        self.path = negotiated.path
        self.exports = exports
        self.settings = settings
        self.shape = tx.ExportShape(
            size=self.path.size,
            flags=negotiated.flags,
            structured=negotiated.structured,
            contexts=len(negotiated.contexts),
            max_payload=settings.max_payload,
        )
        self._budget = _Budget(settings.connection_budget)
        self._slots = trio.Semaphore(settings.max_in_flight)
        self._reading = trio.CancelScope()
        self._broken = False

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
        async with trio.open_nursery() as nursery:
            with self._reading:
                try:
                    await self._read(nursery)
                except (PeerClosedError, NbdProtocolError, trio.BrokenResourceError) as exc:
                    # Requests already taken still run to the end: a write
                    # half done when the client vanished is finished, not torn.
                    failure = exc
        if failure is not None:
            raise failure

    async def _read(self, nursery: trio.Nursery) -> None:
        header_size = tx.REQUEST.size
        while True:
            req = tx.parse_request(await self.conn.receive_exactly(header_size))
            if req.command == Command.DISC:
                log.debug("disconnect requested")
                return
            payload: bytearray | None = None
            held = 0
            if req.command == Command.WRITE:
                if req.length > self.settings.max_payload:
                    await self._drain(req)
                    continue
                held = req.length
                await self._budget.acquire(held)
                payload = bytearray(req.length)
                await self.conn.receive_into(payload)
            refusal = tx.check_request(req, self.shape)
            if refusal is not None:
                self._budget.release(held)
                await self._error(req, refusal.error, refusal.message)
                continue
            if req.command == Command.READ:
                held = req.length
                await self._budget.acquire(held)
            await self._slots.acquire()
            nursery.start_soon(self._serve, req, payload, held)

    async def _drain(self, req: tx.Request) -> None:
        """A WRITE longer than advertised: skip its payload if we can, refuse it."""
        if req.length > self.settings.max_drain:
            raise NbdProtocolError(f"a WRITE of {req.length} bytes")
        await self.conn.discard(req.length)
        await self._error(
            req,
            Errno.EOVERFLOW,
            f"{req.length} bytes in one WRITE (at most {self.shape.max_payload})",
        )

    async def _serve(self, req: tx.Request, payload: bytearray | None, held: int) -> None:
        try:
            await self._dispatch(req, payload)
        except ExportGoneError as exc:
            log.info("export %s ended: %s", self.neg.export.name, exc)
            await self._error(req, exc.error, str(exc))
            # Nothing on this export will work again: answer what is in
            # flight and close, so clients do not wait on a dead export.
            self.exports.gone(self.path)
            self.stop()
        except IOFailedError as exc:
            log.warning("%s on %s failed: %s", _name(req.command), self.neg.export.name, exc)
            await self._error(req, exc.error, str(exc))
        finally:
            self._budget.release(held)
            self._slots.release()

    async def _dispatch(self, req: tx.Request, payload: bytearray | None) -> None:
        fua = bool(req.flags & CommandFlag.FUA)
        command = req.command
        if command == Command.READ:
            data = await self.path.read(req.offset, req.length)
            await self._read_reply(req, data)
            return
        if command == Command.WRITE:
            assert payload is not None
            await self.path.write(req.offset, memoryview(payload), fua=fua)
        elif command == Command.WRITE_ZEROES:
            await self.path.zero(req.offset, req.length, fua=fua)
        elif command == Command.FLUSH:
            await self.path.flush()
        elif command == Command.BLOCK_STATUS:
            await self._block_status(req)
            return
        # TRIM and CACHE are hints: the contents after TRIM are whatever they
        # were, which the spec allows, and there is no cache to warm.
        await self._ok(req)

    async def _block_status(self, req: tx.Request) -> None:
        req_one = bool(req.flags & CommandFlag.REQ_ONE)
        chunks: list[bytes] = []
        contexts = self.neg.contexts
        for number, context in enumerate(contexts):
            if context is BASE_ALLOCATION:
                extents = self.path.allocation(req.length)
            elif context is CSNAP_EXCEPTIONS:
                extents = await self.path.exceptions(req.offset, req.length, req_one=req_one)
            else:  # pragma: no cover - select_contexts only returns the two above
                raise AssertionError(context)
            done = number == len(contexts) - 1
            chunks.append(tx.block_status_chunk(req.cookie, context.id, extents, done=done))
        await self._send(b"".join(chunks))

    # -- replies -------------------------------------------------------------

    async def _send(self, header: bytes, data: bytes | bytearray | memoryview = b"") -> None:
        if self._broken:
            return
        try:
            await self.conn.send(header, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client is gone; the reader sees it too and ends the connection.
            self._broken = True
            self.stop()

    async def _ok(self, req: tx.Request) -> None:
        await self._send(tx.simple_reply(req.cookie))

    async def _read_reply(self, req: tx.Request, data: bytearray) -> None:
        if not self.shape.structured:
            await self._send(tx.simple_reply(req.cookie), data)
        elif req.length == 0:
            await self._send(tx.none_chunk(req.cookie))
        else:
            header = tx.offset_data_header(req.cookie, req.offset, len(data), done=True)
            await self._send(header, data)

    async def _error(self, req: tx.Request, error: Errno, message: str) -> None:
        log.debug("%s refused: %s (%s)", _name(req.command), error.name, message)
        if self.shape.structured:
            await self._send(tx.error_chunk(req.cookie, error, message))
        else:
            await self._send(tx.simple_reply(req.cookie, error))


def _name(command: int) -> str:
    try:
        return Command(command).name
    except ValueError:
        return f"command {command}"
