"""DirectStream's promises, over real loopback TCP with the cluster's mutual
TLS: bytes arrive whole and in order however the sends are cut; what the
kernel does not take waits in the stream, in order, until flushed; a peer
that keeps the socket full does not keep other tasks from running; records
that arrive a byte at a time are read whole; a forced close cuts the stream
short where a plain close ends TLS cleanly; a credential of another CA fails
the handshake.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from csnap_common.credentials import (
    ROLE_ADMIN,
    client_context,
    make_credentials,
    server_context,
)
from csnap_transport import DirectStream


@asynccontextmanager
async def _pair(
    keys: Path, *, client_keys: Path | None = None
) -> AsyncIterator[tuple[DirectStream, DirectStream]]:
    """A client and a server DirectStream on loopback, handshakes done."""
    make_credentials(keys)
    if client_keys is not None:
        make_credentials(client_keys)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        raw_client = await trio.open_tcp_stream("127.0.0.1", port)
        raw_server = await listener.accept()
        client = DirectStream(
            raw_client, client_context(client_keys or keys, ROLE_ADMIN), server_hostname=None
        )
        server = DirectStream(raw_server, server_context(keys), server_side=True)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.do_handshake)
                await client.do_handshake()
            yield client, server
        finally:
            await trio.aclose_forcefully(client)
            await trio.aclose_forcefully(server)


async def _read_exactly(stream: DirectStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, "the stream ended early"
        data += chunk
    return bytes(data)


async def test_bytes_arrive_whole_and_in_order(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _pair(tmp_path / "keys") as (client, server):
            assert server.version() == "TLSv1.3" and client.getpeercert()
            pieces = [bytes([n % 251]) * (1 + n * 37 % 3000) for n in range(200)]

            async def send() -> None:
                for piece in pieces:
                    await client.send_all(piece)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                received = await _read_exactly(server, sum(map(len, pieces)))
            assert received == b"".join(pieces)
            server.send_now(b"reply")
            assert await _read_exactly(client, 5) == b"reply"


async def test_what_the_kernel_does_not_take_waits_in_order(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _pair(tmp_path / "keys") as (client, server):
            server.transport_stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            sent = bytearray()
            # Nobody reads: the kernel's buffers fill and the rest waits here.
            for n in range(64):
                piece = bytes([n]) * 65536
                sent += piece
                if not server.send_now(piece):
                    break
            assert server.unsent > 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.flush)
                received = await _read_exactly(client, len(sent))
            assert received == sent and server.unsent == 0


async def test_a_full_socket_does_not_starve_other_tasks(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _pair(tmp_path / "keys") as (client, server):
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await trio.lowlevel.checkpoint()

            total = 8 * 16384  # fits in loopback's socket buffers
            for _ in range(8):
                client.send_now(b"x" * 16384)
            await client.flush()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                await trio.sleep(0.1)  # everything has arrived
                before = ticks
                received = 0
                while received < total:
                    received += len(await server.receive_some(4096))
                assert ticks - before >= 8  # the ticker ran between the reads
                nursery.cancel_scope.cancel()


async def test_a_plain_close_ends_tls_and_a_forced_one_cuts_it_short(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _pair(tmp_path / "keys") as (client, server):
            await server.aclose()
            assert await client.receive_some() == b""
        async with _pair(tmp_path / "keys") as (client, server):
            await trio.aclose_forcefully(server)
            with pytest.raises(trio.BrokenResourceError):
                await client.receive_some()
            with pytest.raises(trio.ClosedResourceError):
                server.send_now(b"x")


async def test_a_credential_of_another_ca_fails_the_handshake(tmp_path: Path) -> None:
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_credentials(keys)
    make_credentials(other)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    refused = []

    async def serve(raw: trio.SocketStream) -> None:
        server = DirectStream(raw, server_context(keys), server_side=True)
        try:
            await server.do_handshake()
            await server.receive_some()
        except trio.BrokenResourceError:
            refused.append(True)
        finally:
            await trio.aclose_forcefully(server)

    with trio.fail_after(30):
        async with listener, trio.open_nursery() as nursery:
            client = DirectStream(
                await trio.open_tcp_stream("127.0.0.1", port),
                client_context(other, ROLE_ADMIN),
                server_hostname=None,
            )
            nursery.start_soon(serve, await listener.accept())
            with pytest.raises(trio.BrokenResourceError) as failure:
                await client.do_handshake()
            assert isinstance(failure.value.__cause__, ssl.SSLError)
            await trio.aclose_forcefully(client)
    assert refused == [True]


async def test_a_record_arriving_a_byte_at_a_time_is_read_whole(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with _pair(tmp_path / "keys") as (client, server):
            # Two TLS records made by the client's TLS layer, handed to its
            # socket one byte per segment: the server's reads find partial
            # records, and nothing for TLS between them.
            tls = client._tls
            assert tls is not None
            tls.write(b"first record")
            tls.write(b"second")
            records = client._outgoing.read()
            raw = client.transport_stream
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            async def trickle() -> None:
                for byte in records:
                    await raw.send_all(bytes([byte]))
                    await trio.sleep(0.0005)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                assert await _read_exactly(server, 18) == b"first recordsecond"
            server.send_now(b"ok")
            assert await _read_exactly(client, 2) == b"ok"
