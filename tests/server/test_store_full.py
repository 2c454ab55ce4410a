"""csnapd's terms for the store-full policy (docs/protocol.md, "When the store
is full"): a snapshot a client is connected to is spared, whatever its
priority; once its client has gone it is expendable again; a squashed
snapshot refuses identify with snapshot_unavailable and keeps its tag.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from csnap_client import AdminClient, DataClient, ServerError
from csnap_protocol import ErrorCode
from csnapd.engine.check import check_store
from csnapd.engine.device import FileDevice
from tests.server.support import make_store, running

ORIGIN_CHUNKS = 4096  # 16 MiB


async def write_whole_origin(client: DataClient) -> None:
    """Grants for every origin chunk, a quarter at a time (the data itself
    does not matter here)."""
    for first in range(0, ORIGIN_CHUNKS, 1024):
        async with client.origin_write([(first, 1024)]):
            pass


async def states(admin: AdminClient) -> dict[int, str]:
    listed = await admin.list_snapshots()
    return {int(s["tag"]): str(s["state"]) for s in listed}


async def test_a_connected_snapshot_is_spared_and_expendable_once_its_client_left(
    tmp_path: Path,
) -> None:
    # About 1.4 copies of the origin fit.
    config = make_store(tmp_path, store_size=24 << 20)
    async with running(config) as server, server.admin() as admin:
        async with server.client() as origin:
            await admin.create_snapshot(1, -50)
            await write_whole_origin(origin)  # 4096 copies for snapshot 1
            await admin.create_snapshot(2, 0)
            async with server.client(snapshot=1) as reader:
                async with reader.snapshot_read([(0, 1)]):
                    pass
                # Snapshot 1 has the lowest priority but a reader: snapshot 2
                # goes, and then the write needs no copies at all.
                await write_whole_origin(origin)
                assert await states(admin) == {1: "live", 2: "squashed"}
            # The reader has gone: snapshot 1 is expendable again.
            await admin.create_snapshot(3, 10)
            await write_whole_origin(origin)
            assert await states(admin) == {1: "squashed", 2: "squashed", 3: "live"}
            assert (await admin.status()).snapshots[-1].unique_chunks == ORIGIN_CHUNKS
        # A squashed snapshot serves nothing, and says why.
        with pytest.raises(ServerError) as refused:
            async with server.client(snapshot=1, reconnect=False):
                pass
        assert refused.value.error is ErrorCode.SNAPSHOT_UNAVAILABLE
        # Deleting a squashed snapshot frees its slot and its tag.
        await admin.delete_snapshot(1)
        await admin.create_snapshot(1, 0)
        assert (await states(admin))[1] == "live"
    store = FileDevice(config.store)
    try:
        report = check_store(store)
    finally:
        store.close()
    assert report.fatal is None and not report.problems, report.problems
