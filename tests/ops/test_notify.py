"""The services under a real $NOTIFY_SOCKET (a datagram socket this test
owns, as systemd would): READY=1 only once the service answers (the test
connects right after it, with no retry), STATUS= lines on the way,
STOPPING=1 when asked to stop, WATCHDOG=1 pings when $WATCHDOG_USEC is set
and none when it is not; and the agent started by socket activation.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError, find_server, open_admin
from csnap_common.addresses import split_host_port
from csnap_common.systemd import ActivationError, listen_sockets, watchdog_period
from tests.credentials import connector
from tests.e2e.processes import ROOT, csnap, poll
from tests.nbd.support import run
from tests.ops.support import LIMIT, listening, make_store, running

pytestmark = pytest.mark.e2e

#: Armed watchdogs ping every half of this: 0.1 s.
WATCHDOG_USEC = "200000"


def abstract_name() -> str:
    """A fresh "@name" for an abstract notification socket."""
    return f"@csnap-test-notify-{uuid.uuid4().hex}"


async def test_csnapd_is_ready_once_it_serves_and_says_it_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    store, origin = make_store(tmp_path)
    # A path, as systemd's own socket.
    async with listening(str(tmp_path / "notify")) as notify:
        async with running(
            ["csnapd", str(store), str(origin)], tmp_path / "csnapd.log", NOTIFY_SOCKET=notify.name
        ) as csnapd:
            ready = await notify.until("READY")
            address = (await csnapd.first_line()).removeprefix("listening ")
            # Connected to right after READY=1, with no retry: it answers.
            async with open_admin(connector(*split_host_port(address), store)) as admin:
                status = await admin.status()
            assert status.store.origin_chunks == (16 << 20) // 4096
            assert ready["READY"] == "1"
            assert ready["STATUS"] == f"active: serving {store} on {address}"
            before = notify.messages[: notify.messages.index(ready)]
            assert [m["STATUS"] for m in before] == [f"opening the store {store}"]
            assert await csnapd.terminate() == 0
            stopping = await notify.until("STOPPING")
            assert stopping["STOPPING"] == "1"
        assert len(notify.sent("READY")) == 1
        assert notify.sent("WATCHDOG") == []  # no $WATCHDOG_USEC, no pings


async def test_agent_server_and_gateway_under_a_service_manager(tmp_path: Path) -> None:
    """Agent first, then the gateway (which waits for a server), then csnapd:
    each is ready only once it answers, pings its watchdog, stops cleanly."""
    assert shutil.which("nbdinfo"), "nbdinfo is missing: scripts/test installs libnbd-bin"
    store, origin = make_store(tmp_path)
    sock = tmp_path / "agent.sock"
    async with AsyncExitStack() as stack:
        names = {
            name: await stack.enter_async_context(listening(abstract_name()))
            for name in ("agent", "nbd", "csnapd")
        }
        async with running(
            ["csnap_agent", "--socket", str(sock)],
            tmp_path / "agent.log",
            NOTIFY_SOCKET=names["agent"].name,
            WATCHDOG_USEC=WATCHDOG_USEC,
        ) as agent:
            ready = await names["agent"].until("READY")
            # The agent answers at once: there is no server yet.
            with pytest.raises(ServerError) as refused:
                await find_server(str(sock), wait=False)
            assert refused.value.name == "no_server"
            assert ready["STATUS"] == f"listening on {sock}"

            async with running(
                ["csnap_nbd", "--agent", str(sock), "--listen", "127.0.0.1:0"],
                tmp_path / "nbd.log",
                NOTIFY_SOCKET=names["nbd"].name,
                WATCHDOG_USEC=WATCHDOG_USEC,
            ) as nbd:
                looking = await names["nbd"].until("STATUS")
                assert looking == {"STATUS": "looking for csnapd"}
                # Until a server is up, the gateway pings but is not ready.
                for _ in range(3):
                    await names["nbd"].until("WATCHDOG")
                assert names["nbd"].sent("READY") == []

                async with running(
                    ["csnapd", str(store), str(origin), "--agent", str(sock)],
                    tmp_path / "csnapd.log",
                    NOTIFY_SOCKET=names["csnapd"].name,
                    WATCHDOG_USEC=WATCHDOG_USEC,
                ) as csnapd:
                    ready = await names["csnapd"].until("READY")
                    address = (await csnapd.first_line()).removeprefix("listening ")
                    # Ready on standby, registered: its port answers (not_active
                    # while on standby, a session once the agent started it).
                    try:
                        async with open_admin(connector(*split_host_port(address), store)) as admin:
                            await admin.status()
                        answered = "a session"
                    except ServerError as exc:
                        answered = exc.name
                    assert answered in ("a session", "not_active")
                    assert ready["STATUS"] == f"standby on {address}: registered with {sock}"
                    active = await names["csnapd"].until("STATUS")
                    assert active["STATUS"] == f"active: serving {store} on {address}"

                    ready = await names["nbd"].until("READY")
                    url = (await nbd.first_line()).removeprefix("listening ")
                    # Right after READY=1 a real NBD client gets its answer.
                    size = await run("nbdinfo", "--size", url)
                    assert int(size.stdout) == 16 << 20
                    assert ready["STATUS"] == f"serving on {url}"

                    assert await nbd.terminate() == 0
                    assert (await names["nbd"].until("STOPPING"))["STOPPING"] == "1"

                    # An administrator's shutdown is a stop too.
                    done = await csnap(sock, "shutdown")
                    assert done.returncode == 0, done.stderr
                    assert (await names["csnapd"].until("STOPPING"))["STOPPING"] == "1"
                    with trio.fail_after(LIMIT):
                        assert await csnapd.process.wait() == 0

            assert await agent.terminate() == 0
            assert (await names["agent"].until("STOPPING"))["STOPPING"] == "1"
        for name, notify in names.items():
            assert len(notify.sent("READY")) == 1, name
            # A ping every 0.1 s while it ran: at least a few (not a rate).
            assert len(notify.sent("WATCHDOG")) >= 3, name
            assert all(m["WATCHDOG"] == "1" for m in notify.sent("WATCHDOG")), name


async def test_the_agent_serves_the_socket_systemd_passes_it(tmp_path: Path) -> None:
    """Socket activation: systemd-socket-activate holds the socket and starts
    the agent on the first connection; that connection is answered, and the
    socket outlives the agent (it belongs to the manager)."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing: scripts/test installs systemd"
    sock = tmp_path / "agent.sock"
    python = Path(sys.executable)
    notify_name = abstract_name()
    forwarded = {"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [activate, "--listen", str(sock)]
    for key, value in {**forwarded, "NOTIFY_SOCKET": notify_name}.items():
        argv += ["--setenv", f"{key}={value}"]
    # --socket names another path: under activation the passed socket wins.
    argv += [str(python), "-m", "csnap_agent", "--socket", str(tmp_path / "unused.sock")]
    log = tmp_path / "agent.log"

    async def socket_exists() -> bool:
        return sock.exists()

    async with listening(notify_name) as notify:
        with log.open("ab") as err:
            process = await trio.lowlevel.open_process(argv, stdout=subprocess.PIPE, stderr=err)
        try:
            with trio.fail_after(LIMIT):
                await poll(socket_exists)
            # The first connection starts the agent, which answers it.
            answer = await csnap(sock, "server")
            assert answer.returncode == 4, answer.stderr  # the agent says: no server
            ready = await notify.until("READY")
            assert ready["STATUS"] == f"listening on {sock}"
            assert process.stdout is not None
            line = await process.stdout.receive_some(4096)
            assert line.decode().strip() == f"listening unix:{sock}"
            process.terminate()
            with trio.fail_after(LIMIT):
                assert await process.wait() == 0, log.read_text()
            assert sock.exists()  # the manager's socket stays
            assert not (tmp_path / "unused.sock").exists()
            assert "passed by the service manager" in log.read_text()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def test_the_agent_refuses_sockets_it_cannot_serve(tmp_path: Path) -> None:
    """Passed a TCP socket besides the Unix one, the agent says so and exits 3."""
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate is missing: scripts/test installs systemd"
    with socket.socket() as probe:  # a free port for the TCP socket
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sock = tmp_path / "agent.sock"
    argv = [activate, "--listen", f"127.0.0.1:{port}", "--listen", str(sock)]
    argv += ["--setenv", f"PYTHONPATH={ROOT}", sys.executable, "-m", "csnap_agent"]
    with (tmp_path / "agent.log").open("wb") as err:
        process = await trio.lowlevel.open_process(argv, stderr=err)
    try:

        async def socket_exists() -> bool:
            return sock.exists()

        with trio.fail_after(LIMIT):
            await poll(socket_exists)
        answer = await csnap(sock, "server")  # starts the agent, which refuses to run
        assert answer.returncode == 4
        with trio.fail_after(LIMIT):
            assert await process.wait() == 3
        assert (
            "socket activation passed AF_INET/SOCK_STREAM, AF_UNIX/SOCK_STREAM; the agent"
            " takes one Unix stream socket" in (tmp_path / "agent.log").read_text()
        )
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()


def test_watchdog_pings_only_for_the_process_it_is_meant_for() -> None:
    pid = str(os.getpid())
    assert watchdog_period({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_period({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_period({"WATCHDOG_USEC": "soon"}) is None
    assert watchdog_period({}) is None


def test_listen_fds_for_another_process_are_left_alone() -> None:
    other = {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    assert listen_sockets(other) == []
    assert other == {"LISTEN_FDS": "1", "LISTEN_PID": "1"}
    broken = {"LISTEN_FDS": "many", "LISTEN_PID": str(os.getpid())}
    with pytest.raises(ActivationError):
        listen_sockets(broken)
    assert broken == {}  # taken: a child does not try again
