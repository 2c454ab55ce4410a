"""One protocol connection to csnapd: hello, then requests matched to replies
by id, and notices (messages without a request id) handed to a callback.

A session does no reconnecting: when its stream breaks, every request
waiting on it fails with ConnectionLostError and the owner decides.

A session also knows how recently the server certainly heard from it:
`confirmed` is when the newest request the server answered was sent (the
server heard it no earlier). Lease deadlines are counted from it
(docs/protocol.md, "Liveness").
"""

from __future__ import annotations

import itertools
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from csnap_protocol import (
    Connection,
    Error,
    ErrorCode,
    Hello,
    Message,
    RemoteProtocolError,
    Request,
    Role,
    message_id,
)
from csnap_transport import MessageStream

__all__ = [
    "Session",
    "ServerError",
    "ConnectionLostError",
    "AuthenticationError",
    "tls_refusal",
    "Connector",
    "open_session",
]

#: Opens a stream to the server (directly, or after asking an agent).
Connector = Callable[[], Awaitable[trio.abc.Stream]]


class ServerError(Exception):
    """The server refused a request: a stable code, its name, and why."""

    def __init__(self, code: int, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.code = code
        self.name = name
        self.message = message

    @property
    def error(self) -> ErrorCode | None:
        """The code as an ErrorCode, if this side knows it."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


class ConnectionLostError(Exception):
    """The connection to the server broke before the reply came."""


class AuthenticationError(ServerError):
    """The TLS handshake with csnapd failed, or its credential is not a server's."""

    def __init__(self, message: str):
        code = ErrorCode.AUTHENTICATION_FAILED
        super().__init__(int(code), code.symbol, message)


def tls_refusal(exc: BaseException) -> str | None:
    """Why TLS refused the peer, if `exc` (a broken stream) says so; None when
    the connection merely ended (reset, or closed mid-handshake: a server
    that went away, to be reached again)."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError) or isinstance(
        cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    ):
        return None
    return cause.reason or str(cause)


@dataclass(eq=False)
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    #: None once `done` is set: the session ended before the reply came.
    reply: Message | None = None
    #: trio.current_time() just before the request was queued for sending.
    sent: float = math.inf


class Session:
    """An open connection; create with open_session()."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        role: Role,
        on_notice: Callable[[Message], None],
        on_reply: Callable[[Message], None] | None = None,
    ):
        self.messages = MessageStream(stream, Connection(role, name="csnap-client"))
        self._on_notice = on_notice
        # Called in the reader, before the requester wakes: state that must
        # be in place before any later message is read (grants) goes here.
        self._on_reply = on_reply
        self._waiting: dict[int, _Waiter] = {}
        self.closed = trio.Event()
        self.server_hello: Hello | None = None
        self.ids = itertools.count(1)
        #: Why the session ended, once it has.
        self.failure: BaseException | None = None
        #: When the newest request that got an answer was sent (the server
        #: heard it no earlier); -inf before any answer.
        self.confirmed = -math.inf
        #: Seconds of silence after which the server drops this session
        #: (told in identified); 0: it drops none.
        self.lease = 0.0
        #: This side closed (or is closing) the stream: the server may have
        #: seen the end already, whatever `closed` says yet.
        self.abandoned = False

    @property
    def stream(self) -> trio.abc.Stream:
        """The stream the session runs on."""
        return self.messages.stream

    @property
    def codec(self) -> Connection:
        """The protocol state of the connection."""
        return self.messages.codec

    async def send(self, message: Message) -> None:
        """Send a message; ConnectionLostError if the stream is gone.

        Messages sent while another task is writing join its next write: a
        gateway's concurrent requests cost one system call, not one each.
        """
        await self._send_bytes(self.codec.send(message))

    async def _send_bytes(self, data: bytes) -> None:
        try:
            await self.messages.send_bytes(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLostError(str(exc) or "connection closed") from exc
        except BaseException:
            # Cancelled part-way through a frame: the stream is closed; so is
            # this session, and every waiter learns it.
            self.abandoned = True
            raise

    async def abandon(self) -> None:
        """Close the stream from this side; the session then ends."""
        self.abandoned = True
        await trio.aclose_forcefully(self.stream)

    @property
    def usable(self) -> bool:
        """Neither side has ended the session (as far as this side knows)."""
        return not self.abandoned and not self.closed.is_set()

    async def request(self, message: Request) -> Message:
        """Send a request (its id must be unique here) and await its reply.

        Raises:
            ServerError: the reply was an error.
            ConnectionLostError: the connection broke first.
        """
        request = message.id
        waiter = self._waiting[request] = _Waiter()
        try:
            if self.closed.is_set():
                raise ConnectionLostError("connection closed")
            waiter.sent = trio.current_time()
            await self.send(message)
            await waiter.done.wait()
        finally:
            self._waiting.pop(request, None)
        # A reply that arrived counts even if the session ended before this
        # task woke to take it (the reader may end first in the same batch).
        if waiter.reply is None:
            raise ConnectionLostError("connection lost before the reply")
        if isinstance(waiter.reply, Error):
            raise ServerError(waiter.reply.code, waiter.reply.name, waiter.reply.message)
        return waiter.reply

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Say hello, then read until the stream ends; wakes every waiter on exit.

        Until the server's hello arrives, a refusal (ServerError) or a broken
        stream is raised to whoever started the session; afterwards they just
        end it, and `failure` says why.
        """
        started = False

        def ready() -> None:
            nonlocal started
            started = True
            task_status.started()

        try:
            await self._send_bytes(self.codec.hello())
            await self._read(ready)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionLostError) as exc:
            self.failure = exc
            if not started:
                reason = tls_refusal(exc)
                if reason is not None:
                    # TLS 1.3: the server judges our credential after the
                    # handshake ended on this side; its verdict comes here.
                    raise AuthenticationError(f"csnapd refused this credential ({reason})") from exc
                raise ConnectionLostError(f"connection lost during the hello: {exc}") from exc
        except (RemoteProtocolError, ServerError) as exc:
            self.failure = exc
            if not started:
                raise
        finally:
            self.closed.set()
            for waiter in self._waiting.values():
                waiter.done.set()  # those without a reply learn the session ended
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.stream)
        if not started:
            raise ConnectionLostError("the server closed the connection during the hello")

    async def _read(self, ready: Callable[[], None]) -> None:
        while (message := await self.messages.receive()) is not None:
            if isinstance(message, Hello):
                self.server_hello = message
                ready()
                continue
            request = message_id(message)
            waiter = self._waiting.get(request) if request is not None else None
            if isinstance(message, Error) and self.server_hello is None:
                raise ServerError(message.code, message.name, message.message)
            if waiter is not None:
                # Any answer, an error too, proves the server heard it.
                self.confirmed = max(self.confirmed, waiter.sent)
                if self._on_reply is not None:
                    self._on_reply(message)
                waiter.reply = message
                waiter.done.set()
            elif isinstance(message, Error) and message.id is None:
                raise ServerError(message.code, message.name, message.message)
            else:
                self._on_notice(message)


async def open_session(
    nursery: trio.Nursery,
    connect: Connector,
    role: Role,
    on_notice: Callable[[Message], None] = lambda message: None,
    on_reply: Callable[[Message], None] | None = None,
) -> Session:
    """Connect, exchange hellos, and run the session's reader in `nursery`.

    Raises:
        OSError: the server cannot be reached.
        ServerError: the server refused the connection (too many, shutting down).
        ConnectionLostError: the connection broke during the hello.
    """
    stream = await connect()
    session = Session(stream, role, on_notice, on_reply)
    await nursery.start(session.run)
    return session
