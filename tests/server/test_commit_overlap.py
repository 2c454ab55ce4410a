"""Lookups answered while a client batch's commit is written (docs/rules.md,
"lookups during a commit"): a real csnapd copies origin chunks out, one
commit each, while snapshot clients keep reading those very chunks. Some of
their lookups are answered during the copy-outs' commits, and every read
returns the snapshot's data, before and after its chunk was copied.
"""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from csnap_client import DataClient
from tests.server.support import (
    Running,
    label,
    make_store,
    pwrite,
    read_snapshot,
    running,
    write_origin,
)

CHUNKS = 256
READERS = 3


async def test_reads_during_copy_out_commits_return_the_snapshots_data(tmp_path: Path) -> None:
    config = make_store(tmp_path)
    for chunk in range(CHUNKS):
        pwrite(Path(config.origin), chunk, label(chunk, 1))
    written = trio.Event()
    reads = [0] * READERS

    async def reader(client: DataClient, server: Running, n: int) -> None:
        rng = random.Random(n)
        for _ in range(100_000):  # bounded; ends with the writes
            if written.is_set():
                return
            chunk = rng.randrange(CHUNKS - 3)
            assert await read_snapshot(client, server, chunk, 3) == [
                label(c, 1) for c in range(chunk, chunk + 3)
            ]
            reads[n] += 1
        raise AssertionError("the writes did not end within the reads' bound")

    with trio.fail_after(120):
        async with running(config) as server, server.admin() as admin, AsyncExitStack() as stack:
            await admin.create_snapshot(1)
            origin = await stack.enter_async_context(server.client(reconnect=False))
            readers = [
                await stack.enter_async_context(server.client(1, reconnect=False)) for _ in reads
            ]
            async with trio.open_nursery() as nursery:
                for n, client in enumerate(readers):
                    nursery.start_soon(reader, client, server, n)
                for chunk in range(CHUNKS):
                    await write_origin(origin, server.origin, chunk, 2)
                written.set()
            copied = await origin.copied_ranges([(0, CHUNKS)])
            during = server.server.stats.lookups_during_commit
    assert copied == ((0, CHUNKS),)
    assert all(count > 0 for count in reads), reads
    assert during > 0
