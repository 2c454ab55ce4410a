"""When csnapd takes a background step: the sweep's share of the engine task.

Owns the timing of the steps that csnapd takes between client batches (a
sweep step, a reserve squash or a revert step: a SweepTick), never whether
one is wanted (csnapd.dispatch says that). The rule (docs/rules.md, "the
sweep yields to clients"):

- idle: once QUIET_SECONDS have passed since the last client batch was
  answered and nothing is queued, steps run back to back;
- busy: otherwise a step runs once the background's share of the engine
  task's time has fallen to BUSY_SHARE: after a step that took d seconds
  (its work and its commit, whole even when lookups were answered during
  it: every other request waited for all of it), the next one waits until d * (1 / BUSY_SHARE
  - 1) seconds have passed since it ended. So clients keep at least
  1 - BUSY_SHARE of the time, and no client waits behind more than one step
  at a time;
- never between a client batch and its reply: a step due while requests
  are queued runs right after the batch that takes them is answered, in a
  batch of its own;
- no starvation: under any load the background gets its share, a step at
  most one batch after it is due, so a reclaim under a steady load takes
  about 1 / BUSY_SHARE times the time its steps take, not forever.

Sans-IO: the engine task (csnapd.serving) tells it what happened and asks
it what is due; time comes from the clock it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["BUSY_SHARE", "QUIET_SECONDS", "SweepSchedule"]

#: The background's share of the engine task's time while clients are busy:
#: what it gets at most, and under a steady load at least.
BUSY_SHARE = 1 / 3
#: Seconds after its last answer to clients at which csnapd counts as idle.
QUIET_SECONDS = 0.05


class SweepSchedule:
    """Whether a background step is due now, given the clients' recent work."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        #: When the last batch of client requests was answered (-inf: none yet).
        self._last_request = -float("inf")
        #: Before this time (of `clock`) a step is due only when idle.
        self._busy_turn = -float("inf")
        #: A step came due while requests were queued: it runs next.
        self.owed = False

    def requests_answered(self) -> None:
        """The engine task answered a batch holding client requests."""
        self._last_request = self._clock()

    def stepped(self, seconds: float) -> None:
        """A step just ended; it took `seconds`, its commit included."""
        self._busy_turn = self._clock() + seconds * (1 / BUSY_SHARE - 1)
        self.owed = False

    def due(self, *, queued: bool) -> bool:
        """Whether a step is due now; `queued`: client work waits in the queue.

        When it is due with work queued, the step is owed: it runs after
        the batch that takes the queue, before anything else.
        """
        now = self._clock()
        if now >= self._busy_turn:
            self.owed = queued
            return True
        return not queued and now - self._last_request >= QUIET_SECONDS

    def wait(self) -> float:
        """Seconds until a step falls due if no request comes meanwhile."""
        now = self._clock()
        due = min(self._busy_turn, self._last_request + QUIET_SECONDS)
        return max(0.0, due - now)
