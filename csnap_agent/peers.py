"""One connection to the csnap-agent, and the agent's limits on connections.

Peer is a connection with its role, its requests in flight and, for a
server, the answers awaited to the agent's own requests; it answers a
request (releasing its id) or refuses it with an error. Also here: the
hello timer, the refusal that lets the peer read it before the close, and
the check that only the agent's own user and root connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

from csnap_protocol import Error, ErrorCode, Message, Role, message_id
from csnap_transport import MessageStream

log = logging.getLogger("csnap-agent")

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
class Peer:
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
            await self.messages.send_bytes(self.messages.encode_answer(message, self))

    async def answer(self, message: Message) -> None:
        """Send `message`, the answer to its request: the id is free again."""
        request = message_id(message)
        if request is not None:
            self.in_flight.discard(request)
        await self.send(message)

    async def error(self, request: int | None, code: ErrorCode, text: str) -> None:
        """Refuse `request` (None: the connection) with an error."""
        if request is not None:
            self.in_flight.discard(request)
        await self.send(Error(request, int(code), code.symbol, text[:1024]))


async def hello_timer(peer: Peer) -> None:
    """Close a connection that says no hello in time: it holds a socket for nothing."""
    await trio.sleep(HELLO_TIMEOUT)
    if peer.role is None:
        log.warning("%s said no hello within %ds; closing it", peer, HELLO_TIMEOUT)
        await trio.aclose_forcefully(peer.stream)


async def refuse(peer: Peer, code: ErrorCode, text: str) -> None:
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


def check_credentials(stream: trio.SocketStream) -> str | None:
    """Why this peer may not use the agent, or None: only our own user and root may."""
    try:
        raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return None  # not a Unix socket with credentials (tests over socketpairs)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    if uid in (0, os.getuid()):
        return None
    return f"uid {uid} may not use this agent (it runs as uid {os.getuid()})"
