"""Campaign keys: which servers stand by, on every node, as etcd holds them.

A server waiting on standby campaigns through its node's agent for the
store's election (csnap_agent.etcd_coordinator). While it does, the agent
keeps a key for it under PREFIX/stores/NAME/candidates/NODE/PID, naming
its node, address and pid, bound to a lease of the election's TTL that
each campaign round renews. A candidate that wins, or whose agent drops
it, has its key deleted; one whose agent dies, or that stops campaigning,
loses it when the lease expires. `csnap server` lists these keys as the
standbys (docs/operations.md, "Running a cluster").

Every etcd error here is only logged, and no call waits for etcd longer
than KEY_TIMEOUT: the keys are for people to read, and the election must
not wait on them (a lease granted by a call cut short expires by itself).
"""

from __future__ import annotations

import json
import logging
import time

import trio

from csnap_agent.coordinator import Candidate
from csnap_agent.etcd import EtcdClient, EtcdError, KeyValue
from csnap_protocol import StandbyRecord

__all__ = ["Candidacies"]

log = logging.getLogger("csnap-agent.election")

#: Renew a candidate's lease when this share of its TTL has passed since the last renewal.
RENEW_AFTER = 1 / 3
#: Seconds a campaign key's upkeep may wait for etcd.
KEY_TIMEOUT = 0.5


class Candidacies:
    """This node's campaign keys, and everybody's read back."""

    def __init__(self, client: EtcdClient, *, store_key: str, node: str, ttl: int):
        self.client = client
        self.node = node
        self.ttl = ttl
        #: PREFIX/stores/NAME/candidates/
        self.prefix = f"{store_key.rstrip('/')}/candidates/".encode()
        #: (pid, address) -> (lease id, monotonic seconds of its last renewal).
        self._leases: dict[tuple[int, str], tuple[int, float]] = {}

    def standing_by(self, candidate: Candidate) -> bool:
        """Whether `candidate` has campaigned and lost, and keeps its key."""
        return (candidate.pid, candidate.address) in self._leases

    def _key(self, candidate: Candidate) -> bytes:
        return self.prefix + f"{self.node}/{candidate.pid}".encode()

    async def keep(self, candidate: Candidate) -> None:
        """`candidate` still campaigns: its key exists, its lease renewed."""
        now = time.monotonic()
        # Forget leases not renewed for a while: their candidates went, and
        # etcd has expired them.
        for known, (_lease, renewed) in list(self._leases.items()):
            if now - renewed > 2 * self.ttl:
                del self._leases[known]
        held = self._leases.get((candidate.pid, candidate.address))
        with trio.move_on_after(KEY_TIMEOUT):
            await self._keep(candidate, now, held)

    async def _keep(self, candidate: Candidate, now: float, held: tuple[int, float] | None) -> None:
        try:
            if held is not None:
                lease, renewed = held
                if now - renewed < self.ttl * RENEW_AFTER:
                    return
                if await self.client.keep_alive(lease) > 0:
                    self._leases[candidate.pid, candidate.address] = (lease, now)
                    return
            lease = await self.client.grant(self.ttl)
            await self.client.put(
                self._key(candidate), candidate_value(self.node, candidate), lease
            )
            self._leases[candidate.pid, candidate.address] = (lease, now)
        except EtcdError as exc:
            log.debug("cannot keep the campaign key of pid %d: %s", candidate.pid, exc)

    async def drop(self, candidate: Candidate) -> None:
        """`candidate` campaigns no more (it won): its key goes now."""
        held = self._leases.pop((candidate.pid, candidate.address), None)
        if held is None:
            return
        try:
            with trio.move_on_after(KEY_TIMEOUT):
                await self.client.revoke(held[0])  # and the key bound to it
        except EtcdError as exc:
            log.debug("cannot drop the campaign key of pid %d (it expires): %s", candidate.pid, exc)

    async def standbys(self) -> list[StandbyRecord]:
        """The candidates every node's agent keeps a campaign key for.

        Raises:
            EtcdError: etcd cannot be read.
        """
        return [r for r in map(_record, await self.client.get_prefix(self.prefix)) if r]


def candidate_value(node: str, candidate: Candidate) -> bytes:
    """What a candidate's key holds, in the election and among the campaign keys alike."""
    return json.dumps({"node": node, "address": candidate.address, "pid": candidate.pid}).encode()


def _record(kv: KeyValue) -> StandbyRecord | None:
    try:
        value = json.loads(kv.value)
        record = StandbyRecord(str(value["node"]), str(value["address"]), int(value["pid"]))
    except (ValueError, KeyError, TypeError):
        return None  # not ours: a key someone else put there
    fits = len(record.node) <= 256 and len(record.address) <= 256 and 0 <= record.pid < 1 << 32
    return record if fits else None
