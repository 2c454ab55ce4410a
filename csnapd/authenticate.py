"""csnapd's side of authentication: the TLS handshake every TCP connection
starts with, and what the peer's credential lets it do afterwards.

The handshake comes before any csnap byte (docs/protocol.md,
"Authentication"). A peer whose first byte is not a TLS handshake record is
told `authentication_failed` in a plaintext csnap error frame and closed; a
peer that fails the handshake (no certificate, one of another CA, expired,
not meant for a client) is closed by the handshake itself. Neither gets
anything else, and neither reaches the dispatcher.

Roles (csnap_common.credentials): an "admin" credential may say hello in
any role; a "client" credential may say hello as a client, or as an admin
for the read-only queries only (what an NBD gateway asks at start).
"""

from __future__ import annotations

import logging
import ssl

import trio

from csnap_common.credentials import ROLE_ADMIN, ROLE_CLIENT, granted_roles
from csnap_protocol import (
    Connection,
    Error,
    ErrorCode,
    GetServerInfo,
    GetStatus,
    ListSnapshots,
    Request,
    Role,
)
from csnap_transport import DirectStream

__all__ = ["Authenticated", "authenticate", "hello_refusal", "request_refusal"]

log = logging.getLogger("csnapd")

#: The first byte of every TLS connection: a handshake record.
TLS_HANDSHAKE_RECORD = 0x16
#: Admin requests a client credential may make: they read, never change.
READ_ONLY_REQUESTS = (GetServerInfo, GetStatus, ListSnapshots)
_NO_TLS = (
    "csnapd takes only TLS connections with a credential of its cluster"
    " (docs/operations.md, 'Securing a cluster')"
)


class _Replayed(trio.abc.Stream):
    """A stream whose first bytes, already read to look at them, are read again."""

    def __init__(self, stream: trio.abc.Stream, first: bytes | bytearray):
        self._stream = stream
        self._first = first

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self._stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self._stream.aclose()


class Authenticated:
    """A connection past the handshake: its TLS stream and the roles it holds."""

    def __init__(self, stream: trio.abc.Stream, roles: frozenset[str]):
        self.stream = stream
        self.roles = roles


async def authenticate(
    stream: trio.abc.Stream, context: ssl.SSLContext, *, within: float, label: str
) -> Authenticated | None:
    """Run the server's TLS handshake on `stream`, given `within` seconds.

    Returns None once a peer that failed has been answered and closed.
    """
    secured: trio.SSLStream[_Replayed] | DirectStream | None = None
    try:
        with trio.fail_after(within):
            first = await stream.receive_some(1)
            if not first:
                await trio.aclose_forcefully(stream)
                return None
            if first[0] != TLS_HANDSHAKE_RECORD:
                await _refuse_plaintext(stream, label)
                return None
            if isinstance(stream, trio.SocketStream):
                secured = DirectStream(stream, context, server_side=True, received=first)
            else:
                secured = trio.SSLStream(_Replayed(stream, first), context, server_side=True)
            await secured.do_handshake()
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        reason = _reason(exc)
        log.warning(
            "%s failed authentication: %s",
            label,
            reason,
            extra={"event": "client.refused", "peer": label, "reason": reason},
        )
        await _close_after_alert(stream, secured)
        return None
    assert secured is not None
    return Authenticated(secured, granted_roles(secured.getpeercert()))


async def _close_after_alert(
    stream: trio.abc.Stream, secured: trio.SSLStream[_Replayed] | DirectStream | None
) -> None:
    """Send the TLS alert of a failed handshake, then close without a reset.

    trio keeps the alert OpenSSL wrote in the stream's outgoing buffer when
    the handshake fails; sent, it tells the peer why (unknown CA, expired,
    ...), where a bare close reads as a lost connection. Reading what the
    peer still sends before closing keeps the close from becoming a reset
    that would discard the alert on the peer's side.
    """
    outgoing = getattr(secured, "_outgoing", None)
    with trio.move_on_after(0.5):
        try:
            if isinstance(outgoing, ssl.MemoryBIO) and (alert := outgoing.read()):
                await stream.send_all(alert)
            while await stream.receive_some(1 << 16):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def _refuse_plaintext(stream: trio.abc.Stream, label: str) -> None:
    log.warning(
        "%s spoke without TLS: refused",
        label,
        extra={"event": "client.refused", "peer": label, "reason": "no TLS"},
    )
    code = ErrorCode.AUTHENTICATION_FAILED
    frame = Connection(Role.SERVER, name="csnapd").send(
        Error(None, int(code), code.symbol, _NO_TLS)
    )
    with trio.move_on_after(1):
        try:
            await stream.send_all(frame)
            # Read what the peer sent before closing, so that closing with
            # unread data does not reset the connection under the error.
            with trio.move_on_after(0.5):
                while await stream.receive_some(1 << 16):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return "no TLS handshake in time"
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(exc) or "connection closed during the TLS handshake"


def hello_refusal(roles: frozenset[str], role: Role) -> str | None:
    """Why a peer holding `roles` may not say hello as `role`, or None."""
    if ROLE_ADMIN in roles:
        return None
    if ROLE_CLIENT in roles and role in (Role.CLIENT, Role.ADMIN):
        return None  # an admin session of a client credential only reads
    held = ", ".join(sorted(roles)) or "no role"
    return f"this connection's credential grants {held}, not {role.value}"


def request_refusal(roles: frozenset[str], role: Role, request: Request) -> str | None:
    """Why a peer holding `roles`, said hello as `role`, may not make `request`."""
    if role is not Role.ADMIN or ROLE_ADMIN in roles:
        return None
    if isinstance(request, READ_ONLY_REQUESTS):
        return None
    return f"{request.TYPE} needs an admin credential; this connection's is a data-path one"
