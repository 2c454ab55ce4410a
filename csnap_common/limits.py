"""Limits every layer agrees on, each defined once.

The engine, the protocol codec, csnapd and the gateway each enforce their
part; importing the number from here keeps them from drifting apart.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_CHUNKS", "MAX_REQUEST_CHUNKS"]

#: Most chunks one request may name anywhere: the engine refuses more in one
#: call (bounding what a request costs in memory), csnapd may not be set to
#: announce more, and the gateway never asks for more whatever a server
#: announces.
MAX_REQUEST_CHUNKS = 1 << 16

#: Most chunks csnapd takes in one request unless told otherwise
#: (`identified.max_chunks` tells the client; docs/protocol.md, "Limits").
DEFAULT_MAX_CHUNKS = 4096
