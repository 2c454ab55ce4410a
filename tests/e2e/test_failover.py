"""A standby csnapd takes over when the active one dies (docs/operations.md):
real csnap-agent and csnapd processes, the active server killed with
SIGKILL after the agent has relayed administration to it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from csnap_client import agent_connector, find_server, open_client
from tests.credentials import tls
from tests.e2e.processes import Daemon, agent_names, csnap, poll, start_agent, start_csnapd, tail
from tests.e2e.test_agent import make, store_is_clean
from tests.server.support import label, pread, pwrite

pytestmark = pytest.mark.e2e


@asynccontextmanager
async def reaped() -> AsyncIterator[list[Daemon]]:
    """Daemons appended to the list are killed at the end if still running."""
    daemons: list[Daemon] = []
    try:
        yield daemons
    finally:
        with trio.CancelScope(shield=True):
            for daemon in daemons:
                if daemon.process.returncode is None:
                    await daemon.kill()


async def test_a_standby_takes_over_after_relayed_administration(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    async with reaped() as daemons:
        agent = await start_agent(sock, tmp_path / "agent.log")
        daemons.append(agent)
        first, host1, port1 = await start_csnapd(
            store, origin, tmp_path / "first.log", "--agent", str(sock)
        )
        daemons.append(first)
        with trio.fail_after(30):
            await agent_names(sock, f"{host1}:{port1}")
        second, host2, port2 = await start_csnapd(
            store, origin, tmp_path / "second.log", "--agent", str(sock)
        )
        daemons.append(second)

        async def registered() -> bool:
            return "registered with agent" in (tmp_path / "second.log").read_text()

        with trio.fail_after(30):
            await poll(registered)
        # One node: the agent itself knows its standby (`csnap server` lists it).
        where = await find_server(str(sock), wait=False, standbys=True)
        assert [(s.node, s.address, s.pid) for s in where.standbys] == [
            ("", f"{host2}:{port2}", second.process.pid)
        ]
        # The agent relays administration to the active server: its relay
        # connection is open when that server dies.
        status = await csnap(sock, "status")
        assert status.returncode == 0, status.stderr
        created = await csnap(sock, "create", "5")
        assert created.returncode == 0, created.stderr
        pwrite(origin, 9, label(9, 1))

        await first.kill()
        with trio.fail_after(30):
            await agent_names(sock, f"{host2}:{port2}")
        assert "opened" in (tmp_path / "second.log").read_text(), tail(tmp_path / "second.log")

        # The standby serves: administration through the agent, and the data path.
        listed = await csnap(sock, "--json", "list")
        assert listed.returncode == 0, (listed.stderr, tail(tmp_path / "agent.log"))
        assert [s["tag"] for s in json.loads(listed.stdout)["snapshots"]] == [5]
        with trio.fail_after(30):
            async with (
                open_client(agent_connector(str(sock), tls(store))) as client,
                client.origin_write([(9, 1)]),
            ):
                pwrite(origin, 9, label(9, 2))
            async with (
                open_client(agent_connector(str(sock), tls(store)), snapshot=5) as reader,
                reader.snapshot_read([(9, 1)]) as plan,
            ):
                # The new server copied chunk 9 out before the overwrite.
                assert [s[:2] for s in plan.store] == [(9, 1)] and not plan.origin
        assert pread(origin, 9) == label(9, 2)
        status = await csnap(sock, "status", "5")
        assert status.returncode == 0, status.stderr
        assert await second.stop() == 0
        assert await agent.stop() == 0
    assert store_is_clean(store)
