"""MessageStream's promises: whole messages out of bytes however they are
cut, None at a clean end, a protocol error for a frame cut short; writes
from several tasks joined without interleaving; a reply too large for the
peer answered with request_too_large; a write cancelled mid-frame closes the
stream; flush waits for bytes that joined another task's write.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from csnap_protocol import (
    MIN_MAX_FRAME,
    Connection,
    Error,
    ErrorCode,
    Keepalive,
    Message,
    Ok,
    RemoteProtocolError,
    Role,
    SnapshotList,
)
from csnap_protocol.records import SnapshotRecord
from csnap_transport import MessageStream


def _pair() -> tuple[MessageStream, MessageStream]:
    """A client and a server stream, hellos exchanged at the codec level."""
    left, right = trio.testing.memory_stream_pair()
    client = Connection(Role.CLIENT, name="client")
    server = Connection(Role.SERVER, name="server", max_frame=MIN_MAX_FRAME)
    server.receive_data(client.hello())
    client.receive_data(server.hello())
    assert server.next_message() is not None and client.next_message() is not None
    return MessageStream(left, client), MessageStream(right, server)


async def test_messages_come_whole_however_the_bytes_are_cut() -> None:
    client, server = _pair()
    data = b"".join(client.codec.send(Keepalive(n)) for n in range(1, 6))
    for cut in range(0, len(data), 3):
        await client.stream.send_all(data[cut : cut + 3])
    await client.stream.send_eof()  # type: ignore[attr-defined]
    received = await _all(server)
    assert received == [Keepalive(n) for n in range(1, 6)]


async def test_a_frame_cut_short_by_the_end_is_a_protocol_error() -> None:
    client, server = _pair()
    frame = client.codec.send(Keepalive(1))
    await client.stream.send_all(frame[:-1])
    await client.stream.send_eof()  # type: ignore[attr-defined]
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        await server.receive()


async def test_writes_of_many_tasks_arrive_whole() -> None:
    client, server = _pair()
    async with trio.open_nursery() as nursery:
        for n in range(1, 101):
            nursery.start_soon(client.send, Keepalive(n))
    await client.stream.send_eof()  # type: ignore[attr-defined]
    received = await _all(server)
    assert sorted(m.id for m in received) == list(range(1, 101))  # type: ignore[attr-defined]


async def test_a_reply_too_large_for_the_peer_becomes_request_too_large() -> None:
    client, server = _pair()
    # The server's peer (this client) accepts MIN_MAX_FRAME: too small for this list.
    client.codec.peer_max_frame = MIN_MAX_FRAME
    server.codec.peer_max_frame = MIN_MAX_FRAME
    big = SnapshotList(7, tuple(_snapshot(tag) for tag in range(64)))
    data = server.encode_answer(big, "test peer")
    client.codec.receive_data(data)
    reply = client.codec.next_message()
    assert isinstance(reply, Error) and reply.id == 7
    assert reply.code == ErrorCode.REQUEST_TOO_LARGE
    # A reply that fits goes out as it is.
    assert server.encode_answer(Ok(8), "test peer") == server.codec.send(Ok(8))


async def test_a_write_cancelled_mid_frame_closes_the_stream() -> None:
    left, _right = trio.testing.lockstep_stream_pair()
    client = Connection(Role.CLIENT, name="client")
    stream = MessageStream(left, client)
    with trio.move_on_after(0.05):
        await stream.send_bytes(client.hello())  # nobody reads: blocks mid-frame
    with pytest.raises(trio.ClosedResourceError):
        await left.send_all(b"x")


async def test_flush_waits_for_bytes_that_joined_another_tasks_write() -> None:
    left, right = trio.testing.lockstep_stream_pair()
    client = Connection(Role.CLIENT, name="client")
    stream = MessageStream(left, client)
    first, last = client.hello(), client.send(Keepalive(1))
    flushed = False
    received = bytearray()

    async def flush() -> None:
        nonlocal flushed
        await stream.flush()
        flushed = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_bytes, first)  # blocks until read
        await trio.testing.wait_all_tasks_blocked()
        await stream.send_bytes(last)  # joins that write: returns at once
        nursery.start_soon(flush)
        await trio.testing.wait_all_tasks_blocked()
        assert not flushed  # nothing of either has been written yet
        while len(received) < len(first) + len(last):
            received += await right.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        assert flushed
    assert bytes(received) == first + last
    await stream.flush()  # nobody writing: returns at once


async def _all(stream: MessageStream) -> list[Message]:
    out: list[Message] = []
    while (message := await stream.receive()) is not None:
        out.append(message)
    return out


def _snapshot(tag: int) -> SnapshotRecord:
    big = 1 << 40
    return SnapshotRecord(tag, tag, "live", 0, 0, big, big, big, big)
