"""Lookups answered while a client batch's commit is written (docs/rules.md,
"lookups during a commit"): a real csnapd copies origin chunks out, one
commit each, while snapshot clients keep reading those very chunks. Some of
their lookups are answered during the copy-outs' commits, and every read
returns the snapshot's data, before and after its chunk was copied.

A reader that is back within the server's gathering time joins the next
batch and waits for its commit with it (csnapd.group_commit), so the readers
here pause longer than that between reads, as clients doing something with
their data do; and each sync of a commit waits, a bounded while in the
commit's worker thread, until a lookup was answered during it, as a slow
disk would, so that the overlap does not depend on the disk's latency.
"""

from __future__ import annotations

import os
import random
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from csnap_client import DataClient
from csnapd.group_commit import MAX_LINGER
from tests.server.support import (
    Running,
    label,
    make_store,
    pwrite,
    read_snapshot,
    running,
    write_origin,
)

CHUNKS = 128
READERS = 3
#: Longest a commit's sync waits for a lookup to arrive.
SYNC_HOLD = 0.050
#: A reader's pause between reads: past the longest gathering wait.
PAUSE = MAX_LINGER + 0.002


def hold_syncs_for_a_lookup(monkeypatch: pytest.MonkeyPatch, serving: list[Running]) -> None:
    """Every fdatasync while `serving` holds a server waits until that
    server answered one more lookup during a commit, or SYNC_HOLD passed."""
    fdatasync = os.fdatasync

    def held(fd: int) -> None:
        if serving:
            stats = serving[0].server.stats
            before, deadline = stats.lookups_during_commit, time.monotonic() + SYNC_HOLD
            while stats.lookups_during_commit == before and time.monotonic() < deadline:
                time.sleep(0.0002)
        fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", held)


async def test_reads_during_copy_out_commits_return_the_snapshots_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = make_store(tmp_path)
    serving: list[Running] = []
    hold_syncs_for_a_lookup(monkeypatch, serving)
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
            await trio.sleep(PAUSE * rng.uniform(1.0, 1.2))
        raise AssertionError("the writes did not end within the reads' bound")

    with trio.fail_after(120):
        async with running(config) as server, server.admin() as admin, AsyncExitStack() as stack:
            await admin.create_snapshot(1)
            serving.append(server)
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
