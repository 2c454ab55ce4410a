"""csnap-agent's Prometheus metrics, read from the agent when scraped.

Connections, the registered servers by state, the active one (its address
and store as labels, since when), elections, failovers, admin requests
relayed by type, and the coordinator's view: which kind decides, and its
fencing token when it keeps one (a coordinator that fences implements
FencingCoordinator; the local one does not). docs/operations.md
("Monitoring") lists every family.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

from prometheus_client.metrics_core import Metric

from csnap_agent.agent import Agent
from csnap_common.metrics import (
    ScrapeCollector,
    counter,
    gauge,
    labelled_counter,
    labelled_gauge,
    service_registry,
)

__all__ = ["AgentMetrics", "FencingCoordinator", "SERVER_STATES"]

#: Every value of csnap_agent_servers' `state` label.
SERVER_STATES = ("active", "starting", "standby")


@runtime_checkable
class FencingCoordinator(Protocol):
    """A coordinator that hands the active server a fencing token."""

    def fencing_token(self) -> int | None:
        """The token of the active server's term, if one is held now."""


class AgentMetrics(ScrapeCollector):
    """The agent's collector and registry."""

    def __init__(self, agent: Agent):
        self.agent = agent
        self.registry = service_registry(self)

    def families(self) -> Iterator[Metric]:
        agent = self.agent
        yield gauge(
            "csnap_agent_connections", "Peers connected to the agent now", agent.connections
        )
        yield from self._servers()
        yield gauge(
            "csnap_agent_electing", "1 while an election runs (no server active)", agent.electing
        )
        yield counter(
            "csnap_agent_activations", "Servers this agent made active", agent.activations
        )
        yield counter(
            "csnap_agent_active_lost", "Active servers that went away (failovers)", agent.losses
        )
        yield labelled_counter(
            "csnap_agent_relayed_requests",
            "Admin requests relayed to the active server, by type",
            ["type"],
            [((kind,), count) for kind, count in agent.relayed.items()],
        )
        yield from self._coordinator()

    def _servers(self) -> Iterator[Metric]:
        """The registered servers by state, and the active one."""
        agent = self.agent
        states = dict.fromkeys(SERVER_STATES, 0)
        for registration in agent.servers:
            if registration is agent.active:
                states["active"] += 1
            elif registration is agent.starting:
                states["starting"] += 1
            else:
                states["standby"] += 1
        yield labelled_gauge(
            "csnap_agent_servers",
            "Servers registered with this agent, by state",
            ["state"],
            [((state,), count) for state, count in states.items()],
        )
        active = agent.active
        yield labelled_gauge(
            "csnap_agent_active_server",
            "1 while a server registered here is active (its address and store as labels)",
            ["address", "store"],
            [] if active is None else [((active.candidate.address, active.candidate.store), 1)],
        )
        yield gauge(
            "csnap_agent_active_since_seconds",
            "When the active server was started (seconds since 1970); 0 while none is",
            0 if active is None else active.since_ns / 1e9,
        )

    def _coordinator(self) -> Iterator[Metric]:
        """Which kind of coordinator decides, and its fencing token if it keeps one."""
        coordinator = self.agent.coordinator
        yield labelled_gauge(
            "csnap_agent_coordinator",
            "1, labelled with the kind of coordinator that decides which server is active",
            ["kind"],
            [((type(coordinator).__name__,), 1)],
        )
        if isinstance(coordinator, FencingCoordinator):
            token = coordinator.fencing_token()
            if token is not None:
                yield gauge(
                    "csnap_agent_fencing_token",
                    "The fencing token of the active server's term (only with a coordinator"
                    " that fences)",
                    token,
                )
