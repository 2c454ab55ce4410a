"""`csnap resize` through csnap-agent to a real csnapd: its output, --json,
exit codes, the refusal of a data-path credential, and a store that
csnap-check finds clean afterwards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from csnap_client import ServerError, open_admin
from csnap_common.credentials import ROLE_CLIENT
from csnap_format.mkcsnap import format_store
from csnap_protocol import ErrorCode
from tests.credentials import connector
from tests.e2e.processes import csnap, start_agent, start_csnapd_with_agent
from tests.e2e.test_agent import store_is_clean

pytestmark = pytest.mark.e2e

MIB = 1 << 20


async def test_resize_verb_json_and_exit_codes(tmp_path: Path) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(
        str(store), str(origin), store_size=16 * MIB, origin_size=8 * MIB, max_store_size=32 * MIB
    )
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    server, host, port = await start_csnapd_with_agent(store, origin, tmp_path / "csnapd.log", sock)
    try:
        assert (await csnap(sock, "create", "1")).returncode == 0
        usage = await csnap(sock, "resize")
        assert usage.returncode == 2 and "--origin-size" in usage.stderr
        # The origin file is still 8 MiB: refused, nothing changed (exit 1).
        small = await csnap(sock, "--json", "resize", "--origin-size", "12M")
        assert small.returncode == 1
        assert json.loads(small.stdout)["error"]["name"] == "device_too_small"
        grown = await csnap(
            sock, "--json", "resize", "--origin-size", "12M", "--store-size", "24M", "--grow-files"
        )
        assert grown.returncode == 0, grown.stderr
        result = json.loads(grown.stdout)
        assert result["origin_chunks_before"] * 4096 == 8 * MIB
        assert result["origin_chunks"] * 4096 == 12 * MIB
        assert result["store_chunks"] * 4096 == 24 * MIB
        assert sorted(result["grown_files"]) == ["origin", "store"]
        assert origin.stat().st_size == 12 * MIB and store.stat().st_size == 24 * MIB
        table = await csnap(sock, "resize", "--store-size", "32M", "--grow-files")
        assert table.returncode == 0
        assert "store  24 MiB -> 32 MiB" in table.stdout, table.stdout
        shrink = await csnap(sock, "--json", "resize", "--origin-size", "4M")
        assert shrink.returncode == 1
        assert json.loads(shrink.stdout)["error"]["name"] == "shrink_refused"
        status = json.loads((await csnap(sock, "--json", "status")).stdout)
        assert status["store"]["origin_chunks"] * 4096 == 12 * MIB
        assert status["snapshots"][0]["origin_chunks"] * 4096 == 8 * MIB
        # A data-path credential may read the status, not resize.
        async with open_admin(connector(host, port, store, ROLE_CLIENT)) as admin:
            with pytest.raises(ServerError) as refused:
                await admin.resize(origin_bytes=16 * MIB, store_bytes=None)
            assert refused.value.error is ErrorCode.NOT_PERMITTED
            assert (await admin.status()).store.origin_chunks * 4096 == 12 * MIB
    finally:
        await server.stop()
        await agent.stop()
    assert store_is_clean(store)
