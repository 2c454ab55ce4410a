"""scripts/run's supervisor (csnap_agent.demo) as a real process: a closed
terminal (SIGHUP) stops every service in order and leaves the store clean;
a second run on the same directory, or one whose NBD port is taken, says
why in one line and exits 1, leaving nothing running.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from tests.e2e.processes import ROOT, csnap
from tests.e2e.test_agent import store_is_clean

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

#: The services the supervisor starts, by the module each runs.
SERVICES = ("csnap_agent", "csnapd", "csnap_nbd")


@dataclass
class Run:
    process: trio.Process
    log: Path
    #: What it printed on stdout before the test stopped reading.
    output: bytes = b""
    #: Every child process seen so far, killed at the end if still running.
    seen: dict[str, int] = field(default_factory=dict)

    def children(self) -> dict[str, int]:
        """The supervisor's child processes, by the module they run."""
        found: dict[str, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            if parent == self.process.pid and len(argv) > 2 and argv[1] == b"-m":
                found[argv[2].decode()] = int(entry.name)
        self.seen.update(found)
        return found


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


@asynccontextmanager
async def supervisor(data: Path, log: Path, *extra: str) -> AsyncIterator[Run]:
    """`python -m csnap_agent.demo` on `data`; whatever is left running at the
    end (the supervisor, or services it left behind) is killed."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "csnap_agent.demo", "--data", str(data)]
    argv += ["--store-size", "64M", "--origin-size", "16M", *extra]
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=err, env=env
        )
    run = Run(process, log)
    try:
        yield run
    finally:
        with trio.CancelScope(shield=True):
            run.children()
            if process.returncode is None:
                process.kill()
                await process.wait()
            for pid in run.seen.values():
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)


async def _ready(run: Run) -> bytes:
    assert run.process.stdout is not None
    with trio.fail_after(90):
        while b"\n" not in run.output:
            chunk = await run.process.stdout.receive_some(4096)
            assert chunk, run.log.read_text()[-3000:]
            run.output += chunk
    assert run.output.startswith(b"ready: "), run.output
    return run.output


def _one_clear_failure(log: Path, what: str) -> None:
    text = log.read_text()
    assert "Traceback" not in text and "ExceptionGroup" not in text, text[-3000:]
    own = [line for line in text.splitlines() if " csnap-run " in line]
    assert own and f"{what} did not start" in own[-1], text[-3000:]


async def test_sighup_stops_every_service_and_leaves_the_store_clean(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with supervisor(data, tmp_path / "run.log", "--nbd-listen", "127.0.0.1:0") as run:
        await _ready(run)
        children = run.children()
        assert set(children) == set(SERVICES), children
        assert (await csnap(data / "agent.sock", "create", "3")).returncode == 0
        run.process.send_signal(signal.SIGHUP)
        with trio.fail_after(60):
            status = await run.process.wait()
        log = run.log.read_text()
        assert status == 0, log[-3000:]
        assert "SIGHUP: stopping" in log
        left = {name: pid for name, pid in children.items() if _alive(pid)}
        assert not left, f"still running after SIGHUP: {left}"
    assert "store closed cleanly" in log
    assert store_is_clean(data / "store.img")


async def test_a_second_run_on_the_same_directory_fails_in_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with supervisor(data, tmp_path / "first.log", "--nbd-listen", "127.0.0.1:0") as first:
        await _ready(first)
        async with supervisor(
            data, tmp_path / "second.log", "--nbd-listen", "127.0.0.1:0"
        ) as second:
            with trio.fail_after(60):
                assert await second.process.wait() == 1
            second_children = second.children()
        assert not second_children
        _one_clear_failure(tmp_path / "second.log", "agent")
        assert "another agent is listening" in (tmp_path / "second.log").read_text()
        # The first run was not disturbed.
        assert (await csnap(data / "agent.sock", "create", "1")).returncode == 0
        first.process.send_signal(signal.SIGINT)
        with trio.fail_after(60):
            assert await first.process.wait() == 0
    assert store_is_clean(data / "store.img")


async def test_a_taken_nbd_port_fails_in_one_line_and_stops_the_rest(tmp_path: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    data = tmp_path / "data"
    try:
        async with supervisor(
            data, tmp_path / "run.log", "--nbd-listen", f"127.0.0.1:{port}"
        ) as run:
            started: dict[str, int] = {}
            with trio.fail_after(90):
                while run.process.returncode is None:
                    started.update(run.children())
                    await trio.sleep(0.05)
            assert run.process.returncode == 1
            assert {"csnap_agent", "csnapd"} <= set(started), started
            left = {name: pid for name, pid in started.items() if _alive(pid)}
            assert not left, f"still running: {left}"
    finally:
        taken.close()
    _one_clear_failure(tmp_path / "run.log", "nbd")
    log = (tmp_path / "run.log").read_text()
    assert "csnapd stopped" in log and "agent stopped" in log
    assert store_is_clean(data / "store.img")
