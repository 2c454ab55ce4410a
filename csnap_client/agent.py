"""Finding csnapd through a node's csnap-agent.

A data-path client asks the agent `need_server` and then connects to the
address it is given; an administrator talks to the agent itself, which
relays to the active server. Agent sockets are Unix sockets: a filesystem
path, or "@name" for Linux's abstract namespace.
"""

from __future__ import annotations

import os
import socket
import ssl

import trio

from csnap_client.secure import open_tls_stream
from csnap_client.session import (
    ConnectionLostError,
    Connector,
    ServerError,
    open_session,
)
from csnap_common import single_errors, split_host_port, unix_address
from csnap_common.credentials import ROLE_CLIENT, client_context, store_credentials
from csnap_protocol import NeedServer, Role, ServerAt

__all__ = [
    "agent_store_connector",
    "DEFAULT_AGENT",
    "open_agent_stream",
    "find_server",
    "agent_connector",
    "agent_admin_connector",
    "default_agent",
]

#: The agent socket used when none is named: abstract, so no directory is needed.
DEFAULT_AGENT = "@csnap-agent"


async def open_agent_stream(path: str) -> trio.SocketStream:
    """Connect to an agent's Unix socket.

    Raises:
        OSError: nothing listens there.
    """
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.connect(unix_address(path))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def find_server(path: str, *, wait: bool = True, standbys: bool = False) -> ServerAt:
    """Ask the agent at `path` where the active server is.

    With `wait`, returns once a server is active; otherwise an agent without
    one answers `no_server` at once. With `standbys`, the reply also lists
    the servers standing by.

    Raises:
        OSError: the agent cannot be reached.
        ServerError: the agent refused (no_server when not waiting).
        ConnectionLostError: the agent went away before answering.
    """
    with single_errors():
        async with trio.open_nursery() as nursery:
            session = await open_session(nursery, lambda: open_agent_stream(path), Role.CLIENT)
            try:
                reply = await session.request(NeedServer(1, wait, standbys))
            finally:
                await trio.aclose_forcefully(session.stream)
    if not isinstance(reply, ServerAt):
        raise ConnectionLostError(f"the agent answered need_server with {reply.TYPE}")
    return reply


def agent_connector(path: str, tls: ssl.SSLContext) -> Connector:
    """A connector that finds the server through the agent, then connects to it
    and authenticates with `tls` (csnap_common.credentials.client_context()).

    Waits while the agent has no active server; a reconnecting DataClient
    therefore follows the server wherever the agent says it went.
    """

    async def connect() -> trio.abc.Stream:
        try:
            where = await find_server(path, wait=True)
        except ServerError as exc:
            raise ConnectionLostError(f"agent {path}: {exc}") from exc
        host, port = split_host_port(where.address)
        return await open_tls_stream(host, port, tls)

    return connect


def agent_store_connector(path: str, role: str = ROLE_CLIENT) -> Connector:
    """agent_connector with `role`'s credential from beside the store the
    active server reports (STORE.keys, csnap_common.credentials), looked up
    on the first connection: what a tool on the server's own node uses when
    it is given no credentials.
    """
    contexts: list[ssl.SSLContext] = []
    admin = agent_admin_connector(path)

    async def connect() -> trio.abc.Stream:
        if not contexts:
            # Imported here: the admin client sits above this module.
            from csnap_client.admin import open_admin

            async with open_admin(admin) as session:
                info = await session.server_info()
            contexts.append(client_context(store_credentials(str(info["store"])), role))
        return await agent_connector(path, contexts[0])()

    return connect


def agent_admin_connector(path: str) -> Connector:
    """A connector to the agent itself, for admin sessions it relays."""

    async def connect() -> trio.abc.Stream:
        return await open_agent_stream(path)

    return connect


def default_agent() -> str:
    """The agent socket named by $CSNAP_AGENT, or DEFAULT_AGENT."""
    return os.environ.get("CSNAP_AGENT") or DEFAULT_AGENT
