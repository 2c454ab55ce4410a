"""Every message of the csnap protocol, as frozen dataclasses.

A message is a msgpack map: {"type": <name>, <field>: <value>, ...}. Each
class declares its wire name (TYPE) and which roles may send it (SENDERS);
each field is declared once, annotated with its spec (FIELDS is read from
those annotations), and the codec refuses anything else. The records that
replies carry (snapshot, store, server) are frozen dataclasses declared the
same way. The registry MESSAGES is what docs/protocol.md's tables are checked
against.

Requests (Request) carry an `id` the sender chooses (unique among its
requests in flight); the reply (Reply, or Error) carries the same id. Replies
may come in any order.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, ClassVar, TypeVar, get_type_hints

from csnap_protocol.records import (
    MAX_PATH,
    SERVER_INFO,
    SNAPSHOT_INFO,
    STANDBY_INFO,
    STORE_STATUS,
    ServerRecord,
    SnapshotRecord,
    StandbyRecord,
    StoreRecord,
)
from csnap_protocol.schema import (
    S8,
    S32,
    U16,
    U32,
    U64,
    Bytes,
    Choice,
    Flag,
    ListOf,
    Nullable,
    Ranges,
    Segments,
    Spec,
    Text,
)

__all__ = [
    "Role",
    "Message",
    "Request",
    "Reply",
    "message_id",
    "MESSAGES",
    "PROTOCOL_MAGIC",
    "PROTOCOL_VERSION",
    "MAX_WRITE_DATA",
    "MAX_RANGES",
    "SnapshotRecord",
    "StoreRecord",
    "ServerRecord",
    "StandbyRecord",
    "SNAPSHOT_INFO",
    "STORE_STATUS",
    "SERVER_INFO",
    "Hello",
    "Error",
    "Ok",
    "Identify",
    "Identified",
    "QueryWrite",
    "WriteOk",
    "SnapshotWriteOk",
    "WriteSnapshotData",
    "SnapshotDataWritten",
    "touched_chunks",
    "QuerySnapshotRead",
    "SnapshotReadOk",
    "FinishSnapshotRead",
    "UploadLock",
    "FinishUploadLock",
    "Barrier",
    "BarrierDone",
    "SnapshotDeleted",
    "CreateSnapshot",
    "DeleteSnapshot",
    "RevertSnapshot",
    "RevertReply",
    "ListSnapshots",
    "GetStatus",
    "SetPriority",
    "ChangeUseCount",
    "GetServerInfo",
    "Shutdown",
    "Resize",
    "Resized",
    "SnapshotReply",
    "SnapshotList",
    "StatusReply",
    "ServerInfoReply",
    "QueryMap",
    "MapReply",
    "QueryChanges",
    "ChangesReply",
    "QueryOwned",
    "OwnedReply",
    "Keepalive",
    "ServerReady",
    "StartServer",
    "RenewLease",
    "NeedServer",
    "ServerAt",
]

#: First field of every hello: this is the csnap protocol.
PROTOCOL_MAGIC = "csnap"
#: Bumped on any incompatible change; peers of other versions are refused.
PROTOCOL_VERSION = 5
#: Most ranges (or segments) one message may carry.
MAX_RANGES = 8192
#: Most bytes one write_snapshot_data carries (a small write; larger ones
#: take query_write's grant and go straight to the store).
MAX_WRITE_DATA = 64 << 10
#: Most snapshots a list carries (the table has 64 slots).
MAX_LIST = 64


class Role(enum.Enum):
    """What a peer is, declared in its hello."""

    #: A data-path client (NBD gateway, kernel target): identifies to the
    #: origin or one snapshot and asks where chunks are.
    CLIENT = "client"
    #: An administrative peer (the agent relaying the csnap CLI): snapshots.
    ADMIN = "admin"
    #: The metadata server.
    SERVER = "server"
    #: A node's csnap-agent: servers register with it, clients find the
    #: server through it, administrators reach the server through it.
    AGENT = "agent"


CLIENT = frozenset({Role.CLIENT})
ADMIN = frozenset({Role.ADMIN})
SERVER = frozenset({Role.SERVER})
AGENT = frozenset({Role.AGENT})
#: Replies an agent relays from the server, or makes itself.
ANSWERS = SERVER | AGENT
ANYONE = frozenset(Role)

ID = U32
TAG = U32
#: Chunk ranges, as requests and the map reply carry them.
RangeList = Annotated[tuple[tuple[int, int], ...], Ranges(MAX_RANGES)]
#: Store segments, as the snapshot read and write replies carry them.
SegmentList = Annotated[tuple[tuple[int, int, int], ...], Segments(MAX_RANGES)]


@dataclass(frozen=True, slots=True)
class Message:
    """Base of every message."""

    TYPE: ClassVar[str]
    SENDERS: ClassVar[frozenset[Role]]
    FIELDS: ClassVar[Mapping[str, Spec]]

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map for this message."""
        body: dict[str, Any] = {"type": self.TYPE}
        for name, spec in self.FIELDS.items():
            body[name] = spec.to_wire(getattr(self, name))
        return body


@dataclass(frozen=True, slots=True)
class Request(Message):
    """A message that asks for one reply: carries the id its reply repeats.

    The sender chooses the id, unique among its requests in flight.
    """

    id: Annotated[int, ID]


@dataclass(frozen=True, slots=True)
class Reply(Message):
    """The success reply to a request: carries that request's id."""

    id: Annotated[int, ID]


def message_id(message: Message) -> int | None:
    """The id `message` carries: a request's own, or the one a reply or error answers.

    None for a notice, a hello, and an error about the connection.
    """
    match message:
        case Request() | Reply() | Error():
            return message.id
        case _:
            return None


#: Wire name -> message class.
MESSAGES: dict[str, type[Message]] = {}

_M = TypeVar("_M", bound=type[Message])


def _message(wire_name: str, senders: frozenset[Role], /) -> Callable[[_M], _M]:
    """Register a message class under `wire_name`, sendable by `senders`.

    Each field is annotated `Annotated[<python type>, <spec>]` (or an alias of
    one): its spec is read from there, so a field is declared once.
    """

    def register(cls: _M) -> _M:
        hints = get_type_hints(cls, include_extras=True)
        specs: dict[str, Spec] = {}
        for f in fields(cls):
            (spec,) = (m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Spec))
            specs[f.name] = spec
        cls.TYPE = wire_name
        cls.SENDERS = senders
        cls.FIELDS = specs
        if wire_name in MESSAGES:
            raise TypeError(f"message type {wire_name!r} registered twice")
        MESSAGES[wire_name] = cls
        return cls

    return register


# -- handshake and generic replies --------------------------------------------


@_message("hello", ANYONE)
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First frame in each direction: protocol, version, role, frame limit."""

    magic: Annotated[str, Text(16)]
    version: Annotated[int, U16]
    role: Annotated[str, Choice(tuple(r.value for r in Role))]
    max_frame: Annotated[int, U32]
    name: Annotated[str | None, Nullable(Text(256))]


@_message("error", ANSWERS)
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A request failed (id set), or the connection is being closed (id nil)."""

    id: Annotated[int | None, Nullable(ID)]
    code: Annotated[int, U16]
    name: Annotated[str, Text(64)]
    message: Annotated[str, Text(1024)]


@_message("ok", ANSWERS)
@dataclass(frozen=True, slots=True)
class Ok(Reply):
    """A request that returns nothing succeeded."""


# -- the data path ------------------------------------------------------------


@_message("identify", CLIENT)
@dataclass(frozen=True, slots=True)
class Identify(Request):
    """Bind this connection to the origin (snapshot nil) or to a snapshot's tag."""

    client: Annotated[int, U64]
    snapshot: Annotated[int | None, Nullable(TAG)]


@_message("identified", SERVER)
@dataclass(frozen=True, slots=True)
class Identified(Reply):
    """Identify succeeded: the geometry a client needs, the server's epoch and lease."""

    snapshot: Annotated[int | None, Nullable(TAG)]
    chunk_size: Annotated[int, U32]
    origin_chunks: Annotated[int, U64]
    epoch: Annotated[int, U64]
    max_chunks: Annotated[int, U32]
    #: Milliseconds of silence after which the server drops this connection
    #: and its read locks; 0: it drops no silent connection.
    lease_ms: Annotated[int, U32] = 0
    #: The server's fencing token (its election's etcd revision); 0 when it
    #: was not elected through a cluster coordinator.
    token: Annotated[int, U64] = 0


@_message("query_write", CLIENT)
@dataclass(frozen=True, slots=True)
class QueryWrite(Request):
    """May I write these chunks? (origin: copy out first; snapshot: where to)."""

    ranges: RangeList


@_message("write_ok", SERVER)
@dataclass(frozen=True, slots=True)
class WriteOk(Reply):
    """An origin client may write the chunks it asked about; `copied` were copied out."""

    copied: Annotated[int, U32]


@_message("snapshot_write_ok", SERVER)
@dataclass(frozen=True, slots=True)
class SnapshotWriteOk(Reply):
    """A snapshot client writes its chunks at these store chunks."""

    segments: SegmentList


@_message("write_snapshot_data", CLIENT)
@dataclass(frozen=True, slots=True)
class WriteSnapshotData(Request):
    """Write `data` at byte `offset` of my snapshot (snapshot connections only).

    If every chunk the bytes touch needs a copy of its own, csnapd writes
    the bytes into the copies itself, with their old contents around them,
    and answers snapshot_data_written once that is durable: one sync, no
    grant. Otherwise it answers snapshot_write_ok, as to query_write for
    those chunks, and the client writes the bytes there itself.
    """

    offset: Annotated[int, U64]
    data: Annotated[bytes, Bytes(MAX_WRITE_DATA)]


def touched_chunks(offset: int, length: int, chunk_size: int) -> tuple[int, int]:
    """(first chunk, count) of the chunks `length` bytes at byte `offset` touch:
    the range a write_snapshot_data is checked as."""
    first = offset // chunk_size
    return first, -(-(offset + length) // chunk_size) - first


@_message("snapshot_data_written", SERVER)
@dataclass(frozen=True, slots=True)
class SnapshotDataWritten(Reply):
    """write_snapshot_data is done and durable: the chunks it touched are now the
    snapshot's alone, at these store chunks."""

    segments: SegmentList


@_message("query_snapshot_read", CLIENT)
@dataclass(frozen=True, slots=True)
class QuerySnapshotRead(Request):
    """Where do I read these chunks of my snapshot?"""

    ranges: RangeList


@_message("snapshot_read_ok", SERVER)
@dataclass(frozen=True, slots=True)
class SnapshotReadOk(Reply):
    """Read `store` segments from the store; `origin` ranges from the origin,
    now read-locked for this connection until finish_snapshot_read."""

    store: SegmentList
    origin: RangeList


@_message("finish_snapshot_read", CLIENT)
@dataclass(frozen=True, slots=True)
class FinishSnapshotRead(Request):
    """I have read these origin chunks: release their read locks."""

    ranges: RangeList


@_message("upload_lock", CLIENT)
@dataclass(frozen=True, slots=True)
class UploadLock(Request):
    """After a reconnect: I still read these origin chunks (re-take their locks)."""

    ranges: RangeList


@_message("finish_upload_lock", CLIENT)
@dataclass(frozen=True, slots=True)
class FinishUploadLock(Request):
    """After a reconnect: every lock I hold is uploaded."""


@_message("query_map", CLIENT)
@dataclass(frozen=True, slots=True)
class QueryMap(Request):
    """Which of these chunks have copies in the store? Takes no locks.

    For a snapshot client: the chunks its snapshot owns in the store. For an
    origin client: the chunks some live snapshot holds a copy of (an origin
    write there may still copy out for another live snapshot without one).
    """

    ranges: RangeList


@_message("map", SERVER)
@dataclass(frozen=True, slots=True)
class MapReply(Reply):
    """The asked-about chunks that have copies, as ascending ranges."""

    ranges: RangeList


@_message("query_changes", CLIENT)
@dataclass(frozen=True, slots=True)
class QueryChanges(Request):
    """Which chunks of start..start+count-1 may differ between my view and `base`?

    `base` is a snapshot's tag, or nil for the origin; "my view" is what the
    connection identified to. Takes no locks and reads no data. The reply may
    stop early; its `next` says where to ask again.
    """

    base: Annotated[int | None, Nullable(TAG)]
    start: Annotated[int, U64]
    count: Annotated[int, U64]


@_message("changes", SERVER)
@dataclass(frozen=True, slots=True)
class ChangesReply(Reply):
    """The chunks that may differ from the asked start up to `next`, as ascending ranges.

    `next` is nil when the whole range asked about is answered.
    """

    ranges: RangeList
    next: Annotated[int | None, Nullable(U64)]


@_message("query_owned", CLIENT)
@dataclass(frozen=True, slots=True)
class QueryOwned(Request):
    """Which of these chunks does my snapshot own alone in the store, and where?

    Snapshot connections only; takes no locks. The addresses answered stay
    valid while the snapshot lives, so a client may keep them (docs/rules.md,
    "stable owned addresses").
    """

    ranges: RangeList


@_message("owned", SERVER)
@dataclass(frozen=True, slots=True)
class OwnedReply(Reply):
    """The asked-about chunks the snapshot owns alone, as (chunk, count, store chunk)
    extents, and those it still shares with the origin, as ranges."""

    segments: SegmentList
    origin: RangeList


@_message("keepalive", CLIENT)
@dataclass(frozen=True, slots=True)
class Keepalive(Request):
    """I am alive: answered with ok at once; keeps this connection's lease."""


@_message("barrier", SERVER)
@dataclass(frozen=True, slots=True)
class Barrier(Message):
    """To origin clients: finish the writes you were granted, then say barrier_done."""

    barrier: Annotated[int, U64]


@_message("barrier_done", CLIENT)
@dataclass(frozen=True, slots=True)
class BarrierDone(Message):
    """Every origin write granted before that barrier has reached the origin."""

    barrier: Annotated[int, U64]


@_message("snapshot_deleted", SERVER)
@dataclass(frozen=True, slots=True)
class SnapshotDeleted(Message):
    """To a snapshot's clients: it was deleted; finish your writes and close."""

    snapshot: Annotated[int, TAG]


# -- administration -----------------------------------------------------------


@_message("create_snapshot", ADMIN)
@dataclass(frozen=True, slots=True)
class CreateSnapshot(Request):
    """Take a snapshot of the origin now (after the origin-write barrier)."""

    tag: Annotated[int, TAG]
    priority: Annotated[int, S8]


@_message("delete_snapshot", ADMIN)
@dataclass(frozen=True, slots=True)
class DeleteSnapshot(Request):
    """Delete a snapshot; its space is reclaimed in the background."""

    tag: Annotated[int, TAG]


@_message("revert_snapshot", ADMIN)
@dataclass(frozen=True, slots=True)
class RevertSnapshot(Request):
    """Make the origin's content equal to snapshot `tag`'s (after the barrier);
    answered once the revert has started, and finished in the background."""

    tag: Annotated[int, TAG]


@_message("list_snapshots", ADMIN)
@dataclass(frozen=True, slots=True)
class ListSnapshots(Request):
    """Every live snapshot, oldest first."""


@_message("get_status", ADMIN)
@dataclass(frozen=True, slots=True)
class GetStatus(Request):
    """Store totals, every snapshot, and those still being deleted."""


@_message("set_priority", ADMIN)
@dataclass(frozen=True, slots=True)
class SetPriority(Request):
    """Set a snapshot's priority (-128..127)."""

    tag: Annotated[int, TAG]
    priority: Annotated[int, S8]


@_message("change_use_count", ADMIN)
@dataclass(frozen=True, slots=True)
class ChangeUseCount(Request):
    """Add delta to a snapshot's use count (0 reads it)."""

    tag: Annotated[int, TAG]
    delta: Annotated[int, S32]


@_message("get_server_info", ADMIN)
@dataclass(frozen=True, slots=True)
class GetServerInfo(Request):
    """Where the server listens, since when, and who is connected."""


@_message("shutdown", ADMIN)
@dataclass(frozen=True, slots=True)
class Shutdown(Request):
    """Finish in-flight work, mark the store clean and exit."""


@_message("resize", ADMIN)
@dataclass(frozen=True, slots=True)
class Resize(Request):
    """Grow (or safely shrink) the origin and/or the store to these sizes, online.

    A size left null stays as it is. With `grow_files`, csnapd itself grows a
    regular file that is smaller than asked; otherwise the administrator
    grows the file or device first.
    """

    origin_bytes: Annotated[int | None, Nullable(U64)]
    store_bytes: Annotated[int | None, Nullable(U64)]
    grow_files: Annotated[bool, Flag()]


@_message("resized", ANSWERS)
@dataclass(frozen=True, slots=True)
class Resized(Reply):
    """The sizes before and after a resize, in chunks of the store's chunk size."""

    chunk_size: Annotated[int, U32]
    origin_chunks_before: Annotated[int, U64]
    origin_chunks: Annotated[int, U64]
    store_chunks_before: Annotated[int, U64]
    store_chunks: Annotated[int, U64]
    capacity_chunks: Annotated[int, U64]
    data_chunks: Annotated[int, U64]
    data_free: Annotated[int, U64]
    grown_files: Annotated[tuple[str, ...], ListOf(Text(16), 2)]


@_message("snapshot", ANSWERS)
@dataclass(frozen=True, slots=True)
class SnapshotReply(Reply):
    """One snapshot, as it is after the request."""

    snapshot: Annotated[SnapshotRecord, SNAPSHOT_INFO]


@_message("revert_started", ANSWERS)
@dataclass(frozen=True, slots=True)
class RevertReply(Reply):
    """The revert just started: the snapshot, and the chunks it will restore."""

    tag: Annotated[int, TAG]
    total: Annotated[int, U64]


@_message("snapshot_list", ANSWERS)
@dataclass(frozen=True, slots=True)
class SnapshotList(Reply):
    """Live snapshots, oldest first."""

    snapshots: Annotated[tuple[SnapshotRecord, ...], ListOf(SNAPSHOT_INFO, MAX_LIST)]


@_message("status", ANSWERS)
@dataclass(frozen=True, slots=True)
class StatusReply(Reply):
    """Store totals, live snapshots, and snapshots still being deleted."""

    store: Annotated[StoreRecord, STORE_STATUS]
    snapshots: Annotated[tuple[SnapshotRecord, ...], ListOf(SNAPSHOT_INFO, MAX_LIST)]
    deleting: Annotated[tuple[SnapshotRecord, ...], ListOf(SNAPSHOT_INFO, MAX_LIST)]


@_message("server_info", ANSWERS)
@dataclass(frozen=True, slots=True)
class ServerInfoReply(Reply):
    """The server's address, start time, state and connections."""

    server: Annotated[ServerRecord, SERVER_INFO]


# -- the agent ----------------------------------------------------------------


@_message("server_ready", SERVER)
@dataclass(frozen=True, slots=True)
class ServerReady(Request):
    """A server registers with its node's agent: where it listens, which store.

    `active` is false for a server on standby (store not open, waiting for
    start_server), true for one already serving that re-registers after
    losing its agent.
    """

    address: Annotated[str, Text(256)]
    store: Annotated[str, Text(MAX_PATH)]
    pid: Annotated[int, U32]
    active: Annotated[bool, Flag()]


@_message("start_server", AGENT)
@dataclass(frozen=True, slots=True)
class StartServer(Request):
    """The agent activates its standby server: open the store and serve.

    Answered with ok once clients may connect, or error if the store cannot
    be opened. Under a cluster coordinator it carries the fencing token the
    server journals before serving, and the first lease deadline.
    """

    token: Annotated[int, U64] = 0
    #: CLOCK_MONOTONIC nanoseconds on this node at which the server must have
    #: stopped writing unless renew_lease moves it; 0: no lease.
    until_ns: Annotated[int, U64] = 0


@_message("renew_lease", AGENT)
@dataclass(frozen=True, slots=True)
class RenewLease(Request):
    """The agent renewed the active server's lease: serve until `until_ns`.

    Answered ok, or error fenced by a server that already stopped.
    """

    token: Annotated[int, U64]
    until_ns: Annotated[int, U64]


@_message("need_server", CLIENT | ADMIN)
@dataclass(frozen=True, slots=True)
class NeedServer(Request):
    """Where is the active server? With `wait`, the answer comes once there is one."""

    wait: Annotated[bool, Flag()]
    #: Also list the servers standing by (costs the agent a coordinator query).
    standbys: Annotated[bool, Flag()] = False


@_message("server_at", AGENT)
@dataclass(frozen=True, slots=True)
class ServerAt(Reply):
    """The active server's address, and since when it has been active."""

    address: Annotated[str, Text(256)]
    since_ns: Annotated[int, U64]
    #: Its fencing token; 0 when it was not elected through a cluster coordinator.
    token: Annotated[int, U64] = 0
    #: The cluster node it runs on; empty without a cluster coordinator.
    node: Annotated[str, Text(256)] = ""
    #: The servers standing by, when need_server asked for them.
    standbys: Annotated[tuple[StandbyRecord, ...], ListOf(STANDBY_INFO, MAX_LIST)] = ()
