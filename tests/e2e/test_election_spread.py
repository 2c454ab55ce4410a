"""The spreading rule of the etcd coordinator, in process against a real
etcd (docs/operations.md, "Running a cluster"): a candidate whose node
leads other stores waits before it campaigns and yields to a less loaded
node's candidate, a lone one still wins, and a standby with nobody better
placed takes over at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from csnap_agent.coordinator import Candidate
from csnap_agent.etcd import EtcdClient
from csnap_agent.etcd_coordinator import EtcdCoordinator
from tests.e2e.etcd import running_etcd
from tests.e2e.processes import poll

pytestmark = pytest.mark.e2e

TTL = 2


def deferred(caplog: pytest.LogCaptureFixture, node: str) -> list[str]:
    """The messages of `node`'s election.deferred records so far."""
    return [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "event", None) == "election.deferred" and getattr(r, "node", None) == node
    ]


@asynccontextmanager
async def coordinators(
    tmp_path: Path,
) -> AsyncIterator[dict[tuple[str, str], EtcdCoordinator]]:
    """A running coordinator for each of nodes a, b and stores one, two."""
    async with running_etcd(tmp_path) as etcd, EtcdClient([etcd.url]) as client:
        found = {}
        async with trio.open_nursery() as nursery:
            for node in ("a", "b"):
                for store in ("one", "two"):
                    coordinator = EtcdCoordinator(client, node=node, name=store, ttl=TTL)
                    await nursery.start(coordinator.run, lambda: None)
                    found[node, store] = coordinator
            yield found
            nursery.cancel_scope.cancel()


def candidate(pid: int) -> Candidate:
    return Candidate(f"127.0.0.1:{7000 + pid}", "store", pid, serving=False)


async def test_a_loaded_node_yields_to_a_less_loaded_one_and_a_standby_takes_over_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csnap-agent.election")
    async with coordinators(tmp_path) as elections:
        # Node a leads nothing yet: it campaigns at once for store one.
        assert await elections["a", "one"].elect(candidate(1))
        assert deferred(caplog, "a") == []

        # For store two node a, leading one store, waits T/4; node b's
        # candidate, campaigning meanwhile, wins.
        results: dict[str, bool] = {}

        async def elect_on_a() -> None:
            results["a"] = await elections["a", "two"].elect(candidate(2))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(elect_on_a)

                async def a_waits() -> bool:
                    return bool(deferred(caplog, "a"))

                await poll(a_waits, interval=0.01)
                assert await elections["b", "two"].elect(candidate(3))
        assert results == {"a": False}
        assert deferred(caplog, "a") == [
            f"campaigning for {candidate(2).address} in 0.50s: node a leads 1 other store(s)"
        ]
        assert elections["a", "two"].active_holder()[0] == "b"

        # Node b's candidate for store one stands by. When store one's
        # server goes, it takes over at once, though node b leads store
        # two: no standby on a less loaded node waits.
        assert not await elections["b", "one"].elect(candidate(4))
        assert elections["b", "one"].candidacies.standing_by(candidate(4))
        with trio.fail_after(10):
            await elections["a", "one"].resign(candidate(1))
            assert await elections["b", "one"].elect(candidate(4))
        assert deferred(caplog, "b") == []

        # A lone candidate on a loaded node still wins after its wait: node
        # b's server for store two resigns, and a fresh candidate there
        # (node b leads store one) waits, then wins with nobody else
        # campaigning.
        with trio.fail_after(10):
            await elections["b", "two"].resign(candidate(3))
            assert await elections["b", "two"].elect(candidate(5))
        assert deferred(caplog, "b") == [
            f"campaigning for {candidate(5).address} in 0.50s: node b leads 1 other store(s)"
        ]


async def test_a_candidate_gone_during_its_wait_leaves_the_store_to_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="csnap-agent.election")
    async with coordinators(tmp_path) as elections:
        assert await elections["a", "one"].elect(candidate(1))
        # Node a leads store one, so its candidate for store two waits; its
        # server goes away meanwhile.
        registered = [True]

        async def elect_on_a() -> bool:
            return await elections["a", "two"].elect(candidate(2), lambda: registered[0])

        async def a_waits() -> bool:
            return bool(deferred(caplog, "a"))

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                results: list[bool] = []

                async def run() -> None:
                    results.append(await elect_on_a())

                nursery.start_soon(run)
                await poll(a_waits, interval=0.01)
                registered[0] = False
        assert results == [False]
        # Neither the election key nor a campaign key names it: the store
        # is free for node b's candidate, which wins at once.
        assert elections["a", "two"].active_holder() == ("", 0)
        assert not elections["a", "two"].candidacies.standing_by(candidate(2))
        assert await elections["b", "two"].standbys([]) == []
        with trio.fail_after(10):
            assert await elections["b", "two"].elect(candidate(3))
