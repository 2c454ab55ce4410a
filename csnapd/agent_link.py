"""csnapd's link to its node's csnap-agent.

A server started with --agent registers (`server_ready`) and waits on
standby, store unopened, until the agent sends `start_server`; it answers
that request once it serves, or with an error if the store cannot be
opened. The link then stays up: if the agent goes away the server keeps
serving and registers again, as active, whenever an agent is back, so
clients asking that agent find it.

Under a cluster coordinator, `start_server` carries the fencing token and
the first lease deadline, and `renew_lease` moves the deadline; the server
keeps them in a Fence (csnapd.fencing) and stops when it runs out. A lost
agent then means no renewals: the server fences itself at the deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket

import trio

from csnap_common import unix_address
from csnap_common.systemd import notify_ready, notify_status
from csnap_protocol import (
    Connection,
    Error,
    ErrorCode,
    Hello,
    LocalProtocolError,
    Message,
    Ok,
    RemoteProtocolError,
    RenewLease,
    Role,
    ServerReady,
    StartServer,
)
from csnap_transport import MessageStream
from csnapd.fencing import Fence

__all__ = ["AgentLink", "AgentRefusedError"]

log = logging.getLogger("csnapd.agent")

#: Seconds between attempts to reach an agent that is not there.
RETRY_INTERVAL = 1.0


class AgentRefusedError(Exception):
    """The agent refused this server's registration."""


class AgentLink:
    """Registers with the agent at `path` and waits to be started."""

    def __init__(self, path: str, *, address: str, store: str):
        self.path = path
        self.address = address
        #: Absolute, as the agent requires: it may run in another directory.
        self.store = os.path.abspath(store)
        #: Set when the agent asked this server to start.
        self.start_requested = trio.Event()
        self._start_request: int | None = None
        #: The token and lease this server is started under, if the agent's
        #: coordinator is a cluster one.
        self.fence: Fence | None = None
        self._active = False
        #: The connection to the agent, while there is one.
        self._messages: MessageStream | None = None

    async def run(self) -> None:
        """Stay registered with the agent until cancelled; never raises on its loss."""
        told = False
        refusal = ""
        while True:
            try:
                await self._session()
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                if not told:
                    log.warning("agent %s not reachable (%s); retrying", self.path, exc)
                    told = True
            except RemoteProtocolError as exc:
                log.error("agent %s broke the protocol: %s", self.path, exc)
            except AgentRefusedError as exc:
                if str(exc) != refusal:  # said once, not every second
                    refusal = str(exc)
                    log.error("agent %s refused this server: %s; retrying", self.path, exc)
            else:
                told = False
                refusal = ""
                log.warning("lost the agent %s; registering again when it is back", self.path)
                notify_status(f"lost the agent {self.path}; registering again when it is back")
            self._messages = None
            await trio.sleep(RETRY_INTERVAL)

    async def started(self) -> None:
        """Answer the agent's start_server: this server is now serving."""
        self._active = True
        request, self._start_request = self._start_request, None
        if request is not None:
            await self._send(Ok(request))
        log.info(
            "active: serving the store",
            extra={"event": "server.active", "address": self.address, "store": self.store},
        )

    async def failed(self, code: ErrorCode, text: str) -> None:
        """Answer the agent's start_server with an error (the store cannot be opened)."""
        request, self._start_request = self._start_request, None
        if request is not None:
            await self._send(Error(request, int(code), code.symbol, text[:1024]))

    async def _send(self, message: Message) -> None:
        messages = self._messages
        if messages is None:
            return  # no agent now; a new one learns our state from server_ready
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, LocalProtocolError
        ):
            await messages.send(message)

    async def _start_server(self, message: StartServer) -> None:
        fence = self.fence
        if self._active:
            if message.token and (fence is None or fence.token != message.token):
                # Elected anew while serving under an older token (or none):
                # this server cannot prove it stopped writing in between.
                await self._fenced(message.id)
            else:
                await self._send(Ok(message.id))  # a new agent; already serving
        elif fence is not None and message.token != fence.token:
            await self._fenced(message.id)  # a new election while this one opens the store
        else:
            if message.token and fence is None:
                self.fence = Fence(message.token, message.until_ns)
            self._start_request = message.id
            self.start_requested.set()

    async def _renew(self, message: RenewLease) -> None:
        fence = self.fence
        if fence is not None and fence.renew(message.token, message.until_ns):
            await self._send(Ok(message.id))
        else:
            await self._fenced(message.id)

    async def _fenced(self, request: int) -> None:
        code = ErrorCode.FENCED
        text = self.fence.reason if self.fence is not None and self.fence.reason else "not leased"
        await self._send(Error(request, int(code), code.symbol, f"fenced: {text}"[:1024]))

    async def _session(self) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.connect(unix_address(self.path))
        except BaseException:
            sock.close()
            raise
        codec = Connection(Role.SERVER, name="csnapd")
        async with trio.SocketStream(sock) as stream:
            messages = self._messages = MessageStream(stream, codec)
            await messages.send_bytes(codec.hello())
            registered = False
            while (message := await messages.receive()) is not None:
                if isinstance(message, Hello):
                    state = "active" if self._active else "standby"
                    log.info("registering with agent %s (%s)", self.path, state)
                    await self._send(
                        ServerReady(1, self.address, self.store, os.getpid(), self._active)
                    )
                elif isinstance(message, Error):
                    raise AgentRefusedError(f"{message.name}: {message.message}")
                elif isinstance(message, Ok) and not registered:
                    registered = True
                    log.info(
                        "registered with agent %s",
                        self.path,
                        extra={
                            "event": "server.registered",
                            "address": self.address,
                            "store": self.store,
                            "agent": self.path,
                        },
                    )
                    if not self._active:
                        notify_ready(f"standby on {self.address}: registered with {self.path}")
                elif isinstance(message, StartServer):
                    await self._start_server(message)
                elif isinstance(message, RenewLease):
                    await self._renew(message)
                else:
                    log.warning("agent sent an unexpected %s", message.TYPE)
