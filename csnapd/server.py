"""The csnapd server: the trio transport around the Dispatcher.

Tasks:
  * trio.serve_listeners, accepting connections on every address;
  * per connection, a reader (MessageStream -> work queue) and a writer
    (outbox -> MessageStream), so a slow reader never blocks anyone;
  * one engine task: takes everything queued, hands the batch to the
    Dispatcher in a worker thread (the engine's syncs stay off the event
    loop), then delivers the replies: group commit;
  * timers for barriers, detaching clients and the post-restart grace;
  * per connection, a lease watch: an identified data-path client silent
    for longer than `lease` is dropped, which releases its read locks and
    its barrier duty (docs/protocol.md, "Liveness").

Resource handling: a connection accepted beyond `max_connections` (said
hello or not) is refused with an error; a request beyond `max_in_flight` on
one connection is refused with an error; a frame beyond `max_frame` closes
that connection; a peer whose outbox fills (it does not read its replies)
is closed. Every message queued to a peer goes through Server._queue, so
none of these touches any other connection.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio
import trio.lowlevel
from csnap_transport import MessageStream

from csnap_common import join_host_port
from csnap_common.allocator import release_free_pages
from csnap_common.credentials import ROLE_ADMIN
from csnap_common.limits import DEFAULT_MAX_CHUNKS, MAX_REQUEST_CHUNKS
from csnap_common.systemd import notify_status, notify_stopping
from csnap_protocol import (
    DEFAULT_MAX_FRAME,
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
    message_id,
)
from csnapd.agent_link import AgentLink
from csnapd.authenticate import Authenticated, authenticate, hello_refusal, request_refusal
from csnapd.credentials import server_tls
from csnapd.dispatch import (
    DEFAULT_MAX_READ_LOCKS,
    DEFAULT_MAX_SERVER_READ_LOCKS,
    BarrierExpired,
    Connected,
    Disconnected,
    Dispatcher,
    GraceExpired,
    Item,
    Outcome,
    Peer,
    Received,
    SweepTick,
    error_code,
)
from csnapd.engine import DEFAULT_CACHE_BYTES, Engine, EngineError, FencedError
from csnapd.fencing import Fence
from csnapd.group_commit import Gathering
from csnapd.server_stats import ServerStats
from csnapd.space_watch import SpacePolicy

__all__ = ["ServerConfig", "Server", "serve", "ServerFailedError", "ServerFencedError"]

log = logging.getLogger("csnapd")

#: Replies queued for one connection before it counts as not reading them.
OUTBOX_LIMIT = 4096
#: Largest read from a socket at once.
RECEIVE_SIZE = 1 << 16
#: Messages of one connection waiting for the engine task: past this, its
#: reader stops decoding until the engine has taken some. Requests are bounded
#: by max_in_flight already; this bounds notices (barrier_done) too.
QUEUED_LIMIT = 1024
#: Most queued messages one send carries to a peer.
WRITE_COALESCE = 256
#: Seconds connections get at shutdown to send the replies already queued.
FLUSH_TIMEOUT = 2.0
#: Connections being refused at once for max_connections (each is given a
#: moment to read its error); beyond this, one is closed without a word.
REFUSING_LIMIT = 64
#: Seconds a refused connection gets to read its error before it is closed.
REFUSE_LINGER = 1.0
#: Seconds between looks at whether connections closed, to give their
#: memory back (release_free_pages).
RELEASE_INTERVAL = 2.0
#: Placeholder in an outbox for "send our hello" (the codec builds it).
_HELLO = Ok(0)


class ServerFailedError(Exception):
    """The engine failed (a commit could not be made durable); the server stopped."""


class ServerFencedError(Exception):
    """The server lost its lease or saw a newer fencing token; it stopped writing."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything csnapd is started with."""

    store: str
    origin: str
    host: str = "127.0.0.1"
    port: int = 0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    #: Seconds origin writes wait for lock uploads after a crash.
    grace: float = 30.0
    #: Seconds a create waits for origin clients to finish granted writes.
    barrier_timeout: float = 30.0
    #: Seconds a deleted snapshot's clients get to finish and close.
    detach_timeout: float = 30.0
    #: Seconds an identified data-path client may stay silent before it is
    #: dropped with its read locks and barrier duty (clients send keepalives).
    lease: float = 5.0
    #: Connections open at once, counted from accept, hello said or not.
    max_connections: int = 1024
    #: Seconds a new connection has to say hello before it is closed.
    hello_timeout: float = 10.0
    max_in_flight: int = 256
    max_frame: int = DEFAULT_MAX_FRAME
    #: Most chunks one request may name (clients split larger ones).
    max_chunks: int = DEFAULT_MAX_CHUNKS
    #: Most items one batch (one transaction) takes.
    max_batch: int = 512
    #: Most read locks one connection holds (a chunk locked twice counts twice).
    max_read_locks: int = DEFAULT_MAX_READ_LOCKS
    #: Most read locks all connections hold together.
    max_server_read_locks: int = DEFAULT_MAX_SERVER_READ_LOCKS
    #: The node agent's socket: register there and wait on standby to be started.
    agent: str | None = None
    #: The data area's warning threshold and free-space reserve.
    space: SpacePolicy = field(default_factory=SpacePolicy)
    #: The directory with the cluster CA and the server credential; None:
    #: STORE.keys, made there when listening on loopback (csnapd.credentials).
    credentials: Path | None = None
    #: O_DIRECT for the store and origin: None for block devices only, True
    #: for files too, False never (csnap_common.direct_io).
    direct: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_chunks <= MAX_REQUEST_CHUNKS:
            raise ValueError(
                f"max_chunks is 1..{MAX_REQUEST_CHUNKS} (what the engine takes in one request),"
                f" not {self.max_chunks}"
            )


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
    #: Set once the writer has sent everything queued before the outbox closed.
    flushed: trio.Event = field(default_factory=trio.Event)
    #: The roles the peer's credential grants (csnapd.authenticate).
    roles: frozenset[str] = frozenset()

    @property
    def stream(self) -> trio.abc.Stream:
        return self.messages.stream

    @property
    def codec(self) -> Connection:
        return self.messages.codec


class Server:
    """A running csnapd; see serve()."""

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine,
        address: str,
        tls: ssl.SSLContext | None,
        fence: Fence | None = None,
    ):
        self.config = config
        #: None only to measure what TLS costs (serve(authenticate=False)).
        self.tls = tls
        #: The lease and token it serves under, when elected through a cluster.
        self.fence = fence
        self.fenced = False
        self.engine = engine
        self.address = address
        self.dispatcher = Dispatcher(
            engine,
            address=address,
            store=config.store,
            origin=config.origin,
            max_chunks=config.max_chunks,
            lease_ms=math.ceil(config.lease * 1000),
            max_read_locks=config.max_read_locks,
            max_server_read_locks=config.max_server_read_locks,
            space=config.space,
        )
        self._send, self._receive = trio.open_memory_channel[Item](math.inf)
        self._gathering = Gathering()
        self._links: dict[Peer, _Link] = {}
        #: Connections accepted and not yet closed, hello said or not.
        self._accepted = 0
        #: Connections being refused for max_connections.
        self._refusing = 0
        #: Connections closed so far (see _release_memory).
        self._closed = 0
        self._numbers = itertools.count(1)
        self._stopping = trio.Event()
        self._stopped = trio.Event()
        #: Set (and replaced) whenever the engine task takes a batch.
        self._taken = trio.Event()
        self._shutdown_reply: tuple[Peer, int] | None = None
        self.failed = False
        #: Requests, errors, latencies, batches and commits, for the metrics.
        self.stats = ServerStats()
        #: Held while the engine works in a worker thread (a commit, the
        #: close): whoever else reads the engine from the event loop, the
        #: metrics, takes it first.
        self.engine_lock = trio.Lock()

    @property
    def stopping(self) -> bool:
        """Shutdown has begun."""
        return self._stopping.is_set()

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed, hello said or not."""
        return self._accepted

    # -- lifecycle -------------------------------------------------------------

    def request_shutdown(self) -> None:
        """Stop: finish in-flight work, close the store cleanly (idempotent)."""
        self._stopping.set()

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        stop: trio.Event | None = None,
        task_status: trio.TaskStatus[None],
    ) -> None:
        """Serve until `stop` is set or an administrator asks for shutdown."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if stop is not None:
                nursery.start_soon(_stop_on, stop, self)
            accepting = trio.CancelScope()
            nursery.start_soon(self._accept, listeners, accepting)
            nursery.start_soon(self._engine_loop)
            if self.fence is not None:
                nursery.start_soon(self._fence_watch, self.fence)
            nursery.start_soon(self._release_memory)
            if self.dispatcher.grace:
                nursery.start_soon(self._after, self.config.grace, GraceExpired())
            task_status.started()
            await self._stopping.wait()
            log.info("shutting down", extra={"event": "server.stopping", "address": self.address})
            notify_stopping()
            accepting.cancel()  # closes the listeners
            await self._stopped.wait()
            await self._flush()
            nursery.cancel_scope.cancel()
        await self._close_engine()

    async def _flush(self) -> None:
        """Let every connection send what is queued (the shutdown ok among it)."""
        links = list(self._links.values())
        for link in links:
            link.outbox.close()  # its writer sends what is queued, then ends
        with trio.move_on_after(FLUSH_TIMEOUT):
            for link in links:
                await link.flushed.wait()

    async def _fence_watch(self, fence: Fence) -> None:
        await fence.watch(partial(trio.to_thread.run_sync, self.engine.fence_token_on_disk))
        self._fenced()

    def _fenced(self) -> None:
        self.fenced = True
        notify_status("fenced: another server may own the store")
        self._stopping.set()

    async def _close_engine(self) -> None:
        if self.failed:
            return
        if self.fenced:
            # Not even "clean": the store belongs to the server elected since.
            await trio.to_thread.run_sync(self.engine.abandon)
            return
        async with self.engine_lock:
            await trio.to_thread.run_sync(self.engine.close)
        log.info(
            "store closed cleanly", extra={"event": "store.closed", "store": self.config.store}
        )

    async def _after(self, seconds: float, item: Item) -> None:
        await trio.sleep(seconds)
        self._send.send_nowait(item)

    # -- connections ---------------------------------------------------------

    async def _accept(
        self, listeners: list[trio.SocketListener], accepting: trio.CancelScope
    ) -> None:
        with accepting:
            await trio.serve_listeners(self._connection, listeners, handler_nursery=self._nursery)

    async def _connection(self, stream: trio.SocketStream) -> None:
        # Counted before the first checkpoint: a burst of accepts sees every one.
        if self._accepted >= self.config.max_connections:
            await self._refuse_connection(stream)
            return
        self._accepted += 1
        try:
            await self._serve_connection(stream)
        finally:
            self._accepted -= 1
            self._closed += 1

    async def _refuse_connection(self, stream: trio.SocketStream) -> None:
        """One connection too many: say so (when not too busy refusing) and close."""
        if self._refusing >= REFUSING_LIMIT:
            log.warning("too many connections: closing a new one without a message")
            return  # serve_listeners closes the stream
        self._refusing += 1
        log.warning("too many connections (%d): refusing a new one", self.config.max_connections)
        await self._send_refusal(stream)

    async def _send_refusal(self, stream: trio.SocketStream) -> None:
        codec = Connection(Role.SERVER, name="csnapd")
        secured = await self._authenticate(stream, REFUSE_LINGER, "refused")
        if secured is None:
            self._refusing -= 1
            return
        refusal = _error_message(
            None,
            ErrorCode.TOO_MANY_CONNECTIONS,
            f"csnapd has {self.config.max_connections} connections open, its limit;"
            " try again later",
        )
        try:
            with trio.move_on_after(REFUSE_LINGER):
                async with secured.stream:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await secured.stream.send_all(codec.send(refusal))
                        # Read what the peer sent (its hello) before closing, so
                        # that closing with unread data does not reset the
                        # connection under our error.
                        while await secured.stream.receive_some(RECEIVE_SIZE):
                            pass
        finally:
            self._refusing -= 1

    async def _authenticate(
        self, stream: trio.SocketStream, within: float, label: str
    ) -> Authenticated | None:
        if self.tls is None:  # measuring TLS's cost: see serve()
            return Authenticated(stream, frozenset({ROLE_ADMIN}))
        return await authenticate(stream, self.tls, within=within, label=label)

    async def _release_memory(self) -> None:
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
                while link.queued >= QUEUED_LIMIT and not link.closing:
                    await self._taken.wait()
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", link.peer, exc)
            self._queue(link, Error(None, int(exc.code), exc.code.symbol, str(exc)[:1024]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    def _admit(self, link: _Link, message: Message) -> None:
        peer = link.peer
        if isinstance(message, Hello):
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
            return
        if isinstance(message, Keepalive):
            # Answered here, not by the engine task: a busy engine must not
            # make a live client look silent to itself.
            self._queue(link, Ok(message.id))
            return
        if isinstance(message, Request):
            self.stats.arrived(peer, message)
            request = message.id
            refusal = request_refusal(link.roles, peer.role, message)
            if refusal is not None and peer in self._links:
                self._deliver(
                    link,
                    _error_message(request, ErrorCode.NOT_PERMITTED, refusal),
                    finished=False,
                )
                return
            if request in link.in_flight:
                # The first request with this id is still in flight: keep it.
                self._deliver(
                    link,
                    _error_message(request, ErrorCode.DUPLICATE_REQUEST, "request id in flight"),
                    finished=False,
                )
                return
            if len(link.in_flight) >= self.config.max_in_flight:
                self._error(
                    link,
                    request,
                    ErrorCode.TOO_MANY_REQUESTS,
                    f"more than {self.config.max_in_flight} requests in flight",
                )
                return
            link.in_flight.add(request)
        link.queued += 1
        self._send.send_nowait(Received(peer, message))

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
        # Ends once the outbox is closed and drained.
        async for first in outbox:
            messages = [first]
            while len(messages) < WRITE_COALESCE:
                try:
                    messages.append(outbox.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            data = bytearray()
            for message in messages:
                data += self._encode(link, message)
            try:
                if data:
                    await link.messages.send_bytes(bytes(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    def _encode(self, link: _Link, message: Message) -> bytes:
        """The bytes for `message` on this link (b"" for nothing to send)."""
        if link.codec.state is ConnectionState.ERROR and not isinstance(message, Error):
            return b""  # the peer broke the protocol: only our error goes out
        if message is _HELLO:
            return link.codec.hello()
        return link.messages.encode_answer(message, str(link.peer))

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
        try:
            link.outbox.send_nowait(message)
        except trio.WouldBlock:
            log.warning("%s does not read its replies; closing it", link.peer)
            link.dropped = True
            link.closing = True
            self._nursery.start_soon(_abort, link.stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the connection is ending; its writer sends no more

    # -- the engine ------------------------------------------------------------

    async def _engine_loop(self) -> None:
        config = self.config
        try:
            while True:
                item = await self._next_item()
                if item is None:
                    break
                batch = [item]
                while len(batch) < config.max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                await self._gathering.more(batch, self._receive, config.max_batch)
                self._took(batch)
                if self.fence is not None and not self.fence.may_write():
                    self._fenced()  # the batch dies unanswered with its connections
                    break
                self.stats.batch_items.observe(len(batch))
                outcome = await self._apply(batch)
                self._deliver_outcome(outcome)
                # Let readers and writers run between batches, whatever they did.
                await trio.lowlevel.checkpoint()
                if outcome.failed:
                    self.failed = True
                    log.critical(
                        "the engine failed: refusing all further work",
                        extra={"event": "server.failed", "store": self.config.store},
                    )
                    notify_status("failed: the store needs a restart (journal replay)")
                    self._stopping.set()
                    break
        finally:
            self._stopped.set()

    def _took(self, batch: list[Item]) -> None:
        """Count the batch's messages off their connections; wake waiting readers."""
        for item in batch:
            if isinstance(item, Received):
                link = self._links.get(item.peer)
                if link is not None:
                    link.queued -= 1
        self._taken.set()
        self._taken = trio.Event()

    async def _apply(self, items: list[Item]) -> Outcome:
        """One batch: requests applied here, the commit's fsyncs in a worker thread.

        Applying in the event loop is safe because only this task touches the
        engine; it saves a thread hop for every batch that commits nothing
        (lookups, reads, lock releases), the most common kind.
        """
        dispatcher = self.dispatcher
        batch = dispatcher.prepare(items)
        if batch.needs_commit:
            started = time.perf_counter()
            async with self.engine_lock:
                await trio.to_thread.run_sync(dispatcher.commit, batch)
            self.stats.commit_seconds.observe(time.perf_counter() - started)
            self._gathering.committed(items, time.perf_counter() - started)
        return dispatcher.finish(batch)

    async def _next_item(self) -> Item | None:
        """The next thing to do; SweepTick when idle and space awaits reclaiming."""
        while True:
            if self._stopping.is_set():
                try:
                    return self._receive.receive_nowait()
                except trio.WouldBlock:
                    return None
            if self.dispatcher.sweep_due(idle=False):
                return SweepTick()
            try:
                return self._receive.receive_nowait()
            except trio.WouldBlock:
                pass
            if self.dispatcher.sweep_due(idle=True):
                # Still a checkpoint: applying a batch may not yield at all.
                await trio.lowlevel.checkpoint()
                return SweepTick()
            with trio.move_on_after(0.5):
                return await self._receive.receive()

    def _deliver_outcome(self, outcome: Outcome) -> None:
        for peer, message in outcome.sends:
            link = self._links.get(peer)
            if link is not None:
                self._deliver(link, message)
        if outcome.barrier_started is not None:
            self._nursery.start_soon(
                self._after, self.config.barrier_timeout, BarrierExpired(outcome.barrier_started)
            )
        for peer in outcome.detached:
            self._nursery.start_soon(self._detach_timer, peer)
        if outcome.shutdown is not None:
            self._shutdown_reply = outcome.shutdown
            peer, request = outcome.shutdown
            link = self._links.get(peer)
            if link is not None:
                self._deliver(link, Ok(request))
            self._stopping.set()

    async def _detach_timer(self, peer: Peer) -> None:
        await trio.sleep(self.config.detach_timeout)
        link = self._links.get(peer)
        if link is not None:
            log.warning("%s did not close after its snapshot was deleted; closing it", peer)
            link.closing = True
            await _abort(link.stream)


async def _abort(stream: trio.abc.Stream) -> None:
    with trio.move_on_after(1):
        await trio.aclose_forcefully(stream)


async def serve(
    config: ServerConfig,
    *,
    stop: trio.Event | None = None,
    on_start: Callable[[Server], None] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    authenticate: bool = True,
) -> None:
    """Open the store, listen, and serve until shutdown.

    Reports the bound "host:port" through task_status once listening. With
    `config.agent`, the server listens first, registers with that agent and
    stays on standby, store unopened, until the agent starts it. Setting
    `stop` (or an administrator's shutdown request) finishes in-flight work,
    marks the store clean and returns. `on_start` is given the Server once
    it serves (the metrics read it).

    Raises:
        StoreOpenError, StoreLockedError, StoreIOError: the store cannot be opened.
        ServerFailedError: the engine failed while serving.
    """
    # authenticate=False serves plaintext with every peer an admin: only the
    # benchmark that measures what TLS costs asks for it; no command line can.
    tls = server_tls(config) if authenticate else None
    if config.agent is not None:
        assert tls is not None, "an agent's server always authenticates"
        await _serve_for_agent(config, config.agent, tls, stop, on_start, task_status)
        return
    engine = await _open_engine(config)
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except BaseException:
        engine.close()
        raise
    address = _address(listeners)
    async with trio.open_nursery() as nursery:
        server = await _start_server(
            nursery, config, engine, tls, listeners, address, stop, on_start
        )
        task_status.started(address)
    if server.failed:
        raise ServerFailedError("the engine failed; the store needs a restart (journal replay)")


async def _serve_for_agent(
    config: ServerConfig,
    agent: str,
    tls: ssl.SSLContext,
    stop: trio.Event | None,
    on_start: Callable[[Server], None] | None,
    task_status: trio.TaskStatus[str],
) -> None:
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    address = _address(listeners)
    link = AgentLink(agent, address=address, store=config.store)
    async with trio.open_nursery() as outer:
        outer.start_soon(link.run)
        task_status.started(address)
        log.info(
            "standby on %s: waiting for agent %s to start this server",
            address,
            agent,
            extra={"event": "server.standby", "address": address, "agent": agent},
        )
        async with trio.open_nursery() as standby:
            lent = [_Lent(listener) for listener in listeners]
            refuse = partial(_refuse_not_active, tls=tls)
            standby.start_soon(partial(trio.serve_listeners, refuse, lent))
            started = await _first(link.start_requested, stop)
            standby.cancel_scope.cancel()
        if not started:
            for listener in listeners:
                await listener.aclose()
            outer.cancel_scope.cancel()
            return
        fence = link.fence
        try:
            if fence is not None and not fence.may_write():
                # Opening writes (the replay, the busy mark): not past the deadline.
                raise FencedError(f"the lease ran out before the store was opened: {fence.reason}")
            # Under a cluster coordinator the election, not a host-local lock,
            # keeps a second server out: a paused server on this host must not
            # keep the one elected after it from opening the store.
            engine = await _open_engine(config, lock=fence is None)
            if fence is not None:
                await _claim(engine, fence)
        except EngineError as exc:
            await link.failed(error_code(exc), f"cannot open the store: {exc}")
            for listener in listeners:
                await listener.aclose()
            raise
        async with trio.open_nursery() as nursery:
            server = await _start_server(
                nursery, config, engine, tls, listeners, address, stop, on_start, fence
            )
            await link.started()
            notify_status(f"active: serving {config.store} on {address}")
        outer.cancel_scope.cancel()
    if server.fenced:
        assert fence is not None
        raise ServerFencedError(fence.reason)
    if server.failed:
        raise ServerFailedError("the engine failed; the store needs a restart (journal replay)")


async def _claim(engine: Engine, fence: Fence) -> None:
    """Journal the fencing token before serving; the lease must still hold.

    Raises:
        FencedError: the lease ran out, or the store carries a newer token.
    """
    try:
        if not fence.may_write():
            raise FencedError(f"the lease ran out before the store was open: {fence.reason}")
        await trio.to_thread.run_sync(engine.claim_fence, fence.token)
    except BaseException:
        await trio.to_thread.run_sync(engine.abandon)
        raise
    log.info(
        "fencing token %d journaled",
        fence.token,
        extra={"event": "server.token", "token": fence.token},
    )


class _Lent(trio.abc.Listener[trio.SocketStream]):
    """A listener lent to the standby phase: closing it leaves the socket
    listening, for the server that opens once the agent starts it."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self._listener = listener

    async def accept(self) -> trio.SocketStream:
        return await self._listener.accept()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _refuse_not_active(socket_stream: trio.SocketStream, tls: ssl.SSLContext) -> None:
    codec = Connection(Role.SERVER, name="csnapd")
    refusal = _error_message(
        None, ErrorCode.NOT_ACTIVE, "this csnapd is on standby; ask its agent for the server"
    )
    secured = await authenticate(socket_stream, tls, within=5, label="standby")
    if secured is None:
        return
    stream = secured.stream
    with trio.move_on_after(5):
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(codec.send(refusal))
                # Read the peer's hello before closing, so that closing with
                # unread data does not reset the connection under our error.
                with trio.move_on_after(1):
                    await stream.receive_some(4096)


async def _first(wanted: trio.Event, stop: trio.Event | None) -> bool:
    """Wait for `wanted` or `stop`; whether `wanted` came first."""
    async with trio.open_nursery() as nursery:

        async def watch(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch, wanted)
        if stop is not None:
            nursery.start_soon(watch, stop)
    return wanted.is_set()


async def _open_engine(config: ServerConfig, *, lock: bool = True) -> Engine:
    engine = await trio.to_thread.run_sync(
        lambda: Engine.open_files(
            config.store,
            config.origin,
            lock=lock,
            cache_bytes=config.cache_bytes,
            origin_writable=True,
            direct=config.direct,
        )
    )
    report = engine.recovery
    log.info(
        "store %s opened: replayed %d transactions (%d blocks), newest %d%s",
        config.store,
        report.replayed,
        report.blocks,
        report.newest_sequence,
        f"; {report.problem}" if report.problem else "",
        extra={"event": "store.opened", "store": config.store, "transactions": report.replayed},
    )
    return engine


def _address(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return join_host_port(host, port)


async def _start_server(
    nursery: trio.Nursery,
    config: ServerConfig,
    engine: Engine,
    tls: ssl.SSLContext | None,
    listeners: list[trio.SocketListener],
    address: str,
    stop: trio.Event | None,
    on_start: Callable[[Server], None] | None,
    fence: Fence | None = None,
) -> Server:
    server = Server(config, engine, address, tls, fence)
    if on_start is not None:
        on_start(server)
    log.info(
        "listening on %s",
        address,
        extra={"event": "server.listening", "address": address, "store": config.store},
    )
    await nursery.start(partial(server.run, listeners, stop=stop))
    return server


async def _stop_on(event: trio.Event, server: Server) -> None:
    await event.wait()
    server.request_shutdown()


def _error_message(request: int | None, code: ErrorCode, text: str) -> Error:
    return Error(request, int(code), code.symbol, text[:1024])
