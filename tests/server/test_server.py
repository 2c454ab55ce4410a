"""csnapd over real TCP on loopback: the data path, read locks, barriers,
limits and hostile peers.
"""

from __future__ import annotations

import random
import struct
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from csnap_client import (
    DataClient,
    ServerError,
    SnapshotDeletedError,
    open_admin,
    open_session,
)
from csnap_protocol import (
    MIN_MAX_FRAME,
    Connection,
    Error,
    ErrorCode,
    Identify,
    QuerySnapshotRead,
    QueryWrite,
    Role,
    WriteOk,
)
from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from csnapd.server import serve
from tests.credentials import connector, tls_stream
from tests.server.support import (
    CHUNK,
    Running,
    label,
    make_store,
    pread,
    pwrite,
    read_snapshot,
    running,
    write_origin,
)

pytestmark = pytest.mark.slow


async def test_origin_write_copies_out_for_a_snapshot(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            assert origin.chunk_size == CHUNK and origin.origin_chunks == 4096
            await write_origin(origin, server.origin, 5, 1)
            snap = await admin.create_snapshot(1, priority=3)
            assert (snap["tag"], snap["priority"], snap["state"]) == (1, 3, "live")
            async with origin.origin_write([(5, 1)]) as grant:
                assert grant.copied == 1
                pwrite(server.origin, 5, label(5, 2))
            async with server.client(snapshot=1) as reader:
                assert await read_snapshot(reader, server, 5) == [label(5, 1)]
                assert await read_snapshot(reader, server, 6) == [bytes(CHUNK)]
            listed = await admin.list_snapshots()
            assert [s["tag"] for s in listed] == [1] and listed[0]["unique_chunks"] == 1


async def test_an_origin_write_waits_for_a_snapshot_read(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            await write_origin(origin, server.origin, 9, 1)
            await admin.create_snapshot(4)
            async with server.client(snapshot=4) as reader:
                granted = trio.Event()

                async def writer() -> None:
                    await write_origin(origin, server.origin, 9, 2)
                    granted.set()

                async with trio.open_nursery() as nursery:
                    async with reader.snapshot_read([(9, 1)]) as plan:
                        assert plan.origin == ((9, 1),) and plan.store == ()
                        nursery.start_soon(writer)
                        with trio.move_on_after(0.3):
                            await granted.wait()
                        assert not granted.is_set(), "granted while the chunk was read-locked"
                        assert pread(server.origin, 9) == label(9, 1)
                    with trio.fail_after(5):
                        await granted.wait()
                assert pread(server.origin, 9) == label(9, 2)
                assert await read_snapshot(reader, server, 9) == [label(9, 1)]


async def test_a_disconnected_readers_locks_are_released(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            await admin.create_snapshot(2)
            granted = trio.Event()

            async def writer() -> None:
                await write_origin(origin, server.origin, 3, 1)
                granted.set()

            async with (
                trio.open_nursery() as nursery,
                server.client(snapshot=2, reconnect=False) as reader,
            ):
                async with reader.snapshot_read([(3, 1)]) as plan:
                    assert plan.origin == ((3, 1),)
                    nursery.start_soon(writer)
                    await trio.sleep(0.2)
                    assert not granted.is_set()
                    # The reader's node dies with the lock held.
                    await reader.aclose()
                with trio.fail_after(5):
                    await granted.wait()


async def test_two_hundred_clients_at_once(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(120):
        async with running(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            done = []

            async def one(n: int) -> None:
                snapshot = 1 if n % 2 else None
                async with server.client(snapshot=snapshot) as client:
                    for k in range(3):
                        chunk = (n * 7 + k) % 4096
                        if snapshot is None:
                            await write_origin(client, server.origin, chunk, n)
                        else:
                            await read_snapshot(client, server, chunk, 2)
                done.append(n)

            async with trio.open_nursery() as nursery:
                for n in range(200):
                    nursery.start_soon(one, n)
            assert sorted(done) == list(range(200))
            info = await admin.server_info()
            assert info["state"] == "active"


async def _answer(stream: trio.abc.Stream, junk: bytes) -> bytes:
    """Everything the server says to `junk` until it closes."""
    async with stream:
        await stream.send_all(junk)
        answer = b""
        with trio.fail_after(5):
            try:
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            except trio.BrokenResourceError:
                pass  # closed without a TLS goodbye: what was said counts
        return answer


async def test_garbage_on_one_connection_leaves_the_others_alone(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.client() as good:
            hostile = [
                b"\xff" * 64,
                struct.pack(">I", 1 << 30),
                struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",
                b"GET / HTTP/1.1\r\n\r\n",
            ]
            for junk in hostile:
                # Before authentication: refused, in a plaintext error frame.
                assert b"authentication_failed" in await _answer(
                    await trio.open_tcp_stream(server.host, server.port), junk
                )
                # After it: the server said hello, then an error, then closed.
                answer = await _answer(
                    await tls_stream(server.host, server.port, server.store), junk
                )
                assert b"protocol_error" in answer or b"version_mismatch" in answer
                await write_origin(good, server.origin, 1, 1)


async def test_a_snapshot_taken_under_load_never_changes(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    chunks = 64
    with trio.fail_after(60):
        async with running(config) as server, server.admin() as admin:
            stop, written = trio.Event(), trio.Event()
            versions = [0] * chunks

            async def load(client_no: int) -> None:
                rng = random.Random(client_no)
                async with server.client() as client:
                    version = client_no * 1_000_000
                    while not stop.is_set():
                        chunk = rng.randrange(chunks)
                        version += 1
                        async with client.origin_write([(chunk, 1)]):
                            await trio.lowlevel.checkpoint()
                            pwrite(server.origin, chunk, label(chunk, version))
                            versions[chunk] = version
                            written.set()

            async with trio.open_nursery() as nursery:
                for n in range(4):
                    nursery.start_soon(load, n + 1)
                # Some writes must land before the snapshot, however loaded
                # the machine: that is what makes the snapshot's content
                # differ from a fresh origin.
                await written.wait()
                await trio.sleep(0.3)
                await admin.create_snapshot(7)
                async with server.client(snapshot=7) as reader:
                    first = await read_snapshot(reader, server, 0, chunks)
                    await trio.sleep(0.3)
                    second = await read_snapshot(reader, server, 0, chunks)
                    stop.set()
                    nursery.cancel_scope.deadline = trio.current_time() + 10
                    third = await read_snapshot(reader, server, 0, chunks)
            assert first == second == third
            assert any(data != bytes(CHUNK) for data in first)


async def test_create_fails_when_origin_clients_do_not_finish(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config, barrier_timeout=0.5) as server, server.admin() as admin:
            async with server.client() as origin, origin.origin_write([(1, 1)]):
                # Holding a grant open: the barrier cannot complete.
                with pytest.raises(ServerError) as info:
                    await admin.create_snapshot(5)
                assert info.value.error is ErrorCode.BARRIER_TIMEOUT
            assert await admin.list_snapshots() == []
            # Once the grant is closed, creating works.
            async with server.client() as origin:
                await write_origin(origin, server.origin, 1, 1)
                assert (await admin.create_snapshot(5))["tag"] == 5


async def test_request_errors_carry_codes(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin:
            async with trio.open_nursery() as nursery:
                session = await open_session(nursery, server.connector(), Role.CLIENT)
                with pytest.raises(ServerError) as info:
                    await session.request(QueryWrite(1, ((0, 1),)))
                assert info.value.error is ErrorCode.NOT_IDENTIFIED
                with pytest.raises(ServerError) as info:
                    await session.request(Identify(2, 1, 99))
                assert info.value.error is ErrorCode.NO_SUCH_SNAPSHOT
                await session.request(Identify(3, 1, None))
                with pytest.raises(ServerError) as info:
                    await session.request(Identify(4, 1, None))
                assert info.value.error is ErrorCode.ALREADY_IDENTIFIED
                with pytest.raises(ServerError) as info:
                    await session.request(QueryWrite(5, ((4095, 2),)))
                assert info.value.error is ErrorCode.INVALID_REQUEST
                assert "not inside the origin" in info.value.message
                with pytest.raises(ServerError) as info:
                    await session.request(QueryWrite(6, ((0, 5000),)))
                assert info.value.error is ErrorCode.REQUEST_TOO_LARGE
                # (This raw origin session answers no barriers: close it
                # before creating snapshots.)
                nursery.cancel_scope.cancel()
            with pytest.raises(ServerError) as info:
                await admin.delete_snapshot(3)
            assert info.value.error is ErrorCode.NO_SUCH_SNAPSHOT
            await admin.create_snapshot(3)
            with pytest.raises(ServerError) as info:
                await admin.create_snapshot(3)
            assert info.value.error is ErrorCode.SNAPSHOT_EXISTS
            await admin.change_use_count(3, 1)
            with pytest.raises(ServerError) as info:
                await admin.delete_snapshot(3)
            assert info.value.error is ErrorCode.SNAPSHOT_BUSY


async def test_limits_refuse_without_harm(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with (
            running(config, max_connections=3, max_in_flight=1) as server,
            server.admin() as admin,
        ):
            await admin.create_snapshot(1)
            async with server.client(1) as reader, trio.open_nursery() as nursery:
                first = await open_session(nursery, server.connector(), Role.CLIENT)
                with pytest.raises(ServerError) as info:
                    await open_session(nursery, server.connector(), Role.CLIENT)
                assert info.value.error is ErrorCode.TOO_MANY_CONNECTIONS
                await first.request(Identify(1, 1, None))
                results: list[object] = []
                two = trio.Event()

                async def ask(request: int) -> None:
                    try:
                        results.append(await first.request(QueryWrite(request, ((0, 1),))))
                    except ServerError as exc:
                        results.append(exc.error)
                    if len(results) == 2:
                        two.set()

                # A read lock holds write 10 in flight: write 11 is one too many.
                async with reader.snapshot_read([(0, 1)]):
                    nursery.start_soon(ask, 10)
                    await trio.sleep(0.2)
                    await ask(11)
                    assert results == [ErrorCode.TOO_MANY_REQUESTS]
                with trio.fail_after(5):
                    await two.wait()
                assert isinstance(results[1], WriteOk)
                nursery.cancel_scope.cancel()


async def test_deleting_a_snapshot_detaches_its_clients(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            await admin.create_snapshot(8)
            await write_origin(origin, server.origin, 2, 1)  # gives snapshot 8 a copy
            async with server.client(snapshot=8) as reader:
                assert await read_snapshot(reader, server, 2) == [bytes(CHUNK)]
                await admin.delete_snapshot(8)
                await _read_until_deleted(reader, server)
            # Once the client left, the sweep reclaims the copy.
            for _ in range(200):
                if not (await admin.status()).deleting:
                    break
                await trio.sleep(0.05)
            assert (await admin.status()).store.exceptions == 0


async def _read_until_deleted(reader: DataClient, server: Running) -> None:
    """Keep reading until the client learns its snapshot is gone (bounded)."""
    for _ in range(100):
        try:
            await read_snapshot(reader, server, 2)
        except SnapshotDeletedError:
            return
        await trio.sleep(0.05)
    raise AssertionError("the client was never told its snapshot was deleted")


async def test_query_map_reports_copies_without_locking(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    async with running(config) as server, server.admin() as admin:
        await admin.create_snapshot(1)
        async with server.client() as origin_client:
            assert await origin_client.copied_ranges([(0, 16)]) == ()
            async with origin_client.origin_write([(3, 2), (9, 1)]):
                pass
            assert await origin_client.copied_ranges([(0, 16)]) == ((3, 2), (9, 1))
            async with server.client(1) as snap:
                assert await snap.copied_ranges([(0, 16)]) == ((3, 2), (9, 1))
                async with snap.snapshot_write([(5, 1)]):
                    pass
                assert await snap.copied_ranges([(4, 4)]) == ((4, 2),)
                # No read lock was taken: an origin write goes straight through.
                with trio.fail_after(5):
                    async with origin_client.origin_write([(0, 1)]):
                        pass
        await admin.create_snapshot(2)
        async with server.client() as origin_client:
            # Snapshot 2 has no copies yet; snapshot 1's copies of 3, 4 and
            # 5 still count, chunk 6 was never copied.
            assert await origin_client.copied_ranges([(3, 4)]) == ((3, 3),)


async def test_an_admin_shutdown_ends_serve_and_answers(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            address = await nursery.start(partial(serve, config, stop=trio.Event()))
            host, _, port = address.rpartition(":")
            async with open_admin(connector(host, int(port), config.store)) as admin:
                await admin.shutdown()  # answered: ok, not a lost connection
        # serve() returned by itself (the nursery ended) and closed the store.
    device = FileDevice(Path(config.store), writable=False)
    try:
        assert check_store(device).exit_code == 0
    finally:
        device.close()


async def test_a_duplicate_id_never_frees_the_original(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            # A read lock holds origin write 50 in flight.
            async with (
                server.client(1) as reader,
                reader.snapshot_read([(0, 1)]),
                trio.open_nursery() as nursery,
            ):
                session = await open_session(nursery, server.connector(), Role.CLIENT)
                await session.request(Identify(1, 99, None))
                nursery.start_soon(session.request, QueryWrite(50, ((0, 1),)))
                await trio.sleep(0.2)
                for _ in range(2):
                    with pytest.raises(ServerError) as info:
                        await session.request(QueryWrite(50, ((1, 1),)))
                    assert info.value.error is ErrorCode.DUPLICATE_REQUEST
                nursery.cancel_scope.cancel()


async def test_a_reply_too_big_for_the_peer_gets_an_error(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            async with server.client() as origin:
                # Every other chunk copied out: the snapshot's read plan
                # alternates store segments and origin ranges.
                for chunk in range(0, 2048, 2):
                    await write_origin(origin, server.origin, chunk, 2)
            stream = await server.connector()()
            codec = Connection(Role.CLIENT, max_frame=MIN_MAX_FRAME)
            await stream.send_all(codec.hello())
            await stream.send_all(codec.send(Identify(1, 5, 1)))
            await stream.send_all(codec.send(QuerySnapshotRead(2, ((0, 2048),))))
            replies: dict[int, object] = {}
            while 2 not in replies:
                codec.receive_data(await stream.receive_some(1 << 16))
                while (message := codec.next_message()) is not None:
                    replies[getattr(message, "id", -1)] = message
            reply = replies[2]
            assert isinstance(reply, Error) and reply.code == ErrorCode.REQUEST_TOO_LARGE
            await stream.aclose()


async def test_a_connection_that_never_says_hello_is_closed(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config, hello_timeout=0.5) as server:
            silent = await server.connector()()
            async with server.admin() as admin:  # others are served meanwhile
                await admin.list_snapshots()
            # Closed by the server (cut short, without a TLS goodbye).
            with pytest.raises(trio.BrokenResourceError):
                await silent.receive_some(100)
            await trio.aclose_forcefully(silent)


async def test_an_origin_client_remembers_chunks_until_the_next_snapshot(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            await admin.create_snapshot(1)
            await write_origin(origin, server.origin, 5, 1)  # asks: copies for snapshot 1
            before = (await admin.server_info())["requests"]
            async with origin.origin_write([(5, 1)]) as grant:
                assert grant.id < 0 and grant.copied == 0  # from memory, not asked
                pwrite(server.origin, 5, label(5, 2))
            assert (await admin.server_info())["requests"] == before + 1  # the info only
            assert origin.remembered_grants == 1
            # A grant from memory is open like any other: a create waits for it.
            created = trio.Event()

            async def create() -> None:
                await admin.create_snapshot(2)
                created.set()

            async with trio.open_nursery() as nursery, origin.origin_write([(5, 1)]):
                nursery.start_soon(create)
                with trio.move_on_after(0.3):
                    await created.wait()
                assert not created.is_set()
                pwrite(server.origin, 5, label(5, 3))
            assert created.is_set()
            # Snapshot 2 forgot the memory: the next write asks, and copies.
            async with origin.origin_write([(5, 1)]) as grant:
                assert grant.id > 0 and grant.copied == 1
                pwrite(server.origin, 5, label(5, 4))
            async with server.client(2) as reader:
                assert await read_snapshot(reader, server, 5) == [label(5, 3)]
            async with server.client(1) as reader:
                assert await read_snapshot(reader, server, 5) == [bytes(CHUNK)]


async def test_an_origin_client_writes_at_once_only_chunks_it_knows_unique(
    tmp_path: Path,
) -> None:
    """may_write_now, the gateway's inline rewrite: no grant, so it must say
    no for any chunk a snapshot may still share."""
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config) as server, server.admin() as admin, server.client() as origin:
            await admin.create_snapshot(1)
            assert not origin.may_write_now([(5, 1)])  # never asked: snapshot 1 shares it
            await write_origin(origin, server.origin, 5, 1)  # asks: copies for snapshot 1
            assert origin.may_write_now([(5, 1)])
            assert not origin.may_write_now([(5, 2)])  # chunk 6 still shared
            assert not origin.may_write_now([(4, 1), (5, 1)])
            assert origin.remembered_grants == 1  # the one that said yes
            # The create returns only once the client has forgotten: its
            # barrier waits for the client's answer.
            await admin.create_snapshot(2)
            assert not origin.may_write_now([(5, 1)])
            await write_origin(origin, server.origin, 5, 2)
            assert origin.may_write_now([(5, 1)])
            async with server.client(2) as reader:
                assert await read_snapshot(reader, server, 5) == [label(5, 1)]
