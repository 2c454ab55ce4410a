"""scripts/cluster stops cleanly: after its ready lines, SIGTERM stops every
process it started, leaves the store clean, removes its namespaces, links
and bridge and exits 0; Ctrl-C twice (SIGINT to its process group, as a
terminal sends it) stops it at once, exits 1 and leaves nothing behind either.

Each run gets a subnet of its own derived from the test's process id (so
parallel runs never share names), and its own data directory. Runs as root
(it creates namespaces) and fails, never skips, without.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_agent import store_is_clean

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cluster"
#: Seconds the cluster gets to print "cluster ready", and to stop.
READY_WITHIN = 60
STOPPED_WITHIN = 30


@dataclass
class Cluster:
    process: subprocess.Popen[bytes]
    data: Path
    out: Path
    err: Path
    #: The names the script gives its bridge, namespaces and links carry this.
    tag: str

    def logs(self) -> str:
        return f"stdout:\n{self.out.read_text()}\nstderr:\n{self.err.read_text()}"


def _subnet(variant: int) -> tuple[str, str]:
    """A /24 of this test process's own (the partition test uses 10.200-249),
    and the hex tag the script names things by."""
    pid = os.getpid()
    octets = (10, 150 + pid % 50, (pid + variant) % 250)
    return ".".join(map(str, octets)), "".join(f"{o:02x}" for o in octets)


def _leftovers(cluster: Cluster) -> list[str]:
    """Namespaces, links and processes of this cluster still present."""
    found: list[str] = []
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    found += [line for line in namespaces.stdout.splitlines() if cluster.tag in line]
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    found += [line for line in links.stdout.splitlines() if cluster.tag in line]
    marker = str(cluster.data).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:  # exited meanwhile
            continue
        if marker in command:
            shown = command.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"process {entry.name}: {shown}")
    return found


def _remove_leftovers(cluster: Cluster) -> None:
    """After a failure: what the script left, gone, so other tests do not meet it."""
    for line in _leftovers(cluster):
        if line.startswith("process "):
            pid = int(line.split()[1].rstrip(":"))
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for number in range(1, 10):
        subprocess.run(
            ["ip", "netns", "del", f"csnap-{cluster.tag}-n{number}"],
            capture_output=True,
            check=False,
        )
    subprocess.run(["ip", "link", "del", f"csbr{cluster.tag}"], capture_output=True, check=False)


def _wait_for(cluster: Cluster, path: Path, text: str) -> None:
    deadline = time.monotonic() + READY_WITHIN
    while text not in path.read_text():
        if cluster.process.poll() is not None:
            pytest.fail(f"scripts/cluster exited {cluster.process.returncode}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within {READY_WITHIN} s\n{cluster.logs()}")
        time.sleep(0.1)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def running_cluster(tmp_path: Path, nodes: int, variant: int) -> Iterator[Cluster]:
    """scripts/cluster started, up to its ready line; whatever is left at the
    end is removed (and the test has said so)."""
    if os.geteuid() != 0:
        pytest.fail("scripts/cluster creates network namespaces: run the suite as root")
    subnet, tag = _subnet(variant)
    data = tmp_path / "cluster"
    out, err = tmp_path / "cluster.out", tmp_path / "cluster.err"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [str(SCRIPT), "--nodes", str(nodes), "--subnet", subnet, "--data", str(data)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            # A process group of its own, as a terminal's foreground job has.
            start_new_session=True,
            # And Ctrl-C not ignored, as at a terminal: a suite started in the
            # background of a shell inherits SIGINT ignored, which a script
            # cannot trap (bash ignores such traps).
            preexec_fn=_default_sigint,
        )
    cluster = Cluster(process, data, out, err, tag)
    try:
        _wait_for(cluster, out, "cluster ready")
        yield cluster
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        _remove_leftovers(cluster)


def _stopped(cluster: Cluster) -> int:
    try:
        return cluster.process.wait(STOPPED_WITHIN)
    except subprocess.TimeoutExpired:
        pytest.fail(f"scripts/cluster still running {STOPPED_WITHIN} s after\n{cluster.logs()}")


def test_sigterm_stops_every_process_and_removes_the_network(tmp_path: Path) -> None:
    with running_cluster(tmp_path, nodes=2, variant=0) as cluster:
        ready = cluster.out.read_text()
        assert f"namespace csnap-{cluster.tag}-n2" in ready, ready
        assert _leftovers(cluster), "the test cannot see the cluster it started"
        cluster.process.send_signal(signal.SIGTERM)
        status = _stopped(cluster)
        left = _leftovers(cluster)
        assert status == 0, cluster.logs()
        assert not left, left
        assert "cluster stopped" in cluster.err.read_text()
        # The active csnapd stopped in order and marked its store clean.
        assert store_is_clean(cluster.data / "store.img")


def test_a_second_ctrl_c_stops_at_once(tmp_path: Path) -> None:
    with running_cluster(tmp_path, nodes=1, variant=1) as cluster:
        os.killpg(cluster.process.pid, signal.SIGINT)
        _wait_for(cluster, cluster.err, "stopping the cluster")
        os.killpg(cluster.process.pid, signal.SIGINT)
        status = _stopped(cluster)
        left = _leftovers(cluster)
        assert status == 1, cluster.logs()
        assert "stopping at once" in cluster.err.read_text(), cluster.logs()
        assert not left, left
