"""A real csnap-agent answers every request, and its in-flight limit holds:
repeated ids do not lift it, and a relayed reply too big for the admin's
frame limit is answered request_too_large (docs/protocol.md, "The agent").
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from csnap_agent.agent import MAX_IN_FLIGHT
from csnap_client import agent_admin_connector, open_admin, open_agent_stream
from csnap_protocol import GetStatus, NeedServer, encode_frame
from tests.e2e.processes import start_agent, start_csnapd_with_agent
from tests.e2e.test_agent import make
from tests.e2e.test_failover import reaped
from tests.torture.hostile import hello_frame
from tests.torture.support import RawPeer

pytestmark = pytest.mark.e2e


async def test_repeated_ids_do_not_lift_the_in_flight_limit(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    async with reaped() as daemons:
        daemons.append(await start_agent(sock, tmp_path / "agent.log"))
        # No server: every need_server with wait stays in flight.
        peer = RawPeer(await open_agent_stream(str(sock)))
        frames = [hello_frame("client")]
        for request in range(1, 2 * MAX_IN_FLIGHT + 1):
            frames += [encode_frame(NeedServer(request, True))] * 2
        await peer.send(b"".join(frames))
        heard = await peer.listen(3)
        await peer.aclose()
    names = [frame.get("name") for frame in heard.errors()]
    assert names.count("duplicate_request") == MAX_IN_FLIGHT, names
    # Past the limit every request is refused, its repeat too: the limit counts
    # the first request of each id as in flight although its repeat was refused.
    assert names.count("too_many_requests") == 2 * MAX_IN_FLIGHT, names


async def test_a_relayed_reply_too_big_for_the_admin_is_refused_not_dropped(
    tmp_path: Path,
) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    async with reaped() as daemons:
        daemons.append(await start_agent(sock, tmp_path / "agent.log"))
        server, _, _ = await start_csnapd_with_agent(store, origin, tmp_path / "csnapd.log", sock)
        daemons.append(server)
        async with open_admin(agent_admin_connector(str(sock))) as admin:
            for tag in range(64):
                await admin.create_snapshot(tag, 0)
        # An admin that takes frames of 4096 bytes at most asks for the status
        # of 64 snapshots, then for where the server is.
        peer = RawPeer(await open_agent_stream(str(sock)))
        await peer.send(
            hello_frame("admin", max_frame=4096)
            + encode_frame(GetStatus(1))
            + encode_frame(NeedServer(2, False))
        )
        with trio.fail_after(30):
            while True:
                heard = await peer.listen(0.2)
                if {f.get("id") for f in heard.frames} >= {1, 2}:
                    break
        await peer.aclose()
    replies = {f["id"]: f for f in heard.frames if f.get("id") is not None}
    assert replies[1]["type"] == "error" and replies[1]["name"] == "request_too_large"
    assert "frame limit" in replies[1]["message"]
    assert replies[2]["type"] == "server_at"
