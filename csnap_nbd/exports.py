"""Which exports exist and the csnapd client behind each one in use.

Names: "origin" (also the default, empty name) and "snap-TAG" for every
live snapshot. The list comes from csnapd when a client asks (NBD_OPT_LIST,
INFO, GO), so a snapshot created a moment ago is there and a deleted one
is not.

One DataClient per export in use, shared by every NBD connection to it:
opened by the first connection. A snapshot's client may linger (csnap-nbd
--linger, none by default) after the last connection leaves, so a client that
reconnects at once (qemu-img, nbdcopy, a backup tool opening one
connection per step) finds its csnapd session and its owned map still
there; it closes when the linger ends, when the gateway stops, and at once
when its snapshot is deleted (or the client fails). The origin's client
stays open once used. Each client's task lives in the gateway's nursery,
not in any connection's, so a connection that goes away does not take the
client down under the others.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from csnap_client import (
    ConnectionLostError,
    Connector,
    DataClient,
    ServerError,
    open_client,
)
from csnap_nbd.admin_link import AdminLink
from csnap_nbd.backing import Backing
from csnap_nbd.datapath import DataPath, OriginPath, SnapshotPath

__all__ = [
    "ADMIN_LINGER_SECONDS",
    "LINGER_SECONDS",
    "MAX_LINGER_SECONDS",
    "ORIGIN",
    "SNAPSHOT_PREFIX",
    "Geometry",
    "ExportInfo",
    "Exports",
    "UnknownExportError",
    "ServerUnreachableError",
    "parse_export_name",
    "snapshot_export",
]

log = logging.getLogger("csnap.nbd.exports")

ORIGIN = "origin"
SNAPSHOT_PREFIX = "snap-"
#: How long a list or lookup may wait for csnapd before the option fails.
ADMIN_TIMEOUT = 30.0
#: How long a snapshot's client stays open by default after its last NBD
#: connection left, for a reconnect to reuse its session and owned map. While
#: it lingers csnapd counts it connected: its snapshot is spared from
#: squashing as for an open connection (and a delete detaches it at once),
#: so by default it does not linger: a full store may squash the snapshot
#: the moment nobody reads it.
LINGER_SECONDS = 0.0
#: How long the gateway's admin connection stays open after its last
#: answer: it holds no snapshot, so it always lingers.
ADMIN_LINGER_SECONDS = 3.0
#: The longest linger csnap-nbd --linger accepts.
MAX_LINGER_SECONDS = 3600.0


class UnknownExportError(Exception):
    """No such export (a bad name, or a snapshot that is not live)."""


class ServerUnreachableError(Exception):
    """csnapd did not answer in time."""


@dataclass(frozen=True, slots=True)
class Geometry:
    chunk_size: int
    origin_chunks: int

    @property
    def size(self) -> int:
        return self.chunk_size * self.origin_chunks


@dataclass(frozen=True, slots=True)
class ExportInfo:
    name: str
    tag: int | None
    description: str


def parse_export_name(name: str) -> int | None:
    """The snapshot tag an export name means (None for the origin).

    Raises:
        UnknownExportError: not a name this gateway exports.
    """
    if name in ("", ORIGIN):
        return None
    digits = name.removeprefix(SNAPSHOT_PREFIX)
    if digits != name and digits.isascii() and digits.isdigit() and len(digits) <= 10:
        tag = int(digits)
        if tag < 1 << 32 and str(tag) == digits:
            return tag
    raise UnknownExportError(f"no export named {name!r}")


def snapshot_export(tag: int) -> str:
    return f"{SNAPSHOT_PREFIX}{tag}"


def _describe(tag: int | None) -> str:
    return "the origin volume" if tag is None else f"snapshot {tag}"


@dataclass(eq=False)
class _Open:
    """A DataClient shared by the connections using one export."""

    tag: int | None
    users: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    #: Set and replaced whenever `users` changes or the client ends.
    changed: trio.Event = field(default_factory=trio.Event)
    #: The client will serve nothing more (its snapshot was deleted).
    ended: bool = False
    path: DataPath | None = None
    failure: str | None = None

    def note(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Exports:
    """The exports of one gateway; `run` must be running for `use` to work."""

    def __init__(
        self,
        connect: Connector,
        admin_connect: Connector,
        geometry: Geometry,
        backing: Backing,
        *,
        linger: float = LINGER_SECONDS,
    ):
        self._connect = connect
        self._linger = linger
        self._admin = AdminLink(admin_connect, ADMIN_LINGER_SECONDS)
        self.geometry = geometry
        self.backing = backing
        self._open: dict[int | None, _Open] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the export clients until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self._admin.run)
            task_status.started()
            await trio.sleep_forever()

    async def snapshot_tags(self) -> list[int]:
        """The tags of the live snapshots, oldest first, as csnapd lists them now."""
        states = await self._snapshot_states()
        return [tag for tag, state in states.items() if state == "live"]

    async def _snapshot_states(self) -> dict[int, str]:
        """Each snapshot's state by tag (live or squashed), oldest first."""
        try:
            with trio.fail_after(ADMIN_TIMEOUT):
                snapshots = await self._admin.ask(lambda admin: admin.list_snapshots())
        except trio.TooSlowError as exc:
            raise ServerUnreachableError("csnapd did not list its snapshots in time") from exc
        except (OSError, ServerError, ConnectionLostError) as exc:
            raise ServerUnreachableError(f"cannot list snapshots: {exc}") from exc
        return {int(s["tag"]): str(s.get("state", "live")) for s in snapshots}

    async def export_size(self, tag: int | None) -> int:
        """The export's size in bytes now, as csnapd says.

        A snapshot keeps the size it was taken at; the origin's grows with
        csnap resize, and the shared origin client learns it here, so every
        NBD connection made after a resize sees the new size (connections
        already open keep the size they negotiated: NBD cannot change it).

        Raises:
            ServerUnreachableError: csnapd did not answer (only when no open
                client knows the size).
        """
        entry = self._open.get(tag)
        known = entry.path.size if entry is not None and entry.path is not None else None
        if tag is not None and known is not None:
            return known
        try:
            with trio.fail_after(ADMIN_TIMEOUT):
                if tag is None:
                    chunks = (
                        await self._admin.ask(lambda admin: admin.status())
                    ).store.origin_chunks
                else:
                    snapshots = await self._admin.ask(lambda admin: admin.list_snapshots())
                    sizes = {int(s["tag"]): int(s["origin_chunks"]) for s in snapshots}
                    chunks = sizes.get(tag, self.geometry.origin_chunks)
        except (trio.TooSlowError, OSError, ServerError, ConnectionLostError) as exc:
            if known is not None:
                log.warning("cannot ask csnapd for the origin's size (%s); keeping it", exc)
                return known
            raise ServerUnreachableError(f"cannot ask csnapd for the export's size: {exc}") from exc
        if entry is not None and entry.path is not None:
            entry.path.client.grow_origin(chunks)
            return entry.path.size
        return chunks * self.geometry.chunk_size

    async def list_exports(self) -> list[ExportInfo]:
        """Every export now: the origin, then each live snapshot, oldest first."""
        tags = await self.snapshot_tags()
        return [ExportInfo(ORIGIN, None, _describe(None))] + [
            ExportInfo(snapshot_export(tag), tag, _describe(tag)) for tag in tags
        ]

    async def lookup(self, name: str) -> ExportInfo:
        """The export `name` means, if it exists now.

        Raises:
            UnknownExportError, ServerUnreachableError.
        """
        tag = parse_export_name(name)
        if tag is not None:
            entry = self._open.get(tag)
            # An export in use is known to be live without asking csnapd.
            in_use = entry is not None and entry.path is not None
            state = "live" if in_use else (await self._snapshot_states()).get(tag)
            if state == "squashed":
                log.warning(
                    "export %s refused: snapshot %d was squashed to make room; its data is gone",
                    name,
                    tag,
                )
                raise UnknownExportError(f"snapshot {tag} was squashed: its data is gone")
            if state != "live":
                raise UnknownExportError(f"snapshot {tag} is not live")
        return ExportInfo(ORIGIN if tag is None else name, tag, _describe(tag))

    @asynccontextmanager
    async def use(self, tag: int | None) -> AsyncIterator[DataPath]:
        """The export's data path, shared; released when the block ends.

        Raises:
            UnknownExportError: csnapd refused the export (a snapshot not live).
        """
        entry = self._open.get(tag)
        reused = entry is not None
        if entry is None:
            entry = self._open[tag] = _Open(tag)
        # Counted before any await: a lingering client must not close under
        # a connection that found it and is still waiting here.
        entry.users += 1
        entry.note()
        try:
            if reused:
                await entry.ready.wait()
            else:
                await self._start(entry)
            if entry.path is None:
                raise UnknownExportError(entry.failure or f"cannot open {_describe(tag)}")
            if tag is None and reused:
                # The origin's client outlives connections: it may predate a resize.
                await self.export_size(None)
            yield entry.path
        finally:
            entry.users -= 1
            entry.note()

    def gone(self, path: DataPath) -> None:
        """The export behind `path` ended (snapshot deleted): new users open afresh."""
        for entry in list(self._open.values()):
            if entry.path is path:
                self._forget(entry)

    def _forget(self, entry: _Open) -> None:
        if self._open.get(entry.tag) is entry:
            del self._open[entry.tag]

    async def _start(self, entry: _Open) -> None:
        assert self._nursery is not None, "Exports.run is not running"
        try:
            await self._nursery.start(self._hold, entry)
        except ServerError as exc:
            entry.failure = f"csnapd refused {_describe(entry.tag)}: {exc.message}"
        except BaseException:
            entry.failure = f"opening {_describe(entry.tag)} was interrupted"
            self._forget(entry)
            entry.ready.set()
            raise
        if entry.path is None:
            self._forget(entry)
        entry.ready.set()

    async def _hold(self, entry: _Open, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        try:
            async with open_client(self._connect, snapshot=entry.tag) as client:
                entry.path = self._path(client, entry.tag)
                log.info(
                    "opened %s",
                    _describe(entry.tag),
                    extra={"event": "nbd.export_opened", "snapshot": entry.tag},
                )
                started = True
                task_status.started()
                await self._keep(entry, client)
        except Exception as exc:
            if not started:
                raise
            # The client failed for good (e.g. the snapshot vanished across a
            # server restart): its users see errors and new users reopen.
            log.warning("%s: client ended: %s", _describe(entry.tag), exc)
            self._forget(entry)
        else:
            log.info(
                "closed %s",
                _describe(entry.tag),
                extra={"event": "nbd.export_closed", "snapshot": entry.tag},
            )

    async def _keep(self, entry: _Open, client: DataClient) -> None:
        """Return when the client should close: its linger after the last user
        ran out, or its snapshot is gone and no one uses it any more.

        The origin's client stays open once used: it remembers which chunks
        may be rewritten without asking csnapd, until the next snapshot, and
        that is worth keeping between NBD connections.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_end, entry, client)
            while not (entry.ended and entry.users == 0):
                changed = entry.changed
                if entry.users or entry.ended or entry.tag is None:
                    await changed.wait()
                    continue
                # A lingering client stays connected: csnapd's snapshot_deleted
                # still reaches it, so its owned map is forgotten as for a
                # client in use (rule: stable owned addresses).
                with trio.move_on_after(self._linger):
                    await changed.wait()
                if entry.users == 0 and not changed.is_set():
                    break
            # Forgotten before any await: a new user opens a client of its own.
            self._forget(entry)
            nursery.cancel_scope.cancel()

    async def _watch_end(self, entry: _Open, client: DataClient) -> None:
        await client.wait_ended()
        # New users open afresh (and learn the snapshot is gone); users still
        # here see the client's errors until they leave.
        self._forget(entry)
        entry.ended = True
        entry.note()

    def _path(self, client: DataClient, tag: int | None) -> DataPath:
        # The origin may grow (csnap resize) and each snapshot has its own size:
        # only the chunk size is the gateway's for good.
        if client.chunk_size != self.geometry.chunk_size:
            raise ServerError(
                0, "geometry", "csnapd's chunk size changed since the gateway started"
            )
        if tag is None:
            return OriginPath(client, self.backing)
        return SnapshotPath(client, self.backing)
