"""The protocol fuzzer: a real csnapd process on a real store file, several
raw protocol connections at once (tests/torture/wire_peer.py), and a plain
model of what every view must read (tests/torture/protocol_model.py).

Hypothesis drives the peers through well-typed but adversarial steps
(tests/torture/fuzz_requests.py): overlapping, repeated and out-of-range
chunks, no chunk at all, exactly max_chunks and one more, MAX_RANGES
ranges, replies too large for a peer's frame limit, releases of locks never
taken, uploads at odd times, max_in_flight requests and more in one go,
thousands of notices, peers that stop reading, identifies to deleted or
absent snapshots, creates and deletes among data-path traffic.

The test is the data-path client: it writes every write_ok'd origin chunk
to the origin file and every snapshot_write_ok'd chunk to the store file
where csnapd said, and reads snapshots where csnapd says. It checks:
  * after every step, csnapd runs and answers get_status on a new
    connection;
  * every reply is one the model allows (a request the documentation says
    must fail fails; one it must serve is served), and every snapshot read
    returns what the model says;
  * in an isolated step (nothing else in flight, no sweep running), an
    error reply did nothing: the store's status is unchanged, and no read
    lock was taken (an origin write to the named chunks is granted);
  * at the end, every live snapshot reads the model's contents, csnapd
    stops cleanly, and `csnap-check` finds the store clean.
Where the documentation leaves a reply open (overlapping ranges, uploads
outside a restart), any error is accepted, but it must have done nothing.

CSNAP_PROTOCOL_FUZZ_EXAMPLES and CSNAP_PROTOCOL_FUZZ_STEPS make the long
run (scripts/torture fuzz); the default is a bounded CI profile. Every
example starts a csnapd process, so shrinking a failure takes minutes: it
is off unless CSNAP_PROTOCOL_FUZZ_SHRINK=1, and the report shows the steps
of the failing run as they were drawn.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from csnap_protocol import (
    BarrierDone,
    CreateSnapshot,
    Error,
    FinishSnapshotRead,
    FinishUploadLock,
    GetStatus,
    Identify,
    Message,
    QueryMap,
    QuerySnapshotRead,
    QueryWrite,
    Role,
    StatusReply,
    UploadLock,
    encode_frame,
)
from tests.torture.fuzz_requests import (
    U64_MAX,
    Must,
    Ranges,
    chunks_of,
)
from tests.torture.fuzz_session import (
    DRAFTS,
    FRAME_LIMITS,
    ORIGIN_CHUNKS,
    PEERS_EVER,
    REPLY_WAIT,
    TAGS,
    Draft,
    Peer,
    Sent,
    Session,
    describe,
    request_id,
)
from tests.torture.wire_peer import PeerClosed, SendStalled, get_status

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("CSNAP_PROTOCOL_FUZZ_EXAMPLES", "12"))
STEPS = int(os.environ.get("CSNAP_PROTOCOL_FUZZ_STEPS", "25"))
SHRINK = os.environ.get("CSNAP_PROTOCOL_FUZZ_SHRINK") == "1"


class ProtocolFuzz(Session, RuleBasedStateMachine):
    """The session, driven by hypothesis."""

    # -- rules ---------------------------------------------------------------
    # Preconditions and draws depend only on what the test itself did, never
    # on which replies have arrived: hypothesis must be able to replay a run.

    @initialize(tag=TAGS, max_frame=FRAME_LIMITS)
    def scene(self, tag: int, max_frame: int) -> None:
        """Most steps should do real work: an admin, an origin client, a snapshot and its client."""
        with self.step():
            self.opened = 3
            admin = self.connect(Role.ADMIN, 1 << 20)
            origin = self.connect(Role.CLIENT, max_frame)
            self.send(origin, Identify(origin.wire.next_id(), 1, None), Must.SUCCEED)
            self.send(admin, CreateSnapshot(admin.wire.next_id(), tag, 0), Must.SUCCEED)
            self.settle()
            reader = self.connect(Role.CLIENT, max_frame)
            self.send(reader, Identify(reader.wire.next_id(), 2, tag), Must.SUCCEED)
            self.settle()

    #: Peers scene and connect_peer opened. Not len(self.peers): that also
    #: counts the short-lived peers of probes and of reply_beyond_frame,
    #: which open or not depending on replies (locks held, snapshots live
    #: after a burst whose requests csnapd took in either order), and a
    #: precondition that depends on replies makes hypothesis's replay draw
    #: differently (FlakyStrategyDefinition).
    opened = 0

    @precondition(lambda self: self.opened < PEERS_EVER)
    @rule(
        role=st.sampled_from([Role.CLIENT, Role.CLIENT, Role.ADMIN]),
        max_frame=FRAME_LIMITS,
        deaf=st.integers(0, 5).map(lambda n: n == 0),
        draft=DRAFTS,
    )
    def connect_peer(self, role: Role, max_frame: int, deaf: bool, draft: Draft) -> None:
        """A new peer; a client identifies at once (origin, a snapshot, or an absent tag)."""
        with self.step():
            self.opened += 1
            peer = self.connect(role, max_frame, deaf=deaf)
            if role is Role.CLIENT:
                tag = self.pick_tag(draft.target)
                if tag is not None and self.tag_in_flight(tag):
                    tag = None
                identify = Identify(peer.wire.next_id(), draft.client_id, tag)
                self.send(peer, identify, self.must(peer, identify))
            self.pump()

    @rule(drafts=st.lists(DRAFTS, min_size=1, max_size=6))
    def burst(self, drafts: list[Draft]) -> None:
        """Requests from several peers, sent back to back before anything is read."""
        with self.step():
            for draft in drafts:
                peer = self.peer_at(draft.peer, listening=False)
                message = None if peer is None else self.request(draft, peer)
                if peer is not None and message is not None:
                    self.send(peer, message, self.must(peer, message))
            self.pump(0.05)

    @rule(draft=DRAFTS)
    def alone(self, draft: Draft) -> None:
        """One request with nothing else in flight: an error reply must have done nothing."""
        with self.step():
            self.settle()
            peer = self.peer_at(draft.peer, listening=True)
            message = None if peer is None else self.request(draft, peer)
            if peer is not None and message is not None:
                self.isolated(peer, message)

    @rule(draft=DRAFTS, write=st.booleans())
    def reply_beyond_frame(self, draft: Draft, write: bool) -> None:
        """Alone, a snapshot query whose reply cannot fit a 4096-byte frame limit.

        Thousands of one-chunk ranges with gaps: the reply lists each one.
        Whatever csnapd answers, an error must have done nothing: no copy
        committed, no read lock taken.
        """
        with self.step():
            self.settle()
            live = sorted(self.snapshots)
            if not live or self.tag_in_flight(None):
                return
            peer = self.connect(Role.CLIENT, 4096)
            tag = live[draft.tag % len(live)]
            self.send(peer, Identify(peer.wire.next_id(), draft.client_id, tag), Must.SUCCEED)
            deadline = time.monotonic() + REPLY_WAIT
            while peer.identifying and time.monotonic() < deadline:
                self.pump(0.005)
            ranges = tuple((draft.held % 2 + 2 * i, 1) for i in range(1100))
            build = QueryWrite if write else QuerySnapshotRead
            self.isolated(peer, build(peer.wire.next_id(), ranges))
            self.close(peer)

    def isolated(self, peer: Peer, message: Message) -> None:
        """Send `message` with nothing else in flight; an error reply must have done nothing."""
        dropped = self.lease_drops()
        before = get_status(self.address(), self.csnapd.tls)
        held = set(+peer.locks) | peer.unsure
        request = request_id(message)
        self.send(peer, message, self.must(peer, message))
        deadline = time.monotonic() + REPLY_WAIT
        while request in peer.pending and not peer.wire.ended:
            if self.parked(peer, peer.pending[request]):
                return  # an origin write held back by a read lock
            if time.monotonic() > deadline:
                raise self.finding(f"{peer}: no answer to {describe(message)}")
            self.pump(0.005)
        error = self.errors.get((peer.number, request or 0))
        if error is None:
            return
        if isinstance(message, FinishSnapshotRead) and held & chunks_of(
            message.ranges, ORIGIN_CHUNKS
        ):
            return  # the documented partial release: the held chunks were let go
        self.check_no_effect(peer, message, error, before, lease_drops=dropped)

    def lease_drops(self) -> int:
        """Peers csnapd has dropped so far for silence past their lease (its log)."""
        text = (self.dir / "csnapd.log").read_text(errors="replace")
        return text.count("silent for more than its lease")

    def check_no_effect(
        self,
        peer: Peer,
        message: Message,
        error: Error,
        before: StatusReply,
        *,
        lease_drops: int,
    ) -> None:
        """`lease_drops`: lease_drops() before `before` was taken."""
        what = f"{peer}: {describe(message)} answered {error.name} ({error.message})"
        after = get_status(self.address(), self.csnapd.tls)
        # A peer dropped for silence past its lease leaves the store's client
        # registry in a commit of its own. csnapd logs the drop before that
        # commit, so the log, read after `after`, names every drop it shows.
        if self.lease_drops() > lease_drops:
            # That commit moves the journal's sequence on, and nothing else.
            before = dataclasses.replace(
                before, store=dataclasses.replace(before.store, sequence=after.store.sequence)
            )
        if (after.store, after.snapshots, after.deleting) != (
            before.store,
            before.snapshots,
            before.deleting,
        ):
            changed = {
                field.name: (getattr(before.store, field.name), getattr(after.store, field.name))
                for field in dataclasses.fields(before.store)
                if getattr(before.store, field.name) != getattr(after.store, field.name)
            }
            raise self.finding(f"{what}; yet the store changed: {changed or 'snapshots'}")
        if isinstance(message, QuerySnapshotRead | UploadLock):
            self.probe_unlocked(chunks_of(message.ranges, ORIGIN_CHUNKS), what)

    @rule(
        limit=st.sampled_from(["in flight", "notices", "zero count"]),
        draft=DRAFTS,
        count=st.sampled_from([255, 256, 257, 300, 2000]),
        barrier=st.sampled_from([0, U64_MAX]),
    )
    def at_a_limit(self, limit: str, draft: Draft, count: int, barrier: int) -> None:
        """One of the limits a single connection can reach."""
        with self.step():
            peer = self.peer_at(draft.peer, listening=limit == "zero count")
            if peer is None:
                return
            if limit == "in flight":
                self.pipeline_many(peer, count, draft.ranges)
            elif limit == "notices":
                self.notices(peer, count, barrier)
            else:
                self.forbidden_frame(peer, draft.ranges[0][0] if draft.ranges else 0)

    def pipeline_many(self, peer: Peer, count: int, ranges: Ranges) -> None:
        """max_in_flight requests and more in one write: the extra ones are refused, not lost."""
        first = peer.wire.next_id()
        for _ in range(count - 1):
            peer.wire.next_id()
        messages: list[Message]
        if peer.role is Role.ADMIN:
            messages = [GetStatus(first + i) for i in range(count)]
        else:
            messages = [QueryMap(first + i, tuple(ranges)) for i in range(count)]
        for message in messages:
            # The ones past max_in_flight get too_many_requests.
            must = self.must(peer, message)
            peer.pending[first] = Sent(message, Must.EITHER if must is Must.SUCCEED else must)
            first += 1
        try:
            peer.wire.send(*messages)
        except PeerClosed:
            self.gone(peer)
        self.pump(0.05)

    def notices(self, peer: Peer, count: int, barrier: int) -> None:
        """barrier_done notices no barrier asked for (they fill csnapd's queue, not its replies).

        Their numbers are ones no running barrier has (barriers count from
        1): an early answer to a real barrier would break the client's side
        of the contract, and the model with it.
        """
        if peer.role is not Role.CLIENT:
            return
        try:
            peer.wire.send(*[BarrierDone(barrier)] * count)
        except PeerClosed:
            self.gone(peer)
        self.pump(0.05)

    def forbidden_frame(self, peer: Peer, chunk: int) -> None:
        """A range of count 0 (the codec will not encode one): csnapd closes this peer only."""
        if peer.role is not Role.CLIENT:
            return
        peer.must_close = True
        try:
            peer.wire.send_bytes(encode_frame(QueryWrite(peer.wire.next_id(), ((chunk, 0),))))
        except PeerClosed:
            self.gone(peer)
            return
        deadline = time.monotonic() + REPLY_WAIT
        while not peer.wire.ended and time.monotonic() < deadline:
            self.pump(0.02)
        if not peer.wire.ended:
            raise self.finding(f"{peer} sent a range of count 0 and was not closed")

    @precondition(lambda self: any(p.deaf for p in self.peers))
    @rule(which=st.integers(0, PEERS_EVER - 1), count=st.sampled_from([100, 5000, 30000]))
    def deaf_flood(self, which: int, count: int) -> None:
        """A peer that never reads sends request after request: csnapd must only close it."""
        with self.step():
            deaf = [p for p in self.peers if p.deaf]
            peer = deaf[which % len(deaf)]
            build: type[GetStatus | FinishUploadLock]
            build = GetStatus if peer.role is Role.ADMIN else FinishUploadLock
            sent = 0
            try:
                while sent < count and not peer.wire.ended:
                    batch = [build(peer.wire.next_id()) for _ in range(min(1000, count - sent))]
                    peer.wire.send(*batch)
                    sent += len(batch)
            except PeerClosed:
                self.gone(peer)
            except SendStalled:
                pass  # csnapd stopped reading a peer that does not read: allowed

    @rule(which=st.integers(0, PEERS_EVER - 1))
    def hang_up(self, which: int) -> None:
        """A peer goes away, whatever it had in flight or locked."""
        with self.step():
            peer = self.peer_at(which, listening=False)
            if peer is not None:
                self.close(peer)
            self.pump(0.02)

    @invariant()
    def csnapd_serves(self) -> None:
        with self.step():
            problem = None
            try:
                get_status(self.address(), self.csnapd.tls)
            except (OSError, AssertionError, PeerClosed) as exc:
                problem = f"csnapd does not answer get_status on a new connection: {exc!r}"
            status = self.csnapd.exit_status()
            if status is not None:
                problem = f"csnapd exited with status {status}"
            if problem is not None:
                raise self.finding(problem)


def test_protocol_fuzz(tmp_path: Path) -> None:
    ProtocolFuzz.root = tmp_path
    ProtocolFuzz.examples = 0
    ProtocolFuzz.data_replies.clear()
    ProtocolFuzz.first_failure = None
    ProtocolFuzz.started = started = time.monotonic()
    try:
        run_state_machine_as_test(
            ProtocolFuzz,
            settings=settings(
                max_examples=EXAMPLES,
                stateful_step_count=STEPS,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                phases=tuple(Phase) if SHRINK else (Phase.explicit, Phase.reuse, Phase.generate),
            ),
        )
    finally:
        print(
            f"\nprotocol fuzz: {ProtocolFuzz.examples} examples"
            f" (write_snapshot_data answered: {dict(ProtocolFuzz.data_replies)})"
            f" in {time.monotonic() - started:.1f}s"
        )
        if ProtocolFuzz.first_failure is not None:
            seconds, examples, what = ProtocolFuzz.first_failure
            print(f"protocol fuzz: first failure after {seconds:.1f}s, example {examples}: {what}")
