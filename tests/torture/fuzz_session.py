"""One protocol-fuzzing session: a csnapd process on a new store, the raw
peers talking to it (tests/torture/wire_peer.py), and the model of what
every view must read (tests/torture/protocol_model.py). The session is the
data-path client: it handles every reply as a client would (performing
granted writes on the origin and store files, reading where csnapd says,
answering barriers), checks each reply against what the documentation
requires, and at the end checks every snapshot, a clean stop and
`csnap-check`. tests/torture/test_protocol_fuzz.py drives it with
hypothesis.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from hypothesis import strategies as st

from csnap_client.reconnecting import TRUST_FRACTION
from csnap_format.mkcsnap import format_store
from csnap_protocol import (
    MAX_WRITE_DATA,
    Barrier,
    BarrierDone,
    ChangeUseCount,
    CreateSnapshot,
    DeleteSnapshot,
    Error,
    ErrorCode,
    FinishSnapshotRead,
    FinishUploadLock,
    GetStatus,
    Identified,
    Identify,
    ListSnapshots,
    MapReply,
    Message,
    Ok,
    OwnedReply,
    QueryMap,
    QueryOwned,
    QuerySnapshotRead,
    QueryWrite,
    Role,
    SnapshotDataWritten,
    SnapshotDeleted,
    SnapshotList,
    SnapshotReadOk,
    SnapshotReply,
    SnapshotWriteOk,
    StatusReply,
    UploadLock,
    WriteOk,
    WriteSnapshotData,
    touched_chunks,
)
from tests.server.support import CHUNK, label, pread, pwrite
from tests.torture.daemon import Csnapd, csnap_check, start_csnapd
from tests.torture.fuzz_requests import (
    Must,
    Ranges,
    chunks_of,
    outside,
    overlapping,
    ranges_strategy,
    total,
)
from tests.torture.protocol_model import Mismatch, OriginLog, SnapshotModel
from tests.torture.wire_peer import PeerClosed, WirePeer, get_status

ORIGIN_CHUNKS = 4096
STORE_SIZE = 192 << 20
#: csnapd's max_chunks (sent in identified).
MAX_CHUNKS = 4096
#: Seconds a create waits for origin clients: short, since some never answer.
BARRIER_TIMEOUT = 2.0
TAG_VALUES = tuple(range(6))
TAGS = st.sampled_from(TAG_VALUES)
FRAME_LIMITS = st.sampled_from([4096, 4096, 1 << 16, 1 << 20, 1 << 20, 1 << 20])
#: Most peers one example opens (the test's own probes and readers aside).
PEERS_EVER = 12
#: Bounds on waiting (a hang fails the test; these are not measurements).
REPLY_WAIT = 15.0
SETTLE_WAIT = 20.0
PROBE_WAIT = 3.0
#: Receive buffer of a peer that stops reading: csnapd's side fills sooner.
DEAF_BUFFER = 4096
#: Codes any query_write may get without having been wrong (nothing was done).
STORE_LIMITS = {ErrorCode.STORE_FULL, ErrorCode.METADATA_FULL}


@dataclass(frozen=True)
class Draft:
    """Everything one request may need, drawn before the test looks at any state.

    Hypothesis replays a run from its draws: what they are must not depend on
    timing (which replies have arrived), so each step draws the same shape and
    ProtocolFuzz.request() makes of it what fits the peer it lands on.
    """

    peer: int
    admin: str
    tag: int
    priority: int
    delta: int
    client: str
    #: Identify to: None (the origin), or see ProtocolFuzz.pick_tag().
    target: int | None
    client_id: int
    release_held: bool
    held: int
    ranges: Ranges


DRAFTS = st.builds(
    Draft,
    peer=st.integers(0, PEERS_EVER - 1),
    admin=st.sampled_from(["create"] * 3 + ["delete"] * 2 + ["use", "list", "status"]),
    tag=TAGS,
    priority=st.integers(-128, 127),
    delta=st.sampled_from([-1, 0, 1, 1, -(1 << 31), (1 << 31) - 1]),
    client=st.sampled_from(
        ["write"] * 4
        + ["data"] * 3
        + ["read"] * 4
        + ["map", "owned", "finish", "finish", "upload", "upload", "done", "id"]
    ),
    target=st.none() | st.integers(0, 2 * len(TAG_VALUES) - 1),
    client_id=st.integers(0, 3),
    release_held=st.booleans(),
    held=st.integers(0, 1 << 16),
    ranges=ranges_strategy(ORIGIN_CHUNKS, MAX_CHUNKS),
)


@dataclass(eq=False)
class Sent:
    """A request on its way: what was sent and what the model requires of it."""

    message: Message
    must: Must
    #: For a create: the origin log's length when it was sent.
    log_at: int = 0
    #: Creates and deletes sent or answered before it (see ProtocolFuzz.admin_changes).
    admin_at: int = 0
    #: The last version written when it was sent (ProtocolFuzz.next_version).
    version_at: int = 0
    #: time.monotonic() when it was sent: csnapd heard it no earlier.
    sent_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class Peer:
    """One of the test's connections to csnapd, and what the model knows of it."""

    number: int
    wire: WirePeer
    role: Role
    max_frame: int
    #: It never reads again (until it is closed).
    deaf: bool = False
    #: The snapshot it is bound to; None for the origin (once identified).
    target: SnapshotModel | None = None
    identified: bool = False
    identifying: bool = False
    #: Its snapshot was deleted: its queries must fail.
    detaching: bool = False
    pending: dict[int, Sent] = field(default_factory=dict)
    #: Read locks the model knows this connection holds, per chunk.
    locks: Counter[int] = field(default_factory=Counter)
    #: Chunks whose lock count the model cannot know (a release that failed).
    unsure: set[int] = field(default_factory=set)
    #: It sent a frame the protocol forbids: csnapd must close it.
    must_close: bool = False
    #: Seconds of silence after which csnapd drops it (from identified); 0: none.
    lease: float = 0.0

    def trusts(self, sent: Sent) -> bool:
        """Whether a grant or read plan answering `sent` may still be used, as
        a client judges it (docs/protocol.md, "Liveness"): csnapd drops a
        silent peer after its lease and lets others write what it held."""
        return not self.lease or time.monotonic() < sent.sent_at + self.lease * TRUST_FRACTION

    def __str__(self) -> str:
        bound = "admin" if self.role is Role.ADMIN else self.bound()
        return f"peer {self.number} ({bound}{', deaf' if self.deaf else ''})"

    __repr__ = __str__  # hypothesis prints the peers it drew

    def bound(self) -> str:
        if not self.identified:
            return "not identified"
        return "origin" if self.target is None else f"snapshot {self.target.tag}"


class Finding(AssertionError):
    """csnapd did something the protocol or the model forbids."""


def _write_initial_origin(origin: Path) -> None:
    with open(origin, "r+b") as f:
        f.write(b"".join(label(c, 0) for c in range(ORIGIN_CHUNKS)))


class Session:
    """A real csnapd, several raw peers, and the model; see the module comment."""

    #: Where each example makes its store (set by the test), and how many ran.
    root: Path
    examples = 0
    #: write_snapshot_data answered by reply type, over the whole run.
    data_replies: ClassVar[Counter[str]] = Counter()
    #: The first failure: (seconds since the test started, examples run, what).
    first_failure: tuple[float, int, str] | None = None
    started = 0.0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.dir = Path(tempfile.mkdtemp(dir=self.root, prefix="example-"))
        self.store, self.origin = self.dir / "store", self.dir / "origin"
        format_store(
            str(self.store),
            str(self.origin),
            store_size=STORE_SIZE,
            origin_size=ORIGIN_CHUNKS * CHUNK,
        )
        _write_initial_origin(self.origin)
        self.csnapd: Csnapd = start_csnapd(
            self.store,
            self.origin,
            self.dir / "csnapd.log",
            "--barrier-timeout",
            str(BARRIER_TIMEOUT),
        )
        self.log = OriginLog()
        self.versions = 0
        #: Live snapshots by tag (the newest generation of each tag).
        self.snapshots: dict[int, SnapshotModel] = {}
        #: Tags whose create, delete or use-count change was unanswered when
        #: its connection ended: whether it took effect is learnt at the end.
        self.indeterminate: set[int] = set()
        self.peers: list[Peer] = []
        self.numbers = 0
        #: Chunks any request named: the final check reads them all.
        self.named: set[int] = set(range(0, ORIGIN_CHUNKS, 97))
        self.broken = False
        #: Error replies seen, by (peer number, request id): the isolated step reads them.
        self.errors: dict[tuple[int, int], Error] = {}
        #: Counts creates and deletes sent and answered: a list is compared
        #: with the model only if none happened while it was on its way.
        self.admin_changes = 0
        #: Every request sent and every message handled, in order, beside
        #: csnapd's log: what a failure's report cannot show.
        self._trace = (self.dir / "trace.log").open("w", buffering=1)

    def trace(self, line: str) -> None:
        self._trace.write(f"{time.monotonic() - self.started:9.3f} {line}\n")

    # -- plumbing ----------------------------------------------------------

    @contextmanager
    def step(self) -> Iterator[None]:
        """Run a step; a failure in it skips the final checks (they would only add noise)."""
        try:
            yield
        except BaseException as exc:
            self.broken = True
            cls = type(self)
            if cls.first_failure is None:
                what = str(exc).partition("\n")[0][:300]
                cls.first_failure = (time.monotonic() - cls.started, cls.examples, what)
            raise

    def address(self) -> tuple[str, int]:
        return self.csnapd.address

    def open_peers(self) -> list[Peer]:
        return [p for p in self.peers if not p.wire.ended]

    def next_version(self) -> int:
        self.versions += 1
        return self.versions

    def finding(self, text: str) -> Finding:
        return Finding(f"{text}\n--- csnapd log ---\n{self.csnapd.log_tail()}")

    def send(self, peer: Peer, message: Message, must: Must) -> None:
        self.trace(f"-> {peer} {must.name} {traced(message)}")
        request = request_id(message)
        ranges = _ranges(message)
        if total(ranges) <= MAX_CHUNKS:
            self.named |= chunks_of(ranges, ORIGIN_CHUNKS)
        if isinstance(message, CreateSnapshot | DeleteSnapshot):
            self.admin_changes += 1
        if isinstance(message, DeleteSnapshot):
            self.delete_races(message.tag)
        if request is not None:
            peer.pending[request] = Sent(
                message, must, self.log.length, self.admin_changes, self.versions
            )
        if isinstance(message, Identify):
            peer.identifying = True
        if peer.deaf and isinstance(message, QuerySnapshotRead | UploadLock):
            # Its replies are never read: whatever it may have locked counts as locked.
            peer.unsure |= chunks_of(ranges, ORIGIN_CHUNKS)
        if peer.deaf and isinstance(message, WriteSnapshotData):
            self.unseen_data_write(peer, message)  # its reply is never read
        try:
            peer.wire.send(message)
        except PeerClosed:
            self.gone(peer)

    def delete_races(self, tag: int) -> None:
        """A delete of snapshot `tag` goes out while requests of its clients
        are in flight on their own connections: csnapd may take the delete
        first, so each of them may now end either way."""
        for peer in self.open_peers():
            if peer.target is not None and peer.target.tag == tag:
                for sent in peer.pending.values():
                    if sent.must is Must.SUCCEED:
                        sent.must = Must.EITHER

    def unseen_data_write(self, peer: Peer, message: WriteSnapshotData) -> None:
        """A write_snapshot_data whose reply the test will never read: csnapd
        writes its bytes itself, so they may be in the snapshot or not."""
        target = peer.target
        if target is None:
            # Sent before its identify was answered (never, if it does not
            # read): csnapd writes into the snapshot that identify names.
            tags = [
                sent.message.snapshot
                for sent in peer.pending.values()
                if isinstance(sent.message, Identify) and sent.message.snapshot is not None
            ]
            target = self.snapshots.get(tags[0]) if tags else None
        if target is None:
            return  # refused: an origin connection's, or one never identified
        for chunk, version in data_versions(message).items():
            target.maybe.setdefault(chunk, set()).add(version)

    def gone(self, peer: Peer) -> None:
        """The connection ended: csnapd dropped its locks and its unanswered requests.

        An unanswered create, delete or use-count change may or may not have
        taken effect (csnapd applies a request whose reply it then cannot send).
        """
        for sent in peer.pending.values():
            if isinstance(sent.message, CreateSnapshot | DeleteSnapshot | ChangeUseCount):
                self.indeterminate.add(sent.message.tag)
            if isinstance(sent.message, WriteSnapshotData):
                self.unseen_data_write(peer, sent.message)
        peer.wire.close()
        peer.pending.clear()
        peer.locks.clear()
        peer.unsure.clear()

    def close(self, peer: Peer) -> None:
        self.gone(peer)

    # -- what csnapd sends, handled as a client would -----------------------

    def pump(self, seconds: float = 0.0) -> None:
        """Read every listening peer; handle admin replies first (see protocol_model)."""
        deadline = time.monotonic() + seconds
        while True:
            listening = [p for p in self.open_peers() if not p.deaf]
            for peer in listening:
                peer.wire.pump()
            # A create's reply read in this round was sent before any write
            # granted after it: note the cut before performing those writes.
            for peer in sorted(listening, key=lambda p: p.role is not Role.ADMIN):
                for message in peer.wire.take():
                    self.handle(peer, message)
                if peer.wire.ended:
                    self.ended(peer)
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def ended(self, peer: Peer) -> None:
        """csnapd closed a peer: only one that broke the protocol gets an error first."""
        error = peer.wire.connection_error
        if error is not None and not peer.must_close:
            raise self.finding(f"{peer} was closed with {error.name}: {error.message}")
        self.gone(peer)

    def handle(self, peer: Peer, message: Message) -> None:
        self.trace(f"<- {peer} {traced(message)}")
        if isinstance(message, Barrier):
            # Every message before the notice is handled (writes performed):
            # this client's granted writes are done.
            self.send(peer, BarrierDone(message.barrier), Must.EITHER)
            return
        if isinstance(message, SnapshotDeleted):
            peer.detaching = True
            peer.locks.clear()
            peer.unsure.clear()
            return
        request = request_id(message)
        if request is None:
            return  # a connection error: see ended()
        sent = peer.pending.pop(request, None)
        if sent is None:
            raise self.finding(f"{peer}: a reply to request {request}, which is not in flight")
        if isinstance(message, Error):
            self.errors[(peer.number, request)] = message
            self.failed(peer, sent, message)
            return
        if sent.must is Must.FAIL:
            raise self.finding(
                f"{peer}: {describe(sent.message)} must fail, but got {message.TYPE}"
            )
        self.succeeded(peer, sent, message)

    def failed(self, peer: Peer, sent: Sent, error: Error) -> None:
        if sent.must is Must.SUCCEED and not (
            isinstance(sent.message, QueryWrite | WriteSnapshotData) and error.code in STORE_LIMITS
        ):
            raise self.finding(
                f"{peer}: {describe(sent.message)} must succeed,"
                f" but got {error.name}: {error.message}"
            )
        if error.code == ErrorCode.SNAPSHOT_DELETED:
            peer.detaching = True
        request = sent.message
        if isinstance(request, Identify):
            peer.identifying = False
        if isinstance(request, FinishSnapshotRead):
            # The documentation releases the chunks that were held; a stricter
            # csnapd may release none: the model no longer knows these counts.
            peer.unsure |= chunks_of(request.ranges, ORIGIN_CHUNKS)

    def succeeded(self, peer: Peer, sent: Sent, reply: Message) -> None:
        request = sent.message
        if isinstance(request, Identify) and isinstance(reply, Identified):
            self.identified(peer, request, reply)
        elif self.past_lease(peer, sent, reply) or self.wrote(peer, request, reply):
            pass
        elif isinstance(request, QuerySnapshotRead) and isinstance(reply, SnapshotReadOk):
            self.snapshot_read(peer, request.ranges, reply, sent.version_at)
        elif isinstance(request, QueryMap) and isinstance(reply, MapReply):
            self.check_map(peer, request.ranges, reply.ranges)
        elif isinstance(request, QueryOwned) and isinstance(reply, OwnedReply):
            self.check_owned(peer, request.ranges, reply.segments, reply.origin, sent.version_at)
        elif isinstance(request, FinishSnapshotRead) and isinstance(reply, Ok):
            peer.locks.subtract(_chunk_list(request.ranges))
            peer.locks += Counter()  # drop counts of zero
        elif isinstance(request, UploadLock) and isinstance(reply, Ok):
            peer.locks.update(_chunk_list(request.ranges))
        elif isinstance(request, FinishUploadLock) and isinstance(reply, Ok):
            pass
        elif isinstance(request, CreateSnapshot | DeleteSnapshot | ChangeUseCount):
            self.admin_reply(peer, sent, reply)
        elif isinstance(request, ListSnapshots | GetStatus) and isinstance(
            reply, SnapshotList | StatusReply
        ):
            self.check_list(peer, sent, [s.tag for s in reply.snapshots])
        else:
            raise self.finding(f"{peer}: {describe(request)} answered by {describe(reply)}")

    def past_lease(self, peer: Peer, sent: Sent, reply: Message) -> bool:
        """A grant or read plan that came past the lease, which a client does
        not use (csnapd may have dropped this peer and let others change what
        it held): True once the model has done what such a client does."""
        if peer.trusts(sent):
            return False
        if isinstance(sent.message, QueryWrite | WriteSnapshotData) and isinstance(
            reply, WriteOk | SnapshotWriteOk
        ):
            self.trace(f"   {peer}: {reply.TYPE} came past the lease: given back unused")
            return True
        if isinstance(reply, SnapshotReadOk):
            self.trace(f"   {peer}: {reply.TYPE} came past the lease: not read")
            peer.locks.update(_chunk_list(reply.origin))
            return True
        return False

    def wrote(self, peer: Peer, request: Message, reply: Message) -> bool:
        """Whether `reply` answered a write, which the model has now done."""
        if isinstance(request, QueryWrite) and isinstance(reply, WriteOk):
            self.origin_write(peer, request.ranges)
        elif isinstance(request, QueryWrite) and isinstance(reply, SnapshotWriteOk):
            self.snapshot_write(peer, request.ranges, reply.segments)
        elif isinstance(request, WriteSnapshotData) and isinstance(
            reply, SnapshotDataWritten | SnapshotWriteOk
        ):
            self.snapshot_data(peer, request, reply)
        else:
            return False
        return True

    def identified(self, peer: Peer, request: Identify, reply: Identified) -> None:
        peer.identifying = False
        peer.lease = reply.lease_ms / 1000
        if (reply.origin_chunks, reply.max_chunks, reply.chunk_size) != (
            ORIGIN_CHUNKS,
            MAX_CHUNKS,
            CHUNK,
        ):
            raise self.finding(f"{peer}: identified with the wrong geometry: {reply!r}")
        if request.snapshot is not None:
            target = self.snapshots.get(request.snapshot)
            if target is None:
                raise self.finding(f"{peer}: identified to snapshot {request.snapshot}, not live")
            peer.target = target
        peer.identified = True

    def origin_write(self, peer: Peer, ranges: Ranges) -> None:
        """Granted: write every chunk asked about, as the client would."""
        for chunk in sorted(chunks_of(ranges, ORIGIN_CHUNKS)):
            version = self.next_version()
            pwrite(self.origin, chunk, label(chunk, version))
            self.log.write(chunk, version)

    def snapshot_write(self, peer: Peer, ranges: Ranges, segments: Ranges3) -> None:
        asked = chunks_of(ranges, ORIGIN_CHUNKS)
        given = [chunk + k for chunk, count, _ in segments for k in range(count)]
        if sorted(given) != sorted(asked) or len(given) != len(set(given)):
            raise self.finding(
                f"{peer}: snapshot_write_ok for {_short(ranges)} names chunks"
                f" {_short(tuple((c, n) for c, n, _ in segments))}"
            )
        assert peer.target is not None
        for chunk, count, store_chunk in segments:
            for k in range(count):
                version = self.next_version()
                pwrite(self.store, store_chunk + k, label(chunk + k, version))
                peer.target.own.setdefault(chunk + k, []).append(version)

    def snapshot_data(
        self, peer: Peer, request: WriteSnapshotData, reply: SnapshotDataWritten | SnapshotWriteOk
    ) -> None:
        """csnapd wrote the labels the request carries into the snapshot's new
        copies, or (snapshot_write_ok) the client writes them where told."""
        ranges = _ranges(request)
        given = [chunk + k for chunk, count, _ in reply.segments for k in range(count)]
        if sorted(given) != sorted(chunks_of(ranges, ORIGIN_CHUNKS)) or len(given) != len(
            set(given)
        ):
            raise self.finding(
                f"{peer}: {reply.TYPE} for {_short(ranges)} names chunks"
                f" {_short(tuple((c, n) for c, n, _ in reply.segments))}"
            )
        assert peer.target is not None
        type(self).data_replies[reply.TYPE] += 1
        first = request.offset // CHUNK
        versions = data_versions(request)
        for chunk, count, store_chunk in reply.segments:
            for k in range(count):
                if isinstance(reply, SnapshotWriteOk):
                    at = (chunk + k - first) * CHUNK
                    pwrite(self.store, store_chunk + k, request.data[at : at + CHUNK])
                peer.target.own.setdefault(chunk + k, []).append(versions[chunk + k])

    def snapshot_read(
        self, peer: Peer, ranges: Ranges, reply: SnapshotReadOk, sent_after: int
    ) -> None:
        """Read where told and check it against the model (`sent_after`: the
        last version written when the read was sent); the origin ranges are
        now locked."""
        assert peer.target is not None
        reads = self.read_plan(reply)
        asked = chunks_of(ranges, ORIGIN_CHUNKS)
        if set(reads) != asked:
            raise self.finding(
                f"{peer}: snapshot_read_ok for {_short(ranges)} covers other chunks:"
                f" missing {sorted(asked - set(reads))[:8]}, extra {sorted(set(reads) - asked)[:8]}"
            )
        peer.locks.update(_chunk_list(reply.origin))
        if not peer.target.deleted:
            try:
                peer.target.check(self.log, reads, sent_after)
            except Mismatch as exc:
                raise self.finding(f"{peer}: {exc}") from exc

    def read_plan(self, reply: SnapshotReadOk) -> dict[int, bytes]:
        reads: dict[int, bytes] = {}
        for chunk, count, store_chunk in reply.store:
            data = pread(self.store, store_chunk, count)
            for k in range(count):
                reads[chunk + k] = data[k * CHUNK : (k + 1) * CHUNK]
        for chunk, count in reply.origin:
            data = pread(self.origin, chunk, count)
            for k in range(count):
                reads[chunk + k] = data[k * CHUNK : (k + 1) * CHUNK]
        return reads

    def check_owned(
        self,
        peer: Peer,
        asked: Ranges,
        segments: tuple[tuple[int, int, int], ...],
        origin: Ranges,
        sent_after: int,
    ) -> None:
        """Owned addresses: inside what was asked, ascending, holding the snapshot's
        data (`sent_after`: as for snapshot_read); the origin ranges inside what
        was asked and apart from them."""
        spans = tuple((chunk, count) for chunk, count, _ in segments)
        named = chunks_of(asked, ORIGIN_CHUNKS)
        if not chunks_of(spans, ORIGIN_CHUNKS) <= named or overlapping(spans):
            raise self.finding(f"{peer}: owned {_short(spans)} for {_short(asked)}")
        if not chunks_of(origin, ORIGIN_CHUNKS) <= named or overlapping((*spans, *origin)):
            raise self.finding(f"{peer}: owned origin {_short(origin)} for {_short(asked)}")
        if list(spans) != sorted(spans):
            raise self.finding(f"{peer}: owned {_short(spans)} out of order")
        assert peer.target is not None
        if not peer.target.deleted:
            try:
                reads = self.read_plan(SnapshotReadOk(0, segments, ()))
                peer.target.check(self.log, reads, sent_after)
            except Mismatch as exc:
                raise self.finding(f"{peer}: owned: {exc}") from exc

    def check_map(self, peer: Peer, asked: Ranges, answer: Ranges) -> None:
        named = chunks_of(asked, ORIGIN_CHUNKS)
        copied = chunks_of(answer, ORIGIN_CHUNKS)
        if not copied <= named or overlapping(answer) or list(answer) != sorted(answer):
            raise self.finding(f"{peer}: map {_short(answer)} for {_short(asked)}")

    def admin_reply(self, peer: Peer, sent: Sent, reply: Message) -> None:
        request = sent.message
        if not isinstance(reply, SnapshotReply):
            raise self.finding(f"{peer}: {describe(request)} answered by {describe(reply)}")
        self.admin_changes += 1
        record = reply.snapshot
        if isinstance(request, CreateSnapshot):
            self.snapshots[request.tag] = SnapshotModel(
                request.tag, lo=sent.log_at, hi=self.log.length
            )
        elif isinstance(request, DeleteSnapshot):
            deleted = self.snapshots.pop(request.tag)
            deleted.deleted = True
            if record.state != "deleting":
                raise self.finding(f"{peer}: delete answered with state {record.state}")
        elif isinstance(request, ChangeUseCount):
            snapshot = self.snapshots[request.tag]
            snapshot.use_count += request.delta
            if record.use_count != snapshot.use_count:
                raise self.finding(
                    f"{peer}: use count {record.use_count}, model {snapshot.use_count}"
                )

    def check_list(self, peer: Peer, sent: Sent, tags: list[int]) -> None:
        if self.admin_in_flight() or sent.admin_at != self.admin_changes:
            return  # creates or deletes on their way meanwhile
        # A create or delete left unanswered by a connection that ended (a
        # deaf admin csnapd closed, say) may or may not have taken effect:
        # its tag is left to the final check (resolve_indeterminate).
        unsure = self.indeterminate
        listed = sorted(tag for tag in tags if tag not in unsure)
        if listed != sorted(tag for tag in self.snapshots if tag not in unsure):
            raise self.finding(
                f"{peer}: csnapd lists snapshots {tags}, model {self.snapshots}"
                f" (not known: {sorted(unsure)})"
            )

    def admin_in_flight(self) -> bool:
        return any(
            isinstance(s.message, CreateSnapshot | DeleteSnapshot)
            for p in self.open_peers()
            for s in p.pending.values()
        )

    # -- what the model requires --------------------------------------------

    def must(self, peer: Peer, message: Message) -> Must:
        """What the documentation requires of `message` from `peer`, now."""
        if peer.role is Role.ADMIN:
            return self.must_admin(message)
        if isinstance(message, Identify):
            return self.must_identify(peer, message)
        if isinstance(message, FinishUploadLock):
            return Must.EITHER
        return self.must_ranges(peer, message, _ranges(message))

    def must_identify(self, peer: Peer, message: Identify) -> Must:
        if peer.identified:
            return Must.FAIL
        if peer.identifying:
            return Must.EITHER
        if message.snapshot is None or message.snapshot in self.snapshots:
            return Must.SUCCEED
        return Must.FAIL

    def must_ranges(self, peer: Peer, message: Message, ranges: Ranges) -> Must:
        """A data-path request naming `ranges`."""
        if not ranges:
            # "No chunk at all" is refused for queries; a release or an
            # upload of nothing has nothing to do either way.
            releases = isinstance(message, FinishSnapshotRead | UploadLock)
            return Must.EITHER if releases else Must.FAIL
        if outside(ranges, ORIGIN_CHUNKS) or total(ranges) > MAX_CHUNKS:
            return Must.FAIL
        if peer.identifying:
            return Must.EITHER
        if not peer.identified or peer.detaching or (peer.target and peer.target.deleted):
            return Must.FAIL
        snapshot_only = isinstance(
            message, QuerySnapshotRead | QueryOwned | UploadLock | WriteSnapshotData
        )
        if snapshot_only and peer.target is None:
            return Must.FAIL
        if isinstance(message, FinishSnapshotRead):
            if peer.unsure & chunks_of(ranges, ORIGIN_CHUNKS):
                return Must.EITHER
            not_held = Counter(_chunk_list(ranges)) - peer.locks
            return Must.FAIL if not_held else Must.SUCCEED
        if isinstance(message, UploadLock) or overlapping(ranges):
            return Must.EITHER
        if peer.max_frame < (1 << 20):
            return Must.EITHER  # the reply may not fit: request_too_large
        if self.tag_in_flight(None if peer.target is None else peer.target.tag):
            return Must.EITHER
        return Must.SUCCEED

    def must_admin(self, message: Message) -> Must:
        if isinstance(message, CreateSnapshot):
            # Too many snapshots, or a barrier an origin client never answers.
            return Must.FAIL if message.tag in self.snapshots else Must.EITHER
        if isinstance(message, DeleteSnapshot):
            snapshot = self.snapshots.get(message.tag)
            if snapshot is None or snapshot.use_count:
                return Must.FAIL
            return Must.SUCCEED
        if isinstance(message, ChangeUseCount):
            snapshot = self.snapshots.get(message.tag)
            if snapshot is None or not 0 <= snapshot.use_count + message.delta < 1 << 32:
                return Must.FAIL
            return Must.SUCCEED
        return Must.SUCCEED

    def tag_in_flight(self, tag: int | None) -> bool:
        """An admin request or identify about `tag` is unanswered (its outcome unknown)."""
        if self.indeterminate and (tag is None or tag in self.indeterminate):
            return True
        for peer in self.open_peers():
            for sent in peer.pending.values():
                message = sent.message
                if isinstance(message, CreateSnapshot | DeleteSnapshot | ChangeUseCount) and (
                    tag is None or message.tag == tag
                ):
                    return True
                if isinstance(message, Identify) and tag is not None and message.snapshot == tag:
                    return True
        return False

    # -- requests ---------------------------------------------------------

    def request(self, draft: Draft, peer: Peer) -> Message | None:
        """The request `draft` makes for `peer` (by its role), or None if none fits now."""
        request = peer.wire.next_id()
        if peer.role is Role.ADMIN:
            tag = draft.tag
            if draft.admin in ("create", "delete", "use") and self.tag_in_flight(tag):
                return None  # its outcome would decide the model: one at a time
            if draft.admin == "create":
                return CreateSnapshot(request, tag, draft.priority)
            if draft.admin == "delete":
                return DeleteSnapshot(request, tag)
            if draft.admin == "use":
                return ChangeUseCount(request, tag, draft.delta)
            return ListSnapshots(request) if draft.admin == "list" else GetStatus(request)
        if draft.client == "id":
            target = self.pick_tag(draft.target)
            if target is not None and self.tag_in_flight(target):
                return None
            return Identify(request, draft.client_id, target)
        if draft.client == "done":
            return FinishUploadLock(request)
        if draft.client == "finish" and peer.locks and draft.release_held:
            held = sorted(peer.locks)
            return FinishSnapshotRead(request, ((held[draft.held % len(held)], 1),))
        if draft.client in ("write", "data") and self.writing_data(peer, draft.client == "data"):
            # Which of two writes to one chunk took effect last is known only
            # when a data write (csnapd writes it) has nothing to race with.
            return None
        if draft.client == "data":
            # Whole chunks of labels, as many as one message carries.
            start, count = draft.ranges[0] if draft.ranges else (0, 1)
            count = min(count, MAX_WRITE_DATA // CHUNK, max(1, ORIGIN_CHUNKS - start))
            # Far past the origin, but an offset the wire can carry (u64).
            start = min(start, (1 << 64) // CHUNK - count)
            data = b"".join(label(start + k, self.next_version()) for k in range(count))
            return WriteSnapshotData(request, start * CHUNK, data)
        build = {
            "write": QueryWrite,
            "read": QuerySnapshotRead,
            "map": QueryMap,
            "owned": QueryOwned,
            "finish": FinishSnapshotRead,
            "upload": UploadLock,
        }[draft.client]
        return build(request, tuple(draft.ranges))

    def writing_data(self, peer: Peer, any_write: bool) -> bool:
        """Whether a write_snapshot_data (or, with `any_write`, any write) to
        `peer`'s snapshot is in flight."""
        if peer.target is None:
            return False
        kinds = (QueryWrite, WriteSnapshotData) if any_write else (WriteSnapshotData,)
        return any(
            isinstance(sent.message, kinds)
            for other in self.open_peers()
            if other.target is peer.target
            for sent in other.pending.values()
        )

    def pick_tag(self, pick: int | None) -> int | None:
        """A tag for an identify: an index below len(TAG_VALUES) names any tag, above a live one."""
        if pick is None:
            return None
        live = sorted(self.snapshots)
        if pick < len(TAG_VALUES) or not live:
            return TAG_VALUES[pick % len(TAG_VALUES)]
        return live[pick % len(live)]

    def peer_at(self, index: int, *, listening: bool) -> Peer | None:
        """The peer an index drew, if it is still open (and reads, if `listening`)."""
        peer = self.peers[index % len(self.peers)]
        if peer.wire.ended or (listening and peer.deaf):
            return None
        return peer

    def connect(self, role: Role, max_frame: int, *, deaf: bool = False) -> Peer:
        self.numbers += 1
        wire = WirePeer(
            self.address(),
            role,
            self.csnapd.tls,
            max_frame=max_frame,
            receive_buffer=DEAF_BUFFER if deaf else None,
            reads=not deaf,
        )
        if not wire.wait_open(REPLY_WAIT):
            raise self.finding(f"no hello for a new {role.value}: {wire.connection_error!r}")
        peer = Peer(self.numbers, wire, role, max_frame, deaf=deaf)
        self.peers.append(peer)
        return peer

    # -- settling, and the isolated check ----------------------------------

    def parked(self, peer: Peer, sent: Sent) -> bool:
        """An origin write the model expects csnapd to hold back (a read lock)."""
        if not isinstance(sent.message, QueryWrite) or peer.target is not None:
            return False
        named = chunks_of(sent.message.ranges, ORIGIN_CHUNKS)
        for other in self.open_peers():
            if other.unsure & named or any(other.locks[c] > 0 for c in named):
                return True
        return False

    def settle(self) -> None:
        """Until nothing but parked writes and deaf peers' requests is in flight, no sweep runs."""
        deadline = time.monotonic() + SETTLE_WAIT
        while True:
            self.pump(0.02)
            for peer in self.open_peers():
                if peer.detaching or (peer.deaf and peer.target and peer.target.deleted):
                    self.close(peer)  # told to go; and the sweep waits for it
            waiting = [
                (peer, sent)
                for peer in self.open_peers()
                if not peer.deaf
                for sent in peer.pending.values()
                if not self.parked(peer, sent)
            ]
            deleting = get_status(self.address(), self.csnapd.tls).deleting
            if not waiting and not deleting:
                return
            if time.monotonic() > deadline:
                text = "; ".join(f"{p}: {describe(s.message)}" for p, s in waiting[:5])
                raise self.finding(
                    f"after {SETTLE_WAIT}s still unanswered: {text or 'none'};"
                    f" still sweeping: {[s.tag for s in deleting]}"
                )

    def probe_unlocked(self, chunks: set[int], why: str) -> None:
        """An origin write to `chunks` is granted: no read lock holds them."""
        held = set()
        for peer in self.open_peers():
            held |= peer.unsure | set(+peer.locks)
        chunks = set(sorted(chunks - held)[:64])
        if not chunks:
            return
        probe = self.connect(Role.CLIENT, 1 << 20)
        ranges = tuple((c, 1) for c in sorted(chunks))
        self.send(probe, Identify(probe.wire.next_id(), 7, None), Must.SUCCEED)
        request = probe.wire.next_id()
        self.send(probe, QueryWrite(request, ranges), Must.SUCCEED)
        deadline = time.monotonic() + PROBE_WAIT
        while request in probe.pending and time.monotonic() < deadline:
            self.pump(0.02)
        if request in probe.pending:
            raise self.finding(
                f"{why}; yet an origin write to chunks {_short(ranges)} is held back:"
                " the failed request took read locks"
            )
        self.close(probe)

    # -- the end -----------------------------------------------------------

    def teardown(self) -> None:
        try:
            if not self.broken:
                with self.step():
                    self.final_check()
        finally:
            for peer in self.peers:
                peer.wire.close()
            self.csnapd.kill()
            self._trace.close()
            if not self.broken:  # a failed run's store and log stay, to be looked at
                shutil.rmtree(self.dir, ignore_errors=True)

    def final_check(self) -> None:
        self.settle()
        for peer in self.peers:
            self.close(peer)
        self.resolve_indeterminate()
        for tag, snapshot in sorted(self.snapshots.items()):
            self.check_snapshot(tag, snapshot)
        origin = {c: pread(self.origin, c) for c in sorted(self.named)}
        for chunk, data in origin.items():
            if data != label(chunk, self.log.now(chunk)):
                raise self.finding(f"origin chunk {chunk} is not the last write the test made")
        status = self.csnapd.stop()
        if status != 0:
            raise self.finding(f"csnapd exited {status} on SIGTERM")
        check = csnap_check(self.store)
        if check.returncode != 0:
            raise self.finding(
                f"csnap-check exit status {check.returncode}:\n{check.stdout}{check.stderr}"
            )

    def resolve_indeterminate(self) -> None:
        """Learn from csnapd what the unanswered admin requests did.

        A tag the model has and csnapd no longer has live was deleted; one
        both have keeps its model (the create was answered) with csnapd's use
        count. A tag only csnapd has was created at a moment the test never
        saw, so its content is not checked.
        """
        live = {
            s.tag: s
            for s in get_status(self.address(), self.csnapd.tls).snapshots
            if s.state == "live"
        }
        for tag in sorted(self.indeterminate):
            model = self.snapshots.get(tag)
            if model is None:
                continue
            if tag not in live:
                del self.snapshots[tag]
            else:
                model.use_count = live[tag].use_count
        self.indeterminate.clear()

    def check_snapshot(self, tag: int, snapshot: SnapshotModel) -> None:
        reader = self.connect(Role.CLIENT, 1 << 20)
        self.send(reader, Identify(reader.wire.next_id(), 9, tag), Must.SUCCEED)
        named = sorted(self.named)
        for at in range(0, len(named), MAX_CHUNKS):
            ranges = tuple((c, 1) for c in named[at : at + MAX_CHUNKS])
            request = reader.wire.next_id()
            self.send(reader, QuerySnapshotRead(request, ranges), Must.SUCCEED)
            deadline = time.monotonic() + REPLY_WAIT
            while request in reader.pending and time.monotonic() < deadline:
                self.pump(0.01)
            if request in reader.pending:
                raise self.finding(f"no answer to a read of snapshot {tag}")
        self.close(reader)


Ranges3 = tuple[tuple[int, int, int], ...]


def request_id(message: Message) -> int | None:
    request = getattr(message, "id", None)
    return request if isinstance(request, int) else None


def _ranges(message: Message) -> Ranges:
    if isinstance(message, WriteSnapshotData):
        return (touched_chunks(message.offset, len(message.data), CHUNK),)
    ranges = getattr(message, "ranges", ())
    assert isinstance(ranges, tuple)
    return ranges


def traced(message: Message) -> str:
    """A message for the trace: a data write by its chunks and versions."""
    if isinstance(message, WriteSnapshotData):
        versions = list(data_versions(message).values())
        first = message.offset // CHUNK
        return f"write_snapshot_data(id={message.id}, chunk={first}, versions={versions})"
    return describe(message)[:240]


def data_versions(message: WriteSnapshotData) -> dict[int, int]:
    """chunk -> the version of the label a data write (of whole chunks, as
    the fuzzer makes them) carries for it."""
    first = message.offset // CHUNK
    return {
        first + k: struct.unpack_from("<QQ", message.data, k * CHUNK)[1]
        for k in range(len(message.data) // CHUNK)
    }


def describe(message: Message) -> str:
    """A message for a failure report: its fields, long ranges cut short."""
    fields = []
    for name in message.FIELDS:
        value = getattr(message, name)
        if isinstance(value, tuple) and len(value) > 6:
            value = _short(value)
        fields.append(f"{name}={value}")
    return f"{message.TYPE}({', '.join(fields)})"[:400]


def _chunk_list(ranges: Ranges) -> list[int]:
    return [start + k for start, count in ranges for k in range(count)]


def _short(ranges: tuple[tuple[int, ...], ...]) -> str:
    text = repr(list(ranges[:6]))
    return text if len(ranges) <= 6 else f"{text[:-1]}, ... {len(ranges)} ranges]"
