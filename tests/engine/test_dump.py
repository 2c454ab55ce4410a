"""csnap-check --dump then --restore is the identity on a healthy store's
metadata, after any history of snapshots, deletions (swept or not), origin
and snapshot writes; a document that is not valid is refused and changes
nothing.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csnapd.engine import Engine, MemoryDevice, RevertInProgressError
from csnapd.engine.check import check_store
from csnapd.engine.dump import DumpError, dump_store, restore_store
from tests.engine.helpers import assert_clean, format_device, new_geometry

G = new_geometry(store_bytes=16 << 20, origin_bytes=2 << 20)
CHUNKS = G.origin_chunks

_ranges = st.tuples(st.integers(0, CHUNKS - 1), st.integers(1, 64)).map(
    lambda r: (r[0], min(r[1], CHUNKS - r[0]))
)
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.integers(1, 6)),
        st.tuples(st.just("delete"), st.integers(1, 6)),
        st.tuples(st.just("origin"), _ranges),
        st.tuples(st.just("snapshot"), st.tuples(st.integers(1, 6), _ranges)),
        st.tuples(st.just("sweep"), st.none()),
        st.tuples(st.just("client"), st.integers(1, 3)),
        st.tuples(st.just("revert"), st.integers(1, 6)),
    ),
    max_size=25,
)


def _apply(engine: Engine, step: tuple[str, Any]) -> None:
    # While a revert is in progress some requests are refused, as they must be.
    with contextlib.suppress(RevertInProgressError):
        _request(engine, step)
    engine.commit()


def _request(engine: Engine, step: tuple[str, Any]) -> None:
    kind, arg = step
    live = {info.tag for info in engine.snapshots() if info.state == "live"}
    if kind == "create" and arg not in live:
        engine.create_snapshot(arg)
    elif kind == "delete" and arg in live:
        engine.delete_snapshot(arg)
    elif kind == "origin":
        engine.origin_write([arg])
    elif kind == "snapshot" and arg[0] in live:
        engine.snapshot_write(arg[0], [arg[1]])
    elif kind == "sweep":
        engine.sweep()
    elif kind == "client":
        engine.set_registered_clients(frozenset(range(10 * arg, 11 * arg)))
    elif kind == "revert" and arg in live:
        engine.start_revert(arg)  # left in progress: the dump carries it


def _store(steps: list[tuple[str, Any]]) -> MemoryDevice:
    store = MemoryDevice(G.store_bytes)
    format_device(store, G)
    engine = Engine.open(store, MemoryDevice(G.origin_bytes))
    for step in steps:
        _apply(engine, step)
    engine.close()
    return store


def _fresh() -> MemoryDevice:
    store = MemoryDevice(G.store_bytes)
    format_device(store, G)
    return store


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_steps)
def test_dump_then_restore_is_the_identity(steps: list[tuple[str, Any]]) -> None:
    store = _store(steps)
    doc = dump_store(store)
    json.dumps(doc)  # the document is plain JSON
    for target in (store, _fresh()):
        restore_store(target, json.loads(json.dumps(doc)))
        assert_clean(target)
        assert dump_store(target) == doc
        # The restored store serves as the original did.
        Engine.open(target, MemoryDevice(G.origin_bytes)).close()


def _bad_documents(doc: dict[str, Any]) -> list[dict[str, Any]]:
    bad = []
    changes: list[Callable[[dict[str, Any]], object]] = [
        lambda d: d.update(csnap_metadata_dump=2),
        lambda d: d["geometry"].update(store_chunks=1),
        lambda d: d["exceptions"].append([CHUNKS, 1, None]),
        lambda d: d["exceptions"].append([0, 1 << 40, None]),
        lambda d: d["exceptions"].append(list(d["exceptions"][0])),
        lambda d: d["exceptions"].insert(0, [CHUNKS - 1, 1, None]),
        lambda d: d["snapshots"][0].update(unique_chunks=12345),
        lambda d: d["snapshots"][0].update(state="gone"),
        lambda d: d["snapshots"].append(dict(d["snapshots"][0])),
        lambda d: d["state"].update(sweep_mask=1 << 50),
        lambda d: d["state"].update(revert={"tag": 99, "bit": 0, "cursor": 0}),
        lambda d: d["state"].update(
            revert={"tag": 99, "bit": 0, "cursor": 0, "restored": 0, "total": 0}
        ),
        lambda d: d.update(registry={"clients": [3, 2], "overflow": False}),
    ]
    for change in changes:
        changed = copy.deepcopy(doc)
        change(changed)
        bad.append(changed)
    return bad


def test_a_bad_document_is_refused_and_changes_nothing() -> None:
    store = _store([("create", 1), ("origin", (0, 40)), ("create", 2), ("origin", (20, 40))])
    doc = dump_store(store)
    image = store.read(0, G.store_bytes)
    for bad in _bad_documents(doc):
        with pytest.raises(DumpError):
            restore_store(store, bad)
        assert store.read(0, G.store_bytes) == image
    assert check_store(store).exit_code == 0
