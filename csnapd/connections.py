"""csnapd's connections: accepting, authenticating and serving each peer.

Owns what belongs to one connection and no further: the accept loop
(trio.serve_listeners; the refusal beyond `max_connections` is
csnapd.refusals'); per connection, a reader (MessageStream -> the engine
task's queue) and a writer (outbox -> MessageStream), so a slow reader never
blocks anyone; the hello timer; the lease watch that drops an identified
data-path client silent for longer than `lease` (docs/protocol.md,
"Liveness"); the per-connection limits (`max_in_flight`, `max_frame`, the
outbox, the data waiting for the engine task). Every message queued to a
peer goes through Connections._queue, so none of these touches any other
connection. The engine task (csnapd.serving) hands replies back through
Connections.deliver_to.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import ssl
from dataclasses import dataclass, field

import trio

from csnap_common.allocator import release_free_pages
from csnap_common.credentials import ROLE_ADMIN
from csnap_protocol import (
    Connection,
    ConnectionState,
    Error,
    ErrorCode,
    Hello,
    Keepalive,
    Message,
    Ok,
    RemoteProtocolError,
    Request,
    Role,
    WriteSnapshotData,
    message_id,
)
from csnap_transport import DirectStream, MessageStream
from csnapd.authenticate import Authenticated, authenticate, hello_refusal, request_refusal
from csnapd.dispatch import Connected, Disconnected, Item, Peer, Received
from csnapd.refusals import Refusals
from csnapd.server_config import ServerConfig
from csnapd.server_stats import ServerStats

log = logging.getLogger("csnapd")

#: Replies queued for one connection before it counts as not reading them.
OUTBOX_LIMIT = 4096
#: Largest read from a socket at once.
RECEIVE_SIZE = 1 << 16
#: Messages of one connection waiting for the engine task: past this, its
#: reader stops decoding until the engine has taken some. Requests are bounded
#: by max_in_flight already; this bounds notices (barrier_done) too.
QUEUED_LIMIT = 1024
#: Bytes of snapshot data writes (write_snapshot_data) of one connection
#: waiting for the engine task: past this, its reader stops decoding until
#: the engine has taken some. max_in_flight of them at MAX_WRITE_DATA each
#: would be 16 MiB a connection, and a thousand connections 16 GiB.
QUEUED_DATA_LIMIT = 4 << 20
#: Most queued messages one send carries to a peer.
WRITE_COALESCE = 256
#: Seconds connections get at shutdown to send the replies already queued.
FLUSH_TIMEOUT = 2.0
#: Seconds between looks at whether connections closed, to give their
#: memory back (release_free_pages).
RELEASE_INTERVAL = 2.0
#: Placeholder in an outbox for "send our hello" (the codec builds it).
_HELLO = Ok(0)
#: Placeholder in an outbox for "send what waits in the stream".
_FLUSH = Ok(0)


@dataclass(eq=False)
class _Link:
    """The transport side of a connection."""

    peer: Peer
    messages: MessageStream
    outbox: trio.MemorySendChannel[Message]
    #: trio.current_time() when a message from the peer last arrived.
    heard: float
    in_flight: set[int] = field(default_factory=set)
    closing: bool = False
    #: Its outbox overflowed: nothing more is queued for it.
    dropped: bool = False
    #: Messages handed to the engine task that it has not taken yet.
    queued: int = 0
    #: Bytes of the write_snapshot_data among them.
    queued_data: int = 0
    #: Set once the writer has sent everything queued before the outbox closed.
    flushed: trio.Event = field(default_factory=trio.Event)
    #: The roles the peer's credential grants (csnapd.authenticate).
    roles: frozenset[str] = frozenset()
    #: The stream when it can send without waiting (csnap_transport.DirectStream).
    direct: DirectStream | None = None
    #: Outbox entries the writer has not taken: new messages queue behind them.
    waiting: int = 0
    #: The outbox is closed: nothing more goes out.
    ended: bool = False

    @property
    def stream(self) -> trio.abc.Stream:
        return self.messages.stream

    @property
    def codec(self) -> Connection:
        return self.messages.codec


class Connections:
    """Every connection of one Server, from accept to close."""

    def __init__(
        self,
        config: ServerConfig,
        tls: ssl.SSLContext | None,
        stats: ServerStats,
        items: trio.MemorySendChannel[Item],
        stopping: trio.Event,
    ):
        self.config = config
        #: None only to measure what TLS costs (serve(authenticate=False)).
        self.tls = tls
        self.stats = stats
        #: The engine task's queue: what peers send, as items.
        self._send = items
        #: Set once the server shuts down: hellos are refused from then on.
        self._stopping = stopping
        self._links: dict[Peer, _Link] = {}
        #: Connections accepted and not yet closed, hello said or not.
        self._accepted = 0
        self._refusals = Refusals(config.max_connections, self._authenticate)
        #: Connections closed so far (see release_memory).
        self._closed = 0
        self._numbers = itertools.count(1)
        #: Set (and replaced) whenever the engine task takes a batch.
        self._taken = trio.Event()

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed, hello said or not."""
        return self._accepted

    @property
    def queued_data(self) -> int:
        """Bytes of write_snapshot_data received on every connection and not
        yet taken by the engine task (QUEUED_DATA_LIMIT per connection, and
        the write that crossed it)."""
        return sum(link.queued_data for link in self._links.values())

    async def accept(
        self,
        listeners: list[trio.SocketListener],
        accepting: trio.CancelScope,
        nursery: trio.Nursery,
    ) -> None:
        """Serve every connection on `listeners` in `nursery` until `accepting` is cancelled."""
        self._nursery = nursery
        with accepting:
            await trio.serve_listeners(self._connection, listeners, handler_nursery=nursery)

    def deliver_to(self, peer: Peer, message: Message) -> None:
        """Queue `message`, which answers its request, for `peer` if it is still connected."""
        link = self._links.get(peer)
        if link is not None:
            self._deliver(link, message)

    async def close_peer(self, peer: Peer, why: str) -> None:
        """Close `peer`'s connection, if it is still open, logging `why`."""
        link = self._links.get(peer)
        if link is not None:
            log.warning("%s %s; closing it", peer, why)
            link.closing = True
            await _abort(link.stream)

    def took(self, batch: list[Item]) -> None:
        """Count the batch's messages off their connections; wake waiting readers."""
        for item in batch:
            if isinstance(item, Received):
                link = self._links.get(item.peer)
                if link is not None:
                    link.queued -= 1
                    if isinstance(item.message, WriteSnapshotData):
                        link.queued_data -= len(item.message.data)
        self._taken.set()
        self._taken = trio.Event()

    async def flush(self) -> None:
        """Let every connection send what is queued (the shutdown ok among it)."""
        links = list(self._links.values())
        for link in links:
            link.ended = True
            link.outbox.close()  # its writer sends what is queued, then ends
        with trio.move_on_after(FLUSH_TIMEOUT):
            for link in links:
                await link.flushed.wait()

    async def _connection(self, stream: trio.SocketStream) -> None:
        # Counted before the first checkpoint: a burst of accepts sees every one.
        if self._accepted >= self.config.max_connections:
            await self._refusals.refuse(stream)
            return
        self._accepted += 1
        try:
            await self._serve_connection(stream)
        finally:
            self._accepted -= 1
            self._closed += 1

    async def _authenticate(
        self, stream: trio.SocketStream, within: float, label: str
    ) -> Authenticated | None:
        if self.tls is None:  # measuring TLS's cost: see serve()
            return Authenticated(DirectStream(stream), frozenset({ROLE_ADMIN}))
        return await authenticate(stream, self.tls, within=within, label=label)

    async def release_memory(self) -> None:
        """Once connections have closed, give their freed memory back to the system.

        Each TLS connection leaves its buffers' holes in the heap when it
        closes: without this, every burst of connections would leave csnapd
        larger (docs/operations.md, "Memory").
        """
        released = 0
        while True:
            await trio.sleep(RELEASE_INTERVAL)
            if self._closed != released:
                released = self._closed
                # A closed connection's objects may sit in reference cycles
                # (tasks, streams, their buffers) that only the cyclic
                # collector frees, and an idle server allocates too little
                # to trigger it: collected first, they can be given back.
                gc.collect()
                await trio.to_thread.run_sync(release_free_pages)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            label = f"{host}:{port}"
        except OSError:
            label = "?"
        secured = await self._authenticate(stream, self.config.hello_timeout, label)
        if secured is None:
            return
        codec = Connection(Role.SERVER, max_frame=self.config.max_frame, name="csnapd")
        send, receive = trio.open_memory_channel[Message](OUTBOX_LIMIT)
        peer = Peer(next(self._numbers), Role.CLIENT, label)
        link = _Link(
            peer,
            MessageStream(secured.stream, codec),
            send,
            trio.current_time(),
            roles=secured.roles,
            direct=secured.stream if isinstance(secured.stream, DirectStream) else None,
        )
        async with link.stream, trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, link, receive)
            nursery.start_soon(self._hello_timer, link)
            nursery.start_soon(self._lease_watch, link)
            try:
                await self._reader(link)
            finally:
                link.closing = True
                self.stats.gone(peer)
                if peer in self._links:
                    del self._links[peer]
                    self._send.send_nowait(Disconnected(peer))
                link.ended = True
                send.close()  # the writer sends what is queued, then ends
            # ... if the peer takes it in time: it may not be reading at all.
            with trio.move_on_after(FLUSH_TIMEOUT):
                await link.flushed.wait()
            nursery.cancel_scope.cancel()

    async def _hello_timer(self, link: _Link) -> None:
        """Close a connection that says no hello in time: it holds a socket for nothing."""
        await trio.sleep(self.config.hello_timeout)
        if link.peer not in self._links and not link.closing:
            log.warning(
                "%s said no hello within %gs; closing it", link.peer, self.config.hello_timeout
            )
            link.closing = True
            await _abort(link.stream)

    async def _lease_watch(self, link: _Link) -> None:
        """Drop an identified data-path client silent for longer than the lease.

        Dropping it releases its read locks and its barrier duty. The client
        stops trusting its locks before this can happen: it counts the lease
        from when it sent a request this server answered, which is no later
        than when this server heard it (docs/protocol.md, "Liveness").
        """
        lease, peer = self.config.lease, link.peer
        while not link.closing:
            await trio.sleep_until(link.heard + lease)
            if link.closing:
                return
            if peer.role is Role.ADMIN:
                return  # holds no locks and no barrier duty
            if trio.current_time() - link.heard < lease:
                continue  # heard from meanwhile
            if not peer.identified or link.queued:
                # It holds nothing yet, or its own messages wait for the
                # engine task (then its silence is ours): look again later.
                await trio.sleep(lease / 4)
                continue
            log.warning(
                "%s silent for more than its lease (%gs): dropping it, releasing its"
                " read locks and barrier duty",
                peer,
                lease,
            )
            link.closing = True
            await _abort(link.stream)
            return

    async def _reader(self, link: _Link) -> None:
        try:
            # Once closing (a refused hello, say), what follows is dropped:
            # a refused peer's requests must never run.
            while not link.closing:
                message = await link.messages.receive()
                if message is None or link.closing:
                    return
                link.heard = trio.current_time()
                self._admit(link, message)
                while not link.closing and (
                    link.queued >= QUEUED_LIMIT or link.queued_data >= QUEUED_DATA_LIMIT
                ):
                    await self._taken.wait()
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", link.peer, exc)
            self._queue(link, Error(None, int(exc.code), exc.code.symbol, str(exc)[:1024]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _admit(self, link: _Link, message: Message) -> None:
        """Take one message from the peer: answer it here, refuse it, or queue it."""
        if isinstance(message, Hello):
            self._hello(link, message)
            return
        if isinstance(message, Keepalive):
            # Answered here, not by the engine task: a busy engine must not
            # make a live client look silent to itself.
            self._queue(link, Ok(message.id))
            return
        if isinstance(message, Request) and not self._take_request(link, message):
            return
        link.queued += 1
        if isinstance(message, WriteSnapshotData):
            link.queued_data += len(message.data)
        self._send.send_nowait(Received(link.peer, message))

    def _hello(self, link: _Link, message: Hello) -> None:
        """Answer a hello, or refuse it and close the connection."""
        peer = link.peer
        if self._stopping.is_set():
            self._refuse(link, ErrorCode.SHUTTING_DOWN, "the server is shutting down")
            return
        if Role(message.role) not in (Role.CLIENT, Role.ADMIN):
            self._refuse(
                link,
                ErrorCode.WRONG_ROLE,
                f"csnapd serves clients and admins, not a {message.role}",
            )
            return
        refusal = hello_refusal(link.roles, Role(message.role))
        if refusal is not None:
            self._refuse(link, ErrorCode.NOT_PERMITTED, refusal)
            return
        peer.role = Role(message.role)
        peer.max_frame = link.codec.peer_max_frame
        self._links[peer] = link
        self._queue(link, _HELLO)
        self._send.send_nowait(Connected(peer))
        log.info(
            "%s connected as %s",
            peer,
            peer.role.value,
            extra={
                "event": "client.connected",
                "connection": peer.number,
                "peer": peer.label,
                "role": peer.role.value,
            },
        )

    def _take_request(self, link: _Link, message: Request) -> bool:
        """Whether the request may go to the engine task; if not, it is refused."""
        peer = link.peer
        self.stats.arrived(peer, message)
        request = message.id
        refusal = request_refusal(link.roles, peer.role, message)
        if refusal is not None and peer in self._links:
            self._deliver(
                link,
                _error_message(request, ErrorCode.NOT_PERMITTED, refusal),
                finished=False,
            )
            return False
        if request in link.in_flight:
            # The first request with this id is still in flight: keep it.
            self._deliver(
                link,
                _error_message(request, ErrorCode.DUPLICATE_REQUEST, "request id in flight"),
                finished=False,
            )
            return False
        if len(link.in_flight) >= self.config.max_in_flight:
            self._error(
                link,
                request,
                ErrorCode.TOO_MANY_REQUESTS,
                f"more than {self.config.max_in_flight} requests in flight",
            )
            return False
        link.in_flight.add(request)
        return True

    def _error(self, link: _Link, request: int | None, code: ErrorCode, text: str) -> None:
        self._deliver(link, _error_message(request, code, text))

    def _refuse(self, link: _Link, code: ErrorCode, text: str) -> None:
        self._error(link, None, code, text)
        link.closing = True

    async def _writer(self, link: _Link, outbox: trio.MemoryReceiveChannel[Message]) -> None:
        try:
            await self._write_all(link, outbox)
        finally:
            link.flushed.set()

    async def _write_all(self, link: _Link, outbox: trio.MemoryReceiveChannel[Message]) -> None:
        # Everything queued goes out in one send: a batch's replies to one
        # peer cost one system call and one wake-up of the peer, not one each.
        # Ends once the outbox is closed and drained, and the stream flushed.
        direct = link.direct
        try:
            async for first in outbox:
                messages = [first]
                while len(messages) < WRITE_COALESCE:
                    try:
                        messages.append(outbox.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                link.waiting -= len(messages)
                data = bytearray()
                for message in messages:
                    if message is not _FLUSH:
                        data += self._encode(link, message)
                if data:
                    await link.messages.send_bytes(bytes(data))
                elif direct is not None:
                    await direct.flush()
            if direct is not None:
                await direct.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _encode(self, link: _Link, message: Message) -> bytes:
        """The bytes for `message` on this link (b"" for nothing to send)."""
        if link.codec.state is ConnectionState.ERROR and not isinstance(message, Error):
            return b""  # the peer broke the protocol: only our error goes out
        if message is _HELLO:
            return link.codec.hello()
        return link.messages.encode_answer(message, link.peer)

    def _deliver(self, link: _Link, message: Message, *, finished: bool = True) -> None:
        """Queue `message`; `finished`: it answers its request id."""
        request = message_id(message)
        if finished and request is not None and not isinstance(message, Hello):
            link.in_flight.discard(request)
        self.stats.replied(link.peer, message, request, finished)
        self._queue(link, message)

    def _queue(self, link: _Link, message: Message) -> None:
        """Queue `message` for the peer; a peer whose outbox is full is closed.

        The only way anything enters an outbox: a peer that does not read
        costs its own connection and nothing else.
        """
        if link.dropped:
            return
        direct = link.direct
        if direct and not (link.in_flight or link.waiting or direct.unsent or link.ended):
            # The peer waits for nothing else, nothing of its is queued: sent
            # now, not waking the writer (it flushes what the kernel did not
            # take). Replies to a peer with more requests in flight go through
            # the writer, several to a send.
            self._send_now(link, direct, message)
            return
        try:
            link.outbox.send_nowait(message)
            link.waiting += 1
        except trio.WouldBlock:
            log.warning("%s does not read its replies; closing it", link.peer)
            link.dropped = True
            link.closing = True
            self._nursery.start_soon(_abort, link.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is ending; its writer sends no more

    def _send_now(self, link: _Link, direct: DirectStream, message: Message) -> None:
        """Send `message` at once; what the kernel does not take is the writer's to flush."""
        data = self._encode(link, message)
        if not data:
            return
        try:
            if direct.send_now(data):
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return  # the reader learns it too, and ends the connection
        with contextlib.suppress(
            trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            link.outbox.send_nowait(_FLUSH)  # wakes the writer: the rest waits in the stream
            link.waiting += 1


async def _abort(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1):
        await trio.aclose_forcefully(stream)


def _error_message(request: int | None, code: ErrorCode, text: str) -> Error:
    return Error(request, int(code), code.symbol, text[:1024])
