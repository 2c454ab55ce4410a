"""NBD over TLS for the gateway: the TLS policy, the certificate directory, the upgrade.

Owns what `--tls`, `--tls-certificates` and `--tls-verify-peer` mean
(docs/nbd.md, "TLS"): loading the directory in the layout nbdkit and qemu
use into an `ssl.SSLContext`, and turning one connection's plain stream into
a `trio.SSLStream` once `NBD_OPT_STARTTLS` has been acknowledged. The
handshake's option logic lives in csnap_nbd.negotiation.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

import trio

__all__ = [
    "CA_CERT",
    "SERVER_CERT",
    "SERVER_KEY",
    "TlsMode",
    "TlsPolicy",
    "TlsConfigError",
    "TlsHandshakeError",
    "server_context",
    "start_tls",
    "is_loopback",
    "describe",
    "CERTIFICATES_HINT",
]

log = logging.getLogger("csnap.nbd.tls")

#: The files of a certificate directory, named as nbdkit and qemu name them.
CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"

#: How to get certificates, for messages that refuse to go on without them.
CERTIFICATES_HINT = (
    f"DIR holds {CA_CERT}, {SERVER_CERT} and {SERVER_KEY}, which"
    ' "scripts/nbd-certs DIR" makes with openssl; see docs/operations.md, "NBD over TLS"'
)


class TlsMode(enum.Enum):
    """`--tls`: the three server modes of the NBD specification."""

    #: No TLS: NBD_OPT_STARTTLS is answered NBD_REP_ERR_UNSUP.
    OFF = "off"
    #: Clients choose: STARTTLS upgrades, plaintext clients are served too.
    ON = "on"
    #: Every option but STARTTLS and ABORT is refused until TLS is up.
    REQUIRE = "require"


class TlsConfigError(Exception):
    """The certificate directory cannot be used (a file missing or invalid)."""


class TlsHandshakeError(Exception):
    """The TLS handshake after NBD_OPT_STARTTLS failed; the connection is lost."""


@dataclass(frozen=True)
class TlsPolicy:
    """What one gateway does about TLS, on every listener alike."""

    mode: TlsMode = TlsMode.OFF
    #: The server's context; set exactly when mode is not OFF.
    context: ssl.SSLContext | None = None
    #: `--tls=off` was given: plaintext is then allowed on any address,
    #: where by default TCP listeners outside loopback need TLS.
    plaintext_anywhere: bool = False

    def __post_init__(self) -> None:
        if (self.mode is TlsMode.OFF) != (self.context is None):
            raise ValueError(f"TLS mode {self.mode.value} with context {self.context!r}")

    @property
    def verify_peer(self) -> bool:
        return self.context is not None and self.context.verify_mode == ssl.CERT_REQUIRED

    @property
    def scheme(self) -> str:
        """The URL scheme clients should use: nbds only when TLS is required."""
        return "nbds" if self.mode is TlsMode.REQUIRE else "nbd"


def server_context(directory: Path, *, verify_peer: bool = False) -> ssl.SSLContext:
    """The gateway's TLS context from DIR/server-cert.pem and DIR/server-key.pem.

    With `verify_peer`, clients must present a certificate signed by
    DIR/ca-cert.pem (nbdkit's --tls-verify-peer); without it they need none.
    TLS 1.2 is the oldest version accepted, as the NBD specification asks.

    Raises:
        TlsConfigError: a file is missing, unreadable or not a valid PEM
            certificate or key, or the key does not match the certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # A client may not renegotiate a TLS 1.2 session: it buys an attacker
    # handshakes for one connection, and nothing an NBD client needs.
    context.options |= ssl.OP_NO_RENEGOTIATION
    cert, key = directory / SERVER_CERT, directory / SERVER_KEY
    for needed in (cert, key, *([directory / CA_CERT] if verify_peer else [])):
        if not needed.is_file():
            raise TlsConfigError(f"{needed} not found: {CERTIFICATES_HINT}")
    mode = key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s can be read by other users (mode %o): make it 0600", key, mode & 0o777)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load {cert} with {key}: {_reason(exc)}") from exc
    if verify_peer:
        try:
            context.load_verify_locations(cafile=directory / CA_CERT)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError(f"cannot load {directory / CA_CERT}: {_reason(exc)}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext
) -> trio.SSLStream[trio.abc.Stream]:
    """Run the server side of the TLS handshake over `stream`.

    Raises:
        TlsHandshakeError: the client sent something that is not TLS, its
            certificate did not verify, or it went away.
    """
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        await tls.do_handshake()
    except trio.BrokenResourceError as exc:
        raise TlsHandshakeError(f"TLS handshake failed: {_reason(exc.__cause__ or exc)}") from exc
    return tls


def describe(stream: trio.SSLStream[trio.abc.Stream]) -> str:
    """The TLS version, cipher and client certificate subject, for logs."""
    cipher = stream.cipher()
    parts = [str(stream.version()), cipher[0] if cipher else "no cipher"]
    peer = stream.getpeercert()
    if peer:
        subject = ", ".join(f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn)
        parts.append(f"client {subject or 'without a subject'}")
    return ", ".join(parts)


def is_loopback(host: str) -> bool:
    """Whether a bound address only reaches this machine."""
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
