"""Spec.out, the sender's check, against the general way it stands for:
to_wire, as msgpack would see it, then the receiver's check.

Specs whose values go on the wire as they are check them directly; for
every spec of every message, valid or not, the fast way must return the
same wire value and refuse with the same error as the general one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csnap_protocol import MESSAGES
from csnap_protocol.schema import FieldError, Ranges, Segments, Spec

from .strategies import values


def _distinct_specs() -> dict[str, Spec]:
    """Every distinct spec of every message, named by its first field."""
    named: dict[str, Spec] = {}
    for cls in MESSAGES.values():
        for name, spec in cls.FIELDS.items():
            if spec not in named.values():
                named[f"{cls.TYPE}.{name}"] = spec
    return named


SPECS = _distinct_specs()


class Pair(NamedTuple):
    """A range as a named tuple: a tuple, but not exactly one."""

    first: int
    length: int


def general_out(spec: Spec, value: Any, where: str) -> Any:
    """Spec.out as the base class does it, whatever the spec overrides."""
    return Spec.out(spec, value, where)


def outcome(out: Any, value: Any) -> tuple[str, Any]:
    try:
        wire = out(value, "field")
    except FieldError as exc:
        return ("refused", str(exc))
    return ("sent", msgpack.packb(wire, use_bin_type=True))


#: Values of every shape a field might wrongly hold: ints out of every
#: range, bools (ints in Python, not on the wire), wrong containers,
#: pairs and triples of the wrong length, named tuples.
_int = st.one_of(
    st.integers(-(1 << 65), 1 << 65),
    st.sampled_from([0, 1, 0xFFFF_FFFF, 1 << 32, (1 << 64) - 1, 1 << 64, -1]),
    st.booleans(),
)
_leaf = st.one_of(_int, st.none(), st.text(max_size=3), st.binary(max_size=3), st.floats())
_item = st.one_of(
    st.tuples(_int, _int),
    st.lists(_int, max_size=4),
    st.tuples(_int, _int, _int),
    st.builds(Pair, _int, _int),
    _leaf,
)
anything = st.one_of(
    _leaf,
    st.lists(_item, max_size=4),
    st.lists(_item, max_size=4).map(tuple),
    st.dictionaries(st.text(max_size=3), _leaf, max_size=2),
)


@pytest.mark.parametrize("name", sorted(SPECS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_a_specs_own_out_agrees_with_the_general_way(name: str, data: st.DataObject) -> None:
    spec = SPECS[name]
    value = data.draw(values(spec) | anything, label="value")
    assert outcome(spec.out, value) == outcome(lambda v, w: general_out(spec, v, w), value)


@pytest.mark.parametrize("spec", [Ranges(3), Segments(3)], ids=["ranges", "segments"])
def test_ranges_and_segments_over_their_limit_are_refused_on_send(spec: Spec) -> None:
    width = 2 if isinstance(spec, Ranges) else 3
    item = (1,) * width
    assert spec.out((item,) * 3, "f") == (item,) * 3
    with pytest.raises(FieldError, match="4 items exceed the limit of 3"):
        spec.out((item,) * 4, "f")


#: A good run of each kind, then each of its values pushed just out of range
#: or to a type the wire does not carry as an integer.
_EDGES: dict[str, tuple[Spec, tuple[int, ...]]] = {
    "ranges": (Ranges(8), (5, 1)),
    "segments": (Segments(8), (5, 1, 9)),
}


@pytest.mark.parametrize("kind", sorted(_EDGES))
def test_every_value_of_a_run_is_checked_on_send_at_its_bounds(kind: str) -> None:
    spec, good = _EDGES[kind]
    highs = (1 << 64) - 1, 0xFFFF_FFFF, (1 << 64) - 1
    lows = 0, 1, 0
    for position in range(len(good)):
        for fine in (lows[position], highs[position]):
            run = (*good[:position], fine, *good[position + 1 :])
            assert spec.out((run,), "f") == (run,)
        wrongs: tuple[object, ...] = (lows[position] - 1, highs[position] + 1, True, 1.0, None)
        for wrong in wrongs:
            bad = (*good[:position], wrong, *good[position + 1 :])
            with pytest.raises(FieldError):
                spec.out((good, bad), "f")
            with pytest.raises(FieldError):
                spec.out([list(bad)], "f")
