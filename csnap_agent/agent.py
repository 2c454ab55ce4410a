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

This module owns the accept loop, reading and admitting each peer's
messages, and the answers to clients (`need_server`) and administrators
(the relay). The registered servers and the election are in
csnap_agent.servers (Agent extends Servers); one connection and the limits
on connections in csnap_agent.peers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
from pathlib import Path

import trio

from csnap_agent.coordinator import Coordinator
from csnap_agent.peers import (
    HELLO_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_FRAME,
    MAX_IN_FLIGHT,
    REFUSE_LINGER,
    Peer,
    check_credentials,
    hello_timer,
    refuse,
)
from csnap_agent.servers import Registration, Servers
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
    Request,
    Resize,
    RevertSnapshot,
    Role,
    ServerAt,
    ServerReady,
    SetPriority,
    Shutdown,
    StandbyRecord,
    message_id,
)
from csnap_protocol.messages import MAX_LIST
from csnap_transport import MessageStream

__all__ = [
    "Agent",
    "Registration",
    "HELLO_TIMEOUT",
    "MAX_CONNECTIONS",
    "MAX_FRAME",
    "MAX_IN_FLIGHT",
    "REFUSE_LINGER",
]

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


class Agent(Servers):
    """The agent's state and connection handling; run with serve()."""

    def __init__(self, coordinator: Coordinator | None = None, credentials: Path | None = None):
        super().__init__(coordinator)
        #: The admin credential relayed requests go out with; None: the
        #: active server's STORE.keys (csnap_common.credentials).
        self.credentials = credentials
        self._numbers = itertools.count(1)
        self._relay_lock = trio.Lock()
        self._relay_address = ""
        self._connections = 0
        #: For the metrics: admin requests relayed by type, since the agent started.
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
                peer = Peer(next(self._numbers), MessageStream(stream, codec), nursery)
                refusal = check_credentials(stream)
                try:
                    if refusal is not None:
                        log.warning("%s refused: %s", peer, refusal)
                        await refuse(peer, ErrorCode.WRONG_ROLE, refusal)
                        return
                    if self._connections > MAX_CONNECTIONS:
                        await refuse(
                            peer, ErrorCode.TOO_MANY_CONNECTIONS, "the agent is serving enough"
                        )
                        return
                    nursery.start_soon(hello_timer, peer)
                    await self._read(peer)
                finally:
                    # Forget the peer before anything can wait: this scope is
                    # cancelled next (or already, when the agent stops), and
                    # clean-up that waits would be cut short there.
                    self._gone(peer)
                    nursery.cancel_scope.cancel()
        finally:
            self._connections -= 1

    async def _read(self, peer: Peer) -> None:
        try:
            while (message := await peer.messages.receive()) is not None:
                if not await self._admit(peer, message):
                    break
        except RemoteProtocolError as exc:
            log.warning("%s: protocol error: %s", peer, exc)
            await peer.send(Error(None, int(exc.code), exc.code.symbol, str(exc)[:1024]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        # The error that ends the connection may have joined the write of
        # another of the peer's tasks (an answer to need_server, say): it
        # goes out before the close cancels that task, within a bound for a
        # peer that does not read.
        with trio.move_on_after(REFUSE_LINGER):
            await peer.messages.flush()

    async def _admit(self, peer: Peer, message: Message) -> bool:
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
                # Not peer.error: the request already in flight under this id
                # still counts against the limit until it is answered.
                code = ErrorCode.DUPLICATE_REQUEST
                await peer.send(Error(request, int(code), code.symbol, "id in flight"))
                return True
            if len(peer.in_flight) >= MAX_IN_FLIGHT:
                await peer.error(
                    request, ErrorCode.TOO_MANY_REQUESTS, "too many requests in flight"
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
            await peer.error(
                request,
                ErrorCode.INVALID_REQUEST,
                f"{message.TYPE} {request} answers no request the agent sent",
            )
        elif request is not None:
            await peer.error(
                request,
                ErrorCode.INVALID_REQUEST,
                f"the agent does not answer {message.TYPE}",
            )
        else:
            # A notice meant for someone else: the peer is confused; say so and close.
            await peer.error(None, ErrorCode.PROTOCOL_ERROR, f"the agent takes no {message.TYPE}")
            return False
        return True

    async def _hello(self, peer: Peer, message: Hello) -> bool:
        """Answer a hello; False ends the connection."""
        peer.role = Role(message.role)
        if peer.role is Role.AGENT:
            await refuse(peer, ErrorCode.WRONG_ROLE, "an agent does not connect to an agent")
            return False
        try:
            await peer.messages.send_bytes(peer.messages.codec.hello())
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False  # it hung up after its hello: nothing to serve
        log.debug("%s connected", peer)
        return True

    def _gone(self, peer: Peer) -> None:
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

    # -- clients and administrators ----------------------------------------------

    async def _need_server(self, peer: Peer, message: NeedServer) -> None:
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
                await peer.answer(reply)
                return
            if not message.wait:
                await peer.error(message.id, ErrorCode.NO_SERVER, _NO_SERVER)
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

    async def _relay_request(self, peer: Peer, message: Request) -> None:
        request = message.id
        self.relayed[message.TYPE] = self.relayed.get(message.TYPE, 0) + 1
        try:
            session = await self._relay_session()
        except (OSError, ServerError, ConnectionLostError, CredentialsError) as exc:
            await peer.error(request, ErrorCode.NO_SERVER, f"{_NO_SERVER} ({exc})")
            return
        if session is None:
            await peer.error(request, ErrorCode.NO_SERVER, _NO_SERVER)
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
                await peer.answer(Ok(request))
                return
            await peer.error(request, ErrorCode.NO_SERVER, "the server went away before answering")
            return
        await peer.answer(dataclasses.replace(reply, id=request))  # type: ignore[call-arg]

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
