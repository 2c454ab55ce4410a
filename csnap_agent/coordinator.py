"""Which registered server is active: the agent asks its coordinator.

A node's agent knows only the servers that registered with it. Whether one
of them may serve the store is a cluster-wide decision (exactly one server
per store, whichever node it runs on), so it lives behind this small
interface: the local coordinator, the default, activates a local server at
once when none is active; a cluster backend (a lock service, membership
events) implements the same three methods. The agent asks `elect` only
while no server is active, one candidate at a time.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

__all__ = ["Candidate", "Coordinator", "LocalCoordinator"]


@dataclass(frozen=True)
class Candidate:
    """A server that registered with this node's agent."""

    address: str
    store: str
    pid: int
    #: It says it is already serving (it re-registered after losing its agent).
    serving: bool


class Coordinator(abc.ABC):
    """Decides when a registered server becomes the active one."""

    @abc.abstractmethod
    async def elect(self, candidate: Candidate) -> bool:
        """Whether `candidate` may become active now; asked only while none is.

        May wait (for a cluster lock, say); the agent keeps serving meanwhile.
        """

    @abc.abstractmethod
    async def resign(self, candidate: Candidate) -> None:
        """The active server `candidate` went away: let another take over."""

    def remote_server(self) -> str | None:
        """The active server's address when it runs on another node, if known."""
        return None


class LocalCoordinator(Coordinator):
    """One node: the first server to register is started; others wait their turn."""

    async def elect(self, candidate: Candidate) -> bool:
        return True

    async def resign(self, candidate: Candidate) -> None:
        return None
