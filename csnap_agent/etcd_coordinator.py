"""The cluster coordinator: one election per store in etcd, under a lease.

Every node's agent for a store watches one key, PREFIX/stores/NAME/active.
An agent with a server on standby campaigns by granting a lease and putting
that key bound to it in a transaction that succeeds only if the key does not
exist. The winner's fencing token is the revision of that put (the key's
create revision): etcd revisions only grow, so every election's token is
larger than every earlier one's. The value names the node, the server's
address and its pid, so agents on other nodes send their clients there.

The agent renews the lease every `renew_interval` and tells its server a
deadline of FENCE_FRACTION of the lease's TTL after the renewal was *sent*:
etcd counts the TTL from when it received the renewal, later, so the server
stops writing at least (1 - FENCE_FRACTION) x TTL before etcd can expire
the lease and let another agent win (docs/operations.md, "Running a
cluster").

Resigning (the active server went away) waits until the last deadline given
to that server has passed, then deletes the key: a server whose connection
to its agent broke may still be running until then.

A candidate that campaigns and loses keeps a campaign key, so that every
node can list the standbys (csnap_agent.candidacy).

Spreading: before each campaign a candidate counts the other stores whose
active key names its own node, and waits SPREAD_STEP x TTL per such store
(at most SPREAD_CAP x TTL) for a candidate on a less loaded node to win
first; if nobody has won when the wait ends, it campaigns. A candidate that
already stands by skips the wait when no other node's standby for the
store runs on a node that leads fewer stores: nobody better placed waits.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Sequence

import trio

from csnap_agent.candidacy import Candidacies, candidate_value
from csnap_agent.coordinator import Candidate, Coordinator, CoordinatorError, Lease
from csnap_agent.etcd import EtcdClient, EtcdError, KeyValue
from csnap_protocol import StandbyRecord

__all__ = ["EtcdCoordinator", "FENCE_FRACTION", "DEFAULT_TTL", "SPREAD_CAP", "SPREAD_STEP"]

log = logging.getLogger("csnap-agent.election")

#: Seconds an elected server's lease lasts without renewal.
DEFAULT_TTL = 5
#: The share of the TTL, counted from sending a renewal, the server may serve.
FENCE_FRACTION = 2 / 3
#: Renewals per TTL: several, so that one lost renewal costs no fencing.
RENEWALS_PER_TTL = 6
#: Seconds a candidate waits for the key to go before `elect` says no (and
#: the agent asks again): bounds how long a missed watch event can delay it.
CAMPAIGN_WAIT = 1.0
#: Seconds `csnap server` waits for etcd to list the other nodes' standbys.
STANDBYS_WAIT = 2.0
#: The wait before a campaign, per other store the candidate's node leads,
#: as a share of the TTL: long enough for a less loaded node's candidate,
#: registered about as early, to win first.
SPREAD_STEP = 1 / 4
#: The longest wait before a campaign, as a share of the TTL: a failover
#: never waits longer than this for spreading.
SPREAD_CAP = 1 / 2
#: Seconds the read of every store's election may take; past it, no wait.
SPREAD_READ_WAIT = 0.5
#: Seconds between attempts to (re)start a broken watch.
WATCH_RETRY = 0.5
#: Seconds after which a quiet watch is started again from a fresh read: a
#: watch whose connection died without a word (a network that drops
#: everything) would otherwise leave this agent's view stale for good.
WATCH_REFRESH = 10.0


class EtcdCoordinator(Coordinator):
    """Elects this node's servers through etcd and follows the others'."""

    campaigns = True

    def __init__(
        self,
        client: EtcdClient,
        *,
        node: str,
        name: str = "store",
        prefix: str = "/csnap/",
        ttl: int = DEFAULT_TTL,
    ):
        self.client = client
        self.node = node
        self.name = name
        #: PREFIX/stores/: every store's election and campaign keys.
        self.stores_prefix = f"{prefix.rstrip('/')}/stores/".encode()
        self.key = self.stores_prefix + f"{name}/active".encode()
        self.candidacies = Candidacies(
            client, store_key=f"{prefix.rstrip('/')}/stores/{name}", node=node, ttl=ttl
        )
        self.ttl = ttl
        self.renew_interval = ttl / RENEWALS_PER_TTL
        #: The key as etcd last said it is (None: nobody is elected).
        self.holder: KeyValue | None = None
        self._holder_changed = trio.Event()
        self._changed: Callable[[], None] = lambda: None
        #: Our election: lease id, token, and the deadline last handed out.
        self._lease_id = 0
        self._lease: Lease | None = None
        self._last_until_ns = 0

    # -- following ---------------------------------------------------------------

    async def run(
        self,
        changed: Callable[[], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Follow the election key until cancelled, through etcd outages."""
        self._changed = changed
        started = False
        told = False
        while True:
            try:
                holder, revision = await self.client.get(self.key)
                self._set_holder(holder, changed)
                if not started:
                    started = True
                    task_status.started()
                if told:
                    log.info("etcd reachable again", extra={"event": "etcd.reachable"})
                    told = False
                with trio.move_on_after(WATCH_REFRESH) as quiet:
                    async with self.client.watch(self.key, revision + 1) as events:
                        async for event in events:
                            self._set_holder(None if event.deleted else event.kv, changed)
                            quiet.deadline = trio.current_time() + WATCH_REFRESH
                if quiet.cancelled_caught:
                    continue  # read afresh and watch again at once
            except EtcdError as exc:
                if not told:
                    log.warning("etcd: %s; retrying", exc, extra={"event": "etcd.unreachable"})
                    told = True
                if not started:
                    started = True
                    task_status.started()  # serve meanwhile: clients wait for a server
            await trio.sleep(WATCH_RETRY)

    def _set_holder(self, holder: KeyValue | None, changed: Callable[[], None]) -> None:
        before = self.holder
        self.holder = holder
        if (before and before.create_revision) != (holder and holder.create_revision):
            where = _describe(holder)
            log.info(
                "active server: %s",
                where or "none",
                extra={
                    "event": "election.changed",
                    "token": holder.create_revision if holder else 0,
                    "node": _field(holder, "node"),
                    "address": _field(holder, "address"),
                },
            )
            self._holder_changed.set()
            self._holder_changed = trio.Event()
            changed()

    def remote_server(self) -> str | None:
        holder = self.holder
        if holder is None or _field(holder, "node") == self.node:
            return None
        return _field(holder, "address") or None

    def active_holder(self) -> tuple[str, int]:
        """The node and token of the active server, wherever it runs."""
        holder = self.holder
        if holder is None:
            return "", 0
        return _field(holder, "node"), holder.create_revision

    def fencing_token(self) -> int | None:
        """The token of the active server's term, wherever it runs; None with
        nobody elected (the metrics report it: csnap_agent_fencing_token)."""
        holder = self.holder
        return holder.create_revision if holder is not None else None

    async def standbys(self, waiting: Sequence[Candidate]) -> list[StandbyRecord]:
        here = await super().standbys(waiting)
        listed: list[StandbyRecord] = []
        try:
            with trio.move_on_after(STANDBYS_WAIT):
                listed = await self.candidacies.standbys()
        except EtcdError as exc:
            log.debug("cannot list the campaign keys: %s", exc)
        # This node's from the agent itself: fresher than its keys.
        return here + [r for r in listed if r.node != self.node]

    # -- campaigning ---------------------------------------------------------------

    async def elect(self, candidate: Candidate, present: Callable[[], bool] = lambda: True) -> bool:
        won = await self._campaign(candidate, present)
        if won or not present():
            await self.candidacies.drop(candidate)
        else:
            await self.candidacies.keep(candidate)
        return won

    async def _campaign(self, candidate: Candidate, present: Callable[[], bool]) -> bool:
        if self.holder is not None:
            with trio.move_on_after(CAMPAIGN_WAIT):
                await self._holder_changed.wait()
        if self.holder is not None:
            # The watch may have missed the key's end: ask etcd itself.
            try:
                holder, _revision = await self.client.get(self.key)
            except EtcdError as exc:
                # Said once by run() as etcd.unreachable; not every second here.
                log.debug("cannot read the election: %s", exc)
                return False
            self._set_holder(holder, self._changed)
            if holder is not None:
                return False
        if not await self._spread(candidate) or not present():
            # Gone during the wait: its key would hold the store for nobody.
            return False
        value = candidate_value(self.node, candidate)
        lease_id = 0
        try:
            # Before the grant: etcd counts the new lease's TTL from when it
            # received the grant, no earlier than this.
            sent_ns = time.monotonic_ns()
            lease_id = await self.client.grant(self.ttl)
            created, current = await self.client.create(self.key, value, lease_id)
        except EtcdError as exc:
            log.warning("cannot campaign: %s", exc)
            if lease_id:
                # The put may have landed: its key goes with the lease.
                await self._revoke(lease_id)
            await trio.sleep(CAMPAIGN_WAIT)
            return False
        if not created or current is None:
            await self._revoke(lease_id)
            return False
        self._lease_id = lease_id
        self._lease = Lease(current.create_revision, self._deadline(sent_ns, self.ttl))
        self._last_until_ns = self._lease.until_ns
        log.info(
            "won the election for %s with token %d",
            candidate.address,
            current.create_revision,
            extra={
                "event": "election.won",
                "token": current.create_revision,
                "node": self.node,
                "address": candidate.address,
            },
        )
        return True

    async def _spread(self, candidate: Candidate) -> bool:
        """Wait, if this node leads other stores, for a less loaded node's
        candidate to win; whether the key is still absent (campaign now)."""
        delay, led = await self._spread_delay(candidate)
        if delay <= 0:
            return True
        log.info(
            "campaigning for %s in %.2fs: node %s leads %d other store(s)",
            candidate.address,
            delay,
            self.node,
            led,
            extra={"event": "election.deferred", "node": self.node, "address": candidate.address},
        )
        with trio.move_on_after(delay):
            # Listed as standing by meanwhile, so that other nodes see it.
            await self.candidacies.keep(candidate)
            while self.holder is None:
                await self._holder_changed.wait()
        return self.holder is None

    async def _spread_delay(self, candidate: Candidate) -> tuple[float, int]:
        """Seconds `candidate` waits before it campaigns, and how many other
        stores its node leads."""
        keys: list[KeyValue] = []
        try:
            with trio.move_on_after(SPREAD_READ_WAIT):
                keys = await self.client.get_prefix(self.stores_prefix)
        except EtcdError as exc:
            log.debug("cannot read the other stores' elections: %s", exc)
        led: dict[str, int] = {}  # node -> stores whose active server runs there
        rivals: set[str] = set()  # other nodes with a standby for this store
        own_candidates = f"{self.name}/candidates/".encode()
        for kv in keys:
            rest = kv.key[len(self.stores_prefix) :]
            store, _, kind = rest.partition(b"/")
            if kind == b"active" and store != self.name.encode():
                node = _field(kv, "node")
                led[node] = led.get(node, 0) + 1
            elif rest.startswith(own_candidates):
                node = _field(kv, "node")
                if node and node != self.node:
                    rivals.add(node)
        count = led.get(self.node, 0)
        if count == 0:
            return 0.0, 0
        if self.candidacies.standing_by(candidate) and all(
            led.get(rival, 0) >= count for rival in rivals
        ):
            return 0.0, count
        return min(count * SPREAD_STEP, SPREAD_CAP) * self.ttl, count

    def lease(self) -> Lease | None:
        return self._lease

    async def renew(self) -> Lease | None:
        lease = self._lease
        if lease is None:
            return None
        sent_ns = time.monotonic_ns()
        try:
            ttl = await self.client.keep_alive(self._lease_id)
        except EtcdError as exc:
            raise CoordinatorError(f"cannot renew the lease: {exc}") from exc
        if ttl <= 0:
            log.error(
                "the lease of token %d expired",
                lease.token,
                extra={"event": "election.lost", "token": lease.token},
            )
            self._lease = None
            return None
        self._lease = Lease(lease.token, self._deadline(sent_ns, min(ttl, self.ttl)))
        self._last_until_ns = self._lease.until_ns
        return self._lease

    async def resign(self, candidate: Candidate) -> None:
        lease, lease_id = self._lease, self._lease_id
        self._lease, self._lease_id = None, 0
        if lease is None:
            return
        # The server may still run until its deadline (only our link to it
        # is known to be gone): nobody else may be elected before then.
        await trio.sleep(max(0.0, (self._last_until_ns - time.monotonic_ns()) / 1e9))
        try:
            await self.client.delete_if_created(self.key, lease.token)
        except EtcdError as exc:
            log.warning("cannot resign (the lease expires on its own): %s", exc)
        await self._revoke(lease_id)
        log.info(
            "resigned token %d",
            lease.token,
            extra={"event": "election.resigned", "token": lease.token},
        )

    async def _revoke(self, lease_id: int) -> None:
        try:
            await self.client.revoke(lease_id)
        except EtcdError as exc:
            log.debug("cannot revoke lease %d (it expires on its own): %s", lease_id, exc)

    @staticmethod
    def _deadline(sent_ns: int, ttl: int) -> int:
        return sent_ns + math.floor(ttl * FENCE_FRACTION * 1e9)


def _field(holder: KeyValue | None, name: str) -> str:
    if holder is None:
        return ""
    try:
        value = json.loads(holder.value)
    except ValueError:
        return ""
    field = value.get(name) if isinstance(value, dict) else None
    return str(field) if field is not None else ""


def _describe(holder: KeyValue | None) -> str:
    if holder is None:
        return ""
    return (
        f"{_field(holder, 'address')} on node {_field(holder, 'node')},"
        f" token {holder.create_revision}"
    )


def parse_endpoints(text: str) -> Sequence[str]:
    """`URL[,URL...]` into a list of endpoints.

    Raises:
        ValueError: an empty list, or an endpoint that is not http(s)://HOST:PORT.
    """
    endpoints = [e.strip() for e in text.split(",") if e.strip()]
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    for endpoint in endpoints:
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"etcd endpoint {endpoint!r} is not an http:// or https:// URL")
    return endpoints
