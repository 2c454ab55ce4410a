"""One NBD connection's byte stream: exact-length reads over a receive
buffer, payloads received straight into their destination, and sends that
never interleave (replies from concurrent requests share the stream). On a
plain socket, replies and their data leave in one vectored send, uncopied.

On a plain socket the stream also goes around trio's socket calls: reads
and writes try the file descriptor at once and wait for it only when the
kernel cannot go on. A trio socket call yields to the run loop even when
it succeeds at once, and at a queue depth of 16 most calls do: one pass of
the run loop (an `epoll_wait` and a task switch) for every receive and
every send. Two receives in a row that did not wait yield once between
them, so that a client keeping the socket full cannot starve the other
connections.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio
import trio.lowlevel

__all__ = ["Connection", "PeerClosedError", "set_nodelay"]

_Parsed = TypeVar("_Parsed")

#: Most bytes asked of the socket per receive for headers and small data.
_RECEIVE = 1 << 16
#: Replies at most this long are joined into one send, and so are replies
#: of at most this many bytes in all sent together; longer data is sent
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
        #: The plain socket's descriptor (trio keeps it nonblocking), or -1.
        self._fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else -1
        #: Receives in a row that did not wait (see the module docstring).
        self._unwaited = 0

    @property
    def received(self) -> bytearray:
        """The bytes received that no read has taken yet, to parse in place
        (csnap_nbd.runs); whoever takes some deletes them from its front."""
        return self._buffer

    @property
    def buffered(self) -> int:
        """Bytes received from the peer that no read has taken yet."""
        return len(self._buffer)

    async def fill(self) -> None:
        """Receive more (at least one byte, or PeerClosedError)."""
        await self._fill()

    async def _fill(self) -> None:
        if self._fd < 0:
            data = await self.stream.receive_some(_RECEIVE)
        else:
            data = await self._receive_direct()
        if not data:
            raise PeerClosedError("the client closed the connection")
        self._buffer += data

    async def _receive_direct(self) -> bytes:
        """Up to _RECEIVE bytes from the plain socket (empty at its end)."""
        if self._unwaited:
            # The last receive did not wait: let the other tasks run (and
            # a cancelled reader stop) before taking more.
            self._unwaited = 0
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = os.read(self._fd, _RECEIVE)
            except BlockingIOError:
                await self._wait_readable()
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"receiving from the client: {exc}") from exc
            self._unwaited += 1
            return data

    async def _wait_readable(self) -> None:
        self._unwaited = 0
        try:
            await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError as exc:
            raise trio.BrokenResourceError("the connection was closed") from exc

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
            if self._fd >= 0:
                try:
                    got = os.readv(self._fd, [view[done:]])
                except BlockingIOError:
                    await self._wait_readable()
                    continue
                except OSError as exc:
                    raise trio.BrokenResourceError(f"receiving from the client: {exc}") from exc
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
        buffer first unless they are _JOIN bytes or less in all; over TLS they
        are joined (the record layer copies anyway).
        """
        async with self._send_lock:
            if self._fd < 0:
                await self.stream.send_all(b"".join(parts))
                return
            views = self._send_direct(parts)
            while views:
                try:
                    await trio.lowlevel.wait_writable(self._fd)
                except trio.ClosedResourceError as exc:
                    raise trio.BrokenResourceError("the connection was closed") from exc
                views = self._send_direct(views)

    @property
    def sends_now(self) -> bool:
        """Whether send_parts_now may be used: a plain socket nobody is sending on."""
        return self._fd >= 0 and not self._send_lock.locked()

    def send_parts_now(self, parts: Sequence[bytes | bytearray | memoryview]) -> list[memoryview]:
        """Send what the kernel takes of `parts` now, without waiting; the
        rest, which the caller must send next (send_parts), before anything
        else. Only when sends_now."""
        assert self.sends_now
        return self._send_direct(parts)

    def _send_direct(self, parts: Sequence[bytes | bytearray | memoryview]) -> list[memoryview]:
        if len(parts) > 1 and sum(map(len, parts)) <= _JOIN:
            # Many small replies (a run's): one copy costs less than a
            # memoryview and a step of the loop below for each.
            parts = [b"".join(parts)]
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        try:
            while views:
                sent = os.writev(self._fd, views[:_VECTOR])
                while sent:
                    first = views[0]
                    if sent >= len(first):
                        sent -= len(first)
                        views.pop(0)
                    else:
                        views[0] = first[sent:]
                        sent = 0
        except BlockingIOError:
            pass
        except OSError as exc:
            raise trio.BrokenResourceError(f"sending to the client: {exc}") from exc
        return views

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)
