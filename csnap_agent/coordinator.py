"""Which registered server is active: the agent asks its coordinator.

A node's agent knows only the servers that registered with it. Whether one
of them may serve the store is a cluster-wide decision (exactly one server
per store, whichever node it runs on), so it lives behind this small
interface: the local coordinator, the default, activates a local server at
once when none is active; the etcd coordinator (csnap_agent.etcd_coordinator)
holds an election under a lease. The agent asks `elect` only while no
server is active, one candidate at a time.

A coordinator with leases hands the agent a Lease for the server it elected:
the fencing token and the deadline (CLOCK_MONOTONIC, nanoseconds) by which
the server must stop writing unless `renew` moves it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import trio

from csnap_protocol import StandbyRecord

__all__ = ["Candidate", "Coordinator", "CoordinatorError", "Lease", "LocalCoordinator"]


class CoordinatorError(Exception):
    """The coordinator could not do what was asked now (its backend is unreachable)."""


@dataclass(frozen=True)
class Lease:
    """What an elected server serves under."""

    #: Strictly increasing from one election to the next, cluster-wide.
    token: int
    #: CLOCK_MONOTONIC nanoseconds on this node: the server stops writing then.
    until_ns: int


@dataclass(frozen=True)
class Candidate:
    """A server that registered with this node's agent."""

    address: str
    store: str
    pid: int
    #: It says it is already serving (it re-registered after losing its agent).
    serving: bool


def _always() -> bool:
    return True


class Coordinator(abc.ABC):
    """Decides when a registered server becomes the active one."""

    #: `elect` may say no now and yes later: the agent asks again while
    #: servers wait, instead of waiting for a new registration.
    campaigns = False
    #: Seconds between two lease renewals of the active server.
    renew_interval = 1.0

    async def run(
        self,
        changed: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Background work until cancelled; `changed()` when the remote server changes."""
        task_status.started()
        await trio.sleep_forever()

    def lease(self) -> Lease | None:
        """The lease of the candidate `elect` last said yes to; None: no leases."""
        return None

    async def renew(self) -> Lease | None:
        """Renew the active server's lease; None once it is lost for good.

        Raises:
            CoordinatorError: not renewed this time (try again; the server
                stops at the deadline it has if this goes on).
        """
        return None

    @abc.abstractmethod
    async def elect(self, candidate: Candidate, present: Callable[[], bool] = _always) -> bool:
        """Whether `candidate` may become active now; asked only while none is.

        May wait (for a cluster lock, say); the agent keeps serving meanwhile.
        `present` says whether the candidate is still registered: one that
        left during the wait must not take the election with it.
        """

    @abc.abstractmethod
    async def resign(self, candidate: Candidate) -> None:
        """The active server `candidate` went away: let another take over."""

    def remote_server(self) -> str | None:
        """The active server's address when it runs on another node, if known."""
        return None

    #: This node's name in the cluster; empty for the local coordinator.
    node = ""

    def active_holder(self) -> tuple[str, int]:
        """The node the active server runs on and its token, if known; ("", 0) if not."""
        return "", 0

    async def standbys(self, waiting: Sequence[Candidate]) -> list[StandbyRecord]:
        """The servers standing by: `waiting`, this agent's own, and with a
        cluster coordinator those other nodes' agents campaign for."""
        return [StandbyRecord(self.node, c.address, c.pid) for c in waiting]


class LocalCoordinator(Coordinator):
    """One node: the first server to register is started; others wait their turn."""

    async def elect(self, candidate: Candidate, present: Callable[[], bool] = _always) -> bool:
        return present()

    async def resign(self, candidate: Candidate) -> None:
        return None
