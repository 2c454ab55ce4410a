"""The knobs of one gateway that the handshake and transmission consult."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Settings", "MAX_PAYLOAD"]

#: Largest READ or WRITE payload: the size every interoperable client uses.
MAX_PAYLOAD = 32 << 20


@dataclass(frozen=True, slots=True)
class Settings:
    #: Advertise READ_ONLY and refuse every write with EPERM.
    read_only: bool = False
    #: Largest READ or WRITE one request may carry (advertised as maximum block size).
    max_payload: int = MAX_PAYLOAD
    #: Bytes of READ and WRITE data one connection may hold at once; a
    #: request that would go over waits until earlier ones finish.
    connection_budget: int = 64 << 20
    #: Requests one connection may have in flight at once.
    max_in_flight: int = 128
    #: Largest option data the handshake reads; more ends the connection.
    max_option: int = 1 << 16
    #: Seconds a client may take to pick an export; then the connection is
    #: closed, so idle half-open connections do not pile up.
    handshake_timeout: float = 60.0
    #: A WRITE larger than max_payload but at most this is read and dropped
    #: (then refused); a larger one ends the connection, as no client sends it.
    max_drain: int = 64 << 20
