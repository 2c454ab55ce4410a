"""DirectStream: a trio stream over a connected socket, TLS or plain, that
moves bytes without waiting whenever the kernel allows.

trio's SSLStream and SocketStream yield to the event loop on every call,
even when the socket could take or give the bytes at once; for a request
and its reply of a few dozen bytes, those yields (and the locks around
them) cost more than the encryption and the system calls. A DirectStream
tries first and waits only when the socket cannot go on:

  * `send_now` encrypts and hands the bytes to the kernel at once; what the
    kernel does not take stays queued (`unsent`) for `flush`, in order;
  * `receive_some` returns what is already received (every whole TLS record
    the socket holds, up to `max_bytes`) without yielding, except that two
    such calls in a row yield once between them, so that a peer that keeps
    the socket full cannot keep every other task from running.

It speaks TLS 1.2 and 1.3 through an ssl.SSLObject on memory buffers, as
trio's SSLStream does, and runs its own handshake. Errors are trio's: a
broken connection (a reset, a TLS error) is trio.BrokenResourceError from
the cause, a stream this side closed is trio.ClosedResourceError.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import ssl
from typing import Any

import trio
import trio.lowlevel

__all__ = ["DirectStream", "RECEIVE_SIZE"]

#: Bytes asked of the socket per read.
RECEIVE_SIZE = 1 << 16


class DirectStream(trio.abc.Stream):
    """Bytes over `transport`'s socket, encrypted by `context` when given.

    `received` are bytes already read from the socket (to look at them)
    that belong to the stream. With a context, call do_handshake() first.
    """

    def __init__(
        self,
        transport: trio.SocketStream,
        context: ssl.SSLContext | None = None,
        *,
        server_side: bool = False,
        server_hostname: str | None = None,
        received: bytes | bytearray = b"",
    ) -> None:
        self.transport_stream = transport
        self._fd = transport.socket.fileno()
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        #: Plaintext read ahead (a plain stream's `received`).
        self._plain_ahead = b""
        if context is not None:
            self._tls = context.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=server_side,
                server_hostname=server_hostname,
            )
            if received:
                self._incoming.write(received)
        else:
            self._plain_ahead = bytes(received)
        self._handshaken = context is None
        #: Bytes for the socket that the kernel has not taken yet, in order.
        self._unsent = bytearray()
        #: What the handshake left to send after it ended (session tickets),
        #: held until our first message, as trio does (see do_handshake).
        self._held = b""
        self._closed = False
        self._broken: BaseException | None = None
        #: The last receive_some returned without waiting.
        self._hurried = False
        #: The last read from the socket took all it held (as far as it knew).
        self._drained = False
        #: The transport reached its end (no more bytes will come).
        self._transport_eof = False

    # -- what the caller may look at ----------------------------------------------

    @property
    def unsent(self) -> int:
        """Bytes handed to this stream that the kernel has not taken yet."""
        return len(self._unsent)

    def getpeercert(self) -> dict[str, Any] | None:
        """The peer's verified certificate (ssl.SSLSocket.getpeercert())."""
        if self._tls is None:
            return None
        return self._tls.getpeercert()

    def version(self) -> str | None:
        """The TLS version in use, once the handshake is done."""
        return None if self._tls is None else self._tls.version()

    def cipher(self) -> tuple[str, str, int] | None:
        """The cipher in use, once the handshake is done."""
        return None if self._tls is None else self._tls.cipher()

    # -- the handshake ----------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake (a checkpoint; nothing for a plain stream).

        A failed handshake raises trio.BrokenResourceError from the ssl
        error, after handing the alert that says why to the kernel.
        """
        await trio.lowlevel.checkpoint()
        tls = self._tls
        if tls is None or self._handshaken:
            return
        self._check()
        while True:
            try:
                tls.do_handshake()
                done = True
            except ssl.SSLWantReadError:
                done = False
            except (ssl.SSLError, ssl.CertificateError) as exc:
                self._unsent += self._outgoing.read()
                self._write_quietly()  # the alert, if the kernel takes it
                raise self._break(exc) from exc
            data = self._outgoing.read()
            if done and tls.server_side and tls.version() == "TLSv1.3":
                # A TLS 1.3 server may write session tickets as the
                # handshake ends; a client need not expect bytes then, so
                # they go with our first message instead (trio does the same).
                self._held = data
                data = b""
            self._unsent += data
            await self.flush()
            if done:
                self._handshaken = True
                return
            if not await self._fill():
                self._incoming.write_eof()

    # -- sending ------------------------------------------------------------------------

    def send_now(self, data: bytes | bytearray | memoryview) -> bool:
        """Hand `data` to the kernel without waiting; whether it took all that
        is queued. What it did not take is kept, in order, for flush().

        Raises:
            trio.BrokenResourceError: the connection broke.
            trio.ClosedResourceError: this side closed the stream.
        """
        self._check()
        if self._tls is None:
            self._unsent += data
        elif data:
            if self._held:
                self._unsent += self._held
                self._held = b""
            try:
                self._tls.write(data)
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise self._break(exc) from exc
            self._unsent += self._outgoing.read()
        return self._write()

    async def flush(self) -> None:
        """Wait until the kernel has taken every byte queued."""
        while not self._write():
            try:
                await trio.lowlevel.wait_writable(self._fd)
            except trio.ClosedResourceError:
                self._closed = True
                raise

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send `data`; returns without yielding when the kernel takes it at once.

        A send cancelled while it waits leaves the rest queued, in order:
        the stream stays usable.
        """
        if not self.send_now(data):
            await self.flush()

    async def wait_send_all_might_not_block(self) -> None:
        if self._unsent:
            await trio.lowlevel.wait_writable(self._fd)
        else:
            await trio.lowlevel.checkpoint()

    def _write(self) -> bool:
        """Give the kernel what it takes of the queue; whether it took everything."""
        if self._closed:  # its descriptor may be another's by now
            raise trio.ClosedResourceError("the stream was closed")
        unsent = self._unsent
        while unsent:
            try:
                sent = os.write(self._fd, unsent)
            except BlockingIOError:
                return False
            except OSError as exc:
                raise self._io_error(exc) from exc
            del unsent[:sent]
        return True

    def _write_quietly(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            self._write()

    # -- receiving ------------------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        """Bytes from the peer (at most `max_bytes`); b"" once it has ended the stream."""
        limit = RECEIVE_SIZE if max_bytes is None else max_bytes
        if limit < 1:
            raise ValueError("max_bytes must be >= 1")
        waited = False
        if self._hurried:
            # Two in a row without waiting: let the others run once.
            await trio.lowlevel.checkpoint()
        elif self._drained and not self._buffered():
            # The last read emptied the socket: asking it again now would
            # most likely only say so.
            await self._wait_readable()
            waited = True
        while True:
            data = self.receive_now(limit)
            if data is not None:
                self._hurried = not waited
                return data
            waited = True
            await self._wait_readable()

    async def _wait_readable(self) -> None:
        try:
            await trio.lowlevel.wait_readable(self._fd)
        except trio.ClosedResourceError:
            self._closed = True
            raise
        self._drained = False

    def _buffered(self) -> bool:
        """Bytes wait here already, read from the socket but not yet returned."""
        if self._tls is None:
            return bool(self._plain_ahead)
        return bool(self._incoming.pending or self._tls.pending())

    def receive_now(self, max_bytes: int = RECEIVE_SIZE) -> bytes | None:
        """What can be read without waiting: bytes, b"" at the end, None for nothing yet."""
        self._check()
        if self._tls is None:
            if self._plain_ahead:
                data = self._plain_ahead[:max_bytes]
                self._plain_ahead = self._plain_ahead[max_bytes:]
                return data
            return self._read(max_bytes)
        pieces: list[bytes] = []
        size = 0
        while size < max_bytes:
            try:
                piece = self._decrypt(max_bytes - size)
            except trio.BrokenResourceError:
                if pieces:
                    break  # what came before the error is the caller's; the error comes next
                raise
            if piece is None:
                break
            if not piece:
                if pieces:
                    break
                return b""  # the peer closed TLS cleanly
            pieces.append(piece)
            size += len(piece)
            if self._drained and not self._buffered():
                break  # the socket gave all it had: no need to hear it say so
        if not pieces:
            return None
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _decrypt(self, max_bytes: int) -> bytes | None:
        """One TLS read, reading the socket as long as it gives bytes; None for nothing yet."""
        tls = self._tls
        assert tls is not None
        while True:
            # With no bytes for it and none decrypted, TLS could only say it
            # wants more: the socket is read first, sparing a read that
            # fails (and its exception) for every message.
            if self._transport_eof or self._incoming.pending or tls.pending():
                try:
                    return tls.read(max_bytes)
                except ssl.SSLWantReadError as exc:
                    if self._transport_eof:
                        raise self._break(exc) from exc
                except (ssl.SSLError, ssl.CertificateError) as exc:
                    raise self._break(exc) from exc
                finally:
                    # Reading may make TLS answer (a key update): it goes out in order.
                    if self._outgoing.pending:
                        self._unsent += self._outgoing.read()
                        self._write_quietly()
            received = self._read(RECEIVE_SIZE)
            if received is None:
                return None
            if received:
                self._incoming.write(received)
            else:
                self._transport_eof = True
                self._incoming.write_eof()

    def _read(self, max_bytes: int) -> bytes | None:
        if self._closed:  # its descriptor may be another's by now
            raise trio.ClosedResourceError("the stream was closed")
        try:
            data = os.read(self._fd, max_bytes)
        except BlockingIOError:
            self._drained = True
            return None
        except OSError as exc:
            raise self._io_error(exc) from exc
        self._drained = len(data) < max_bytes
        return data

    async def _fill(self) -> bool:
        """Wait for bytes for the TLS layer; False at the transport's end."""
        while True:
            received = self._read(RECEIVE_SIZE)
            if received is not None:
                if not received:
                    self._transport_eof = True
                    return False
                self._incoming.write(received)
                return True
            await self._wait_readable()

    # -- closing ---------------------------------------------------------------------------

    async def send_eof(self) -> None:
        """Close our side of the plain stream (TLS has no half-close)."""
        if self._tls is not None:
            raise trio.BrokenResourceError("TLS streams cannot be half-closed")
        await self.flush()
        await self.transport_stream.send_eof()

    async def aclose(self) -> None:
        """Close: say so in TLS when the kernel takes it at once, then close the socket.

        Closed forcefully (trio.aclose_forcefully, or in a cancelled scope),
        it only closes the socket: the peer sees the stream cut short.
        """
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        if (
            self._tls is not None
            and self._handshaken
            and self._broken is None
            and trio.current_effective_deadline() != -math.inf
        ):
            with contextlib.suppress(ssl.SSLError, ValueError):
                self._tls.unwrap()
            self._unsent += self._outgoing.read()
            self._write_quietly()
        self._closed = True
        await self.transport_stream.aclose()

    # -- errors ----------------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError("the connection broke") from self._broken

    def _break(self, exc: BaseException) -> trio.BrokenResourceError:
        self._broken = exc
        return trio.BrokenResourceError(str(exc))

    def _io_error(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if exc.errno == errno.EBADF:
            self._closed = True
            return trio.ClosedResourceError("the stream was closed")
        return self._break(exc)  # a reset, a broken pipe: the connection is gone
