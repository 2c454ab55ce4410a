"""`csnap server` through a real etcd: the active server, its node and its
fencing token, and the standbys, the same from every node; a standby that
goes away leaves the list.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import trio

from csnap_client import find_server
from tests.e2e.processes import csnap, poll, tail
from tests.e2e.test_cluster import TTL, elected, token_of, two_nodes

pytestmark = pytest.mark.e2e


async def shown(sock: Path) -> dict[str, Any]:
    answer = await csnap(sock, "--json", "server")
    assert answer.returncode == 0, answer.stderr
    result: dict[str, Any] = json.loads(answer.stdout)
    return result


async def standbys(sock: Path) -> list[dict[str, Any]]:
    """What the agent says stands by (as `csnap server` asks it, in this process)."""
    where = await find_server(str(sock), wait=False, standbys=True)
    return [asdict(s) for s in where.standbys]


async def test_csnap_server_shows_the_active_server_and_the_standbys_on_every_node(
    tmp_path: Path,
) -> None:
    async with two_nodes(tmp_path) as (nodes, store, _origin):
        active, standby = await elected(nodes)
        wanted = [
            {"node": standby.name, "address": standby.address, "pid": standby.server.process.pid}
        ]

        # The standby's campaign key appears once it has campaigned and lost.
        async def listed() -> bool:
            return await standbys(active.sock) == wanted

        with trio.fail_after(10):
            await poll(listed, interval=0.1)
        # The same from either node: this one's own standby, the other's key.
        assert await standbys(standby.sock) == wanted
        result = await shown(standby.sock)
        assert (result["address"], result["node"], result["token"]) == (
            active.address,
            active.name,
            token_of(store),
        )
        assert result["standbys"] == wanted, tail(standby.agent.log)
        text = await csnap(active.sock, "server")
        assert text.returncode == 0, text.stderr
        assert f"node       {active.name}\n" in text.stdout
        assert f"token      {token_of(store)}\n" in text.stdout
        assert (
            f"standbys   {standby.address} on node {standby.name},"
            f" pid {standby.server.process.pid}\n" in text.stdout
        ), text.stdout

        # The standby goes: its agent forgets it at once, the other node's
        # once its campaign key's lease has expired.
        await standby.server.kill()
        with trio.fail_after(3 * TTL + 5):
            for node in nodes:

                async def gone(sock: Path = node.sock) -> bool:
                    return not await standbys(sock)

                await poll(gone, interval=0.1)
