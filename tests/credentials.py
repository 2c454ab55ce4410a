"""Credentials for tests: those csnapd makes beside a test's store on
loopback (zero configuration), as TLS contexts, connectors and raw
authenticated streams for tests that write frames by hand.
"""

from __future__ import annotations

import os
import ssl

import trio

from csnap_client import Connector, open_tls_stream, tcp_connector
from csnap_common.credentials import ROLE_ADMIN, client_context, store_credentials

__all__ = ["tls", "connector", "tls_stream", "secure"]


def tls(store: str | os.PathLike[str], role: str = ROLE_ADMIN) -> ssl.SSLContext:
    """A client context with `role`'s credential beside `store` (STORE.keys)."""
    return client_context(store_credentials(store), role)


def connector(
    host: str, port: int, store: str | os.PathLike[str], role: str = ROLE_ADMIN
) -> Connector:
    """An authenticated connector to csnapd serving `store`."""
    return tcp_connector(host, port, tls(store, role))


async def tls_stream(
    host: str, port: int, store: str | os.PathLike[str], role: str = ROLE_ADMIN
) -> trio.abc.Stream:
    """An authenticated stream to csnapd, for writing csnap frames by hand."""
    return await open_tls_stream(host, port, tls(store, role))


async def secure(
    stream: trio.SocketStream, store: str | os.PathLike[str], role: str = ROLE_ADMIN
) -> trio.abc.Stream:
    """Authenticate an open TCP stream (its socket options already set)."""
    secured = trio.SSLStream(stream, tls(store, role), server_hostname=None)
    await secured.do_handshake()
    return secured
