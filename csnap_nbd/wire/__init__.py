"""csnap_nbd.wire: the NBD protocol as bytes, sans-IO.

Constants, the handshake (greeting, options, option replies), the
transmission phase (requests, simple and structured replies, request
checks) and metadata context selection. No trio, no sockets: the gateway's
transport reads the lengths these modules name and writes what they build,
and unit tests drive them byte by byte.
"""

from __future__ import annotations

from csnap_nbd.wire import constants, contexts, handshake, transmission
from csnap_nbd.wire.errors import NbdProtocolError, OptionDataError

__all__ = [
    "constants",
    "contexts",
    "handshake",
    "transmission",
    "NbdProtocolError",
    "OptionDataError",
]
