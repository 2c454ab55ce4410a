"""The suite's own guards, proved on an inner pytest run of deliberately bad
tests: a test past its time limit fails (trio or not) and the run goes on;
a failing, hanging or careless end-to-end test leaves no csnapd or agent
running; a hang that ignores cancellation ends the run without leaving one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.processes import ROOT

pytestmark = pytest.mark.e2e

INI = """[pytest]
trio_mode = true
timeout = 4
timeout_method = signal
addopts = -p tests.process_guard -p tests.timeouts
"""

BAD_TESTS = """
import os, time
from pathlib import Path
import trio
from csnap_format.mkcsnap import format_store
from tests.e2e.processes import start_agent, start_csnapd

PIDS = Path(os.environ["PIDS_FILE"])


async def daemons(tmp_path, *, agent=True):
    store, origin = tmp_path / "store", tmp_path / "origin"
    format_store(str(store), str(origin), store_size=16 << 20, origin_size=4 << 20)
    started = []
    if agent:
        started.append(await start_agent(tmp_path / "agent.sock", tmp_path / "agent.log"))
    server, _, _ = await start_csnapd(store, origin, tmp_path / "csnapd.log")
    started.append(server)
    with PIDS.open("a") as f:
        for daemon in started:
            f.write(f"{daemon.process.pid}\\n")


async def test_fails_with_its_daemons_running(tmp_path):
    await daemons(tmp_path)
    assert False, "deliberately"


async def test_hangs_with_its_daemons_running(tmp_path):
    await daemons(tmp_path)
    await trio.sleep_forever()


def test_spins_forever():
    while True:
        pass


async def test_passes_but_leaves_csnapd_running(tmp_path):
    await daemons(tmp_path, agent=False)


async def test_runs_after_the_others():
    await trio.sleep(0.01)


async def test_hangs_where_cancellation_cannot_reach(tmp_path):
    await daemons(tmp_path)
    await trio.to_thread.run_sync(time.sleep, 600)
"""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _inner(tmp_path: Path, *selection: str) -> tuple[subprocess.CompletedProcess[str], list[int]]:
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_bad.py").write_text(BAD_TESTS)
    pids = tmp_path / "pids"
    pids.write_text("")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PIDS_FILE": str(pids),
        "CSNAP_TIMEOUT_GRACE": "3",
    }
    env.pop("PYTEST_ADDOPTS", None)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    return done, [int(line) for line in pids.read_text().split()]


def test_bad_tests_fail_and_leave_no_process(tmp_path: Path) -> None:
    done, pids = _inner(tmp_path, "-k", "not cancellation_cannot_reach")
    out = done.stdout + done.stderr
    assert "FAILED test_bad.py::test_fails_with_its_daemons_running - AssertionError" in out, out
    assert "FAILED test_bad.py::test_hangs_with_its_daemons_running - Failed: Timeout" in out, out
    assert "FAILED test_bad.py::test_spins_forever - Failed: Timeout" in out, out
    assert "ERROR test_bad.py::test_passes_but_leaves_csnapd_running" in out, out
    assert "left processes running" in out, out
    assert "3 failed, 2 passed, 1 deselected, 1 error" in out, out
    assert len(pids) == 5, out
    assert [pid for pid in pids if _alive(pid)] == [], out


def test_a_hang_past_cancellation_ends_the_run_and_leaves_no_process(tmp_path: Path) -> None:
    done, pids = _inner(tmp_path, "-k", "cancellation_cannot_reach")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "ignored cancellation" in out and "Killing every process" in out, out
    assert len(pids) == 2, out
    assert [pid for pid in pids if _alive(pid)] == [], out
