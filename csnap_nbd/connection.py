"""One NBD connection's byte stream: exact-length reads over a receive
buffer, payloads received straight into their destination, and sends that
never interleave (replies from concurrent requests share the stream). On a
plain socket, replies and their data leave in one vectored send, uncopied.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["Connection", "PeerClosedError", "set_nodelay"]

_Parsed = TypeVar("_Parsed")

#: Most bytes asked of the socket per receive for headers and small data.
_RECEIVE = 1 << 16
#: Replies at most this long are joined into one send; longer data is sent
#: after its header without copying it.
_JOIN = 1 << 16
#: Most buffers one vectored send carries (Linux's IOV_MAX is 1024).
_VECTOR = 512


class PeerClosedError(Exception):
    """The client closed the connection (possibly in the middle of a message)."""


def set_nodelay(stream: trio.abc.Stream) -> None:
    """Disable Nagle on a TCP stream (the NBD spec says both sides SHOULD).

    Without it small replies wait for delayed ACKs: tens of milliseconds per
    batch of requests. A Unix socket has no such option and is left alone.
    """
    if isinstance(stream, trio.SocketStream) and stream.socket.family in (
        socket.AF_INET,
        socket.AF_INET6,
    ):
        stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)


class Connection:
    """Buffered reads and locked writes over a trio stream."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self._buffer = bytearray()
        self._send_lock = trio.Lock()
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None

    @property
    def buffered(self) -> int:
        """Bytes received from the peer that no read has taken yet."""
        return len(self._buffer)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(_RECEIVE)
        if not data:
            raise PeerClosedError("the client closed the connection")
        self._buffer += data

    def parse_now(self, size: int, parse: Callable[[bytearray], _Parsed]) -> _Parsed | None:
        """`parse` of the next `size` bytes if they are already received, else
        None (nothing taken): no wait and no copy for the common case of a
        request header that came with the previous receive."""
        if len(self._buffer) < size:
            return None
        parsed = parse(self._buffer)
        del self._buffer[:size]
        return parsed

    async def receive_exactly(self, size: int) -> bytes:
        while len(self._buffer) < size:
            await self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def receive_now(self, target: bytearray) -> bool:
        """Fill `target` from what is already received, if that covers it all."""
        size = len(target)
        if len(self._buffer) < size:
            return False
        target[:] = memoryview(self._buffer)[:size]
        del self._buffer[:size]
        return True

    async def receive_into(self, target: bytearray) -> None:
        """Fill `target` completely; large payloads go straight from the socket."""
        view = memoryview(target)
        size = len(view)
        done = min(len(self._buffer), size)
        view[:done] = self._buffer[:done]
        del self._buffer[:done]
        while done < size:
            if self._sock is not None:
                got = await self._sock.recv_into(view[done:])
                if not got:
                    raise PeerClosedError("the client closed the connection inside a payload")
                done += got
            else:
                data = await self.stream.receive_some(min(size - done, 1 << 20))
                if not data:
                    raise PeerClosedError("the client closed the connection inside a payload")
                view[done : done + len(data)] = data
                done += len(data)

    async def discard(self, size: int) -> None:
        """Read and drop `size` bytes without holding more than one receive."""
        dropped = min(len(self._buffer), size)
        del self._buffer[:dropped]
        while dropped < size:
            data = await self.stream.receive_some(min(size - dropped, 1 << 20))
            if not data:
                raise PeerClosedError("the client closed the connection inside a payload")
            dropped += len(data)

    async def send(self, header: bytes, data: bytes | bytearray | memoryview = b"") -> None:
        """Send a reply (header and optional data) as one unit on the stream."""
        async with self._send_lock:
            if len(data) <= _JOIN:
                await self.stream.send_all(header + data if data else header)
            else:
                await self.stream.send_all(header)
                await self.stream.send_all(data)

    async def send_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Send `parts` back to back as one unit on the stream.

        On a plain socket they go by sendmsg, without being copied into one
        buffer first; over TLS they are joined (the record layer copies anyway).
        """
        async with self._send_lock:
            if self._sock is None:
                await self.stream.send_all(b"".join(parts))
                return
            views = [memoryview(p).cast("B") for p in parts if len(p)]
            try:
                while views:
                    sent = await self._sock.sendmsg(views[:_VECTOR])
                    while sent:
                        first = views[0]
                        if sent >= len(first):
                            sent -= len(first)
                            views.pop(0)
                        else:
                            views[0] = first[sent:]
                            sent = 0
            except OSError as exc:
                raise trio.BrokenResourceError(f"sending to the client: {exc}") from exc

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
