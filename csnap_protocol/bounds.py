"""The most bytes a message can take on the wire, known before it is built.

csnapd must refuse a request whose reply would not fit the peer's frame
limit before the request does anything (docs/protocol.md, "What csnapd
checks"). A reply that lists chunks (segments or ranges) has at most one
entry per chunk the request named, so its size is bounded by the request
alone: the size of the message with every integer at its widest and every
list empty, plus the widest entry for each chunk.
"""

from __future__ import annotations

import msgpack

from csnap_protocol.messages import Message
from csnap_protocol.schema import U32, U64, Int, Nullable, Ranges, Segments

__all__ = ["largest_payload", "RANGE_BYTES", "SEGMENT_BYTES"]

#: Widest msgpack encoding of one [chunk, count] range.
RANGE_BYTES = len(msgpack.packb([U64.high, U32.high]))
#: Widest msgpack encoding of one [chunk, count, store chunk] segment.
SEGMENT_BYTES = len(msgpack.packb([U64.high, U32.high, U64.high]))
#: An empty array's header is one byte; any other's at most five.
_ARRAY_HEADER_GROWTH = 4


def _widest(spec: Int) -> int:
    """The value of `spec` whose encoding is longest."""
    return max((spec.low, spec.high), key=lambda value: len(msgpack.packb(value)))


def largest_payload(kind: type[Message], entries: int) -> int:
    """Most payload bytes a `kind` message takes with `entries` list entries in all.

    `kind` may have integer fields (or nil-able ones) and ranges or segments
    fields; `entries` counts the items of all its list fields together.

    Raises:
        ValueError: `kind` has a field of another type, whose size is not bounded here.
    """
    shape = _SHAPES.get(kind)
    if shape is None:
        shape = _SHAPES[kind] = _shape(kind)
    base, per_entry = shape
    return base + entries * per_entry


#: _shape of each kind asked about: csnapd asks for every request it checks,
#: and packing the widest message costs more than answering the request.
_SHAPES: dict[type[Message], tuple[int, int]] = {}


def _shape(kind: type[Message]) -> tuple[int, int]:
    """(bytes with every list empty, at its widest; widest bytes per entry) of `kind`."""
    wire: dict[str, object] = {"type": kind.TYPE}
    per_entry = 0
    lists = 0
    for name, spec in kind.FIELDS.items():
        inner = spec.inner if isinstance(spec, Nullable) else spec
        if isinstance(inner, Int):
            wire[name] = _widest(inner)
        elif isinstance(inner, Ranges | Segments):
            wire[name] = []
            lists += 1
            per_entry = max(
                per_entry, SEGMENT_BYTES if isinstance(inner, Segments) else RANGE_BYTES
            )
        else:
            raise ValueError(f"{kind.TYPE}.{name}: no size bound for {inner.wire()}")
    base = len(msgpack.packb(wire, use_bin_type=True))
    return base + lists * _ARRAY_HEADER_GROWTH, per_entry
