"""Load and fairness: 200 clients at once against one csnapd (in-process, real
TCP on loopback, real files), each with a fixed quota of operations.

  * 100 origin writers, each on its own chunks: ask, write, repeat;
  * 60 snapshot readers of two snapshots whose contents the test knows,
    reading chunks the writers are overwriting all along: every chunk must
    read as it was when its snapshot was taken;
  * 30 snapshot writers, each writing its own chunks of a third snapshot
    and reading them back;
  * 10 administrators listing, setting priorities and use counts, and
    creating and deleting snapshots of their own (each create is a barrier
    every origin writer must answer).

Every client must finish its quota (nobody starves), with no error and
replies that match the requests. The spread of completion times is printed,
never asserted. The fairness rule for origin writes held by read locks has
its own test below.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from csnap_client import AdminClient, DataClient, ServerError, open_client, tcp_connector
from csnap_common.credentials import (
    ROLE_CLIENT,
    client_context,
    make_credentials,
    server_context,
)
from csnap_protocol import (
    Barrier,
    BarrierDone,
    Connection,
    ErrorCode,
    Hello,
    Identified,
    Identify,
    Role,
)
from csnapd.engine import Engine
from tests.server.support import CHUNK, label, pread, pwrite
from tests.torture.support import Served, make_files, serving

pytestmark = pytest.mark.slow

WRITERS, READERS, SNAPSHOT_WRITERS, ADMINS = 100, 60, 30, 10
QUOTA = int(os.environ.get("CSNAP_LOAD_QUOTA", "20"))
#: Chunks each origin writer and each snapshot writer owns.
OWN = 8
#: Chunks labelled before the snapshots: what the readers read.
LABELLED = 1024
SNAPSHOT_WRITER_BASE = 2048
#: Bounds on a hang (never a measure): one operation, and the whole run.
OPERATION_LIMIT = 120
RUN_LIMIT = 900


@dataclass
class Progress:
    """One client's run."""

    role: str
    number: int
    done: int = 0
    finished_at: float | None = None
    slowest: float = 0.0
    #: Creates refused too_many_snapshots, waiting for deleted ones to be swept.
    retries: int = 0


@dataclass
class Watch:
    """The server's connections, queue and cache, sampled during the run."""

    links: int = 0
    queued: int = 0
    cached_pages: int = 0
    samples: int = 0
    stop: trio.Event = field(default_factory=trio.Event)


def _expected(snapshot: int, chunk: int) -> bytes:
    """What snapshot 1 and snapshot 2 hold (see the set-up)."""
    if chunk >= LABELLED:
        return bytes(CHUNK)
    if snapshot == 2 and chunk % 2 == 0:
        return label(chunk, 2)
    return label(chunk, 1)


async def _timed(progress: Progress, operation: Callable[[], Awaitable[None]]) -> None:
    started = time.monotonic()
    with trio.fail_after(OPERATION_LIMIT):
        await operation()
    progress.slowest = max(progress.slowest, time.monotonic() - started)
    progress.done += 1


async def _origin_writer(served: Served, origin: Path, progress: Progress) -> None:
    rng = random.Random(progress.number)
    base = progress.number * OWN
    async with served.client() as client:
        for step in range(QUOTA):
            chunk = base + rng.randrange(OWN)

            async def write(chunk: int = chunk, step: int = step) -> None:
                async with client.origin_write([(chunk, 1)]) as grant:
                    # One copy serves every snapshot lacking one; a write parked
                    # across a create is applied again and may copy once more.
                    assert 0 <= grant.copied <= 1 + ADMINS
                    pwrite(origin, chunk, label(chunk, 10 + step))

            await _timed(progress, write)


async def _read(client: DataClient, served: Served, start: int, count: int) -> list[bytes]:
    """Read chunks start..start+count-1 where the server says; check the plan covers them."""
    out: dict[int, bytes] = {}
    async with client.snapshot_read([(start, count)]) as plan:
        for first, n, store_chunk in plan.store:
            data = pread(Path(served.server.config.store), store_chunk, n)
            for k in range(n):
                out[first + k] = data[k * CHUNK : (k + 1) * CHUNK]
        for first, n in plan.origin:
            data = pread(Path(served.server.config.origin), first, n)
            for k in range(n):
                out[first + k] = data[k * CHUNK : (k + 1) * CHUNK]
    assert sorted(out) == list(range(start, start + count)), "the plan does not match the request"
    return [out[c] for c in range(start, start + count)]


async def _snapshot_reader(served: Served, snapshot: int, progress: Progress) -> None:
    rng = random.Random(1000 + progress.number)
    async with served.client(snapshot) as client:
        for _ in range(QUOTA):
            # Mostly chunks the origin writers are overwriting right now.
            start = rng.randrange(WRITERS * OWN)
            count = rng.randint(1, 8)

            async def read(start: int = start, count: int = count) -> None:
                got = await _read(client, served, start, count)
                for chunk, data in enumerate(got, start):
                    assert data == _expected(snapshot, chunk), f"snapshot {snapshot} {chunk}"

            await _timed(progress, read)


async def _snapshot_writer(served: Served, progress: Progress) -> None:
    rng = random.Random(2000 + progress.number)
    base = SNAPSHOT_WRITER_BASE + progress.number * OWN
    store = Path(served.server.config.store)
    async with served.client(3) as client:
        for step in range(QUOTA):
            start = base + rng.randrange(OWN - 1)
            count = 2
            version = 100 + step

            async def write(start: int = start, count: int = count, version: int = version) -> None:
                async with client.snapshot_write([(start, count)]) as segments:
                    covered = [c for first, n, _ in segments for c in range(first, first + n)]
                    assert covered == list(range(start, start + count))
                    for first, n, store_chunk in segments:
                        for k in range(n):
                            pwrite(store, store_chunk + k, label(first + k, version))
                got = await _read(client, served, start, count)
                assert got == [label(c, version) for c in range(start, start + count)]

            await _timed(progress, write)


async def _admin(served: Served, progress: Progress) -> None:
    tag = 100 + progress.number
    async with served.admin() as admin:
        for step in range(QUOTA):

            async def work(step: int = step) -> None:
                kind = step % 5
                if kind == 0:
                    created = await _create(admin, tag, progress)
                    assert created["tag"] == tag and created["state"] == "live"
                elif kind == 1:
                    assert 3 in [s["tag"] for s in await admin.list_snapshots()]
                elif kind == 2:
                    changed = await admin.set_priority(3, step % 128)
                    assert changed["tag"] == 3 and changed["priority"] == step % 128
                elif kind == 3:
                    status = await admin.status()
                    assert status.store.chunk_size == CHUNK
                else:
                    deleted = await admin.delete_snapshot(tag)
                    assert deleted["tag"] == tag

            await _timed(progress, work)


async def _create(admin: AdminClient, tag: int, progress: Progress) -> dict[str, Any]:
    """Create a snapshot; while every slot is taken by snapshots still being
    swept, wait and ask again, as an administrator would (docs/protocol.md,
    too_many_snapshots). The sweep must make progress under load: the
    attempts are bounded."""
    for _ in range(1000):
        try:
            return await admin.create_snapshot(tag)
        except ServerError as exc:
            if exc.error is not ErrorCode.TOO_MANY_SNAPSHOTS:
                raise
            progress.retries += 1
            await trio.sleep(0.05)
    raise AssertionError("deleted snapshots were never swept: no slot came free")


async def _watch(served: Served, engine: Engine, watch: Watch) -> None:
    server = served.server
    while not watch.stop.is_set():
        watch.links = max(watch.links, len(server.connections._links))
        watch.queued = max(watch.queued, server._receive.statistics().current_buffer_used)
        watch.cached_pages = max(watch.cached_pages, engine.cached_pages)
        watch.samples += 1
        with trio.move_on_after(0.05):
            await watch.stop.wait()


def _spread(label_: str, runs: list[Progress], started: float) -> str:
    times = sorted((p.finished_at or 0) - started for p in runs)
    slowest = max(p.slowest for p in runs)
    return (
        f"{label_:>16}: {len(runs):3} clients, finished after {times[0]:6.2f}s (first),"
        f" {statistics.median(times):6.2f}s (median), {times[-1]:6.2f}s (last);"
        f" slowest operation {slowest:.3f}s"
    )


async def test_two_hundred_clients_each_finish_their_quota(tmp_path: Path) -> None:
    config = make_files(tmp_path, store_size=256 << 20)
    origin = Path(config.origin)
    for chunk in range(LABELLED):
        pwrite(origin, chunk, label(chunk, 1))
    engine = Engine.open_files(config.store, config.origin, cache_bytes=config.cache_bytes)
    runs: list[Progress] = []
    watch = Watch()
    with trio.fail_after(RUN_LIMIT):
        async with serving(config, engine) as served, served.admin() as admin:
            await admin.create_snapshot(1)
            async with served.client() as setup:
                for chunk in range(0, LABELLED, 2):
                    async with setup.origin_write([(chunk, 1)]):
                        pwrite(origin, chunk, label(chunk, 2))
            await admin.create_snapshot(2)
            await admin.create_snapshot(3)
            started = time.monotonic()

            async def client(
                role: str, number: int, body: Callable[[Progress], Awaitable[None]]
            ) -> None:
                progress = Progress(role, number)
                runs.append(progress)
                await body(progress)
                progress.finished_at = time.monotonic()

            async with trio.open_nursery() as watcher:
                watcher.start_soon(_watch, served, engine, watch)
                async with trio.open_nursery() as nursery:
                    for n in range(WRITERS):
                        nursery.start_soon(
                            client, "origin writer", n, lambda p: _origin_writer(served, origin, p)
                        )
                    for n in range(READERS):
                        snapshot = 1 + n % 2
                        nursery.start_soon(
                            client,
                            "snapshot reader",
                            n,
                            lambda p, s=snapshot: _snapshot_reader(served, s, p),
                        )
                    for n in range(SNAPSHOT_WRITERS):
                        nursery.start_soon(
                            client, "snapshot writer", n, lambda p: _snapshot_writer(served, p)
                        )
                    for n in range(ADMINS):
                        nursery.start_soon(client, "admin", n, lambda p: _admin(served, p))
                watch.stop.set()
            assert len(runs) == WRITERS + READERS + SNAPSHOT_WRITERS + ADMINS
            unfinished = [(p.role, p.number, p.done) for p in runs if p.done != QUOTA]
            assert not unfinished, f"clients that did not finish their quota: {unfinished}"
            info = await admin.server_info()
            assert info["state"] == "active"
    print(f"\n{len(runs)} clients x {QUOTA} operations:")
    for role in ("origin writer", "snapshot reader", "snapshot writer", "admin"):
        print(_spread(role, [p for p in runs if p.role == role], started))
    retries = sum(p.retries for p in runs)
    print(f"creates refused while every free slot awaited the sweep, then retried: {retries}")
    print(
        f"server, at most: {watch.links} connections, {watch.queued} messages queued for the"
        f" engine, {watch.cached_pages} cached pages ({watch.samples} samples)"
    )
    assert watch.links <= len(runs) + 2


async def test_a_stream_of_new_readers_does_not_starve_an_origin_writer(tmp_path: Path) -> None:
    """The fairness rule: an origin write copies its chunks out before it waits
    for read locks, so readers that come after it read the copy and take no
    lock; only the readers already holding the chunk delay it, and once they
    finish it is granted, however many readers keep coming."""
    config = make_files(tmp_path)
    origin = Path(config.origin)
    pwrite(origin, 10, label(10, 1))
    engine = Engine.open_files(config.store, config.origin)
    with trio.fail_after(60):
        async with (
            serving(config, engine) as served,
            served.admin() as admin,
            served.client() as writer,
            trio.open_nursery() as nursery,
        ):
            await admin.create_snapshot(1)
            granted = trio.Event()

            async def write() -> None:
                async with writer.origin_write([(10, 1)]) as grant:
                    assert grant.copied == 1
                    pwrite(origin, 10, label(10, 2))
                granted.set()

            async with served.client(1) as first, first.snapshot_read([(10, 1)]) as plan:
                assert plan.origin == ((10, 1),)  # read-locked
                nursery.start_soon(write)
                for _ in range(500):
                    if served.server.dispatcher.parked:
                        break
                    await trio.sleep(0.01)
                assert served.server.dispatcher.parked, "the write was not held by the lock"
                # A steady stream of overlapping readers: each reads the copy.
                async with trio.open_nursery() as readers:
                    for n in range(20):
                        readers.start_soon(_reads_the_copy, served, n)
                assert not granted.is_set()
            # The one reader that held the chunk is done: the write goes through.
            await granted.wait()
            async with served.client(1) as late:
                assert await _read(late, served, 10, 1) == [label(10, 1)]


async def _reads_the_copy(served: Served, number: int) -> None:
    async with served.client(1) as reader:
        for _ in range(5):
            async with reader.snapshot_read([(10, 1)]) as plan:
                assert not plan.origin and plan.store, "a reader after the write took a lock"
                assert pread(Path(served.server.config.store), plan.store[0][2]) == label(10, 1)
                await trio.sleep(0.001 * number)


async def test_a_barrier_right_behind_the_identify_reply_is_answered(tmp_path: Path) -> None:
    """csnapd may send a create's barrier in the same write as the identify
    reply. The client must answer it all the same: an unanswered barrier
    holds every origin write until barrier_timeout. (Task order is random
    in trio, so the race is run many times.)"""
    answered: list[int] = []

    keys = tmp_path / "keys"
    make_credentials(keys)
    server_tls = server_context(keys)

    async def fake_server(socket_stream: trio.SocketStream) -> None:
        codec = Connection(Role.SERVER)
        stream = trio.SSLStream(socket_stream, server_tls, server_side=True)
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    return  # the client closed without a TLS goodbye
                if not data:
                    return
                codec.receive_data(data)
                while (message := codec.next_message()) is not None:
                    if isinstance(message, Hello):
                        await stream.send_all(codec.hello())
                    elif isinstance(message, Identify):
                        reply = Identified(message.id, None, CHUNK, 64, 1, 4096)
                        await stream.send_all(codec.send(reply) + codec.send(Barrier(7)))
                    elif isinstance(message, BarrierDone):
                        answered.append(message.barrier)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, fake_server, listeners)
            for attempt in range(20):
                connect = tcp_connector("127.0.0.1", port, client_context(keys, ROLE_CLIENT))
                async with open_client(connect, reconnect=False):
                    for _ in range(200):
                        if len(answered) > attempt:
                            break
                        await trio.sleep(0.01)
                assert len(answered) == attempt + 1, f"barrier unanswered (attempt {attempt})"
            nursery.cancel_scope.cancel()
