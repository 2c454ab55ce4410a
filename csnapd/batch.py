"""What the dispatcher works on: peers, the items of a batch, and its outcome.

The transport (csnapd.server) turns connections and timers into items; the
dispatcher (csnapd.dispatch) handles a batch of them and answers with an
Outcome. Nothing here does anything: these are the values passed between the
two, and between the dispatcher's parts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from csnap_protocol import DEFAULT_MAX_FRAME, Error, ErrorCode, Message, Role
from csnapd.engine import EngineError, EngineFailedError

__all__ = [
    "Peer",
    "Received",
    "Connected",
    "Disconnected",
    "BarrierExpired",
    "GraceExpired",
    "SweepTick",
    "Wake",
    "Item",
    "Outcome",
    "Batch",
    "ParkedWrite",
    "Ranges",
    "Sends",
    "EngineRefusal",
    "error_reply",
]

Ranges = tuple[tuple[int, int], ...]


@dataclass(eq=False)
class Peer:
    """One connection, as the dispatcher sees it."""

    number: int
    role: Role
    label: str
    client_id: int | None = None
    #: The tag it identified to; None for the origin (once identified).
    snapshot: int | None = None
    identified: bool = False
    #: Its snapshot was deleted: it was told to finish and go.
    detaching: bool = False
    #: The largest frame it accepts: no reply may be larger. The transport
    #: sets it from the peer's hello.
    max_frame: int = DEFAULT_MAX_FRAME
    #: It sent finish_upload_lock: it uploads no more locks.
    uploaded: bool = False

    def __str__(self) -> str:
        return f"peer {self.number} ({self.label})"


#: Messages to send, each to its peer, in order.
Sends = list[tuple[Peer, Message]]


@dataclass(frozen=True)
class Received:
    """A message from a peer."""

    peer: Peer
    message: Message


@dataclass(frozen=True)
class Connected:
    """A peer connected (and said hello)."""

    peer: Peer


@dataclass(frozen=True)
class Disconnected:
    """A peer's connection closed."""

    peer: Peer


@dataclass(frozen=True)
class BarrierExpired:
    """The create barrier `barrier` ran out of time."""

    barrier: int


@dataclass(frozen=True)
class GraceExpired:
    """The post-restart grace period for lock uploads ended."""


@dataclass(frozen=True)
class SweepTick:
    """Nothing else to do: reclaim some deleted snapshot space."""


@dataclass(frozen=True)
class Wake:
    """Nothing to do: sent once when the server stops, so that an engine task
    waiting for work notices the stop."""


Item = Received | Connected | Disconnected | BarrierExpired | GraceExpired | SweepTick | Wake


@dataclass
class Outcome:
    """What the transport must do after a batch."""

    #: Messages to send, in order.
    sends: Sends = field(default_factory=list)
    #: A barrier started: schedule BarrierExpired for it.
    barrier_started: int | None = None
    #: Peers told their snapshot is gone: close them if they linger.
    detached: list[Peer] = field(default_factory=list)
    #: An administrator asked for shutdown: (peer, request id).
    shutdown: tuple[Peer, int] | None = None
    #: A commit failed: the server must stop.
    failed: bool = False
    #: More deleted-snapshot space remains to sweep.
    sweep_pending: bool = False


@dataclass(eq=False)
class ParkedWrite:
    """An origin write applied to the engine, waiting to be granted."""

    peer: Peer
    request: int
    ranges: Ranges
    #: Chunks copied out for it so far (a write applied again adds to it).
    copied: int


@dataclass(eq=False)
class Batch:
    """A batch between Dispatcher.prepare() and Dispatcher.finish()."""

    out: Outcome = field(default_factory=Outcome)
    #: Answers to requests, sent after the commit.
    replies: Sends = field(default_factory=list)
    #: Notices (barrier, snapshot_deleted), sent after the replies.
    notices: Sends = field(default_factory=list)
    #: Origin writes applied in this batch, granted after its commit.
    writes: list[ParkedWrite] = field(default_factory=list)
    #: The engine has changes only a commit makes durable.
    needs_commit: bool = False
    #: A step of the revert in progress is due: it runs with the commit.
    revert_step: bool = False
    #: The batch is one step of a sweep, which changes nothing a live
    #: snapshot's lookup sees: lookups answered during its commit need not
    #: wait for it (docs/rules.md, "lookups during a commit").
    sweep_step: bool = False
    failure: EngineFailedError | None = None


#: Turns an engine error into the error reply to a request (csnapd.dispatch
#: owns the translation; the dispatcher's parts are given it).
EngineRefusal = Callable[[int, EngineError], Error]


def error_reply(request: int | None, code: ErrorCode, message: str) -> Error:
    """The error reply to `request` (None: to the connection)."""
    return Error(request, int(code), code.symbol, message[:1024])
