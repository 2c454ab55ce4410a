"""A csnap protocol peer over a real TCP socket, driven step by step: the
sans-IO codec (csnap_protocol.Connection) encodes what the test sends and
decodes what csnapd answers, and the test decides when to read. The
connection is authenticated first (TLS with the credential given), as
csnapd takes no other. A peer can
pipeline any number of requests without reading, stop reading altogether
(a small receive buffer makes csnapd's side fill up sooner), or send a
frame the codec itself would refuse to produce.

Whatever csnapd sends must decode: a frame larger than the limit this peer
announced, or a malformed one, raises RemoteProtocolError to the test.
"""

from __future__ import annotations

import contextlib
import itertools
import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Iterator

from csnap_protocol import (
    Connection,
    ConnectionClosed,
    ConnectionState,
    Error,
    GetStatus,
    Hello,
    Message,
    Role,
    StatusReply,
)

__all__ = ["WirePeer", "PeerClosed", "SendStalled", "get_status"]

#: Seconds a send may make no progress before the peer gives up (SendStalled).
SEND_TIMEOUT = 60.0
RECEIVE_SIZE = 1 << 16


class PeerClosed(Exception):
    """csnapd closed (or reset) this connection."""


class SendStalled(Exception):
    """csnapd read nothing more from this connection for SEND_TIMEOUT seconds."""


class WirePeer:
    """One connection to csnapd in `role`, announcing `max_frame`."""

    def __init__(
        self,
        address: tuple[str, int],
        role: Role,
        tls: ssl.SSLContext,
        *,
        max_frame: int = 1 << 20,
        receive_buffer: int | None = None,
        reads: bool = True,
        name: str = "fuzz",
    ):
        self.role = role
        #: It reads what arrives while it sends (a peer that stops reading does not).
        self.reads = reads
        self.codec = Connection(role, max_frame=max_frame, name=name)
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if receive_buffer is not None:
            # Before connect, so that the window csnapd sees is small too.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        # Without it, our hello waits behind the TLS Finished for csnapd's
        # delayed ACK (Nagle): a 40 ms stall on every connection.
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(SEND_TIMEOUT)
        try:
            raw.connect(address)
            self.sock = tls.wrap_socket(raw, server_hostname=None)  # handshakes, blocking
        except BaseException:
            raw.close()
            raise
        self.sock.setblocking(False)
        self.inbox: deque[Message] = deque()
        #: csnapd ended the stream (cleanly or by a reset), or we closed it.
        self.ended = False
        #: The error with id nil csnapd sent before closing, if any.
        self.connection_error: Error | None = None
        self._ids = itertools.count(1)
        try:
            self.send_bytes(self.codec.hello())
        except BaseException:
            # A hello that stalled (a loaded machine) must not leak the socket.
            self.close()
            raise

    def next_id(self) -> int:
        return next(self._ids)

    # -- sending -------------------------------------------------------------

    def send(self, *messages: Message) -> None:
        """Encode (checked by the codec) and send, in one write."""
        self.send_bytes(b"".join(self.codec.send(m) for m in messages))

    def send_bytes(self, data: bytes) -> None:
        """Send all of `data`, reading replies meanwhile if this peer reads.

        Raises:
            PeerClosed: csnapd closed the connection.
            SendStalled: csnapd took no byte for SEND_TIMEOUT seconds.
        """
        view = memoryview(data)
        stalled = time.monotonic() + SEND_TIMEOUT
        while view:
            if self.ended:
                raise PeerClosed("the connection is closed")
            if self.reads:
                self.pump()
                if self.ended:
                    raise PeerClosed("csnapd closed the connection")
            try:
                # Retried with the same bytes after a "want": TLS needs that.
                sent = self.sock.send(view[: 1 << 20])
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                sent = 0
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as exc:
                self._end()
                raise PeerClosed(str(exc)) from exc
            if sent:
                view = view[sent:]
                stalled = time.monotonic() + SEND_TIMEOUT
            elif time.monotonic() > stalled:
                raise SendStalled(f"csnapd took none of {len(view)} bytes in {SEND_TIMEOUT}s")
            else:
                _writable(self.sock, 0.01)

    # -- receiving -----------------------------------------------------------

    def pump(self) -> int:
        """Read whatever has arrived, without waiting; how many messages it made."""
        before = len(self.inbox)
        while not self.ended and self._readable(0):
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return len(self.inbox) - before
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                data = b""
            self.codec.receive_data(data)
            self._decode()
            if not data:
                self._end()
        return len(self.inbox) - before

    def _decode(self) -> None:
        while (message := self.codec.next_message()) is not None:
            if isinstance(message, ConnectionClosed):
                self._end()
                return
            if isinstance(message, Hello):
                continue
            if isinstance(message, Error) and message.id is None:
                self.connection_error = message
            self.inbox.append(message)

    def wait_open(self, seconds: float) -> bool:
        """Wait for csnapd's hello (frames past MIN_MAX_FRAME need it); False if none came."""
        deadline = time.monotonic() + seconds
        while self.codec.state is ConnectionState.HANDSHAKE and not self.ended:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._readable(min(left, 0.05))
            self.pump()
        return self.codec.state is ConnectionState.OPEN

    def wait(self, seconds: float) -> bool:
        """Wait until something arrives (True) or `seconds` pass (False)."""
        if self.ended or self.inbox:
            return True
        return self._readable(seconds)

    def take(self) -> Iterator[Message]:
        """The messages received so far, oldest first, removing them."""
        while self.inbox:
            yield self.inbox.popleft()

    def reply(self, request: int, seconds: float) -> Message | None:
        """Wait up to `seconds` for the reply to `request`; other messages stay queued."""
        deadline = time.monotonic() + seconds
        while True:
            self.pump()
            for message in self.inbox:
                if getattr(message, "id", None) == request:
                    self.inbox.remove(message)
                    return message
            left = deadline - time.monotonic()
            if self.ended or left <= 0:
                return None
            self._readable(min(left, 0.05))

    def _readable(self, seconds: float) -> bool:
        """Bytes wait: decrypted already, or on the socket."""
        return bool(self.sock.pending()) or _readable(self.sock, seconds)

    def close(self) -> None:
        if not self.ended:
            self._end()

    def _end(self) -> None:
        self.ended = True
        with contextlib.suppress(OSError):
            self.sock.close()


def _readable(sock: socket.socket, seconds: float) -> bool:
    """Data (or the end of the stream) waits on `sock`; poll(), as a test opens 1000+ sockets."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(seconds * 1000))


def _writable(sock: socket.socket, seconds: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(seconds * 1000))


def get_status(address: tuple[str, int], tls: ssl.SSLContext, seconds: float = 10.0) -> StatusReply:
    """get_status on a fresh admin connection: csnapd is alive and serves."""
    admin = WirePeer(address, Role.ADMIN, tls, name="fuzz-probe")
    try:
        request = admin.next_id()
        admin.wait_open(seconds)
        admin.send(GetStatus(request))
        reply = admin.reply(request, seconds)
    finally:
        admin.close()
    if not isinstance(reply, StatusReply):
        raise AssertionError(f"csnapd did not answer get_status on a new connection: {reply!r}")
    return reply
