"""scripts/run's supervisor (csnap_agent.demo) when an administrator stops
the server with `csnap shutdown`: the whole demo ends cleanly, exit status
0, with a line saying why and no error, and the store is left clean.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from csnapd.engine import FileDevice
from csnapd.engine.check import check_store
from tests.e2e.processes import ROOT, csnap
from tests.ops.support import LIMIT

pytestmark = pytest.mark.e2e


async def test_csnap_shutdown_ends_the_demo_cleanly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "csnap_agent.demo", "--data", str(data)]
    argv += ["--store-size", "64M", "--origin-size", "16M", "--nbd-listen", "127.0.0.1:0"]
    log = tmp_path / "run.log"
    with log.open("wb") as err:
        process = await trio.lowlevel.open_process(
            argv, stdout=subprocess.PIPE, stderr=err, env=env
        )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(3 * LIMIT):
            while b"\n" not in output:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, log.read_text()[-3000:]
                output += chunk
        assert output.startswith(b"ready: "), output
        done = await csnap(data / "agent.sock", "shutdown")
        assert done.returncode == 0, done.stderr
        with trio.fail_after(3 * LIMIT):
            status = await process.wait()
        text = log.read_text()
        assert status == 0, text[-3000:]
        assert "csnapd was shut down (csnap shutdown); stopping the rest" in text
        assert "nbd stopped" in text and "agent stopped" in text
        supervisor = [line for line in text.splitlines() if " csnap-run " in line]
        assert not [line for line in supervisor if " ERROR " in line], text[-3000:]
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
    device = FileDevice(data / "store.img", writable=False)
    try:
        assert check_store(device).exit_code == 0
    finally:
        device.close()
