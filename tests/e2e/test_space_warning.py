"""The data area's early warning through real processes: csnapd started with
--warn-at, origin writes that fill the store past it, and `csnap status`
(text and --json) showing the warning, with one `store.filling` JSON log
line (docs/operations.md, "Store space: the warning and the reserve").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from csnap_client import agent_store_connector, find_server, open_client
from csnap_format.mkcsnap import format_store
from tests.e2e.processes import csnap, start_agent, start_csnapd

pytestmark = pytest.mark.e2e

ORIGIN_CHUNKS = 2048  # 8 MiB of 4 KiB chunks


async def test_csnap_status_shows_the_warning_of_a_real_csnapd(tmp_path: Path) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=16 << 20, origin_size=8 << 20)
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    log = tmp_path / "csnapd.log"
    server, _, _ = await start_csnapd(
        store, origin, log, "--agent", str(sock), "--warn-at", "30%", "--log-format=json"
    )
    with trio.fail_after(30):
        await find_server(str(sock), wait=True)

    before = json.loads((await csnap(sock, "--json", "status")).stdout)["store"]
    assert (before["warn_at"], before["keep_free"], before["space_warning"]) == (30, 0, False)
    assert "warning" not in (await csnap(sock, "status")).stdout

    assert (await csnap(sock, "create", "1")).returncode == 0
    # Every origin chunk copied out for snapshot 1: over half the data area.
    async with open_client(agent_store_connector(str(sock))) as client:
        for first in range(0, ORIGIN_CHUNKS, 512):
            async with client.origin_write([(first, 512)]):
                pass

    after = json.loads((await csnap(sock, "--json", "status")).stdout)["store"]
    used = after["data_chunks"] - after["data_free"]
    assert used * 100 >= 30 * after["data_chunks"], after
    assert after["space_warning"] is True
    text = (await csnap(sock, "status")).stdout
    assert "warning    the data area is past its warning threshold of 30% used" in text, text

    assert (await csnap(sock, "shutdown")).returncode == 0
    with trio.fail_after(30):
        assert await server.process.wait() == 0
    assert await agent.stop() == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line]
    filling = [line for line in lines if line["event"] == "store.filling"]
    assert len(filling) == 1, filling
    assert filling[0]["store"] == str(store) and filling[0]["level"] == "warning"
