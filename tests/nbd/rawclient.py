"""A tiny NBD client over a raw socket, for what real clients will not send:
bad magics, unknown options and commands, oversized lengths, requests cut
off in the middle, simple replies and NBD_OPT_EXPORT_NAME.

It uses csnap_nbd.wire to build and parse bytes; the real clients (qemu,
libnbd) in the other tests are the independent check of those codecs.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import trio

from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import ChunkType, ClientFlag, Option, Reply, ReplyFlag

#: Every wait for the gateway is bounded by this.
WAIT = 10.0


@dataclass
class Chunk:
    flags: int
    type: int
    payload: bytes


@dataclass
class Answer:
    """A reply to one request: simple (error, data) or structured chunks."""

    cookie: int
    error: int = 0
    data: bytes = b""
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def errors(self) -> list[int]:
        return [tx.parse_error_payload(c.payload)[0] for c in self.chunks if c.type & (1 << 15)] + (
            [self.error] if self.error else []
        )


class RawClient:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        #: What the bytes go through: the socket, or TLS over it once a
        #: test has started TLS (tests/nbd/test_tls.py).
        self.channel: trio.abc.Stream = stream
        self._buffer = bytearray()
        self.structured = False

    @classmethod
    async def unix(cls, path: Path) -> Self:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with trio.fail_after(WAIT):
            await sock.connect(str(path))
        return cls(trio.SocketStream(sock))

    @classmethod
    async def tcp(cls, port: int) -> Self:
        with trio.fail_after(WAIT):
            return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def aclose(self) -> None:
        await self.channel.aclose()

    async def send(self, data: bytes) -> None:
        with trio.fail_after(WAIT):
            await self.channel.send_all(data)

    async def receive(self, size: int) -> bytes:
        with trio.fail_after(WAIT):
            while len(self._buffer) < size:
                data = await self.channel.receive_some(1 << 16)
                if not data:
                    raise EOFError(f"closed with {len(self._buffer)} of {size} bytes read")
                self._buffer += data
        out = bytes(self._buffer[:size])
        del self._buffer[:size]
        return out

    async def closed(self) -> bool:
        """True once the gateway closes the connection (anything sent first is
        skipped); our end is closed too."""
        try:
            with trio.fail_after(WAIT):
                while True:
                    data = await self.channel.receive_some(1 << 16)
                    if not data:
                        return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return True
        finally:
            await trio.aclose_forcefully(self.channel)

    # -- handshake -------------------------------------------------------------

    async def greet(self, flags: int = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES) -> int:
        handshake_flags = hs.parse_greeting(await self.receive(hs.GREETING.size))
        await self.send(hs.CLIENT_FLAGS.pack(flags))
        return int(handshake_flags)

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; every reply up to the final one (ACK or an error)."""
        await self.send(hs.option(opt, data))
        return await self.option_replies(opt)

    async def option_replies(self, opt: int) -> list[tuple[int, bytes]]:
        replies = []
        while True:
            header = hs.parse_option_reply_header(await self.receive(hs.OPTION_REPLY_HEADER.size))
            assert header.option == opt, header
            payload = await self.receive(header.length)
            replies.append((header.reply, payload))
            if header.reply == Reply.ACK or header.reply & (1 << 31):
                return replies

    async def go(
        self, name: str = "origin", *, structured: bool = True, contexts: tuple[str, ...] = ()
    ) -> None:
        """Negotiate and enter transmission, or fail the test."""
        await self.greet()
        if structured:
            assert (await self.option(Option.STRUCTURED_REPLY))[-1][0] == Reply.ACK
            self.structured = True
        if contexts:
            replies = await self.option(
                Option.SET_META_CONTEXT, hs.meta_context_request(name, contexts)
            )
            assert replies[-1][0] == Reply.ACK, replies
        replies = await self.option(Option.GO, hs.info_request(name))
        assert replies[-1][0] == Reply.ACK, replies

    # -- transmission ------------------------------------------------------------

    async def request(
        self,
        command: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        cookie: int = 1,
        payload: bytes = b"",
    ) -> None:
        await self.send(tx.request(command, cookie, offset, length, flags) + payload)

    async def answer(self, read_length: int | Mapping[int, int] = 0) -> Answer:
        """The next reply; `read_length` is the data a simple READ reply carries
        (by cookie, when several READs may be answered in any order)."""
        head = await self.receive(4)
        _, rest = tx.parse_reply_header(head)
        header = tx.decode_reply_header(head + await self.receive(rest))
        if not header.structured:
            if not isinstance(read_length, int):
                read_length = read_length.get(header.cookie, 0)
            data = await self.receive(read_length) if header.error == 0 else b""
            return Answer(header.cookie, error=header.error, data=data)
        answer = Answer(header.cookie)
        while True:
            payload = await self.receive(header.length)
            answer.chunks.append(Chunk(header.flags, header.type, payload))
            if header.type == ChunkType.OFFSET_DATA:
                answer.data += payload[8:]
            if header.flags & ReplyFlag.DONE:
                return answer
            head = await self.receive(tx.CHUNK_HEADER.size)
            header = tx.decode_reply_header(head)
