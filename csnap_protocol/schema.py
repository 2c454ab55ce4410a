"""A small declarative schema for message fields: each spec checks one
decoded msgpack value and names its wire type for docs/protocol.md.

Rule: every value taken from the wire passes through a spec before any
other code sees it. msgpack gives Python ints, strs, bytes, lists, dicts,
bools, floats and None; `bool` is an `int` in Python, so integer specs test
the exact type.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Spec",
    "Int",
    "Text",
    "Choice",
    "Blob",
    "Bytes",
    "Flag",
    "Nullable",
    "Ranges",
    "Segments",
    "ListOf",
    "Record",
    "U8",
    "U16",
    "U32",
    "U64",
    "S8",
    "S32",
    "FieldError",
]


class FieldError(ValueError):
    """A value that does not match its spec; `where` names the field."""


class Spec:
    """Checks a decoded value and returns it in its Python form."""

    def wire(self) -> str:
        """How docs/protocol.md names this type."""
        raise NotImplementedError

    def check(self, value: object, where: str) -> Any:
        raise NotImplementedError

    def to_wire(self, value: Any) -> Any:
        """What msgpack is given for `value` (a value check() returned)."""
        return value

    def out(self, value: Any, where: str) -> Any:
        """What msgpack is given for `value`, a field of a message about to
        be sent, refusing what check() would refuse once it came back from
        the wire (FieldError): a sender finds out before its peer does.

        Specs whose values go on the wire as they are override this with
        their own check, sparing the conversion.
        """
        wire = self.to_wire(value)
        self.check(_as_wire(wire), where)
        return wire


def _sent_as_it_is(spec: Spec, value: Any, where: str) -> Any:
    """Spec.out for a spec whose values go on the wire as they are: checking
    one is enough. What it refuses is refused the general way, for the
    general way's words."""
    try:
        return spec.check(value, where)
    except FieldError:
        return Spec.out(spec, value, where)


def _as_wire(value: Any) -> Any:
    """What msgpack turns a Python value into (tuples become lists)."""
    if type(value) is int or value is None:
        return value
    if isinstance(value, tuple | list):
        return [_as_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_wire(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Int(Spec):
    low: int
    high: int
    name: str = "int"

    def wire(self) -> str:
        return self.name

    def check(self, value: object, where: str) -> int:
        if type(value) is not int:
            raise FieldError(f"{where}: expected an integer, got {type(value).__name__}")
        if not self.low <= value <= self.high:
            raise FieldError(f"{where}: {value} is not in {self.low}..{self.high}")
        return value

    def out(self, value: Any, where: str) -> Any:
        return _sent_as_it_is(self, value, where)


U8 = Int(0, 0xFF, "u8")
U16 = Int(0, 0xFFFF, "u16")
U32 = Int(0, 0xFFFF_FFFF, "u32")
U64 = Int(0, (1 << 64) - 1, "u64")
S8 = Int(-128, 127, "s8")
S32 = Int(-(1 << 31), (1 << 31) - 1, "s32")
_U64_HIGH = U64.high
_U32_HIGH = U32.high


@dataclass(frozen=True)
class Text(Spec):
    max_length: int

    def wire(self) -> str:
        return "str"

    def check(self, value: object, where: str) -> str:
        if type(value) is not str:
            raise FieldError(f"{where}: expected a string, got {type(value).__name__}")
        if len(value) > self.max_length:
            raise FieldError(
                f"{where}: string of {len(value)} characters exceeds {self.max_length}"
            )
        return value

    def out(self, value: Any, where: str) -> Any:
        return _sent_as_it_is(self, value, where)


@dataclass(frozen=True)
class Choice(Spec):
    values: tuple[str, ...]

    def wire(self) -> str:
        return "str"

    def check(self, value: object, where: str) -> str:
        if type(value) is not str or value not in self.values:
            raise FieldError(f"{where}: expected one of {', '.join(self.values)}")
        return value

    def out(self, value: Any, where: str) -> Any:
        return _sent_as_it_is(self, value, where)


@dataclass(frozen=True)
class Blob(Spec):
    length: int

    def wire(self) -> str:
        return "bin"

    def check(self, value: object, where: str) -> bytes:
        if type(value) is not bytes or len(value) != self.length:
            raise FieldError(f"{where}: expected {self.length} bytes of binary")
        return value

    def out(self, value: Any, where: str) -> Any:
        return _sent_as_it_is(self, value, where)


@dataclass(frozen=True)
class Bytes(Spec):
    """Binary of 1 to `max_length` bytes."""

    max_length: int

    def wire(self) -> str:
        return "bin"

    def check(self, value: object, where: str) -> bytes:
        if type(value) is not bytes:
            raise FieldError(f"{where}: expected binary, got {type(value).__name__}")
        if not 1 <= len(value) <= self.max_length:
            raise FieldError(f"{where}: {len(value)} bytes of binary is not 1..{self.max_length}")
        return value

    def out(self, value: Any, where: str) -> Any:
        return _sent_as_it_is(self, value, where)


@dataclass(frozen=True)
class Flag(Spec):
    def wire(self) -> str:
        return "bool"

    def check(self, value: object, where: str) -> bool:
        if type(value) is not bool:
            raise FieldError(f"{where}: expected true or false")
        return value

    def out(self, value: Any, where: str) -> Any:
        return _sent_as_it_is(self, value, where)


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def wire(self) -> str:
        return f"{self.inner.wire()} or nil"

    def check(self, value: object, where: str) -> Any:
        return None if value is None else self.inner.check(value, where)

    def to_wire(self, value: Any) -> Any:
        return None if value is None else self.inner.to_wire(value)

    def out(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.out(value, where)


def _list(value: object, where: str, most: int) -> list[object]:
    if type(value) is not list:
        raise FieldError(f"{where}: expected an array, got {type(value).__name__}")
    if len(value) > most:
        raise FieldError(f"{where}: {len(value)} items exceed the limit of {most}")
    return value


def _runs_as_they_are(value: Any, most: int, width: int) -> bool:
    """Whether `value`, ranges (`width` 2) or segments (3) as a sender holds
    them, tuples or lists, is what check() accepts once on the wire: at most
    `most` runs of a u64 chunk, a u32 count of at least 1 and, for a
    segment, a u64 store chunk."""
    if (type(value) is not tuple and type(value) is not list) or len(value) > most:
        return False
    for run in value:
        if (type(run) is not tuple and type(run) is not list) or len(run) != width:
            return False
        chunk, count = run[0], run[1]
        if type(chunk) is not int or type(count) is not int:
            return False
        if not (0 <= chunk <= _U64_HIGH and 1 <= count <= _U32_HIGH):
            return False
        if width == 3 and (type(run[2]) is not int or not 0 <= run[2] <= _U64_HIGH):
            return False
    return True


@dataclass(frozen=True)
class Ranges(Spec):
    """Chunk ranges: [[first chunk u64, count u32 >= 1], ...]."""

    most: int

    def wire(self) -> str:
        return "ranges"

    def check(self, value: object, where: str) -> tuple[tuple[int, int], ...]:
        items = _list(value, where, self.most)
        out = []
        for item in items:
            # Every range checked here; the slow loop below only names what is wrong.
            if type(item) is not list or len(item) != 2:
                break
            chunk, count = item
            if type(chunk) is not int or type(count) is not int:
                break
            if not (0 <= chunk <= _U64_HIGH and 1 <= count <= _U32_HIGH):
                break
            out.append((chunk, count))
        else:
            return tuple(out)
        out = []
        for n, item in enumerate(items):
            pair = _list(item, f"{where}[{n}]", 2)
            if len(pair) != 2:
                raise FieldError(f"{where}[{n}]: expected [chunk, count]")
            chunk = U64.check(pair[0], f"{where}[{n}] chunk")
            count = Int(1, 0xFFFF_FFFF).check(pair[1], f"{where}[{n}] count")
            out.append((chunk, count))
        return tuple(out)

    def out(self, value: Any, where: str) -> Any:
        # Ranges go on the wire as they are (msgpack packs tuples as
        # arrays); any that check() would refuse take the general way, for
        # its error.
        return value if _runs_as_they_are(value, self.most, 2) else super().out(value, where)


@dataclass(frozen=True)
class Segments(Spec):
    """Store segments: [[first chunk u64, count u32 >= 1, store chunk u64], ...]."""

    most: int

    def wire(self) -> str:
        return "segments"

    def check(self, value: object, where: str) -> tuple[tuple[int, int, int], ...]:
        items = _list(value, where, self.most)
        out = []
        for item in items:
            # Every segment checked here; the slow loop below only names what is wrong.
            if type(item) is not list or len(item) != 3:
                break
            chunk, count, store = item
            if type(chunk) is not int or type(count) is not int or type(store) is not int:
                break
            if not (
                0 <= chunk <= _U64_HIGH and 1 <= count <= _U32_HIGH and 0 <= store <= _U64_HIGH
            ):
                break
            out.append((chunk, count, store))
        else:
            return tuple(out)
        out = []
        for n, item in enumerate(items):
            triple = _list(item, f"{where}[{n}]", 3)
            if len(triple) != 3:
                raise FieldError(f"{where}[{n}]: expected [chunk, count, store chunk]")
            chunk = U64.check(triple[0], f"{where}[{n}] chunk")
            count = Int(1, 0xFFFF_FFFF).check(triple[1], f"{where}[{n}] count")
            store = U64.check(triple[2], f"{where}[{n}] store chunk")
            out.append((chunk, count, store))
        return tuple(out)

    def out(self, value: Any, where: str) -> Any:
        # As Ranges.out.
        return value if _runs_as_they_are(value, self.most, 3) else super().out(value, where)


@dataclass(frozen=True)
class Record(Spec):
    """A nested map with exactly these fields, decoded into `cls`.

    `cls` is a frozen dataclass whose fields are these, in this order; the
    map is built from its fields in that order.
    """

    name: str
    fields: Mapping[str, Spec]
    cls: type[Any]

    def wire(self) -> str:
        return self.name

    def check(self, value: object, where: str) -> Any:
        if type(value) is not dict:
            raise FieldError(f"{where}: expected a map, got {type(value).__name__}")
        extra = set(value) - set(self.fields)
        if extra:
            raise FieldError(f"{where}: unknown fields {sorted(map(str, extra))}")
        return self.cls(
            **{
                key: spec.check(value.get(key), f"{where}.{key}")
                for key, spec in self.fields.items()
            }
        )

    def to_wire(self, value: Any) -> Any:
        if not isinstance(value, self.cls):
            return value  # not a record: left as it is, for check() to refuse
        return {key: spec.to_wire(getattr(value, key)) for key, spec in self.fields.items()}


@dataclass(frozen=True)
class ListOf(Spec):
    inner: Spec
    most: int

    def wire(self) -> str:
        return f"array of {self.inner.wire()}"

    def check(self, value: object, where: str) -> tuple[Any, ...]:
        return tuple(
            self.inner.check(item, f"{where}[{n}]")
            for n, item in enumerate(_list(value, where, self.most))
        )

    def to_wire(self, value: Any) -> Any:
        if not isinstance(value, tuple | list):
            return value  # not a list: left as it is, for check() to refuse
        return tuple(self.inner.to_wire(item) for item in value)
