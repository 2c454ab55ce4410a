"""The records replies carry: a snapshot, the store, the server, a standby.

Each is a frozen dataclass whose fields are declared once, annotated with
their wire spec; RECORD is the Record spec built from those annotations,
which decodes a map into the dataclass and encodes it in field order
(docs/protocol.md, "Records").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Annotated, ClassVar, TypeVar, get_type_hints

from csnap_protocol.schema import S8, U32, U64, Blob, Choice, Flag, Int, Record, Spec, Text

#: Longest file path a message carries (a store or origin file).
MAX_PATH = 4096

__all__ = [
    "SnapshotRecord",
    "StoreRecord",
    "ServerRecord",
    "StandbyRecord",
    "SNAPSHOT_INFO",
    "STORE_STATUS",
    "SERVER_INFO",
    "STANDBY_INFO",
]

TAG = U32

_R = TypeVar("_R")


def _record(wire_name: str) -> Callable[[type[_R]], type[_R]]:
    """Give a record dataclass its spec (RECORD), built from its annotations.

    Each field is annotated `Annotated[<python type>, <spec>]`: the field
    and its wire type are declared once, in one place.
    """

    def register(cls: type[_R]) -> type[_R]:
        hints = get_type_hints(cls, include_extras=True)
        specs: dict[str, Spec] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            (spec,) = (m for m in hints[f.name].__metadata__ if isinstance(m, Spec))
            specs[f.name] = spec
        cls.RECORD = Record(wire_name, specs, cls)  # type: ignore[attr-defined]
        return cls

    return register


@_record("snapshot")
@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """One snapshot, as replies carry it (docs/protocol.md, "Snapshot record")."""

    RECORD: ClassVar[Record]

    tag: Annotated[int, TAG]
    bit: Annotated[int, Int(0, 63, "u8")]
    state: Annotated[str, Choice(("live", "deleting", "squashed"))]
    priority: Annotated[int, S8]
    use_count: Annotated[int, U32]
    created_ns: Annotated[int, U64]
    origin_chunks: Annotated[int, U64]
    unique_chunks: Annotated[int, U64]
    shared_chunks: Annotated[int, U64]


@_record("store")
@dataclass(frozen=True, slots=True)
class StoreRecord:
    """The store's totals, as status carries them (docs/protocol.md, "Store record")."""

    RECORD: ClassVar[Record]

    uuid: Annotated[bytes, Blob(16)]
    created_ns: Annotated[int, U64]
    chunk_size: Annotated[int, U32]
    block_size: Annotated[int, U32]
    store_chunks: Annotated[int, U64]
    origin_chunks: Annotated[int, U64]
    data_chunks: Annotated[int, U64]
    data_free: Annotated[int, U64]
    meta_blocks: Annotated[int, U64]
    meta_free: Annotated[int, U64]
    exceptions: Annotated[int, U64]
    sequence: Annotated[int, U64]
    sweep_cursor: Annotated[int, U64]
    warn_at: Annotated[int, Int(0, 100, "u8")]
    keep_free: Annotated[int, Int(0, 99, "u8")]
    space_warning: Annotated[bool, Flag()]
    #: The revert in progress (docs/protocol.md, "Reverting the origin"):
    #: whether one runs, to which snapshot, and how far it is.
    reverting: Annotated[bool, Flag()] = False
    revert_tag: Annotated[int, TAG] = 0
    revert_restored: Annotated[int, U64] = 0
    revert_total: Annotated[int, U64] = 0


@_record("server")
@dataclass(frozen=True, slots=True)
class ServerRecord:
    """The server, as server_info carries it (docs/protocol.md, "Server record")."""

    RECORD: ClassVar[Record]

    address: Annotated[str, Text(256)]
    store: Annotated[str, Text(MAX_PATH)]
    origin: Annotated[str, Text(MAX_PATH)]
    started_ns: Annotated[int, U64]
    epoch: Annotated[int, U64]
    state: Annotated[str, Choice(("active", "uploading", "failed", "stopping"))]
    clients: Annotated[int, U32]
    origin_clients: Annotated[int, U32]
    snapshot_clients: Annotated[int, U32]
    commits: Annotated[int, U64]
    requests: Annotated[int, U64]


@_record("standby")
@dataclass(frozen=True, slots=True)
class StandbyRecord:
    """A server waiting to take over, as server_at carries it (docs/protocol.md,
    "Standby record")."""

    RECORD: ClassVar[Record]

    #: The cluster node whose agent it registered with; empty with the local coordinator.
    node: Annotated[str, Text(256)]
    address: Annotated[str, Text(256)]
    pid: Annotated[int, U32]


SNAPSHOT_INFO = SnapshotRecord.RECORD
STORE_STATUS = StoreRecord.RECORD
SERVER_INFO = ServerRecord.RECORD
STANDBY_INFO = StandbyRecord.RECORD
