"""The client's side of authentication: TCP connections to csnapd are TLS,
both sides showing a credential of the cluster's CA, and the server's must
be a server credential (docs/protocol.md, "Authentication").

The contexts come from csnap_common.credentials (client_context() for a
role's credential directory); this module runs the handshake over trio.
"""

from __future__ import annotations

import ssl

import trio

from csnap_client.session import AuthenticationError, ConnectionLostError, Connector, tls_refusal
from csnap_common.credentials import ROLE_SERVER, granted_roles
from csnap_transport import DirectStream

__all__ = ["AuthenticationError", "open_tls_stream", "tcp_connector"]


async def open_tls_stream(host: str, port: int, tls: ssl.SSLContext) -> DirectStream:
    """Connect to csnapd at host:port and authenticate both ways.

    Raises:
        OSError: nothing answers there.
        ConnectionLostError: the connection ended during the handshake.
        AuthenticationError: the handshake failed, or the peer is no csnapd
            of this cluster.
    """
    stream = await trio.open_tcp_stream(host, port)
    secured = DirectStream(stream, tls, server_hostname=None)
    try:
        await secured.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(stream)
        why = tls_refusal(exc)
        if why is None:
            raise ConnectionLostError(
                f"connection to {host}:{port} lost during the TLS handshake"
            ) from exc
        raise AuthenticationError(
            f"TLS handshake with {host}:{port} failed ({why}): is it a csnapd of this"
            " cluster, and is the credential one of its CA's?"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    if ROLE_SERVER not in granted_roles(secured.getpeercert()):
        await trio.aclose_forcefully(secured)
        raise AuthenticationError(
            f"{host}:{port} showed a credential of this cluster that is not a server's"
        )
    return secured


def tcp_connector(host: str, port: int, tls: ssl.SSLContext) -> Connector:
    """A connector for csnapd at a fixed TCP address, authenticated with `tls`
    (csnap_common.credentials.client_context())."""

    async def connect() -> trio.abc.Stream:
        return await open_tls_stream(host, port, tls)

    return connect
