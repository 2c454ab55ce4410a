"""What csnapd checks before a request does anything, over real TCP: ranges
that name a chunk twice or leave the origin, replies too big for the peer's
frame limit, lock uploads at the wrong time, and the read-lock limits
(docs/protocol.md, "What csnapd checks" and "Limits").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError, Session, open_session
from csnap_common import join_host_port
from csnap_common.limits import MAX_REQUEST_CHUNKS
from csnap_protocol import (
    MIN_MAX_FRAME,
    Connection,
    ConnectionClosed,
    Error,
    ErrorCode,
    FinishSnapshotRead,
    FinishUploadLock,
    Identify,
    MapReply,
    Message,
    QueryMap,
    QuerySnapshotRead,
    QueryWrite,
    Request,
    Role,
    UploadLock,
)
from csnapd.credentials import server_tls
from csnapd.engine import Engine, FileDevice
from csnapd.engine.check import check_store
from csnapd.server import Server, ServerConfig
from tests.server.support import Running, make_store, running

pytestmark = pytest.mark.slow

Ranges = tuple[tuple[int, int], ...]

#: Ranges naming one chunk twice, or reaching outside the origin (4096 chunks).
BAD_RANGES: list[tuple[Ranges, str]] = [
    (((200, 1), (200, 1)), "named twice"),
    (((100, 10), (105, 10)), "named twice"),
    (((300, 4), (0, 1), (301, 1)), "named twice"),
    (((4095, 2),), "not inside the origin"),
    ((((1 << 64) - 1, 2),), "not inside the origin"),
]


@asynccontextmanager
async def serving(config: ServerConfig) -> AsyncIterator[tuple[Server, Running]]:
    """A real csnapd on loopback whose dispatcher the test can look into."""
    engine = await trio.to_thread.run_sync(Engine.open_files, config.store, config.origin)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    host, port = listeners[0].socket.getsockname()[:2]
    server = Server(config, engine, join_host_port(host, port), server_tls(config))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(server.run, listeners, stop=stop))
        try:
            yield server, Running(config, host, port, stop, server)
        finally:
            stop.set()


async def refused(session: Session, message: Request) -> ServerError:
    with pytest.raises(ServerError) as info:
        await session.request(message)
    return info.value


def assert_store_clean(config: ServerConfig) -> None:
    device = FileDevice(Path(config.store), writable=False)
    try:
        report = check_store(device)
        assert report.exit_code == 0, [str(p) for p in report.problems]
    finally:
        device.close()


async def test_ranges_naming_a_chunk_twice_are_refused_and_do_nothing(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(60):
        async with running(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            await admin.create_snapshot(2)
            async with trio.open_nursery() as nursery:
                origin = await open_session(nursery, server.connector(), Role.CLIENT)
                await origin.request(Identify(1, 10, None))
                reader = await open_session(nursery, server.connector(), Role.CLIENT)
                await reader.request(Identify(1, 11, 1))
                before = (await admin.status()).store
                request = 100
                for ranges, why in BAD_RANGES:
                    for session, kind in (
                        (origin, QueryWrite),
                        (origin, QueryMap),
                        (reader, QueryWrite),
                        (reader, QuerySnapshotRead),
                        (reader, QueryMap),
                    ):
                        request += 1
                        error = await refused(session, kind(request, ranges))
                        assert error.error is ErrorCode.INVALID_REQUEST, (kind, ranges)
                        assert why in error.message
                after = (await admin.status()).store
                for field in ("exceptions", "data_free", "meta_free", "sequence"):
                    assert getattr(after, field) == getattr(before, field), field
                nursery.cancel_scope.cancel()
    assert_store_clean(config)


async def test_a_reply_too_big_for_the_peer_is_refused_before_anything_is_done(
    tmp_path: Path,
) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(60):
        async with running(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            async with server.client() as writer:
                # Every other chunk copied out: a read plan of chunks 0..999
                # alternates store segments and origin ranges, too big a
                # reply for the smallest frame limit.
                for chunk in range(0, 1000, 2):
                    async with writer.origin_write([(chunk, 1)]):
                        pass
            stream = await server.connector()()
            codec = Connection(Role.CLIENT, max_frame=MIN_MAX_FRAME)
            replies: dict[int, Message] = {}

            async def ask(message: Message) -> Message:
                await stream.send_all(codec.send(message))
                request = getattr(message, "id", -1)
                while request not in replies:
                    codec.receive_data(await stream.receive_some(1 << 16))
                    while (reply := codec.next_message()) is not None:
                        assert not isinstance(reply, ConnectionClosed)
                        replies[getattr(reply, "id", -1)] = reply
                return replies[request]

            await stream.send_all(codec.hello())
            await ask(Identify(1, 5, 1))
            before = (await admin.status()).store
            read = await ask(QuerySnapshotRead(2, ((0, 1000),)))
            assert isinstance(read, Error) and read.code == ErrorCode.REQUEST_TOO_LARGE
            assert "frame limit" in read.message
            write = await ask(QueryWrite(3, ((2000, 1000),)))
            assert isinstance(write, Error) and write.code == ErrorCode.REQUEST_TOO_LARGE
            # A query whose largest reply fits is answered.
            assert isinstance(await ask(QueryMap(4, ((0, 100),))), MapReply)
            # No copy was made, and no read lock holds an origin write back
            # while the small-frame peer stays connected.
            assert (await admin.status()).store.exceptions == before.exceptions
            async with server.client() as writer:
                with trio.fail_after(5):
                    async with writer.origin_write([(0, 1000)]) as granted:
                        assert granted.copied == 500
            await stream.aclose()
    assert_store_clean(config)


async def test_lock_uploads_are_checked_and_bounded_and_freed(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    config = ServerConfig(
        store=config.store,
        origin=config.origin,
        max_read_locks=1000,
        max_server_read_locks=1500,
    )
    with trio.fail_after(60):
        async with serving(config) as (server, running_server):
            locks = server.dispatcher.locks
            async with running_server.admin() as admin:
                await admin.create_snapshot(1)
            async with trio.open_nursery() as nursery:
                connector = running_server.connector()
                origin = await open_session(nursery, connector, Role.CLIENT)
                await origin.request(Identify(1, 10, None))
                error = await refused(origin, UploadLock(2, ((0, 1),)))
                assert error.error is ErrorCode.INVALID_REQUEST

                first = await open_session(nursery, connector, Role.CLIENT)
                await first.request(Identify(1, 11, 1))
                for request, ranges in ((2, ((4096, 1),)), (3, (((1 << 64) - 1, 1),))):
                    error = await refused(first, UploadLock(request, ranges))
                    assert error.error is ErrorCode.INVALID_REQUEST
                    assert "not inside the origin" in error.message
                # Locks are counted: a chunk named twice is locked twice.
                await first.request(UploadLock(4, ((0, 500), (0, 100))))
                await first.request(UploadLock(5, ((500, 400),)))
                assert locks.total == 1000
                error = await refused(first, UploadLock(6, ((999, 1),)))
                assert error.error is ErrorCode.TOO_MANY_REQUESTS
                error = await refused(first, QuerySnapshotRead(7, ((2000, 1),)))
                assert error.error is ErrorCode.TOO_MANY_REQUESTS
                assert locks.total == 1000

                second = await open_session(nursery, connector, Role.CLIENT)
                await second.request(Identify(1, 12, 1))
                error = await refused(second, UploadLock(2, ((1000, 501),)))
                assert error.error is ErrorCode.TOO_MANY_REQUESTS
                await second.request(UploadLock(3, ((1000, 500),)))
                assert locks.total == 1500
                await second.request(FinishUploadLock(4))
                error = await refused(second, UploadLock(5, ((3000, 1),)))
                assert error.error is ErrorCode.INVALID_REQUEST
                # Releasing more than is held releases nothing.
                error = await refused(second, FinishSnapshotRead(6, ((1000, 10), (1000, 1))))
                assert error.error is ErrorCode.INVALID_REQUEST
                assert locks.total == 1500
                await second.request(FinishSnapshotRead(7, ((1000, 10),)))
                assert locks.total == 1490
                nursery.cancel_scope.cancel()
            # Both readers left: the lock table is empty again.
            for _ in range(500):
                if not (locks.total or locks.holders or locks.locked_chunks):
                    break
                await trio.sleep(0.01)
            assert (locks.total, locks.holders, locks.locked_chunks) == (0, 0, 0)
    assert_store_clean(config)


async def test_a_whole_origin_write_succeeds_after_thirteen_snapshots(tmp_path: Path) -> None:
    # 4 KiB chunks and the default journal (4 MiB: 339 blocks a transaction);
    # each write names max_chunks chunks, as the NBD gateway asks for a
    # 32 MiB write, and after thirteen snapshots its metadata needs more than
    # one transaction.
    config = make_store(tmp_path, store_size=256 << 20, origin_size=16 << 20)
    with trio.fail_after(300):
        async with (
            running(config) as server,
            server.admin() as admin,
            server.client() as writer,
        ):
            for round_ in range(1, 15):
                async with writer.origin_write([(0, 4096)]) as granted:
                    assert granted.copied == (4096 if round_ > 1 else 0)
                if round_ < 14:
                    await admin.create_snapshot(round_)
    assert_store_clean(config)


def test_max_chunks_cannot_exceed_what_the_engine_takes() -> None:
    assert ServerConfig(store="s", origin="o", max_chunks=MAX_REQUEST_CHUNKS).max_chunks
    for wrong in (0, MAX_REQUEST_CHUNKS + 1):
        with pytest.raises(ValueError, match=r"max_chunks is 1\.\.65536"):
            ServerConfig(store="s", origin="o", max_chunks=wrong)
