"""csnap-agent, csnapd --agent and the csnap CLI as real processes: the
administrator's verbs and their exit codes, standby and activation, a
client that asks before any server is up, a server killed and restarted,
and an agent restarted under a running server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from csnap_client import (
    ServerError,
    agent_connector,
    find_server,
    open_admin,
    open_agent_stream,
    open_client,
)
from csnap_common.credentials import make_credentials, store_credentials
from csnap_format.mkcsnap import format_store
from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from tests.credentials import connector, tls
from tests.e2e.processes import (
    ROOT,
    csnap,
    poll,
    start,
    start_agent,
    start_csnapd,
    start_csnapd_with_agent,
)
from tests.server.support import label, pread, pwrite, write_origin

pytestmark = pytest.mark.e2e


def make(tmp_path: Path) -> tuple[Path, Path]:
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=64 << 20, origin_size=16 << 20)
    return store, origin


def store_is_clean(store: Path) -> bool:
    device = FileDevice(store, writable=False)
    try:
        return check_store(device).exit_code == 0
    finally:
        device.close()


async def test_the_cli_verbs_and_their_exit_codes(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    server, host, port = await start_csnapd_with_agent(store, origin, tmp_path / "csnapd.log", sock)

    created = await csnap(sock, "create", "7", "--priority", "5")
    assert created.returncode == 0, created.stderr
    assert "snapshot 7: created" in created.stdout
    again = await csnap(sock, "create", "7")
    assert again.returncode == 1
    assert "already exists" in again.stderr

    listed = await csnap(sock, "--json", "list")
    assert listed.returncode == 0
    body = json.loads(listed.stdout)
    assert [(s["tag"], s["priority"], s["state"]) for s in body["snapshots"]] == [(7, 5, "live")]
    table = await csnap(sock, "list")
    assert table.stdout.splitlines()[0].split()[:3] == ["TAG", "CREATED", "PRIORITY"]

    status = await csnap(sock, "status", "7", "--json")
    detail = json.loads(status.stdout)
    assert detail["snapshot"]["tag"] == 7 and detail["store"]["chunk_size"] == 4096
    whole = await csnap(sock, "status")
    assert "free" in whole.stdout and whole.returncode == 0

    assert (await csnap(sock, "priority", "7", "-3")).stdout == "snapshot 7: priority -3\n"
    assert (await csnap(sock, "usecount", "7", "2")).stdout == "snapshot 7: use count 2\n"
    assert (await csnap(sock, "usecount", "7")).stdout == "snapshot 7: use count 2\n"
    busy = await csnap(sock, "delete", "7")
    assert busy.returncode == 1 and "use count" in busy.stderr
    await csnap(sock, "usecount", "7", "-2")

    # Revert, with an origin client connected: the origin changed since 7 was
    # taken and goes back to it; the client writes again afterwards.
    async with open_client(connector(host, port, store)) as client:
        for chunk in range(3):
            await write_origin(client, origin, chunk, 1)
        reverted = await csnap(sock, "--json", "revert", "7")
        assert reverted.returncode == 0, reverted.stderr
        assert json.loads(reverted.stdout) == {"tag": 7, "total": 3, "restored": 3, "done": True}
        assert pread(origin, 0, 3) == bytes(3 * 4096)
        await write_origin(client, origin, 0, 2)
    assert (await csnap(sock, "revert", "7")).stdout == (
        "origin reverted to snapshot 7 (3 chunks restored)\n"
    )
    assert pread(origin, 0) == bytes(4096)
    assert (await csnap(sock, "revert", "9")).returncode == 3

    # A revert waits while a reader of another snapshot holds a read lock on
    # an origin chunk it restores; status shows it, and creates are refused.
    assert (await csnap(sock, "create", "8")).returncode == 0
    async with (
        open_client(connector(host, port, store), snapshot=8) as reader,
        reader.snapshot_read([(0, 1)]) as plan,
    ):
        assert plan.origin == ((0, 1),)
        started = await csnap(sock, "--json", "revert", "7", "--no-wait")
        assert json.loads(started.stdout) == {"tag": 7, "total": 3, "restored": 0, "done": False}
        shown = await csnap(sock, "status")
        assert "being reverted to snapshot 7: 0 of 3 chunks restored" in shown.stdout
        refused = await csnap(sock, "--json", "create", "9")
        assert refused.returncode == 1
        assert json.loads(refused.stdout)["error"]["name"] == "revert_in_progress"
    async with open_admin(connector(host, port, store)) as admin:

        async def revert_done() -> bool:
            return not (await admin.status()).store.reverting

        with trio.fail_after(30):
            await poll(revert_done)
    assert (await csnap(sock, "delete", "8")).returncode == 0

    missing = await csnap(sock, "--json", "delete", "9")
    assert missing.returncode == 3
    assert json.loads(missing.stdout)["error"]["name"] == "no_such_snapshot"
    assert (await csnap(sock, "status", "9")).returncode == 3
    assert (await csnap(sock, "delete", "7")).returncode == 0
    assert json.loads((await csnap(sock, "--json", "list")).stdout)["snapshots"] == []

    usage = await csnap(sock, "priority", "7", "500")
    assert usage.returncode == 2 and "-128..127" in usage.stderr
    assert (await csnap(sock, "create", "not-a-number")).returncode == 2

    info = json.loads((await csnap(sock, "--json", "server")).stdout)
    assert info["state"] == "active" and info["store"] == str(store)

    stopped = await csnap(sock, "shutdown")
    assert stopped.returncode == 0, stopped.stderr
    with trio.fail_after(30):
        assert await server.process.wait() == 0
    gone = await csnap(sock, "--json", "server")
    assert gone.returncode == 4
    assert json.loads(gone.stdout)["error"]["name"] == "no_server"
    assert (await csnap(sock, "list")).returncode == 4
    assert await agent.stop() == 0
    assert not sock.exists()
    unreachable = await csnap(sock, "list")
    assert unreachable.returncode == 4 and "cannot reach the agent" in unreachable.stderr
    assert store_is_clean(store)


async def test_standby_until_the_agent_starts_it(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    # The server comes first: it binds its port and waits for an agent.
    server, host, port = await start_csnapd(
        store, origin, tmp_path / "csnapd.log", "--agent", str(sock)
    )

    # The store is not open yet.
    async def waiting() -> bool:
        return "not reachable" in (tmp_path / "csnapd.log").read_text()

    with trio.fail_after(5):
        await poll(waiting)
    assert "opened" not in (tmp_path / "csnapd.log").read_text()
    # Connecting to it directly is refused: it is not serving yet.
    with pytest.raises(ServerError) as refused:
        async with open_admin(connector(host, port, store)):
            pass
    assert refused.value.name == "not_active"

    found: list[str] = []

    async def ask_early() -> None:
        # A data-path client asks before any agent exists; it retries, then waits.
        while True:
            try:
                where = await find_server(str(sock), wait=True)
            except OSError:
                await trio.sleep(0.05)
                continue
            found.append(where.address)
            return

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask_early)
            await trio.sleep(0.3)
            assert not found
            agent = await start_agent(sock, tmp_path / "agent.log")
    assert found == [f"{host}:{port}"]
    assert "opened" in (tmp_path / "csnapd.log").read_text()
    assert await server.stop() == 0
    assert await agent.stop() == 0


async def test_a_client_that_asks_first_is_served_once_a_server_is_up(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    with pytest.raises(ServerError) as refused:
        await find_server(str(sock), wait=False)
    assert refused.value.name == "no_server"
    pwrite(origin, 3, label(3, 1))
    # The client holds its credential before any server exists: made here,
    # csnapd takes them as its own (it makes none when they are there).
    make_credentials(store_credentials(store))
    results: list[bytes] = []

    async def origin_writer() -> None:
        async with open_client(agent_connector(str(sock), tls(store))) as client:
            async with client.origin_write([(3, 1)]):
                pwrite(origin, 3, label(3, 2))
            results.append(pread(origin, 3))

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(origin_writer)
            await trio.sleep(0.3)
            assert not results
            server, _, _ = await start_csnapd_with_agent(
                store, origin, tmp_path / "csnapd.log", sock
            )
    assert results == [label(3, 2)]
    assert await server.stop() == 0
    assert await agent.stop() == 0


async def test_a_killed_server_is_reported_missing_then_back(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    log = tmp_path / "csnapd.log"
    agent = await start_agent(sock, tmp_path / "agent.log")
    server, _, _ = await start_csnapd_with_agent(store, origin, log, sock)
    assert (await csnap(sock, "create", "11")).returncode == 0
    await server.kill()

    async def missing() -> bool:
        return (await csnap(sock, "server")).returncode == 4

    with trio.fail_after(10):
        await poll(missing, interval=0.1)
    server, _, _ = await start_csnapd_with_agent(store, origin, log, sock)
    back = await csnap(sock, "--json", "list")
    assert back.returncode == 0, back.stderr
    assert [s["tag"] for s in json.loads(back.stdout)["snapshots"]] == [11]
    assert "replayed" in log.read_text()
    assert await server.stop() == 0
    assert await agent.stop() == 0
    assert store_is_clean(store)


async def test_a_restarted_agent_learns_the_running_server(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    server, host, port = await start_csnapd_with_agent(store, origin, tmp_path / "csnapd.log", sock)
    assert (await csnap(sock, "create", "1")).returncode == 0
    await agent.kill()
    # A new agent on the same path replaces the dead one's socket file.
    agent = await start_agent(sock, tmp_path / "agent2.log")
    with trio.fail_after(10):
        where = await find_server(str(sock), wait=True)
    assert where.address == f"{host}:{port}"
    assert (await csnap(sock, "create", "2")).returncode == 0
    assert "registered (serving)" in (tmp_path / "agent2.log").read_text()
    assert await server.stop() == 0
    assert await agent.stop() == 0


async def test_a_second_agent_on_a_live_socket_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    with pytest.raises(RuntimeError, match="exited before it was ready"):
        await start(["csnap_agent", "--socket", str(sock)], tmp_path / "agent2.log")
    assert "another agent is listening" in (tmp_path / "agent2.log").read_text()
    assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
    assert await agent.stop() == 0


async def test_garbage_on_the_agent_socket_harms_nobody(tmp_path: Path) -> None:
    store, origin = make(tmp_path)
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    server, _, _ = await start_csnapd_with_agent(store, origin, tmp_path / "csnapd.log", sock)
    with trio.fail_after(30):
        for junk in (b"\x00\x00\x00\x05hello", b"\xff\xff\xff\xff", b"GET / HTTP/1.0\r\n\r\n"):
            stream = await open_agent_stream(str(sock))
            await stream.send_all(junk)
            with trio.move_on_after(5):
                while await stream.receive_some(4096):
                    pass
            await stream.aclose()
        # A slow sender that never finishes its frame does not block others.
        slow = await open_agent_stream(str(sock))
        await slow.send_all(b"\x00\x00\x01")
        assert (await csnap(sock, "create", "4")).returncode == 0
        await slow.aclose()
    assert await server.stop() == 0
    assert await agent.stop() == 0


@pytest.mark.slow
async def test_the_run_command_starts_and_stops_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [
        sys.executable,
        "-m",
        "csnap_agent.demo",
        "--data",
        str(data),
        "--store-size",
        "64M",
        "--origin-size",
        "16M",
        "--nbd-listen",
        "127.0.0.1:0",
    ]
    for round_ in range(2):  # the second run reuses the store
        log = tmp_path / f"run{round_}.log"
        with log.open("wb") as err:
            process = await trio.lowlevel.open_process(
                argv, stdout=subprocess.PIPE, stderr=err, env=env
            )
        assert process.stdout is not None
        output = b""
        with trio.fail_after(90):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, log.read_text()[-3000:]
                output += chunk
        assert output.startswith(b"ready: agent unix:"), output
        sock = data / "agent.sock"
        created = await csnap(sock, "create", str(round_ + 1))
        assert created.returncode == 0, created.stderr
        process.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            assert await process.wait() == 0, log.read_text()[-3000:]
        assert "store closed cleanly" in log.read_text()
    assert store_is_clean(data / "store.img")
    assert "reusing the store" in (tmp_path / "run1.log").read_text()
