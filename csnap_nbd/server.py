"""The gateway process: find csnapd's geometry and files, listen on TCP
and/or Unix sockets, run one handshake then one transmission per
connection, and stop cleanly.

Stopping: listeners close first, connections still negotiating are
dropped, connections in transmission answer what they already took and
close; after a grace period whatever is left is cancelled. Export clients
close last, so no grant is left open behind a write.

TLS (docs/nbd.md, "TLS"): one policy for every listener; a TCP listener
outside loopback is refused without TLS unless --tls=off says so.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import socket
import stat
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from urllib.parse import quote

import trio

from csnap_client import ConnectionLostError, Connector, ServerError, open_admin
from csnap_common import single_errors
from csnap_nbd.backing import Backing
from csnap_nbd.commands import Transmission
from csnap_nbd.connection import Connection, PeerClosedError, set_nodelay
from csnap_nbd.exports import LINGER_SECONDS, Exports, Geometry
from csnap_nbd.files import FileRefusedError, open_backing
from csnap_nbd.negotiation import Negotiated, negotiate
from csnap_nbd.settings import Settings
from csnap_nbd.stats import GatewayStats
from csnap_nbd.tls import (
    CERTIFICATES_HINT,
    TlsHandshakeError,
    TlsMode,
    TlsPolicy,
    describe,
    is_loopback,
)
from csnap_nbd.wire import NbdProtocolError

__all__ = ["GatewayConfig", "serve", "discover", "GatewayStartError"]

log = logging.getLogger("csnap.nbd")

#: How long stopping waits for requests in flight before cancelling them.
STOP_GRACE = 10.0
#: How long one attempt to reach csnapd at start may take.
DISCOVER_TIMEOUT = 30.0
#: How long closing a TLS connection may wait to send its close_notify.
TLS_CLOSE_TIMEOUT = 1.0


class GatewayStartError(Exception):
    """The gateway cannot start (a file will not open, an address is taken)."""


@dataclass(frozen=True)
class GatewayConfig:
    connect: Connector
    admin_connect: Connector
    tcp: Sequence[tuple[str, int]] = ()
    unix: Sequence[str] = ()
    settings: Settings = field(default_factory=Settings)
    #: The files to serve; the paths csnapd reports must name them (csnap_nbd.files).
    origin: str | None = None
    store: str | None = None
    tls: TlsPolicy = field(default_factory=TlsPolicy)
    #: csnapd is found through an agent whose credentials are checked, so the
    #: paths it reports may be opened when not given (csnap_nbd.files).
    vouched: bool = False
    #: O_DIRECT for the origin and store: None for block devices only, True
    #: for files too, False never (csnap_nbd.backing).
    direct: bool | None = None
    #: Seconds a snapshot's csnapd client and the admin connection stay open
    #: after their last use (csnap_nbd.exports).
    linger: float = LINGER_SECONDS
    #: What the gateway counts as it serves (read by csnap_nbd.metrics).
    stats: GatewayStats = field(default_factory=GatewayStats, compare=False)


@dataclass
class _Conn:
    number: int
    #: The connection's stream: the TLS one once STARTTLS succeeded.
    conn: Connection
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    transmission: Transmission | None = None
    encrypted: bool = False

    def upgraded(self, conn: Connection) -> None:
        self.conn = conn
        self.encrypted = True

    async def close(self) -> None:
        """Close the connection: TLS says goodbye first (close_notify), briefly."""
        if self.encrypted:
            # A peer already gone has nothing to be told goodbye.
            with (
                trio.move_on_after(TLS_CLOSE_TIMEOUT),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
            ):
                await self.conn.stream.aclose()
        await self.conn.aclose()


async def discover(admin_connect: Connector) -> tuple[Geometry, str, str]:
    """csnapd's geometry and its (store, origin) paths; retries until it answers."""
    delay = 0.1
    while True:
        try:
            with trio.fail_after(DISCOVER_TIMEOUT):
                async with open_admin(admin_connect) as admin:
                    info = await admin.server_info()
                    status = await admin.status()
            geometry = Geometry(status.store.chunk_size, status.store.origin_chunks)
            return geometry, str(info["store"]), str(info["origin"])
        except (OSError, ServerError, ConnectionLostError, trio.TooSlowError) as exc:
            log.warning("cannot reach csnapd yet (%s); retrying", exc or type(exc).__name__)
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)


class _Gateway:
    def __init__(self, exports: Exports, settings: Settings, tls: TlsPolicy, stats: GatewayStats):
        self.exports = exports
        self.stats = stats
        self.settings = settings
        self.tls = tls
        self.stopping = False
        self._conns: dict[int, _Conn] = {}
        self._numbers = itertools.count(1)
        self.idle = trio.Event()
        self.idle.set()

    async def connection(self, stream: trio.SocketStream) -> None:
        set_nodelay(stream)
        entry = _Conn(next(self._numbers), Connection(stream))
        self._conns[entry.number] = entry
        self.idle = trio.Event()
        self.stats.accepted += 1
        self.stats.open += 1
        try:
            with entry.scope:
                await self._serve(entry)
        except (PeerClosedError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("connection %d: closed (%s)", entry.number, exc)
        except NbdProtocolError as exc:
            log.info("connection %d: protocol violation, closing: %s", entry.number, exc)
        except TlsHandshakeError as exc:
            log.info("connection %d: %s; closing", entry.number, exc)
        except Exception:
            # One connection's bug must not take the gateway and every
            # other connection down with it.
            log.exception("connection %d failed", entry.number)
        finally:
            self.stats.open -= 1
            del self._conns[entry.number]
            with trio.CancelScope(shield=True):
                await entry.close()
            if not self._conns:
                self.idle.set()

    async def _serve(self, entry: _Conn) -> None:
        async with AsyncExitStack() as stack:
            negotiated = None
            with trio.move_on_after(self.settings.handshake_timeout) as deadline:
                negotiated = await negotiate(
                    entry.conn,
                    self.exports,
                    self.settings,
                    stack,
                    lambda: self.stopping,
                    self.tls,
                    entry.upgraded,
                )
            if deadline.cancelled_caught:
                log.info("connection %d: no export chosen in time; closing", entry.number)
            if negotiated is None:
                return
            _log_serving(entry, negotiated)
            stats = self.stats.export(negotiated.export.name)
            transmission = entry.transmission = Transmission(
                negotiated.conn, negotiated, self.exports, self.settings, stats
            )
            if self.stopping:
                transmission.stop()
            stats.connections += 1
            try:
                await transmission.run()
            finally:
                stats.connections -= 1
            log.info(
                "connection %d: done",
                entry.number,
                extra={
                    "event": "nbd.disconnected",
                    "connection": entry.number,
                    "export": negotiated.export.name,
                },
            )

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def stop_connections(self) -> None:
        self.stopping = True
        for entry in self._conns.values():
            if entry.transmission is not None:
                entry.transmission.stop()
            else:
                entry.scope.cancel()


def _log_serving(entry: _Conn, negotiated: Negotiated) -> None:
    """Log that connection `entry` now serves the export it negotiated."""
    stream = entry.conn.stream
    over = f" over TLS ({describe(stream)})" if isinstance(stream, trio.SSLStream) else ""
    log.info(
        "connection %d: serving %s%s",
        entry.number,
        negotiated.export.name,
        over,
        extra={
            "event": "nbd.connected",
            "connection": entry.number,
            "export": negotiated.export.name,
            "snapshot": negotiated.export.tag,
        },
    )


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def _unix_listener(path: str) -> trio.SocketListener:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise GatewayStartError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens there
        else:
            raise GatewayStartError(f"another server listens on {path}")
        finally:
            probe.close()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise GatewayStartError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return trio.SocketListener(sock)


async def _listeners(
    config: GatewayConfig, created: list[str]
) -> tuple[list[trio.SocketListener], list[str]]:
    """Open every listener; Unix socket paths made are added to `created`."""
    listeners: list[trio.SocketListener] = []
    urls: list[str] = []
    scheme = config.tls.scheme
    try:
        for host, port in config.tcp:
            try:
                opened = await trio.open_tcp_listeners(port, host=host)
            except OSError as exc:
                raise GatewayStartError(
                    f"cannot listen on {host}:{port}: {exc.strerror or exc}"
                ) from exc
            listeners.extend(opened)
            for listener in opened:
                bound_host, bound_port = listener.socket.getsockname()[:2]
                urls.append(f"{scheme}://{_url_host(bound_host)}:{bound_port}")
        for path in config.unix:
            listeners.append(await _unix_listener(path))
            created.append(path)
            urls.append(f"{scheme}+unix:///?socket={quote(path, safe='/@')}")
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners, urls


async def _refuse_plaintext_outside_loopback(config: GatewayConfig) -> None:
    """Without TLS, only loopback TCP addresses, unless --tls=off was explicit.

    Checked before csnapd is looked for, so a wrong command line fails at once.
    """
    if config.tls.mode is not TlsMode.OFF or config.tls.plaintext_anywhere:
        return
    for host, port in config.tcp:
        try:
            found = await trio.socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
        except OSError as exc:
            raise GatewayStartError(f"cannot resolve {host}: {exc.strerror or exc}") from exc
        outside = sorted({str(a[4][0]) for a in found if not is_loopback(str(a[4][0]))})
        if outside:
            raise GatewayStartError(
                f"refusing to serve NBD without TLS on {host}:{port}, which reaches beyond"
                f" this machine ({', '.join(outside)}). Give --tls=require"
                f" --tls-certificates=DIR, where {CERTIFICATES_HINT}; or --tls=off to"
                " serve in the clear anyway"
            )


def _open_backing(config: GatewayConfig, store: str, origin: str, geometry: Geometry) -> Backing:
    try:
        backing = open_backing(
            reported_origin=origin,
            reported_store=store,
            origin=config.origin,
            store=config.store,
            vouched=config.vouched,
            read_only=config.settings.read_only,
            direct=config.direct,
        )
    except FileRefusedError as exc:
        raise GatewayStartError(str(exc)) from exc
    origin, store = backing.origin_path, backing.store_path
    size = os.lseek(backing.origin, 0, os.SEEK_END)
    if stat.S_ISREG(os.fstat(backing.origin).st_mode) and size < geometry.size:
        log.warning(
            "origin %s has %d bytes, fewer than the export's %d", origin, size, geometry.size
        )
    log.info(
        "origin %s, store %s, chunk size %d, %d chunks, direct I/O for %s",
        origin,
        store,
        geometry.chunk_size,
        geometry.origin_chunks,
        _direct_names(backing),
    )
    return backing


def _direct_names(backing: Backing) -> str:
    names = [
        n
        for n, fd in (("origin", backing.origin), ("store", backing.store))
        if fd in backing.direct
    ]
    return " and ".join(names) or "neither"


async def serve(
    config: GatewayConfig,
    *,
    stop: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until `stop` is set; reports the URLs it listens on.

    Raises:
        GatewayStartError: a file or an address could not be opened.
    """
    with single_errors():
        await _serve(config, stop, task_status)


async def _serve(
    config: GatewayConfig, stop: trio.Event, task_status: trio.TaskStatus[list[str]]
) -> None:
    await _refuse_plaintext_outside_loopback(config)
    geometry, store, origin = await discover(config.admin_connect)
    backing = _open_backing(config, store, origin, geometry)
    created: list[str] = []
    try:
        exports = Exports(
            config.connect, config.admin_connect, geometry, backing, linger=config.linger
        )
        gateway = _Gateway(exports, config.settings, config.tls, config.stats)
        async with trio.open_nursery() as top:
            await top.start(exports.run)
            listeners, urls = await _listeners(config, created)
            async with trio.open_nursery() as conns:
                accepting = trio.CancelScope()

                async def accept_all() -> None:
                    with accepting:
                        await trio.serve_listeners(
                            gateway.connection, listeners, handler_nursery=conns
                        )

                conns.start_soon(accept_all)
                task_status.started(urls)
                await stop.wait()
                log.info(
                    "stopping: %d connections open",
                    gateway.open_connections,
                    extra={"event": "gateway.stopping"},
                )
                accepting.cancel()
                gateway.stop_connections()
                with trio.move_on_after(STOP_GRACE):
                    await gateway.idle.wait()
                conns.cancel_scope.cancel()
            top.cancel_scope.cancel()
    finally:
        backing.close()
        for path in created:
            try:
                os.unlink(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot remove %s: %s", path, exc.strerror)
