"""The client session's promise to whoever awaits a reply: a reply that
arrived is returned, even when the session ends before that task wakes; a
request whose reply never came raises ConnectionLostError.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from csnap_client import open_session
from csnap_client.session import ConnectionLostError, Session
from csnap_protocol import Connection, Error, ErrorCode, Keepalive, Ok, Role


async def _serve_one_request(stream: trio.abc.Stream, *, answer: bool) -> None:
    """Greet, take one keepalive, then end the connection in the same write.

    With `answer`, the end follows the reply in the same bytes (an error
    about no request, as a server shutting down sends): the client's reader
    ends before the task awaiting the reply wakes. Without, the reply never
    comes.
    """
    codec = Connection(Role.SERVER, name="test-server")
    await stream.send_all(codec.hello())
    while True:
        codec.receive_data(await stream.receive_some(1 << 16))
        while (message := codec.next_message()) is not None:
            if isinstance(message, Keepalive):
                reply = codec.send(Ok(message.id)) if answer else b""
                end = Error(None, int(ErrorCode.SHUTTING_DOWN), "shutting_down", "bye")
                await stream.send_all(reply + codec.send(end))
                await stream.aclose()
                return


async def _session(nursery: trio.Nursery, *, answer: bool) -> Session:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def connect() -> trio.abc.Stream:
        return client_stream

    nursery.start_soon(lambda: _serve_one_request(server_stream, answer=answer))
    return await open_session(nursery, connect, Role.CLIENT)


async def test_a_reply_that_came_is_kept_when_the_session_ends_in_the_same_read() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            session = await _session(nursery, answer=True)
            assert await session.request(Keepalive(1)) == Ok(1)
            await session.closed.wait()


async def test_a_request_whose_reply_never_came_is_lost() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            session = await _session(nursery, answer=False)
            with pytest.raises(ConnectionLostError):
                await session.request(Keepalive(1))
            assert session.closed.is_set()
