"""MessageStream: a csnap connection over a trio stream.

It owns the loop every side of the protocol needs: read bytes, feed them to
the sans-IO codec (csnap_protocol.Connection), hand out whole messages; and
on the way out, encode, with writes from several tasks joined into one
system call. The codec's rules (hello first, roles, frame limits) stay in
the codec; what to do with a message stays with the caller.
"""

from __future__ import annotations

import logging

import trio

from csnap_protocol import (
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    LocalProtocolError,
    Message,
    message_id,
)

__all__ = ["MessageStream", "RECEIVE_SIZE"]

log = logging.getLogger("csnap.transport")

#: Bytes asked of the stream per read.
RECEIVE_SIZE = 1 << 16


class MessageStream:
    """Messages over `stream`, encoded and decoded by `codec`."""

    def __init__(self, stream: trio.abc.Stream, codec: Connection) -> None:
        self.stream = stream
        self.codec = codec
        #: Encoded bytes waiting for the task that is writing.
        self._unsent = bytearray()
        #: Set while no task is writing; a new one when a task starts to write.
        self._written = trio.Event()
        self._written.set()

    async def receive(self) -> Message | None:
        """The next message from the peer; None once it has closed its side.

        Raises:
            RemoteProtocolError: the peer broke the protocol (the codec is
                now in its ERROR state: only an error may still be sent).
            trio.BrokenResourceError, trio.ClosedResourceError: the stream broke.
        """
        while True:
            message = self.codec.next_message()
            if isinstance(message, ConnectionClosed):
                return None
            if message is not None:
                return message
            self.codec.receive_data(await self.stream.receive_some(RECEIVE_SIZE))

    def encode_answer(self, message: Message, peer: object) -> bytes:
        """The bytes of `message`; for a reply that cannot be sent as it is
        (larger than the peer's frame limit, say), those of an error
        `request_too_large` for its request, so that every request is
        answered; b"" for a notice or error that cannot be sent. `peer`
        names the peer in the log line that says so (formatted only then).

        Raises nothing the peer could cause.
        """
        try:
            return self.codec.send(message)
        except LocalProtocolError as exc:
            log.error("%s: cannot send %s: %s", peer, message.TYPE, exc)
            request = message_id(message)
            if request is None or isinstance(message, Error):
                return b""
            code = ErrorCode.REQUEST_TOO_LARGE
            text = (
                f"the {message.TYPE} reply does not fit in your frame limit;"
                f" ask about less at once ({exc})"
            )
            try:
                return self.codec.send(Error(request, int(code), code.symbol, text[:1024]))
            except LocalProtocolError:
                return b""  # not even an error may go out (before our hello, say)

    async def send(self, message: Message) -> None:
        """Encode and send `message` (LocalProtocolError if it cannot be encoded)."""
        await self.send_bytes(self.codec.send(message))

    async def send_bytes(self, data: bytes) -> None:
        """Send encoded bytes; bytes sent while another task is writing join
        its next write, and this call returns at once (if that write fails,
        the stream is broken and its reader learns it).

        A write cancelled part-way through a frame leaves the stream unable
        to carry anything more: the stream is closed and the cancellation
        goes on.

        Raises:
            trio.BrokenResourceError, trio.ClosedResourceError: the stream broke.
        """
        self._unsent += data
        if not self._written.is_set():
            return  # another task is writing: these bytes join its next write
        self._written = trio.Event()
        try:
            while self._unsent:
                pending = bytes(self._unsent)
                self._unsent.clear()
                await self.stream.send_all(pending)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise
        except BaseException:
            await trio.aclose_forcefully(self.stream)
            raise
        finally:
            self._written.set()

    async def flush(self) -> None:
        """Wait until the bytes handed to send_bytes so far have been written
        (or their write failed: then the stream is broken).

        Bytes that joined another task's write were not sent when their
        send_bytes returned: whoever closes the stream after saying its last
        word (an error, say) flushes first, or the close may cut that task's
        write short and the word with it.
        """
        await self._written.wait()

    async def aclose(self) -> None:
        """Close the stream at once (what is unsent is dropped)."""
        await trio.aclose_forcefully(self.stream)
