"""The csnapd server: starting it, on its own or on standby for an agent.

serve() opens the store, listens and runs a Server (csnapd.serving, with its
connections in csnapd.connections) until shutdown. Under a node agent it
listens first, registers with the agent and stays on standby, store
unopened, refusing every connection with `not_active`, until the agent
starts it; elected through a cluster, it journals its fencing token before
it serves. This module is also csnapd's public face: ServerConfig, Server,
serve, the errors and the connection limits are imported from here.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Callable
from functools import partial

import trio
import trio.lowlevel

from csnap_common import join_host_port
from csnap_common.systemd import notify_status
from csnap_protocol import Connection, ErrorCode, Role
from csnapd.agent_link import AgentLink
from csnapd.authenticate import authenticate
from csnapd.connections import (
    FLUSH_TIMEOUT,
    OUTBOX_LIMIT,
    QUEUED_DATA_LIMIT,
    QUEUED_LIMIT,
    RECEIVE_SIZE,
    WRITE_COALESCE,
    _error_message,
)
from csnapd.credentials import server_tls
from csnapd.dispatch import error_code
from csnapd.engine import Engine, EngineError, FencedError
from csnapd.fencing import Fence
from csnapd.refusals import REFUSE_LINGER, REFUSING_LIMIT
from csnapd.server_config import ServerConfig, ServerFailedError, ServerFencedError
from csnapd.serving import Server

__all__ = [
    "FLUSH_TIMEOUT",
    "OUTBOX_LIMIT",
    "QUEUED_DATA_LIMIT",
    "QUEUED_LIMIT",
    "RECEIVE_SIZE",
    "REFUSE_LINGER",
    "REFUSING_LIMIT",
    "WRITE_COALESCE",
    "ServerConfig",
    "Server",
    "serve",
    "ServerFailedError",
    "ServerFencedError",
]

log = logging.getLogger("csnapd")


async def serve(
    config: ServerConfig,
    *,
    stop: trio.Event | None = None,
    on_start: Callable[[Server], None] | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    authenticate: bool = True,
) -> None:
    """Open the store, listen, and serve until shutdown.

    Reports the bound "host:port" through task_status once listening. With
    `config.agent`, the server listens first, registers with that agent and
    stays on standby, store unopened, until the agent starts it. Setting
    `stop` (or an administrator's shutdown request) finishes in-flight work,
    marks the store clean and returns. `on_start` is given the Server once
    it serves (the metrics read it).

    Raises:
        StoreOpenError, StoreLockedError, StoreIOError: the store cannot be opened.
        ServerFailedError: the engine failed while serving.
    """
    # authenticate=False serves plaintext with every peer an admin: only the
    # benchmark that measures what TLS costs asks for it; no command line can.
    tls = server_tls(config) if authenticate else None
    if config.agent is not None:
        assert tls is not None, "an agent's server always authenticates"
        await _serve_for_agent(config, config.agent, tls, stop, on_start, task_status)
        return
    engine = await _open_engine(config)
    try:
        listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    except BaseException:
        engine.close()
        raise
    address = _address(listeners)
    async with trio.open_nursery() as nursery:
        server = await _start_server(
            nursery, config, engine, tls, listeners, address, stop, on_start
        )
        task_status.started(address)
    if server.failed:
        raise ServerFailedError("the engine failed; the store needs a restart (journal replay)")


async def _serve_for_agent(
    config: ServerConfig,
    agent: str,
    tls: ssl.SSLContext,
    stop: trio.Event | None,
    on_start: Callable[[Server], None] | None,
    task_status: trio.TaskStatus[str],
) -> None:
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    address = _address(listeners)
    link = AgentLink(agent, address=address, store=config.store)
    async with trio.open_nursery() as outer:
        outer.start_soon(link.run)
        task_status.started(address)
        log.info(
            "standby on %s: waiting for agent %s to start this server",
            address,
            agent,
            extra={"event": "server.standby", "address": address, "agent": agent},
        )
        started = await _standby(listeners, tls, link.start_requested, stop)
        if not started:
            for listener in listeners:
                await listener.aclose()
            outer.cancel_scope.cancel()
            return
        fence = link.fence
        engine = await _open_for_agent(config, link, listeners)
        async with trio.open_nursery() as nursery:
            server = await _start_server(
                nursery, config, engine, tls, listeners, address, stop, on_start, fence
            )
            await link.started()
            notify_status(f"active: serving {config.store} on {address}")
        outer.cancel_scope.cancel()
    if server.fenced:
        assert fence is not None
        raise ServerFencedError(fence.reason)
    if server.failed:
        raise ServerFailedError("the engine failed; the store needs a restart (journal replay)")


async def _standby(
    listeners: list[trio.SocketListener],
    tls: ssl.SSLContext,
    start_requested: trio.Event,
    stop: trio.Event | None,
) -> bool:
    """Refuse every connection with not_active until started; whether it was (not stopped)."""
    async with trio.open_nursery() as standby:
        lent = [_Lent(listener) for listener in listeners]
        refuse = partial(_refuse_not_active, tls=tls)
        standby.start_soon(partial(trio.serve_listeners, refuse, lent))
        started = await _first(start_requested, stop)
        standby.cancel_scope.cancel()
    return started


async def _open_for_agent(
    config: ServerConfig, link: AgentLink, listeners: list[trio.SocketListener]
) -> Engine:
    """Open the store the agent started this server for, its fencing token journaled.

    On failure the agent is told why and the listeners are closed.

    Raises:
        EngineError: the store cannot be opened, or the lease ran out first.
    """
    fence = link.fence
    try:
        if fence is not None and not fence.may_write():
            # Opening writes (the replay, the busy mark): not past the deadline.
            raise FencedError(f"the lease ran out before the store was opened: {fence.reason}")
        # Under a cluster coordinator the election, not a host-local lock,
        # keeps a second server out: a paused server on this host must not
        # keep the one elected after it from opening the store.
        engine = await _open_engine(config, lock=fence is None)
        if fence is not None:
            await _claim(engine, fence)
    except EngineError as exc:
        await link.failed(error_code(exc), f"cannot open the store: {exc}")
        for listener in listeners:
            await listener.aclose()
        raise
    return engine


async def _claim(engine: Engine, fence: Fence) -> None:
    """Journal the fencing token before serving; the lease must still hold.

    Raises:
        FencedError: the lease ran out, or the store carries a newer token.
    """
    try:
        if not fence.may_write():
            raise FencedError(f"the lease ran out before the store was open: {fence.reason}")
        await trio.to_thread.run_sync(engine.claim_fence, fence.token)
    except BaseException:
        await trio.to_thread.run_sync(engine.abandon)
        raise
    log.info(
        "fencing token %d journaled",
        fence.token,
        extra={"event": "server.token", "token": fence.token},
    )


class _Lent(trio.abc.Listener[trio.SocketStream]):
    """A listener lent to the standby phase: closing it leaves the socket
    listening, for the server that opens once the agent starts it."""

    def __init__(self, listener: trio.SocketListener) -> None:
        self._listener = listener

    async def accept(self) -> trio.SocketStream:
        return await self._listener.accept()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def _refuse_not_active(socket_stream: trio.SocketStream, tls: ssl.SSLContext) -> None:
    codec = Connection(Role.SERVER, name="csnapd")
    refusal = _error_message(
        None, ErrorCode.NOT_ACTIVE, "this csnapd is on standby; ask its agent for the server"
    )
    secured = await authenticate(socket_stream, tls, within=5, label="standby")
    if secured is None:
        return
    stream = secured.stream
    with trio.move_on_after(5):
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(codec.send(refusal))
                # Read the peer's hello before closing, so that closing with
                # unread data does not reset the connection under our error.
                with trio.move_on_after(1):
                    await stream.receive_some(4096)


async def _first(wanted: trio.Event, stop: trio.Event | None) -> bool:
    """Wait for `wanted` or `stop`; whether `wanted` came first."""
    async with trio.open_nursery() as nursery:

        async def watch(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch, wanted)
        if stop is not None:
            nursery.start_soon(watch, stop)
    return wanted.is_set()


async def _open_engine(config: ServerConfig, *, lock: bool = True) -> Engine:
    engine = await trio.to_thread.run_sync(
        lambda: Engine.open_files(
            config.store,
            config.origin,
            lock=lock,
            cache_bytes=config.cache_bytes,
            origin_writable=True,
            direct=config.direct,
        )
    )
    report = engine.recovery
    log.info(
        "store %s opened: replayed %d transactions (%d blocks), newest %d%s",
        config.store,
        report.replayed,
        report.blocks,
        report.newest_sequence,
        f"; {report.problem}" if report.problem else "",
        extra={"event": "store.opened", "store": config.store, "transactions": report.replayed},
    )
    return engine


def _address(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return join_host_port(host, port)


async def _start_server(
    nursery: trio.Nursery,
    config: ServerConfig,
    engine: Engine,
    tls: ssl.SSLContext | None,
    listeners: list[trio.SocketListener],
    address: str,
    stop: trio.Event | None,
    on_start: Callable[[Server], None] | None,
    fence: Fence | None = None,
) -> Server:
    server = Server(config, engine, address, tls, fence)
    if on_start is not None:
        on_start(server)
    log.info(
        "listening on %s",
        address,
        extra={"event": "server.listening", "address": address, "store": config.store},
    )
    await nursery.start(partial(server.run, listeners, stop=stop))
    return server
