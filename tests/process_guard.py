"""No test leaves a process running (a pytest plugin).

The test run makes itself a child subreaper, so a process orphaned by a
child that died (csnapd started by an agent that was killed, say) is
reparented to the run rather than to init, and stays visible. After every
test, each process the test started that is still there is killed and
reaped; a test that passed but left one running fails in its teardown,
naming it. At the end of the session nothing may remain at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import signal
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphaned descendants are reparented to this process (Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process on the machine."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), fields[0])
    return out


def descendants(root: int | None = None) -> dict[int, str]:
    """Live (not zombie) descendants of `root` (this process): pid -> command line."""
    root = os.getpid() if root is None else root
    table = _parents()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        if table[pid][1] != "Z":
            out[pid] = _command(pid)
    return out


def _command(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def reap() -> None:
    """Collect every exited child, so none stays a zombie."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def kill_descendants(keep: frozenset[int] = frozenset()) -> dict[int, str]:
    """SIGKILL every live descendant not in `keep`, reap them; what was killed."""
    killed: dict[int, str] = {}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = {pid: cmd for pid, cmd in descendants().items() if pid not in keep}
        if not found:
            break
        for pid, cmd in found.items():
            killed.setdefault(pid, cmd)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
        reap()
    reap()
    return killed


def pytest_configure(config: pytest.Config) -> None:
    become_subreaper()


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    before = frozenset(descendants())
    yield
    left = kill_descendants(keep=before)
    if left:
        # The test's process objects of what was killed warn when collected:
        # let that happen now, in this test, not in a later one.
        gc.collect()
    report = getattr(request.node, "_csnap_call_report", None)
    if left and report is not None and report.passed:
        names = "; ".join(f"{pid}: {cmd}" for pid, cmd in sorted(left.items()))
        pytest.fail(f"the test left processes running (now killed): {names}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item._csnap_call_report = report  # type: ignore[attr-defined]
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    left = kill_descendants()
    if left:
        names = "; ".join(f"{pid}: {cmd}" for pid, cmd in sorted(left.items()))
        print(f"\nprocesses of the test run were still running at its end (now killed): {names}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
