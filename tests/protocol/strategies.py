"""Hypothesis strategies that build valid messages from their field specs."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from csnap_protocol import MESSAGES, Message
from csnap_protocol.schema import (
    Blob,
    Bytes,
    Choice,
    Flag,
    Int,
    ListOf,
    Nullable,
    Ranges,
    Record,
    Segments,
    Spec,
    Text,
)


def values(spec: Spec) -> st.SearchStrategy[Any]:
    """Values that `spec` accepts."""
    if isinstance(spec, Int):
        return st.integers(spec.low, spec.high)
    if isinstance(spec, Text):
        return st.text(max_size=min(spec.max_length, 24))
    if isinstance(spec, Choice):
        return st.sampled_from(spec.values)
    if isinstance(spec, Blob):
        return st.binary(min_size=spec.length, max_size=spec.length)
    if isinstance(spec, Bytes):
        return st.binary(min_size=1, max_size=min(spec.max_length, 64))
    if isinstance(spec, Flag):
        return st.booleans()
    if isinstance(spec, Nullable):
        return st.none() | values(spec.inner)
    if isinstance(spec, Ranges):
        pair = st.tuples(st.integers(0, (1 << 64) - 1), st.integers(1, 0xFFFF_FFFF))
        return st.lists(pair, max_size=6).map(tuple)
    if isinstance(spec, Segments):
        triple = st.tuples(
            st.integers(0, (1 << 64) - 1),
            st.integers(1, 0xFFFF_FFFF),
            st.integers(0, (1 << 64) - 1),
        )
        return st.lists(triple, max_size=6).map(tuple)
    if isinstance(spec, Record):
        return st.fixed_dictionaries({k: values(v) for k, v in spec.fields.items()}).map(
            lambda fields: spec.cls(**fields)
        )
    if isinstance(spec, ListOf):
        return st.lists(values(spec.inner), max_size=min(3, spec.most)).map(tuple)
    raise TypeError(f"no strategy for {spec!r}")


def messages_of(cls: type[Message]) -> st.SearchStrategy[Message]:
    return st.builds(cls, **{name: values(spec) for name, spec in cls.FIELDS.items()})


def any_message(*, hello: bool = False) -> st.SearchStrategy[Message]:
    """Any registered message (hello only if asked)."""
    return st.sampled_from(
        sorted((c for t, c in MESSAGES.items() if hello or t != "hello"), key=lambda c: c.TYPE)
    ).flatmap(messages_of)
