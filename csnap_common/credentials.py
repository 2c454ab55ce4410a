"""Cluster credentials: the files that hold them, the TLS contexts made from
them, and the roles a certificate grants.

Every csnapd connection is mutual TLS under one certificate authority per
cluster (docs/protocol.md, "Authentication"). A credential directory holds:

  ca-cert.pem                     the cluster CA's certificate (whom to trust)
  ca-key.pem                      the CA's key: only where credentials are made
  server-cert.pem, server-key.pem csnapd's credential
  admin-cert.pem, admin-key.pem   an administrator's (the agent's) credential
  client-cert.pem, client-key.pem a data-path credential (NBD gateways)

The role is the certificate subject's organizationalUnitName: "server",
"admin" or "client". An admin credential may do everything; a client
credential may do I/O and read the server's state, never change it.

Files are written with mode 0600 in a directory of mode 0700. A store kept
in a file has its zero-configuration credentials beside it, in
"STORE.keys" (store_credentials()).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "ROLES",
    "ROLE_SERVER",
    "ROLE_ADMIN",
    "ROLE_CLIENT",
    "CA_CERT",
    "CA_KEY",
    "CredentialsError",
    "cert_file",
    "key_file",
    "store_credentials",
    "make_credentials",
    "issue_credential",
    "load_ca",
    "server_context",
    "client_context",
    "granted_roles",
    "is_loopback",
    "has_credential",
]

ROLE_SERVER = "server"
ROLE_ADMIN = "admin"
ROLE_CLIENT = "client"
#: Every role, in the order `csnap keys` issues them.
ROLES = (ROLE_SERVER, ROLE_ADMIN, ROLE_CLIENT)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
#: Days a CA and a credential are valid for when not told otherwise.
CA_DAYS = 3650
CREDENTIAL_DAYS = 825
#: A certificate counts as valid from this long before it was made: the
#: clocks of a cluster's nodes are never quite equal.
CLOCK_SKEW = datetime.timedelta(hours=1)


class CredentialsError(Exception):
    """Credentials that are missing, unreadable or cannot be made."""


def cert_file(role: str) -> str:
    """The certificate's file name for `role`: "admin-cert.pem"."""
    return f"{role}-cert.pem"


def key_file(role: str) -> str:
    """The private key's file name for `role`: "admin-key.pem"."""
    return f"{role}-key.pem"


def store_credentials(store: str | os.PathLike[str]) -> Path:
    """Where a store's zero-configuration credentials live: "STORE.keys"."""
    return Path(os.path.abspath(store) + ".keys")


def has_credential(directory: Path, role: str) -> bool:
    """Whether `directory` holds the CA certificate and `role`'s credential."""
    return all((directory / name).is_file() for name in (CA_CERT, cert_file(role), key_file(role)))


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine ("127.0.0.1", "::1", "localhost")."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# -- making credentials ---------------------------------------------------------


def make_credentials(
    directory: Path,
    roles: Iterable[str] = ROLES,
    *,
    days: int = CREDENTIAL_DAYS,
) -> list[Path]:
    """Make the cluster CA in `directory` if it has none, then issue `roles`.

    Credentials already there for a role are replaced (rotation: the CA, and
    so everybody's trust, stays). Returns the files written.

    Raises:
        CredentialsError: the directory cannot be written, or it has a CA
            certificate but not its key.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        written: list[Path] = []
        if not (directory / CA_CERT).exists():
            ca_key = ec.generate_private_key(ec.SECP256R1())
            ca_cert = _ca_certificate(ca_key)
            written.append(_write(directory / CA_KEY, _key_pem(ca_key)))
            written.append(_write(directory / CA_CERT, ca_cert.public_bytes(_PEM)))
        ca_cert, ca_key = _load_ca(directory)
        for role in roles:
            cert_pem, key_pem = issue_credential(ca_cert, ca_key, role, days=days)
            written.append(_write(directory / key_file(role), key_pem))
            written.append(_write(directory / cert_file(role), cert_pem))
    except OSError as exc:
        raise CredentialsError(f"cannot write credentials in {directory}: {exc}") from exc
    return written


def issue_credential(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    role: str,
    *,
    days: int = CREDENTIAL_DAYS,
    not_before: datetime.datetime | None = None,
    name: str | None = None,
) -> tuple[bytes, bytes]:
    """A new credential for `role` signed by the CA: (certificate PEM, key PEM).

    `not_before` (default: now less the clock skew) and `days` bound its
    validity; `name` is its common name (default "csnap ROLE").
    """
    if role not in ROLES:
        raise CredentialsError(f"no role {role!r}: roles are {', '.join(ROLES)}")
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - CLOCK_SKEW
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH if role == ROLE_SERVER else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, name or f"csnap {role}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(_PEM), _key_pem(key)


def load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and key kept in `directory` (CredentialsError if absent)."""
    try:
        return _load_ca(directory)
    except OSError as exc:
        raise CredentialsError(f"cannot read the CA in {directory}: {exc}") from exc


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not (directory / CA_KEY).exists():
        raise CredentialsError(
            f"{directory} has a CA certificate but not its key ({CA_KEY}):"
            " credentials are made where the CA key is kept"
        )
    # The first certificate in the file is the CA's own; any after it are
    # older CAs still trusted while credentials are rotated.
    cert = x509.load_pem_x509_certificates((directory / CA_CERT).read_bytes())[0]
    key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialsError(f"{directory / CA_KEY} is not an elliptic-curve key")
    return cert, key


def _ca_certificate(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "csnap cluster CA"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "ca"),
        ]
    )
    start = _now() - CLOCK_SKEW
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


_PEM = serialization.Encoding.PEM


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write(path: Path, data: bytes) -> Path:
    """Write `data` to `path` with mode 0600, atomically (readers never see half)."""
    partial = path.with_name(path.name + ".new")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)
    return path


# -- using credentials ----------------------------------------------------------


def server_context(directory: Path) -> ssl.SSLContext:
    """csnapd's TLS context: its server credential; peers must show one of the CA's.

    Raises:
        CredentialsError: the files are missing or do not load.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.verify_mode = ssl.CERT_REQUIRED
    # No session tickets: connections are long-lived and nothing resumes
    # them, and each ticket would leave a session (with the peer's
    # certificate) in the server's cache, memory a stream of connections
    # would grow without end.
    context.num_tickets = 0
    _load(context, directory, ROLE_SERVER)
    return context


def client_context(directory: Path, role: str) -> ssl.SSLContext:
    """A peer's TLS context for `role` ("admin" or "client"): csnapd must show
    a server credential of the CA (checked by csnap_client on connecting).

    The host name is not checked: the cluster CA issues server credentials
    to csnapd only, and the role is checked instead.

    Raises:
        CredentialsError: the files are missing or do not load.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    _load(context, directory, role)
    return context


def _load(context: ssl.SSLContext, directory: Path, role: str) -> None:
    # TLS 1.3 only: every csnap peer is Python with OpenSSL 1.1.1 or later,
    # and 1.3 has no server-side session cache to grow (see num_tickets).
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    files = (CA_CERT, cert_file(role), key_file(role))
    missing = [name for name in files if not (directory / name).is_file()]
    if missing:
        raise CredentialsError(
            f"{directory} lacks {', '.join(missing)}; make credentials with"
            f" `csnap keys {directory}` (docs/operations.md, 'Securing a cluster')"
        )
    try:
        context.load_verify_locations(cafile=str(directory / CA_CERT))
        context.load_cert_chain(str(directory / cert_file(role)), str(directory / key_file(role)))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f"cannot load the {role} credential in {directory}: {exc}") from exc


def granted_roles(peer_certificate: object) -> frozenset[str]:
    """The roles a verified peer certificate (SSLSocket.getpeercert()) grants."""
    if not isinstance(peer_certificate, dict):
        return frozenset()
    subject: Sequence[Sequence[tuple[str, str]]] = peer_certificate.get("subject", ())
    return frozenset(
        value
        for rdn in subject
        for key, value in rdn
        if key == "organizationalUnitName" and value in ROLES
    )
