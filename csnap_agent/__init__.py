"""csnap_agent: a node's control point, and the csnap admin CLI.

The agent (csnap-agent) listens on a Unix socket: servers register with it
and wait to be started, data-path clients ask it where the server is, and
administrators reach the server through it. Which registered server is
active is its Coordinator's decision (LocalCoordinator by default).
"""

from __future__ import annotations

from csnap_agent.agent import Agent, Registration
from csnap_agent.coordinator import Candidate, Coordinator, LocalCoordinator

__all__ = ["Agent", "Registration", "Candidate", "Coordinator", "LocalCoordinator"]
