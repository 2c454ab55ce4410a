"""Sending a delta file over TCP to a receiving store, resumably and at a bounded rate.

The sender offers the delta (its size and header); the receiver answers
with how many bytes of it it already holds, from a transfer that was cut,
and the sender sends the rest. The receiver keeps what arrives in a spool
file named after the delta's header, so a transfer cut at any point
resumes where it stopped, from this or a later sender process using the
same delta file. Once the file is whole, the receiver receives it into its
store (csnap_delta.receive) and says how that went. The messages are laid
out in docs/protocol.md, "Delta transfer".

The channel is mutual TLS under the receiving store's cluster CA
(csnap_common.credentials): the receiver shows its server credential, and
the sender must show an admin credential of that CA, since a received
delta writes the origin and creates a snapshot. A sender without one is
refused by the handshake, before a byte of the delta is read.
"""

from __future__ import annotations

import logging
import os
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from csnap_client import ConnectionLostError, Connector, ServerError
from csnap_common.credentials import ROLE_ADMIN, granted_roles
from csnap_delta.apply import DeltaRefusedError
from csnap_delta.layout import DeltaFormatError, DeltaHeader
from csnap_delta.receive import ReceiveReport, receive_delta

__all__ = [
    "OFFER",
    "ANSWER",
    "DONE",
    "DeltaTransferError",
    "SendReport",
    "send_delta",
    "serve_receive",
]

#: magic, version, reserved, reserved, delta bytes; the delta's header follows.
OFFER = struct.Struct("<8sHHIQ")
#: magic, status, reserved, bytes already held, message length; the message follows.
ANSWER = struct.Struct("<8sIIQI")
#: magic, status, message length; the message follows.
DONE = struct.Struct("<8sII")
OFFER_MAGIC, ANSWER_MAGIC, DONE_MAGIC = b"CSNAPSND", b"CSNAPRCV", b"CSNAPEND"
VERSION = 1
#: Status: accepted / done.
OK = 0
#: Status: refused, with a message saying why.
REFUSED = 1
#: Bytes sent or written at a time.
PIECE = 256 << 10
MAX_MESSAGE = 4096
#: Seconds a peer may stay silent during the offer and answer.
HANDSHAKE_TIMEOUT = 30.0

log = logging.getLogger("csnap.delta")


class DeltaTransferError(Exception):
    """The receiver refused the delta, or (`cut`) the connection failed: send again."""

    def __init__(self, message: str, *, cut: bool = False):
        super().__init__(message)
        self.cut = cut


@dataclass(frozen=True, slots=True)
class SendReport:
    """What a send did: the delta's size, where it resumed, and what the receiver said."""

    total_bytes: int
    resumed_at: int
    message: str


async def _receive_exact(stream: trio.abc.Stream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        more = await stream.receive_some(size - len(data))
        if not more:
            raise DeltaTransferError("the peer closed the connection", cut=True)
        data += more
    return bytes(data)


async def _message(stream: trio.abc.Stream, length: int) -> str:
    if length > MAX_MESSAGE:
        raise DeltaTransferError(f"the peer sent a {length}-byte message")
    return (await _receive_exact(stream, length)).decode("utf-8", "replace")


def _text(message: str) -> bytes:
    return message.encode()[:MAX_MESSAGE]


# -- the sender ----------------------------------------------------------------------


async def send_delta(
    delta: str | os.PathLike[str],
    host: str,
    port: int,
    *,
    tls: ssl.SSLContext,
    rate: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SendReport:
    """Send the delta file to a receiver at host:port; returns once it has been received.

    `tls` carries an admin credential of the receiving store's cluster CA
    (csnap_common.credentials.client_context(DIR, "admin")).

    `rate` bounds the bytes sent per second. A cut connection raises
    DeltaTransferError or OSError; sending again resumes.
    """
    path = Path(delta)
    total, header = _offer_of(path)
    try:
        return await _send(path, total, header, host, port, tls, rate, progress)
    except (OSError, trio.BrokenResourceError) as exc:
        raise DeltaTransferError(
            f"the connection to {host}:{port} failed: {exc}", cut=True
        ) from exc
    except trio.TooSlowError as exc:
        raise DeltaTransferError(f"{host}:{port} did not answer in time", cut=True) from exc


async def _send(
    path: Path,
    total: int,
    header: bytes,
    host: str,
    port: int,
    tls: ssl.SSLContext,
    rate: int | None,
    progress: Callable[[int, int], None] | None,
) -> SendReport:
    plain = await trio.open_tcp_stream(host, port)
    stream = trio.SSLStream(plain, tls, server_hostname=None)
    async with stream:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            try:
                await stream.do_handshake()
            except trio.BrokenResourceError as exc:
                raise DeltaTransferError(
                    f"the TLS handshake with {host}:{port} failed ({exc.__cause__ or exc}):"
                    " is the credential an admin one of the receiving store's CA?"
                ) from exc
            await stream.send_all(OFFER.pack(OFFER_MAGIC, VERSION, 0, 0, total) + header)
            magic, status, _, held, length = ANSWER.unpack(
                await _receive_exact(stream, ANSWER.size)
            )
            message = await _message(stream, length)
        if magic != ANSWER_MAGIC:
            raise DeltaTransferError("the peer is not a csnap receiver")
        if status != OK:
            raise DeltaTransferError(f"the receiver refused the delta: {message}")
        if not 0 <= held <= total:
            raise DeltaTransferError(f"the receiver holds {held} of {total} bytes")
        await _send_from(stream, path, held, total, rate, progress)
        magic, status, length = DONE.unpack(await _receive_exact(stream, DONE.size))
        message = await _message(stream, length)
    if magic != DONE_MAGIC:
        raise DeltaTransferError("the receiver's last answer is damaged")
    if status != OK:
        raise DeltaTransferError(f"the receiver could not receive the delta: {message}")
    return SendReport(total, held, message)


def _offer_of(path: Path) -> tuple[int, bytes]:
    """The delta's size and its header's bytes, checked."""
    with open(path, "rb") as source:
        header = source.read(DeltaHeader.SIZE)
        total = os.fstat(source.fileno()).st_size
    DeltaHeader.decode(header)
    return total, header


async def _send_from(
    stream: trio.abc.Stream,
    path: Path,
    offset: int,
    total: int,
    rate: int | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    start = trio.current_time()
    sent = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        position = offset
        while position < total:
            piece = os.pread(fd, min(PIECE, total - position), position)
            if not piece:
                raise DeltaTransferError(f"{path} ended early at {position} bytes")
            await stream.send_all(piece)
            position += len(piece)
            sent += len(piece)
            if progress is not None:
                progress(position, total)
            if rate:
                # A token bucket of one second: never ahead of `rate` bytes per second.
                await trio.sleep_until(start + sent / rate)
    finally:
        os.close(fd)


# -- the receiver --------------------------------------------------------------------


def spool_name(header: DeltaHeader) -> str:
    """The spool file of a delta: one name per delta file (its header says which)."""
    return f"{header.store_uuid.hex()}-{header.from_tag}-{header.to_tag}-{header.written_ns}.delta"


async def serve_receive(
    listen: tuple[str, int],
    spool: Path,
    connect: Connector,
    admin_connect: Connector,
    *,
    tls: ssl.SSLContext,
    listening: Callable[[str], None] = lambda address: None,
    origin: str | None = None,
    direct: bool | None = None,
) -> ReceiveReport:
    """Accept senders one at a time until one delta has been received into the store.

    `tls` is the receiving store's server credential
    (csnap_common.credentials.server_context()); a sender must show an admin
    credential of the same CA.

    `listening` is told the address once the socket listens; `origin` is
    the origin file to write (by default the path csnapd reports), opened
    O_DIRECT as `direct` says (see csnap_delta.devices.Device.open).
    """
    host, port = listen
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        sockname = listeners[0].socket.getsockname()
        listening(f"{sockname[0]}:{sockname[1]}")
        while True:
            plain = await listeners[0].accept()
            stream = await _authenticated(plain, tls)
            if stream is None:
                continue
            async with stream:
                try:
                    report = await _serve_one(stream, spool, connect, admin_connect, origin, direct)
                except (DeltaTransferError, trio.BrokenResourceError, trio.TooSlowError):
                    continue  # the sender went away: what arrived stays in the spool
            if report is not None:
                return report
    finally:
        for listener in listeners:
            await listener.aclose()


async def _authenticated(
    plain: trio.SocketStream, tls: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream] | None:
    """The sender's stream once it has shown an admin credential of our CA; None
    (and the connection closed) for any other peer."""
    stream = trio.SSLStream(plain, tls, server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await stream.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        log.warning("a sender failed the TLS handshake: %s", exc.__cause__ or exc)
        await trio.aclose_forcefully(plain)
        return None
    if ROLE_ADMIN not in granted_roles(stream.getpeercert()):
        log.warning("a sender without an admin credential was refused")
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await _answer(stream, REFUSED, 0, "an admin credential of this store's CA is needed")
        await trio.aclose_forcefully(stream)
        return None
    return stream


async def _answer(stream: trio.abc.Stream, status: int, held: int, message: str) -> None:
    text = _text(message)
    await stream.send_all(ANSWER.pack(ANSWER_MAGIC, status, 0, held, len(text)) + text)


async def _done(stream: trio.abc.Stream, status: int, message: str) -> None:
    text = _text(message)
    await stream.send_all(DONE.pack(DONE_MAGIC, status, len(text)) + text)


async def _serve_one(
    stream: trio.abc.Stream,
    spool: Path,
    connect: Connector,
    admin_connect: Connector,
    origin: str | None,
    direct: bool | None,
) -> ReceiveReport | None:
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        offer = await _receive_exact(stream, OFFER.size + DeltaHeader.SIZE)
    magic, version, _, _, total = OFFER.unpack(offer[: OFFER.size])
    if magic != OFFER_MAGIC or version != VERSION:
        await _answer(stream, REFUSED, 0, "not a csnap delta offer of version 1")
        return None
    try:
        header = DeltaHeader.decode(offer[OFFER.size :])
    except DeltaFormatError as exc:
        await _answer(stream, REFUSED, 0, str(exc))
        return None
    final = spool / spool_name(header)
    partial = final.with_name(final.name + ".partial")
    held = _held(partial, total)
    await _answer(stream, OK, held, "")
    if not await _spool(stream, partial, held, total):
        return None
    os.replace(partial, final)
    try:
        report = await receive_delta(connect, admin_connect, final, origin=origin, direct=direct)
    except (DeltaFormatError, DeltaRefusedError) as exc:
        os.unlink(final)
        await _done(stream, REFUSED, str(exc))
        return None
    except (ServerError, ConnectionLostError, OSError) as exc:
        # The store could not be reached or written: keep the file, so a
        # new send finds it whole and only the receive runs again.
        os.replace(final, partial)
        await _done(stream, REFUSED, f"receiving into the store: {exc}")
        return None
    os.unlink(final)
    await _done(stream, OK, f"snapshot {header.to_tag} created")
    return report


def _held(partial: Path, total: int) -> int:
    """Bytes of the delta already spooled (none if the spool is longer than the delta)."""
    try:
        held = partial.stat().st_size
    except FileNotFoundError:
        return 0
    if held > total:
        partial.unlink()
        return 0
    return held


async def _spool(stream: trio.abc.Stream, partial: Path, held: int, total: int) -> bool:
    """Append the rest of the delta to the spool file; False if the sender went away."""
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, held)
        position = held
        while position < total:
            data = await stream.receive_some(min(PIECE, total - position))
            if not data:
                return False
            os.pwrite(fd, data, position)
            position += len(data)
        return True
    finally:
        # What arrived is kept, whole pieces or not: the next offer resumes after it.
        os.fsync(fd)
        os.close(fd)
