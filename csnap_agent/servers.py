"""The servers registered with the csnap-agent, and which one is active.

Servers owns the registry of servers and the election: registering a
server (its fields checked against the others), asking the coordinator
which to activate, start_server and its answer, the lease renewals handed
to the active server, and demoting one whose lease is lost. Agent
(csnap_agent.agent) adds the connections and the relay of admin requests.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import trio

from csnap_agent.coordinator import Candidate, Coordinator, CoordinatorError, LocalCoordinator
from csnap_agent.peers import Peer
from csnap_agent.registration import RegistrationError, check_against, check_fields
from csnap_client import Session
from csnap_protocol import (
    Error,
    ErrorCode,
    Message,
    Ok,
    RenewLease,
    Request,
    Role,
    ServerReady,
    StartServer,
)

log = logging.getLogger("csnap-agent")


@dataclass(eq=False)
class Registration:
    """A server registered with this agent."""

    candidate: Candidate
    peer: Peer
    registered_ns: int
    active: bool = False
    since_ns: int = 0
    #: Lost its lease while registered: never named or started again.
    fenced: bool = False


class Servers:
    """The registered servers, the active one, and elections among them."""

    #: The agent's own nursery: tasks that outlive any one connection.
    _nursery: trio.Nursery

    def __init__(self, coordinator: Coordinator | None = None):
        self.coordinator = coordinator or LocalCoordinator()
        #: The store of the last server that registered: where its
        #: credentials are (STORE.keys) once it has gone.
        self._last_store: str | None = None
        self.servers: list[Registration] = []
        self.active: Registration | None = None
        self._active_changed = trio.Event()
        #: The admin connection to the active server, dropped when it changes.
        self._relay: Session | None = None
        self._relay_ids = itertools.count(1)
        self._electing = False
        self._elect_again = False
        #: The server sent start_server and not yet answered, if any.
        self._starting: Registration | None = None
        #: For the metrics: servers made active and active servers lost.
        self.activations = 0
        self.losses = 0

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

    async def _register(self, peer: Peer, message: ServerReady) -> None:
        if peer.role is not Role.SERVER:
            await peer.error(message.id, ErrorCode.WRONG_ROLE, "only a server sends server_ready")
            return
        if any(r.peer is peer for r in self.servers):
            await peer.error(message.id, ErrorCode.INVALID_REQUEST, "already registered")
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
            await peer.error(message.id, ErrorCode.INVALID_REQUEST, str(exc))
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
        await peer.answer(Ok(message.id))
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

                    def present(registration: Registration = registration) -> bool:
                        return registration in self.servers and not registration.fenced

                    if await self.coordinator.elect(candidate, present) and not await self._start(
                        registration
                    ):
                        await self.coordinator.resign(candidate)
                candidates = [r for r in self.servers if not r.fenced]
                if not self._elect_again and not (self.coordinator.campaigns and candidates):
                    return
        finally:
            self._electing = False

    async def _ask_server(self, peer: Peer, message: Request) -> Message | None:
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
