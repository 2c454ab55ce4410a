"""The btree walk (ExceptionTree.entries_of) against the leaves' own
lookups: for any list of ranges, in any order, over a tree of several leaves
whose entries hold one to three exceptions each, it yields every chunk of
every range once, in order, with the entry index LeafPage.find gives and the
position LeafPage.span gives (or -1 where the chunk has no entry), whether
or not a range starts in the leaf the one before ended in.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from csnapd.engine import Engine
from csnapd.engine.btree import Entry
from tests.engine.helpers import new_store


def _engine() -> tuple[Engine, int]:
    """Snapshots 1..3 taken between origin writes of scattered chunks, so
    that entries have one to three exceptions and many chunks none."""
    store, origin, g = new_store(origin_bytes=4 << 20)
    engine = Engine.open(store, origin)
    end = g.origin_chunks
    rng = random.Random(5)
    for tag in (1, 2, 3):
        engine.create_snapshot(tag)
        engine.commit()
        for chunk in rng.sample(range(end), end // 3):
            engine.origin_write([(chunk, 1)])
        engine.commit()
    return engine, end


ENGINE, END = _engine()


def _expected(ranges: list[tuple[int, int]]) -> list[Entry]:
    tree = ENGINE._tree
    out: list[Entry] = []
    for start, count in ranges:
        for chunk in range(start, start + count):
            leaf = tree.descend(chunk)[0]
            i, found = leaf.find(chunk)
            out.append((chunk, leaf, i, leaf.span(i)[0] if found else -1))
    return out


@st.composite
def _ranges(draw: st.DrawFn) -> list[tuple[int, int]]:
    starts = draw(st.lists(st.integers(0, END - 1), min_size=1, max_size=12))
    return [(s, draw(st.integers(1, min(40, END - s)))) for s in starts]


def test_the_tree_has_leaves_and_entries_of_several_exceptions() -> None:
    leaves = [leaf for leaf, _, _ in ENGINE._tree.leaves()]
    assert len(leaves) > 2
    assert max(max(leaf.counts, default=0) for leaf in leaves) == 3
    assert sum(len(leaf.chunks) for leaf in leaves) < END


@settings(max_examples=300, deadline=None)
@given(_ranges())
def test_the_walk_yields_what_the_leaves_say(ranges: list[tuple[int, int]]) -> None:
    walked = list(ENGINE._tree.entries_of(ranges))
    assert [(c, leaf.address, i, at) for c, leaf, i, at in walked] == [
        (c, leaf.address, i, at) for c, leaf, i, at in _expected(ranges)
    ]
