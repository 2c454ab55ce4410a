"""What the agent accepts in a `server_ready`: each field on its own, then the
registration beside the servers the agent already knows. The checks and
their order are the list in docs/protocol.md, section `server_ready`; each
refusal is a sentence for the server's log.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from typing import Protocol

__all__ = ["RegistrationError", "parse_server_address", "check_fields", "check_against"]

#: One label of a host name (RFC 1123): letters, digits and inner hyphens.
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


class RegistrationError(ValueError):
    """A registration the agent refuses, and why."""


class Known(Protocol):
    """What the agent knows of a server already registered."""

    @property
    def address(self) -> str: ...
    @property
    def store(self) -> str: ...
    @property
    def pid(self) -> int: ...


def parse_server_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT`, strictly: a host, and a port 1..65535.

    Raises:
        RegistrationError: anything else (no host, port 0, a port with a
            sign, spaces or leading zeros, an unbracketed IPv6 address).
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        raise RegistrationError(f"address {text!r} is not HOST:PORT")
    if not (port.isascii() and port.isdigit()) or (len(port) > 1 and port.startswith("0")):
        raise RegistrationError(f"address {text!r}: the port is not a decimal number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise RegistrationError(f"address {text!r}: the port is not 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise RegistrationError(f"address {text!r}: {host} is not an IPv6 address") from None
        return host[1:-1], number
    if not host:
        raise RegistrationError(f"address {text!r} names no host")
    if ":" in host or "[" in host or "]" in host:
        raise RegistrationError(f"address {text!r}: an IPv6 host is written [HOST]:PORT")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if len(host) > 253 or not all(_LABEL.match(label) for label in host.split(".")):
            raise RegistrationError(
                f"address {text!r}: {host!r} is neither an IP address nor a host name"
            ) from None
    return host, number


def check_fields(address: str, store: str, pid: int) -> None:
    """Each field of a registration on its own.

    Raises:
        RegistrationError: the first field that makes no sense.
    """
    parse_server_address(address)
    if not store:
        raise RegistrationError("the store path is empty")
    if "\0" in store:
        raise RegistrationError("the store path contains a NUL character")
    if not store.startswith("/"):
        raise RegistrationError(f"the store path {store!r} is not absolute")
    if os.path.normpath(store) != store:
        raise RegistrationError(
            f"the store path {store!r} is not in normal form ({os.path.normpath(store)!r})"
        )
    if pid < 1:
        raise RegistrationError(f"pid {pid} is not a process id")


def check_against(
    address: str,
    store: str,
    active: bool,
    registered: Iterable[Known],
    serving: Known | None,
) -> None:
    """A registration beside the servers the agent knows.

    `registered` are the servers registered on other connections; `serving`
    is the one active or being started, if any.

    Raises:
        RegistrationError: it contradicts what the agent knows.
    """
    for other in registered:
        if other.address == address:
            raise RegistrationError(
                f"address {address} is registered already, by server pid {other.pid}"
            )
        if other.store != store:
            raise RegistrationError(
                f"this agent's servers serve the store {other.store}, not {store}"
            )
    if active and serving is not None:
        raise RegistrationError(
            f"server pid {serving.pid} at {serving.address} is active;"
            " a second server cannot be serving the store"
        )
