"""csnapd's answer to a connection beyond `max_connections`.

Owns the refusal and how many are under way: each refused connection is
told `too_many_connections` (after its TLS handshake, so that it can read
the error) and given a moment to read it; past REFUSING_LIMIT refusals at
once, a new one is closed without a word, so that a flood of connections
cannot hold csnapd's memory and sockets through its refusals
(docs/protocol.md, "Limits").
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import trio

from csnap_protocol import Connection, Error, ErrorCode, Role
from csnap_transport.direct import RECEIVE_SIZE
from csnapd.authenticate import Authenticated

log = logging.getLogger("csnapd")

#: Connections being refused at once for max_connections (each is given a
#: moment to read its error); beyond this, one is closed without a word.
REFUSING_LIMIT = 64
#: Seconds a refused connection gets to read its error before it is closed.
REFUSE_LINGER = 1.0

#: Authenticates a new connection within so many seconds, under a label for logs.
Authenticator = Callable[[trio.SocketStream, float, str], Awaitable[Authenticated | None]]


class Refusals:
    """The refusals of one Server's connections beyond `max_connections`."""

    def __init__(self, max_connections: int, authenticate: Authenticator) -> None:
        self.max_connections = max_connections
        self._authenticate = authenticate
        #: Connections being refused now.
        self._refusing = 0

    async def refuse(self, stream: trio.SocketStream) -> None:
        """One connection too many: say so (when not too busy refusing); the
        caller closes the stream."""
        if self._refusing >= REFUSING_LIMIT:
            log.warning("too many connections: closing a new one without a message")
            return
        self._refusing += 1
        try:
            log.warning("too many connections (%d): refusing a new one", self.max_connections)
            await self._send_refusal(stream)
        finally:
            self._refusing -= 1

    async def _send_refusal(self, stream: trio.SocketStream) -> None:
        codec = Connection(Role.SERVER, name="csnapd")
        secured = await self._authenticate(stream, REFUSE_LINGER, "refused")
        if secured is None:
            return
        code = ErrorCode.TOO_MANY_CONNECTIONS
        text = f"csnapd has {self.max_connections} connections open, its limit; try again later"
        refusal = Error(None, int(code), code.symbol, text)
        with trio.move_on_after(REFUSE_LINGER):
            async with secured.stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await secured.stream.send_all(codec.send(refusal))
                    # Read what the peer sent (its hello) before closing, so
                    # that closing with unread data does not reset the
                    # connection under our error.
                    while await secured.stream.receive_some(RECEIVE_SIZE):
                        pass
