"""The per-test time limit, made safe for trio tests (a pytest plugin).

pytest-timeout's "signal" method raises its failure from a SIGALRM handler
wherever the main thread happens to be. Inside `trio.run` that is usually
trio's own event loop, which it corrupts: the test fails, and so does every
later test ("Attempted to call run() from inside a run()"). Its "thread"
method ends the whole run with os._exit, leaving the processes a test
started running.

This plugin takes over setting the timer. Outside trio it fails the test as
pytest-timeout does. Inside trio it cancels every task of the run instead,
so the test's `finally` blocks and fixtures tear down (stopping what they
started), and the test fails with the timeout. A test still stuck
`GRACE_SECONDS` later is stuck in code a cancel cannot reach: if that is the
test's own code, the failure is raised there; if it is trio waiting on
something that ignores cancellation (a thread), the run cannot go on, so
every process the run started is killed and pytest exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import trio

from tests.process_guard import kill_descendants

#: How long a cancelled trio test gets to finish its clean-up.
GRACE_SECONDS = float(os.environ.get("CSNAP_TIMEOUT_GRACE", "15"))

_TRIO_DIR = str(Path(trio.__file__).resolve().parent)
_ENTRY_TASK = "<TrioToken.run_sync_soon task>"


def _message(item: pytest.Item, timeout: float) -> str:
    return f"Timeout (>{timeout}s): {item.nodeid} ran past its time limit"


def _dump_stacks() -> None:
    """Every thread's stack to stderr, so the hang can be found."""
    import faulthandler

    sys.stderr.write("\n+++++ time limit: stacks of every thread +++++\n")
    faulthandler.dump_traceback(all_threads=True)


def _in_trio_loop_code(frame: FrameType | None) -> bool:
    """Whether the interrupted frame is trio's own code (its event loop)."""
    return frame is not None and frame.f_code.co_filename.startswith(_TRIO_DIR)


def _cancel_every_task() -> None:
    """Cancel the run's main task and everything under it (from trio's loop)."""
    root = trio.lowlevel.current_root_task()
    if root is None:
        return
    for nursery in root.child_nurseries:
        # The nursery of trio's own run_sync_soon task must keep running.
        if not any(task.name == _ENTRY_TASK for task in nursery.child_tasks):
            nursery.cancel_scope.cancel()


class _Timer:
    """One test's alarm: cancel first (in trio), fail or exit later."""

    def __init__(self, item: pytest.Item, timeout: float):
        self.item = item
        self.timeout = timeout
        self.cancelled = False
        #: The trio run last cancelled for this test.
        self.cancelled_run: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        signal.signal(signal.SIGALRM, self._fire)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def stop(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        try:
            token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:
            token = None
        if token is None:
            _dump_stacks()
            pytest.fail(_message(self.item, self.timeout))
        if token is not self.cancelled_run:
            # The first alarm, or a new trio run since (hypothesis runs an
            # async test once per example): cancel it and give it time.
            if not self.cancelled:
                _dump_stacks()
            self.cancelled = True
            self.cancelled_run = token
            token.run_sync_soon(_cancel_every_task)
            signal.setitimer(signal.ITIMER_REAL, GRACE_SECONDS)
            return
        if not _in_trio_loop_code(frame):
            pytest.fail(_message(self.item, self.timeout) + " and ignored its cancellation")
        # os._exit loses whatever pytest captured: show it on the real stderr.
        capture = self.item.config.pluginmanager.getplugin("capturemanager")
        if capture is not None:
            capture.suspend_global_capture(in_=True)
        _dump_stacks()
        sys.stderr.write(
            f"\n{_message(self.item, self.timeout)}; it ignored cancellation for"
            f" {GRACE_SECONDS} s while trio waits on something that cannot be cancelled."
            " Killing every process the run started and exiting.\n"
        )
        sys.stderr.flush()
        kill_descendants()
        os._exit(1)


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None  # pytest-timeout's own handling
    timer = _Timer(item, settings.timeout)
    item.stash[_TIMER] = timer
    timer.start()
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    timer = item.stash.get(_TIMER, None)
    if timer is None:
        return None
    timer.stop()
    return True


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    """A trio test that was cancelled for its time limit fails with that reason."""
    try:
        result = yield
    except BaseException as exc:
        timer = item.stash.get(_TIMER, None)
        if timer is not None and timer.cancelled:
            raise pytest.fail.Exception(_message(item, timer.timeout)) from exc
        raise
    timer = item.stash.get(_TIMER, None)
    if timer is not None and timer.cancelled:
        pytest.fail(_message(item, timer.timeout) + " (and then swallowed the cancellation)")
    return result


_TIMER = pytest.StashKey[_Timer]()
