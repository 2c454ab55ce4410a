"""csnapd's configuration and the errors that end a server's run.

ServerConfig holds everything csnapd is started with; ServerFailedError and
ServerFencedError are how serve() says why it stopped serving.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from csnap_common.limits import DEFAULT_MAX_CHUNKS, MAX_REQUEST_CHUNKS
from csnap_protocol import DEFAULT_MAX_FRAME
from csnapd.dispatch import DEFAULT_MAX_READ_LOCKS, DEFAULT_MAX_SERVER_READ_LOCKS
from csnapd.engine import DEFAULT_CACHE_BYTES
from csnapd.space_watch import SpacePolicy


class ServerFailedError(Exception):
    """The engine failed (a commit could not be made durable); the server stopped."""


class ServerFencedError(Exception):
    """The server lost its lease or saw a newer fencing token; it stopped writing."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything csnapd is started with."""

    store: str
    origin: str
    host: str = "127.0.0.1"
    port: int = 0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    #: Seconds origin writes wait for lock uploads after a crash.
    grace: float = 30.0
    #: Seconds a create waits for origin clients to finish granted writes.
    barrier_timeout: float = 30.0
    #: Seconds a deleted snapshot's clients get to finish and close.
    detach_timeout: float = 30.0
    #: Seconds an identified data-path client may stay silent before it is
    #: dropped with its read locks and barrier duty (clients send keepalives).
    lease: float = 5.0
    #: Connections open at once, counted from accept, hello said or not.
    max_connections: int = 1024
    #: Seconds a new connection has to say hello before it is closed.
    hello_timeout: float = 10.0
    max_in_flight: int = 256
    max_frame: int = DEFAULT_MAX_FRAME
    #: Most chunks one request may name (clients split larger ones).
    max_chunks: int = DEFAULT_MAX_CHUNKS
    #: Most items one batch (one transaction) takes.
    max_batch: int = 512
    #: Most read locks one connection holds (a chunk locked twice counts twice).
    max_read_locks: int = DEFAULT_MAX_READ_LOCKS
    #: Most read locks all connections hold together.
    max_server_read_locks: int = DEFAULT_MAX_SERVER_READ_LOCKS
    #: The node agent's socket: register there and wait on standby to be started.
    agent: str | None = None
    #: The data area's warning threshold and free-space reserve.
    space: SpacePolicy = field(default_factory=SpacePolicy)
    #: The directory with the cluster CA and the server credential; None:
    #: STORE.keys, made there when listening on loopback (csnapd.credentials).
    credentials: Path | None = None
    #: O_DIRECT for the store and origin: None for block devices only, True
    #: for files too, False never (csnap_common.direct_io).
    direct: bool | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_chunks <= MAX_REQUEST_CHUNKS:
            raise ValueError(
                f"max_chunks is 1..{MAX_REQUEST_CHUNKS} (what the engine takes in one request),"
                f" not {self.max_chunks}"
            )
