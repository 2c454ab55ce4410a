"""csnapd's bounds on holds and connections (docs/protocol.md, "Liveness" and
"Limits"): a silent data-path connection loses its read locks after the
lease while a live idle one keeps them, and the connection limit counts
connections from accept, hello or not.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError, open_session
from csnap_protocol import ErrorCode, Identify, Keepalive, Ok, QuerySnapshotRead, Role
from csnapd.server import ServerConfig
from tests.server.support import Running, make_store, running, write_origin

LEASE = 1.0


def running_with_lease(config: ServerConfig) -> AbstractAsyncContextManager[Running]:
    return running(config, lease=LEASE)


async def test_a_live_idle_client_keeps_its_locks_past_the_lease(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with (
            running_with_lease(config) as server,
            server.admin() as admin,
            server.client() as origin,
        ):
            await admin.create_snapshot(1)
            granted = trio.Event()

            async def writer() -> None:
                await write_origin(origin, server.origin, 5, 2)
                granted.set()

            async with server.client(snapshot=1) as reader, trio.open_nursery() as nursery:
                async with reader.snapshot_read([(5, 1)]) as plan:
                    assert plan.origin == ((5, 1),)
                    nursery.start_soon(writer)
                    # Many leases of doing nothing but keepalives.
                    await trio.sleep(3 * LEASE)
                    assert not granted.is_set(), "the lock was dropped from a live client"
                    assert reader.read_trusted(plan)
                    assert reader.reconnects == 0
                with trio.fail_after(10):
                    await granted.wait()
            # Admin connections have no lease: this one idled all along.
            assert await admin.list_snapshots()


async def test_a_silent_client_loses_its_locks_after_the_lease(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running_with_lease(config) as server, server.admin() as admin:
            await admin.create_snapshot(1)
            async with trio.open_nursery() as nursery:
                silent = await open_session(nursery, server.connector(), Role.CLIENT)
                identified = await silent.request(Identify(1, 77, 1))
                assert identified.lease_ms == LEASE * 1000  # type: ignore[attr-defined]
                lively = await open_session(nursery, server.connector(), Role.CLIENT)
                await lively.request(Identify(1, 78, 1))
                await silent.request(QuerySnapshotRead(2, ((9, 1),)))
                await lively.request(QuerySnapshotRead(2, ((10, 1),)))
                keeping = trio.Event()

                async def keep_alive() -> None:
                    for number in range(3, 1000):
                        assert isinstance(await lively.request(Keepalive(number)), Ok)
                        if number == 3 + int(3 * LEASE / 0.05):
                            keeping.set()
                        await trio.sleep(0.05)

                nursery.start_soon(keep_alive)
                async with server.client() as origin:
                    # The silent one's lock goes with it; the other's stays.
                    with trio.fail_after(10):
                        await write_origin(origin, server.origin, 9, 2)
                    with trio.fail_after(10):
                        await silent.closed.wait()
                    await keeping.wait()
                    assert not lively.closed.is_set()
                    with trio.move_on_after(2 * LEASE) as parked:
                        await write_origin(origin, server.origin, 10, 2)
                    assert parked.cancelled_caught, "a live connection's lock was dropped"
                nursery.cancel_scope.cancel()


async def test_the_connection_limit_counts_connections_that_said_no_hello(
    tmp_path: Path,
) -> None:
    config = make_store(tmp_path)
    with trio.fail_after(30):
        async with running(config, max_connections=3) as server:
            silent = [await trio.open_tcp_stream(server.host, server.port) for _ in range(3)]
            async with trio.open_nursery() as nursery:
                with pytest.raises(ServerError) as refused:
                    await open_session(nursery, server.connector(), Role.ADMIN)
                assert refused.value.error is ErrorCode.TOO_MANY_CONNECTIONS
                assert "3 connections" in refused.value.message
                await silent.pop().aclose()
                # Room again, once csnapd has seen that one close.
                while True:
                    try:
                        session = await open_session(nursery, server.connector(), Role.ADMIN)
                    except ServerError as exc:
                        if exc.error is not ErrorCode.TOO_MANY_CONNECTIONS:
                            raise
                        await trio.sleep(0.02)
                    else:
                        break
                assert not session.closed.is_set()
                nursery.cancel_scope.cancel()
            for stream in silent:
                await stream.aclose()
