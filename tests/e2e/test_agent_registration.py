"""What a real csnap-agent accepts in `server_ready` (docs/protocol.md,
section `server_ready`): every nonsensical field and every registration
that contradicts what the agent knows is refused with a clear error, the
refusal changes nothing, and the active server keeps being the answer.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from csnap_client import find_server, open_agent_stream
from csnap_protocol import (
    Connection,
    ConnectionClosed,
    Error,
    Hello,
    Message,
    Ok,
    Role,
    ServerReady,
    StartServer,
)
from tests.e2e.processes import csnap, poll, start, start_agent, start_csnapd_with_agent
from tests.e2e.test_agent import make
from tests.e2e.test_failover import reaped

pytestmark = pytest.mark.e2e


class RawServer:
    """A connection to the agent in the server role, driven by the test."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.codec = Connection(Role.SERVER, name="test")

    @classmethod
    @asynccontextmanager
    async def open(cls, sock: Path) -> AsyncIterator[RawServer]:
        stream = await open_agent_stream(str(sock))
        async with stream:
            peer = cls(stream)
            await stream.send_all(peer.codec.hello())
            assert isinstance(await peer.receive(), Hello)
            yield peer

    async def receive(self) -> Message:
        with trio.fail_after(10):
            while (message := self.codec.next_message()) is None:
                data = await self.stream.receive_some(1 << 16)
                self.codec.receive_data(data)
        assert not isinstance(message, ConnectionClosed), "the agent closed the connection"
        return message

    async def register(self, message: Message) -> Message:
        """Send `message` (a server_ready, mostly) and return the agent's reply."""
        await self.stream.send_all(self.codec.send(message))
        return await self.receive()


#: Fields that make no sense on their own, and a word the refusal must say.
NONSENSE: list[tuple[str, str, int, str]] = [
    (":70", "/s", 1, "names no host"),
    ("127.0.0.1:0", "/s", 1, "1..65535"),
    ("127.0.0.1:65536", "/s", 1, "1..65535"),
    ("127.0.0.1: 70", "/s", 1, "decimal"),
    ("127.0.0.1:+70", "/s", 1, "decimal"),
    ("127.0.0.1:070", "/s", 1, "decimal"),
    ("127.0.0.1:0x46", "/s", 1, "decimal"),
    ("127.0.0.1", "/s", 1, "HOST:PORT"),
    ("", "/s", 1, "HOST:PORT"),
    ("::1:70", "/s", 1, "[HOST]:PORT"),
    ("[127.0.0.1]:70", "/s", 1, "IPv6"),
    ("a b:70", "/s", 1, "host name"),
    ("host-.example:70", "/s", 1, "host name"),
    ("10.0.0.5:7000", "", 1, "empty"),
    ("10.0.0.5:7000", "store.img", 1, "not absolute"),
    ("10.0.0.5:7000", "/srv/../etc/shadow", 1, "normal form"),
    ("10.0.0.5:7000", "/srv/store\0", 1, "NUL"),
    ("10.0.0.5:7000", "/srv/store", 0, "process id"),
]


async def test_nonsense_registrations_are_refused(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    async with reaped() as daemons:
        daemons.append(await start_agent(sock, tmp_path / "agent.log"))
        server, host, port = await start_csnapd_with_agent(
            store, origin, tmp_path / "csnapd.log", sock
        )
        daemons.append(server)
        address = f"{host}:{port}"
        assert (await csnap(sock, "status")).returncode == 0  # the relay is open

        async with RawServer.open(sock) as peer:
            for number, (where, path, pid, why) in enumerate(NONSENSE, start=1):
                reply = await peer.register(ServerReady(number, where, path, pid, False))
                assert isinstance(reply, Error), (where, path, pid, reply)
                assert (reply.id, reply.name) == (number, "invalid_request"), reply
                assert why in reply.message, (why, reply.message)
            # What contradicts the servers the agent knows.
            contradictions = [
                (address, str(store), False, "registered already"),
                ("127.0.0.1:1", "/elsewhere/store", False, "serve the store"),
                ("127.0.0.1:1", str(store), True, "is active"),
            ]
            for number, (where, path, active, why) in enumerate(contradictions, start=100):
                reply = await peer.register(ServerReady(number, where, path, 4242, active))
                assert isinstance(reply, Error), (where, path, active, reply)
                assert (reply.id, reply.name) == (number, "invalid_request"), reply
                assert why in reply.message, (why, reply.message)
            # Nothing was registered: a good standby registration is accepted
            # on the same connection, once, and the active server stays active.
            good = ServerReady(200, "localhost:1", str(store), 4242, False)
            assert await peer.register(good) == Ok(200)
            again = await peer.register(ServerReady(201, "localhost:2", str(store), 4242, False))
            assert isinstance(again, Error) and "already registered" in again.message
            where_now = await find_server(str(sock), wait=False)
            assert where_now.address == address
            assert (await csnap(sock, "status")).returncode == 0
            # An answer to no start_server is refused, and the link stays up.
            answer = await peer.register(Ok(77))
            assert isinstance(answer, Error) and answer.id == 77
            assert "answers no request" in answer.message
            # Once the active server is gone, the accepted standby is started.
            await server.kill()
            started = await peer.receive()
            assert isinstance(started, StartServer), started
            await peer.stream.send_all(peer.codec.send(Ok(started.id)))

            async def standby_active() -> bool:
                return (await find_server(str(sock), wait=True)).address == "localhost:1"

            with trio.fail_after(10):
                await poll(standby_active)


def _relative(path: Path) -> str:
    return os.path.relpath(path)


async def test_a_csnapd_for_another_store_is_refused_and_says_so_once(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_store, other_origin = make(other)
    sock = tmp_path / "agent.sock"
    async with reaped() as daemons:
        daemons.append(await start_agent(sock, tmp_path / "agent.log"))
        server, host, port = await start_csnapd_with_agent(
            store, origin, tmp_path / "csnapd.log", sock
        )
        daemons.append(server)
        log = other / "csnapd.log"
        # Given relative paths: csnapd registers their absolute form.
        intruder = await start(
            ["csnapd", _relative(other_store), _relative(other_origin), "--agent", str(sock)], log
        )
        daemons.append(intruder)

        async def refused() -> bool:
            return "refused this server" in log.read_text()

        with trio.fail_after(10):
            await poll(refused)
        await trio.sleep(2.5)  # it tries again every second
        text = log.read_text()
        assert text.count("refused this server") == 1, text
        assert f"serve the store {store}, not {other_store}" in text, text
        assert (await find_server(str(sock), wait=False)).address == f"{host}:{port}"
        assert await intruder.stop() == 0
        assert await server.stop() == 0
