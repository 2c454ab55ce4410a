"""What csnapd reports about itself: snapshot records, store status, server info.

Turns the engine's results and the dispatcher's counters into the records
docs/protocol.md describes ("Records"); changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from csnap_protocol import ServerRecord, SnapshotRecord, StatusReply, StoreRecord
from csnapd.batch import Peer
from csnapd.engine import Engine, SnapshotInfo, StoreStatus
from csnapd.space_watch import SpaceWatch

__all__ = ["ServerIdentity", "snapshot_record", "status_reply", "server_record"]

#: The store record's fields the engine's status carries; the rest are the
#: space watch's.
_STORE_FIELDS = tuple(
    f.name for f in dataclasses.fields(StoreRecord) if f.name in StoreStatus.__dataclass_fields__
)


@dataclass(frozen=True)
class ServerIdentity:
    """What a server is, fixed from its start."""

    address: str
    store: str
    origin: str
    started_ns: int
    #: Changes every time a server starts: clients see a restart.
    epoch: int


def snapshot_record(info: SnapshotInfo) -> SnapshotRecord:
    """A snapshot, as the snapshot record carries it."""
    return SnapshotRecord(**dataclasses.asdict(info))


def status_reply(engine: Engine, space: SpaceWatch, request: int) -> StatusReply:
    """The answer to get_status."""
    status = engine.status()
    space.observe(status.data_chunks, status.data_free)
    revert = engine.revert_progress
    store = StoreRecord(
        **{name: getattr(status, name) for name in _STORE_FIELDS},
        warn_at=space.policy.warn_at or 0,
        keep_free=space.policy.keep_free or 0,
        space_warning=space.warning,
        reverting=revert is not None,
        revert_tag=revert.tag if revert is not None else 0,
        revert_restored=revert.restored if revert is not None else 0,
        revert_total=revert.total if revert is not None else 0,
    )
    return StatusReply(
        request,
        store,
        tuple(snapshot_record(i) for i in status.snapshots),
        tuple(snapshot_record(i) for i in status.deleting),
    )


def server_record(
    identity: ServerIdentity,
    peers: Iterable[Peer],
    *,
    state: str,
    commits: int,
    requests: int,
) -> ServerRecord:
    """What get_server_info reports."""
    peers = list(peers)
    identified = [p for p in peers if p.identified]
    return ServerRecord(
        address=identity.address,
        store=identity.store,
        origin=identity.origin,
        started_ns=identity.started_ns,
        epoch=identity.epoch,
        state=state,
        clients=len(peers),
        origin_clients=sum(1 for p in identified if p.snapshot is None),
        snapshot_clients=sum(1 for p in identified if p.snapshot is not None),
        commits=commits,
        requests=requests,
    )
