"""The services tolerate the confinement the contrib/systemd units ask for:
under a read-only file system with one writable directory, no new
privileges, no writable-and-executable memory and the units' capability
bounding sets (see tests/ops/sandbox.py), the agent, csnapd and the
gateway start, report READY=1, take a snapshot, serve NBD reads and a
copy-on-write NBD write, and stop with exit status 0.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import trio

from tests.e2e.processes import ROOT, csnap
from tests.nbd.support import run
from tests.ops.support import LIMIT, listening, make_store, running

pytestmark = pytest.mark.e2e

#: CapabilityBoundingSet= of each unit.
AGENT_CAPS = ""
SERVICE_CAPS = "dac_override,dac_read_search"


def confined(writable: Path, caps: str, module: str, *args: str) -> list[str]:
    """argv for support.running(): `python -m module args` inside the sandbox."""
    return ["tests.ops.sandbox", str(writable), caps, "--", sys.executable, "-m", module, *args]


async def test_the_services_run_confined_as_their_units_ask(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "confining a service needs root (a private mount namespace)"
    for tool in ("setpriv", "qemu-io", "nbdinfo"):
        assert shutil.which(tool), f"{tool} is missing: scripts/test installs it"
    store, origin = make_store(tmp_path)
    sock, nbd_sock = tmp_path / "agent.sock", tmp_path / "nbd.sock"
    notify_name = f"@csnap-test-notify-{uuid.uuid4().hex}"
    async with (
        listening(notify_name) as notify,
        running(
            confined(tmp_path, AGENT_CAPS, "csnap_agent", "--socket", str(sock)),
            tmp_path / "agent.log",
        ) as agent,
    ):
        assert await agent.first_line() == f"listening unix:{sock}"
        async with running(
            confined(
                tmp_path, SERVICE_CAPS, "csnapd", str(store), str(origin), "--agent", str(sock)
            ),
            tmp_path / "csnapd.log",
            NOTIFY_SOCKET=notify_name,
        ) as csnapd:
            await notify.until("READY")
            created = await csnap(sock, "create", "1")
            assert created.returncode == 0, created.stderr
            nbd_args = ["--agent", str(sock), "--listen", "127.0.0.1:0", "--unix", str(nbd_sock)]
            async with running(
                confined(tmp_path, SERVICE_CAPS, "csnap_nbd", *nbd_args), tmp_path / "nbd.log"
            ) as nbd:
                url = (await nbd.first_line()).removeprefix("listening ")
                await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 64k", url)
                await run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", url)
                # The snapshot kept the origin as it was: zeros (a copy-out happened).
                await run("qemu-io", "-f", "raw", "-c", "read -P 0 0 64k", f"{url}/snap-1")
                assert await nbd.terminate() == 0
            done = await csnap(sock, "shutdown")
            assert done.returncode == 0, done.stderr
            with trio.fail_after(LIMIT):
                assert await csnapd.process.wait() == 0
        assert await agent.terminate() == 0
    for name in ("agent", "csnapd", "nbd"):
        text = (tmp_path / f"{name}.log").read_text()
        assert "Traceback" not in text and " ERROR " not in text, text[-3000:]
    assert "store closed cleanly" in (tmp_path / "csnapd.log").read_text()


PROBE = """
import mmap, pathlib, sys
writable, outside = map(pathlib.Path, sys.argv[1:3])
(writable / "probe").write_text("ok")
try:
    (outside / "probe").write_text("ok")
    print("outside writable")
except OSError as exc:
    print("outside", exc.strerror)
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    print("wx allowed")
except OSError as exc:
    print("wx", exc.strerror)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print("nonewprivs", status["NoNewPrivs"].strip(), "capbnd", status["CapBnd"].strip())
"""


async def test_the_sandbox_confines_as_it_says(tmp_path: Path) -> None:
    """The test above means something: inside the sandbox only the one
    directory is writable, W+X memory is refused, privileges are capped."""
    assert os.geteuid() == 0, "confining a service needs root (a private mount namespace)"
    writable, outside = tmp_path / "state", tmp_path / "elsewhere"
    writable.mkdir()
    outside.mkdir()
    sandbox = [sys.executable, str(ROOT / "tests" / "ops" / "sandbox.py")]
    probe = [sys.executable, "-c", PROBE, str(writable), str(outside)]
    result = await run(*sandbox, str(writable), "dac_override", "--", *probe)
    assert result.stdout.split("\n")[:3] == [
        "outside Read-only file system",
        "wx Permission denied",
        "nonewprivs 1 capbnd 0000000000000002",  # CAP_DAC_OVERRIDE alone
    ]
    assert (writable / "probe").read_text() == "ok"
    assert not (outside / "probe").exists()
