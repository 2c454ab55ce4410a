"""Addresses as users write them: "host:port", "[v6]:port", and Unix socket
paths where "@name" means Linux's abstract namespace.
"""

from __future__ import annotations

__all__ = ["AddressError", "split_host_port", "join_host_port", "unix_address"]


class AddressError(ValueError):
    """An address that does not parse."""


def split_host_port(text: str, *, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """ "host:port" or "[v6]:port" -> (host, port); an empty host is `default_host`."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise AddressError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or default_host, int(port)


def join_host_port(host: str, port: int) -> str:
    """(host, port) -> "host:port", bracketing IPv6 hosts."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def unix_address(path: str) -> str:
    """The socket address for a Unix socket path: "@name" is the abstract "\\0name"."""
    return "\0" + path[1:] if path.startswith("@") else path
