"""csnap-nbd against a raw-socket client that sends what real clients will
not: unknown options and commands get their proper errors and the
connection goes on; broken framing (bad magics, unknown client flags,
oversized lengths, a request cut off) closes that connection only, and the
gateway keeps serving others. Also the paths real clients cannot force:
simple replies, NBD_OPT_EXPORT_NAME, REQ_ONE, EPERM on a read-only export.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from csnap_nbd.wire import handshake as hs
from csnap_nbd.wire import transmission as tx
from csnap_nbd.wire.constants import (
    IHAVEOPT,
    ChunkType,
    Command,
    CommandFlag,
    Errno,
    HandshakeFlag,
    Info,
    Option,
    Reply,
)
from tests.compare import assert_same_bytes
from tests.nbd.rawclient import RawClient
from tests.nbd.support import CHUNK, ORIGIN_SIZE, Gateway, gateway, origin_image

pytestmark = [pytest.mark.e2e]

IMAGE = origin_image()


@pytest.fixture
async def gw(tmp_path: Path) -> AsyncIterator[Gateway]:
    async with gateway(tmp_path, image=IMAGE) as running:
        await running.create(1)
        yield running


async def still_serving(gw: Gateway) -> None:
    """A fresh connection negotiates and reads correctly."""
    client = await RawClient.unix(gw.socket)
    await client.go("origin")
    await client.request(Command.READ, 12345, 100, cookie=9)
    answer = await client.answer()
    assert answer.cookie == 9 and not answer.errors
    assert answer.data == IMAGE[12345:12445]
    await client.request(Command.DISC)
    assert await client.closed()


async def test_handshake_greeting_and_flags(gw: Gateway) -> None:
    client = await RawClient.tcp(gw.port)
    flags = await client.greet()
    assert flags == HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    await client.send(hs.option(Option.ABORT))
    assert (await client.option_replies(Option.ABORT))[0][0] == Reply.ACK
    assert await client.closed()


async def test_unknown_client_flags_close_the_connection(gw: Gateway) -> None:
    client = await RawClient.unix(gw.socket)
    await client.greet(flags=0x8000_0001)
    assert await client.closed()
    await still_serving(gw)


async def test_unknown_and_malformed_options_get_errors_and_negotiation_goes_on(
    gw: Gateway,
) -> None:
    client = await RawClient.unix(gw.socket)
    await client.greet()
    for unknown in (Option.STARTTLS, Option.EXTENDED_HEADERS, 4, 999, 0x7FFF_FFFF):
        replies = await client.option(unknown, b"ignored data")
        assert replies == [(Reply.ERR_UNSUP, replies[0][1])]
    # Known options with malformed data.
    assert (await client.option(Option.LIST, b"x"))[-1][0] == Reply.ERR_INVALID
    assert (await client.option(Option.GO, b"\x00\x00\x00\x09ab"))[-1][0] == Reply.ERR_INVALID
    assert (await client.option(Option.INFO, b"\xff\xff"))[-1][0] == Reply.ERR_INVALID
    # Metadata contexts before structured replies.
    request = hs.meta_context_request("origin", ["base:allocation"])
    assert (await client.option(Option.SET_META_CONTEXT, request))[-1][0] == Reply.ERR_INVALID
    # Unknown exports.
    for name in ("snap-2", "snap-01", "snap-", "origin2"):
        replies = await client.option(Option.INFO, hs.info_request(name))
        assert replies[-1][0] == Reply.ERR_UNKNOWN, name
    # A big unknown option is skipped, not buffered or fatal.
    assert (await client.option(12345, bytes(200_000)))[-1][0] == Reply.ERR_UNSUP

    # Still negotiating: the list and INFO work.
    replies = await client.option(Option.LIST)
    entries = [p for r, p in replies if r == Reply.SERVER]
    names = [p[4 : 4 + struct.unpack(">I", p[:4])[0]].decode() for p in entries]
    assert names == ["origin", "snap-1"]
    assert entries[1].endswith(b"snapshot 1")  # the description follows the name
    replies = await client.option(Option.INFO, hs.info_request("snap-1", [Info.NAME]))
    assert [r for r, _ in replies] == [Reply.INFO] * 3 + [Reply.ACK]
    export = struct.unpack(">HQH", replies[0][1])
    assert export[:2] == (Info.EXPORT, ORIGIN_SIZE)
    assert replies[1][1] == struct.pack(">H", Info.NAME) + b"snap-1"

    # Contexts: list all, select by name, unknown namespaces select nothing.
    assert (await client.option(Option.STRUCTURED_REPLY))[-1][0] == Reply.ACK
    listed = await client.option(Option.LIST_META_CONTEXT, hs.meta_context_request("origin"))
    assert [p[4:] for r, p in listed if r == Reply.META_CONTEXT] == [
        b"base:allocation",
        b"csnap:exceptions",
        b"csnap:diff:1",
    ]
    only = hs.meta_context_request("origin", ["csnap:", "qemu:dirty-bitmap:x"])
    listed = await client.option(Option.LIST_META_CONTEXT, only)
    assert [p[4:] for r, p in listed if r == Reply.META_CONTEXT] == [
        b"csnap:exceptions",
        b"csnap:diff:1",
    ]
    bad = hs.meta_context_request("origin", ["no-namespace"])
    assert (await client.option(Option.SET_META_CONTEXT, bad))[-1][0] == Reply.ERR_INVALID
    await client.aclose()
    await still_serving(gw)


OPTION_GARBAGE = {
    "bad option magic": struct.pack(">QII", 0x1234, Option.GO, 0),
    "huge option": struct.pack(">QII", IHAVEOPT, Option.GO, 0xFFFF_FFFF),
    "option cut short": struct.pack(">QII", IHAVEOPT, Option.GO, 100) + b"abc",
}


async def test_broken_option_framing_closes_only_that_connection(gw: Gateway) -> None:
    other = await RawClient.unix(gw.socket)
    await other.go("snap-1")
    for what, garbage in OPTION_GARBAGE.items():
        client = await RawClient.unix(gw.socket)
        await client.greet()
        await client.send(garbage)
        await client.stream.send_eof()
        assert await client.closed(), what
        # The connection negotiated before is unaffected.
        await other.request(Command.READ, 0, 10)
        assert (await other.answer()).data == IMAGE[:10], what
    await other.aclose()
    await still_serving(gw)


async def test_unknown_commands_and_bad_requests_get_errors_and_the_connection_goes_on(
    gw: Gateway,
) -> None:
    client = await RawClient.unix(gw.socket)
    await client.go("origin", contexts=("base:allocation",))

    async def expect(
        error: int, command: int, offset: int = 0, length: int = 0, flags: int = 0
    ) -> None:
        await client.request(command, offset, length, cookie=77, flags=flags)
        answer = await client.answer()
        assert answer.cookie == 77
        assert answer.errors == [error], (command, answer)

    await expect(Errno.EINVAL, 42)  # unknown command
    await expect(Errno.EINVAL, Command.RESIZE)  # known to the spec, not served
    await expect(Errno.EINVAL, Command.READ, 0, 512, flags=1 << 9)  # unknown flag
    await expect(Errno.EINVAL, Command.READ, 0, 512, flags=CommandFlag.REQ_ONE)  # wrong command
    await expect(Errno.EINVAL, Command.WRITE_ZEROES, 0, 512, flags=CommandFlag.FAST_ZERO)
    await expect(Errno.EINVAL, Command.READ, ORIGIN_SIZE - 10, 11)  # past the end
    await expect(Errno.ENOSPC, Command.WRITE_ZEROES, ORIGIN_SIZE, 1)
    await expect(Errno.EINVAL, Command.BLOCK_STATUS, ORIGIN_SIZE, 512)
    await expect(Errno.EINVAL, Command.READ, 0, (32 << 20) + 1)  # over the advertised max
    # A write over the maximum is drained and refused; the stream stays in step.
    await client.request(Command.WRITE, 0, (32 << 20) + 512, cookie=78)
    await client.send(b"\xee" * ((32 << 20) + 512))
    answer = await client.answer()
    assert answer.cookie == 78 and answer.errors == [Errno.EINVAL]
    assert IMAGE[:512] == (await read(client, 0, 512))

    # A structured READ of zero bytes is a single NONE chunk.
    await client.request(Command.READ, 100, 0, cookie=5)
    answer = await client.answer()
    assert [c.type for c in answer.chunks] == [ChunkType.NONE]
    await client.request(Command.DISC)
    assert await client.closed()


async def read(client: RawClient, offset: int, length: int) -> bytes:
    await client.request(Command.READ, offset, length, cookie=1000)
    answer = await client.answer(length)
    assert not answer.errors, answer
    return answer.data


REQUEST_GARBAGE = {
    "bad request magic": struct.pack(">IHHQQI", 0xDEADBEEF, 0, 0, 1, 0, 512),
    "huge write": tx.request(Command.WRITE, 1, 0, 0xFFFF_FFFF),
    "request cut short": tx.request(Command.READ, 1, 0, 512)[:20],
    "payload cut short": tx.request(Command.WRITE, 1, 0, 4096) + b"x" * 100,
}


async def test_broken_request_framing_closes_only_that_connection(gw: Gateway) -> None:
    for what, garbage in REQUEST_GARBAGE.items():
        client = await RawClient.tcp(gw.port)
        await client.go("snap-1")
        await client.send(garbage)
        await client.stream.send_eof()
        assert await client.closed(), what
        await still_serving(gw)


async def test_simple_replies_and_export_name(gw: Gateway) -> None:
    """The Linux kernel's way in: EXPORT_NAME, no structured replies."""
    client = await RawClient.unix(gw.socket)
    await client.greet()
    await client.send(hs.option(Option.EXPORT_NAME, b"snap-1"))
    size, flags = struct.unpack(">QH", await client.receive(10))  # NO_ZEROES was agreed
    assert size == ORIGIN_SIZE and flags & 1
    assert_same_bytes(await read(client, 4095, 4098), IMAGE[4095 : 4095 + 4098], "snap-1")
    data = b"\x42" * 5000
    await client.request(Command.WRITE, 6000, len(data), cookie=3, payload=data)
    assert (await client.answer()).error == 0
    assert_same_bytes(await read(client, 6000, 5000), data, "snap-1")
    await client.request(Command.FLUSH, cookie=4)
    assert (await client.answer()).error == 0
    # Errors in simple mode carry no data.
    await client.request(Command.READ, ORIGIN_SIZE, 512, cookie=5)
    answer = await client.answer(512)
    assert answer.error == Errno.EINVAL and answer.data == b""
    await client.request(Command.BLOCK_STATUS, 0, 512, cookie=6)
    assert (await client.answer()).error == Errno.EINVAL  # no contexts without structured replies
    await client.request(Command.DISC)
    assert await client.closed()
    # The origin did not change.
    assert_same_bytes(gw.origin.read_bytes(), IMAGE, "origin file")

    # Without NO_ZEROES, EXPORT_NAME is answered with 124 zero bytes more;
    # an unknown export can only be refused by closing.
    client = await RawClient.unix(gw.socket)
    await client.greet(flags=1)
    await client.send(hs.option(Option.EXPORT_NAME, b""))
    reply = await client.receive(10 + 124)
    assert reply[10:] == bytes(124)
    await client.aclose()
    client = await RawClient.unix(gw.socket)
    await client.greet()
    await client.send(hs.option(Option.EXPORT_NAME, b"snap-77"))
    assert await client.closed()


async def test_block_status_both_contexts_and_req_one(gw: Gateway) -> None:
    writer = await RawClient.unix(gw.socket)
    await writer.go("origin")
    await writer.request(Command.WRITE, 3 * CHUNK, 2 * CHUNK, payload=bytes(2 * CHUNK))
    assert not (await writer.answer()).errors

    client = await RawClient.unix(gw.socket)
    await client.go("snap-1", contexts=("base:allocation", "csnap:exceptions", "x-other:y"))
    offset, length = CHUNK + 10, 6 * CHUNK
    await client.request(Command.BLOCK_STATUS, offset, length, cookie=11)
    answer = await client.answer()
    assert [c.type for c in answer.chunks] == [ChunkType.BLOCK_STATUS] * 2
    assert answer.chunks[-1].flags & 1 and not answer.chunks[0].flags & 1
    by_context = dict(tx.parse_block_status_payload(c.payload) for c in answer.chunks)
    assert by_context[1] == [(length, 0)]  # base:allocation: data
    assert by_context[2] == [(2 * CHUNK - 10, 0), (2 * CHUNK, 1), (2 * CHUNK + 10, 0)]

    await client.request(Command.BLOCK_STATUS, offset, length, cookie=12, flags=CommandFlag.REQ_ONE)
    answer = await client.answer()
    by_context = dict(tx.parse_block_status_payload(c.payload) for c in answer.chunks)
    assert by_context == {1: [(length, 0)], 2: [(2 * CHUNK - 10, 0)]}
    await client.aclose()
    await writer.aclose()


async def test_read_only_refuses_every_write_with_eperm(tmp_path: Path) -> None:
    async with gateway(tmp_path, "--read-only", image=IMAGE) as gw:
        client = await RawClient.unix(gw.socket)
        await client.go("origin")
        for command, payload in (
            (Command.WRITE, b"z" * 512),
            (Command.WRITE_ZEROES, b""),
            (Command.TRIM, b""),
        ):
            await client.request(command, 0, 512, cookie=2, payload=payload)
            assert (await client.answer()).errors == [Errno.EPERM], command
        assert await read(client, 0, 512) == IMAGE[:512]
        await client.request(Command.FLUSH, cookie=3)
        assert (await client.answer()).errors == []
        await client.aclose()
        assert_same_bytes(gw.origin.read_bytes(), IMAGE, "origin file")
