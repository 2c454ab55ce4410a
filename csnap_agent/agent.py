"""The csnap-agent: a node's control point, on a Unix socket.

Three kinds of peers connect (the role in their hello says which):
  * a server registers (`server_ready`) and waits on standby until the
    agent, when its coordinator agrees, sends `start_server`;
  * a data-path client asks `need_server` and gets the active server's
    address, at once or (with wait) once there is one;
  * an administrator (the csnap CLI) sends admin requests, which the agent
    relays to the active server over its own admin connection, answering
    with the server's reply under the caller's request id.

Rules: a bad peer gets an error or a closed connection and nobody else
notices; only peers running as the agent's own user (or root) are served;
when the active server's connection closes, the agent forgets it at once,
so nobody is sent to a dead address.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio
from csnap_transport import MessageStream

from csnap_agent.coordinator import Candidate, Coordinator, CoordinatorError, LocalCoordinator
from csnap_agent.registration import RegistrationError, check_against, check_fields
from csnap_client import (
    ConnectionLostError,
    ServerError,
    Session,
    open_session,
    tcp_connector,
)
from csnap_common import split_host_port
from csnap_common.credentials import (
    ROLE_ADMIN,
    CredentialsError,
    client_context,
    store_credentials,
)
from csnap_protocol import (
    ChangeUseCount,
    Connection,
    CreateSnapshot,
    DeleteSnapshot,
    Error,
    ErrorCode,
    GetServerInfo,
    GetStatus,
    Hello,
    ListSnapshots,
    Message,
    NeedServer,
    Ok,
    RemoteProtocolError,
    RenewLease,
    Request,
    Resize,
    RevertSnapshot,
    Role,
    ServerAt,
    ServerReady,
    SetPriority,
    Shutdown,
    StandbyRecord,
    StartServer,
    message_id,
)
from csnap_protocol.messages import MAX_LIST

__all__ = ["Agent", "Registration"]

log = logging.getLogger("csnap-agent")

#: Admin requests the agent relays to the active server.
RELAYED = (
    CreateSnapshot,
    DeleteSnapshot,
    RevertSnapshot,
    ListSnapshots,
    GetStatus,
    SetPriority,
    ChangeUseCount,
    GetServerInfo,
    Shutdown,
    Resize,
)
#: Largest frame the agent accepts: its messages are small.
MAX_FRAME = 1 << 16
#: Requests one peer may have in flight at the agent.
MAX_IN_FLIGHT = 64
#: Connections the agent serves at once; more are refused.
MAX_CONNECTIONS = 256
#: Seconds a new connection has to say hello before it is closed.
HELLO_TIMEOUT = 10
#: Seconds a refused peer gets to read its refusal before the connection closes.
REFUSE_LINGER = 1.0
_PEERCRED = struct.Struct("3i")


@dataclass(eq=False)
class _Peer:
    """One connection to the agent."""

    number: int
    messages: MessageStream
    nursery: trio.Nursery
    role: Role | None = None
    in_flight: set[int] = field(default_factory=set)
    #: For a server link: replies to our start_server requests, by id.
    answers: dict[int, trio.MemorySendChannel[Message]] = field(default_factory=dict)

    def __str__(self) -> str:
        role = self.role.value if self.role else "peer"
        return f"{role} {self.number}"

    @property
    def stream(self) -> trio.abc.Stream:
        return self.messages.stream

    async def send(self, message: Message) -> None:
        """Send `message`; a reply too big for the peer's frame limit becomes
        `error` `request_too_large`, so that every request is answered."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            # A broken stream: the reader sees the end and cleans up.
            await self.messages.send_bytes(self.messages.encode_answer(message, str(self)))


@dataclass(eq=False)
class Registration:
    """A server registered with this agent."""

    candidate: Candidate
    peer: _Peer
    registered_ns: int
    active: bool = False
    since_ns: int = 0
    #: Lost its lease while registered: never named or started again.
    fenced: bool = False


class Agent:
    """The agent's state and connection handling; run with serve()."""

    def __init__(self, coordinator: Coordinator | None = None, credentials: Path | None = None):
        self.coordinator = coordinator or LocalCoordinator()
        #: The store of the last server that registered: where its
        #: credentials are (STORE.keys) once it has gone.
        self._last_store: str | None = None
        #: The admin credential relayed requests go out with; None: the
        #: active server's STORE.keys (csnap_common.credentials).
        self.credentials = credentials
        self.servers: list[Registration] = []
        self.active: Registration | None = None
        self._active_changed = trio.Event()
        self._numbers = itertools.count(1)
        self._relay: Session | None = None
        self._relay_lock = trio.Lock()
        self._relay_address = ""
        self._relay_ids = itertools.count(1)
        self._electing = False
        self._elect_again = False
        #: The server sent start_server and not yet answered, if any.
        self._starting: Registration | None = None
        self._connections = 0
        #: For the metrics: servers made active, active servers lost, and
        #: admin requests relayed by type, since the agent started.
        self.activations = 0
        self.losses = 0
        self.relayed: dict[str, int] = {}

    @property
    def connections(self) -> int:
        """Peers connected now."""
        return self._connections

    @property
    def electing(self) -> bool:
        """An election runs: no server is active and the coordinator is being asked."""
        return self._electing

    @property
    def starting(self) -> Registration | None:
        """The server sent start_server and not yet answered, if any."""
        return self._starting

    async def serve(
        self,
        listener: trio.SocketListener,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept peers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.coordinator.run, self._changed)
            task_status.started()
            try:
                await trio.serve_listeners(self._connection, [listener], handler_nursery=nursery)
            except* trio.ClosedResourceError:
                pass  # the listener was closed: accept no more

    # -- connections -----------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        self._connections += 1
        try:
            async with stream, trio.open_nursery() as nursery:
                codec = Connection(Role.AGENT, max_frame=MAX_FRAME, name="csnap-agent")
                peer = _Peer(next(self._numbers), MessageStream(stream, codec), nursery)
                refusal = _check_credentials(stream)
                try:
                    if refusal is not None:
                        log.warning("%s refused: %s", peer, refusal)
                        await _refuse(peer, ErrorCode.WRONG_ROLE, refusal)
                        return
                    if self._connections > MAX_CONNECTIONS:
                        await _refuse(
                            peer, ErrorCode.TOO_MANY_CONNECTIONS, "the agent is serving enough"
                        )
                        return
                    nursery.start_soon(_hello_timer, peer)
                    await self._read(peer)
                finally:
                    # Forget the peer before anything can wait: this scope is
                    # cancelled next (or already, when the agent stops), and
                    # clean-up that waits would be cut short there.
                    self._gone(peer)
                    nursery.cancel_scope.cancel()
        finally:
            self._connections -= 1

    async def _read(self, peer: _Peer) -> None:
        try:
            while (message := await peer.messages.receive()) is not None:
                if not await self._admit(peer, message):
                    return
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", peer, exc)
            await peer.send(Error(None, int(exc.code), exc.code.symbol, str(exc)[:1024]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def _admit(self, peer: _Peer, message: Message) -> bool:
        """Handle one message; False ends the connection."""
        if isinstance(message, Hello):
            return await self._hello(peer, message)
        request = message_id(message)
        if isinstance(message, Ok | Error) and request in peer.answers:
            with contextlib.suppress(trio.BrokenResourceError):
                peer.answers.pop(request).send_nowait(message)
            return True
        if request is not None:
            if request in peer.in_flight:
                # Not _error: the request already in flight under this id
                # still counts against the limit until it is answered.
                code = ErrorCode.DUPLICATE_REQUEST
                await peer.send(Error(request, int(code), code.symbol, "id in flight"))
                return True
            if len(peer.in_flight) >= MAX_IN_FLIGHT:
                await self._error(
                    peer, request, ErrorCode.TOO_MANY_REQUESTS, "too many requests in flight"
                )
                return True
        if isinstance(message, ServerReady):
            await self._register(peer, message)
        elif isinstance(message, NeedServer):
            peer.in_flight.add(message.id)
            peer.nursery.start_soon(self._need_server, peer, message)
        elif isinstance(message, RELAYED):
            peer.in_flight.add(message.id)
            peer.nursery.start_soon(self._relay_request, peer, message)
        elif isinstance(message, Ok | Error) and request is not None:
            await self._error(
                peer,
                request,
                ErrorCode.INVALID_REQUEST,
                f"{message.TYPE} {request} answers no request the agent sent",
            )
        elif request is not None:
            await self._error(
                peer,
                request,
                ErrorCode.INVALID_REQUEST,
                f"the agent does not answer {message.TYPE}",
            )
        else:
            # A notice meant for someone else: the peer is confused; say so and close.
            await self._error(
                peer, None, ErrorCode.PROTOCOL_ERROR, f"the agent takes no {message.TYPE}"
            )
            return False
        return True

    async def _hello(self, peer: _Peer, message: Hello) -> bool:
        """Answer a hello; False ends the connection."""
        peer.role = Role(message.role)
        if peer.role is Role.AGENT:
            await _refuse(peer, ErrorCode.WRONG_ROLE, "an agent does not connect to an agent")
            return False
        try:
            await peer.messages.send_bytes(peer.messages.codec.hello())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # it hung up after its hello: nothing to serve
        log.debug("%s connected", peer)
        return True

    async def _error(self, peer: _Peer, request: int | None, code: ErrorCode, text: str) -> None:
        if request is not None:
            peer.in_flight.discard(request)
        await peer.send(Error(request, int(code), code.symbol, text[:1024]))

    async def _answer(self, peer: _Peer, message: Message) -> None:
        request = message_id(message)
        if request is not None:
            peer.in_flight.discard(request)
        await peer.send(message)

    def _gone(self, peer: _Peer) -> None:
        """Forget a closed connection's registration; never waits.

        What must wait (closing the relay, telling the coordinator, starting
        a standby) runs as a task of the agent, not of the connection being
        torn down, so that its cancellation cannot cut it short.
        """
        for answer in peer.answers.values():
            answer.close()  # a start_server that will never be answered
        peer.answers.clear()
        for registration in [r for r in self.servers if r.peer is peer]:
            self.servers.remove(registration)
            if registration is self.active:
                log.warning(
                    "the active server at %s went away",
                    registration.candidate.address,
                    extra={
                        "event": "server.lost",
                        "address": registration.candidate.address,
                        "store": registration.candidate.store,
                    },
                )
                self.active = None
                self.losses += 1
                self._changed()
                relay, self._relay = self._relay, None
                self._nursery.start_soon(self._replace_active, registration, relay)
            else:
                log.info(
                    "standby server at %s went away",
                    registration.candidate.address,
                    extra={
                        "event": "server.gone",
                        "address": registration.candidate.address,
                        "store": registration.candidate.store,
                    },
                )

    async def _replace_active(self, gone: Registration, relay: Session | None) -> None:
        """After the active server went away: close its relay, resign, elect another."""
        if relay is not None:
            await trio.aclose_forcefully(relay.stream)
        await self.coordinator.resign(gone.candidate)
        await self._elect()

    def _changed(self) -> None:
        self._active_changed.set()
        self._active_changed = trio.Event()

    # -- servers ---------------------------------------------------------------

    async def _register(self, peer: _Peer, message: ServerReady) -> None:
        if peer.role is not Role.SERVER:
            await self._error(
                peer, message.id, ErrorCode.WRONG_ROLE, "only a server sends server_ready"
            )
            return
        if any(r.peer is peer for r in self.servers):
            await self._error(peer, message.id, ErrorCode.INVALID_REQUEST, "already registered")
            return
        try:
            check_fields(message.address, message.store, message.pid)
            serving = self.active or self._starting
            check_against(
                message.address,
                message.store,
                message.active,
                [r.candidate for r in self.servers],
                serving.candidate if serving is not None else None,
            )
        except RegistrationError as exc:
            log.warning("%s: registration refused: %s", peer, exc)
            await self._error(peer, message.id, ErrorCode.INVALID_REQUEST, str(exc))
            return
        candidate = Candidate(message.address, message.store, message.pid, message.active)
        registration = Registration(candidate, peer, time.time_ns())
        self.servers.append(registration)
        self._last_store = candidate.store
        log.info(
            "server pid %d at %s registered (%s), store %s",
            candidate.pid,
            candidate.address,
            "serving" if candidate.serving else "standby",
            candidate.store,
            extra={
                "event": "server.registered",
                "address": candidate.address,
                "store": candidate.store,
            },
        )
        await self._answer(peer, Ok(message.id))
        self._nursery.start_soon(self._elect)

    async def _elect(self) -> None:
        """Activate a registered server if there is none active and the coordinator agrees."""
        if self._electing:
            self._elect_again = True  # the running election looks once more
            return
        self._electing = True
        try:
            while self.active is None:
                self._elect_again = False
                # Servers already serving first: they are the active one's survivors.
                for registration in sorted(self.servers, key=lambda r: not r.candidate.serving):
                    if self.active is not None:
                        return
                    if registration not in self.servers or registration.fenced:
                        continue
                    candidate = registration.candidate
                    if await self.coordinator.elect(candidate) and not await self._start(
                        registration
                    ):
                        await self.coordinator.resign(candidate)
                candidates = [r for r in self.servers if not r.fenced]
                if not self._elect_again and not (self.coordinator.campaigns and candidates):
                    return
        finally:
            self._electing = False

    async def _ask_server(self, peer: _Peer, message: Request) -> Message | None:
        """Send a request to a server link; its answer, or None if the link ended."""
        send, receive = trio.open_memory_channel[Message](1)
        peer.answers[message.id] = send
        try:
            await peer.send(message)
            async with receive:
                try:
                    return await receive.receive()
                except trio.EndOfChannel:
                    return None
        finally:
            # Cancelled while waiting (a renewal not answered in time): an
            # answer arriving later finds nobody and is dropped.
            if peer.answers.get(message.id) is send:
                del peer.answers[message.id]

    async def _start(self, registration: Registration) -> bool:
        """Start a server the coordinator elected; whether it is now active."""
        peer = registration.peer
        request = next(self._relay_ids)
        address = registration.candidate.address
        lease = self.coordinator.lease()
        log.info(
            "starting the server at %s",
            address,
            extra={"event": "server.starting", "address": address, "request": request},
        )
        self._starting = registration
        try:
            start = StartServer(request)
            if lease is not None:
                start = StartServer(request, lease.token, lease.until_ns)
                # Renewals begin now: opening the store (a long journal
                # replay) may take longer than the first deadline.
                self._nursery.start_soon(self._keep_lease, registration)
            answer = await self._ask_server(peer, start)
        finally:
            self._starting = None
        if registration not in self.servers:
            log.warning("the server at %s went away while starting", address)
            return False
        if isinstance(answer, Error):
            log.error(
                "the server at %s could not start: %s",
                address,
                answer.message,
                extra={"event": "server.start_failed", "address": address, "request": request},
            )
            return False
        registration.active = True
        registration.since_ns = time.time_ns()
        self.active = registration
        self.activations += 1
        log.info(
            "the server at %s is active",
            address,
            extra={
                "event": "server.active",
                "address": address,
                "store": registration.candidate.store,
            },
        )
        self._changed()
        return True

    async def _keep_lease(self, registration: Registration) -> None:
        """Renew the active server's lease and hand it each new deadline.

        Stops renewing when the server does not take a renewal in time (hung,
        or fenced): etcd then expires the lease, after the server's own
        deadline has passed, and another node's server is elected.
        """
        coordinator = self.coordinator

        def leased() -> bool:
            return registration is self.active or registration is self._starting

        while leased():
            await trio.sleep(coordinator.renew_interval)
            if not leased():
                return
            try:
                lease = await coordinator.renew()
            except CoordinatorError as exc:
                log.warning("%s; the server stops at its deadline if this goes on", exc)
                continue
            if lease is None:
                log.error(
                    "the lease of the server at %s is lost; it fences itself",
                    registration.candidate.address,
                )
                self._demote(registration)
                return
            answer = None
            with trio.move_on_after(coordinator.renew_interval):
                answer = await self._ask_server(
                    registration.peer,
                    RenewLease(next(self._relay_ids), lease.token, lease.until_ns),
                )
            if not isinstance(answer, Ok):
                log.error(
                    "the server at %s did not take its lease renewal (%s); no more renewals",
                    registration.candidate.address,
                    answer.message if isinstance(answer, Error) else "no answer in time",
                    extra={"event": "election.abandoned", "token": lease.token},
                )
                self._demote(registration)
                return

    def _demote(self, registration: Registration) -> None:
        """The active server lost its lease: name it no more, elect anew."""
        registration.fenced = True
        if registration is not self.active:
            return
        self.active = None
        self._changed()
        relay, self._relay = self._relay, None
        self._nursery.start_soon(self._replace_active, registration, relay)

    # -- clients and administrators ----------------------------------------------

    async def _need_server(self, peer: _Peer, message: NeedServer) -> None:
        while True:
            active = self.active
            node, token = self.coordinator.active_holder()
            if active is not None:
                address, since_ns = active.candidate.address, active.since_ns
            else:
                address, since_ns = self.coordinator.remote_server() or "", 0
            if address:
                standbys = await self._standbys(address) if message.standbys else []
                reply = ServerAt(message.id, address, since_ns, token, node, tuple(standbys))
                await self._answer(peer, reply)
                return
            if not message.wait:
                await self._error(peer, message.id, ErrorCode.NO_SERVER, _NO_SERVER)
                return
            await self._active_changed.wait()

    async def _standbys(self, active_address: str) -> list[StandbyRecord]:
        """The servers standing by, on every node the coordinator knows of."""
        waiting = [
            r.candidate
            for r in self.servers
            if r is not self.active and r is not self._starting and not r.fenced
        ]
        found = await self.coordinator.standbys(waiting)
        return [s for s in found if s.address != active_address][:MAX_LIST]

    async def _relay_request(self, peer: _Peer, message: Request) -> None:
        request = message.id
        self.relayed[message.TYPE] = self.relayed.get(message.TYPE, 0) + 1
        try:
            session = await self._relay_session()
        except (OSError, ServerError, ConnectionLostError, CredentialsError) as exc:
            await self._error(peer, request, ErrorCode.NO_SERVER, f"{_NO_SERVER} ({exc})")
            return
        if session is None:
            await self._error(peer, request, ErrorCode.NO_SERVER, _NO_SERVER)
            return
        relayed = dataclasses.replace(message, id=next(self._relay_ids))
        try:
            reply = await session.request(relayed)
        except ServerError as exc:
            await peer.send(Error(request, exc.code, exc.name, exc.message))
            peer.in_flight.discard(request)
            return
        except ConnectionLostError:
            if isinstance(message, Shutdown):
                # The server closes as it exits; its ok may be lost with it.
                await self._answer(peer, Ok(request))
                return
            await self._error(
                peer, request, ErrorCode.NO_SERVER, "the server went away before answering"
            )
            return
        await self._answer(peer, dataclasses.replace(reply, id=request))  # type: ignore[call-arg]

    def _relay_credentials(self) -> Path:
        """Where the admin credential for relaying is: --credentials, or the
        directory beside the store of the server this agent knows (active
        here, a standby candidate, or the last server that registered while
        the active one runs on another node: an agent serves one store).

        Raises:
            CredentialsError: neither is known.
        """
        if self.credentials is not None:
            return self.credentials
        known = self.active or (self.servers[0] if self.servers else None)
        store = known.candidate.store if known is not None else self._last_store
        if store is None:
            raise CredentialsError(
                "no credentials to reach the active server on another node: give the agent"
                " --credentials DIR"
            )
        return store_credentials(store)

    async def _relay_session(self) -> Session | None:
        """The admin connection to the active server, opened on first use.

        The server may run on another node (the coordinator knows where).
        """
        async with self._relay_lock:
            active = self.active
            address = active.candidate.address if active else self.coordinator.remote_server()
            if address is None:
                return None
            session = self._relay
            if (
                session is not None
                and not session.closed.is_set()
                and self._relay_address == address
            ):
                return session
            if session is not None:
                await trio.aclose_forcefully(session.stream)
            host, port = split_host_port(address)
            tls = client_context(self._relay_credentials(), ROLE_ADMIN)
            session = await open_session(self._nursery, tcp_connector(host, port, tls), Role.ADMIN)
            if self.active is not active:
                await trio.aclose_forcefully(session.stream)
                return None
            self._relay = session
            self._relay_address = address
            return session


_NO_SERVER = "no csnapd is active: none has registered with this agent, or it went away"


async def _hello_timer(peer: _Peer) -> None:
    """Close a connection that says no hello in time: it holds a socket for nothing."""
    await trio.sleep(HELLO_TIMEOUT)
    if peer.role is None:
        log.warning("%s said no hello within %ds; closing it", peer, HELLO_TIMEOUT)
        await trio.aclose_forcefully(peer.stream)


async def _refuse(peer: _Peer, code: ErrorCode, text: str) -> None:
    """Send the refusal, then read what the peer sent (its hello) for a
    moment before the connection closes: closing with unread data resets
    the connection, and the reset can destroy the refusal before the peer
    reads it."""
    await peer.send(Error(None, int(code), code.symbol, text))
    with (
        trio.move_on_after(REFUSE_LINGER),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        while await peer.stream.receive_some(1 << 16):
            pass


def _check_credentials(stream: trio.SocketStream) -> str | None:
    """Why this peer may not use the agent, or None: only our own user and root may."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None  # not a Unix socket with credentials (tests over socketpairs)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    if uid in (0, os.getuid()):
        return None
    return f"uid {uid} may not use this agent (it runs as uid {os.getuid()})"
