"""Index summaries: the sweep reads only the leaves that may hold a swept
bit, csnap-check finds a summary missing a bit, and a store formatted
before summaries existed opens, upgrades and is swept.
"""

from __future__ import annotations

import dataclasses

from csnap_format import (
    FEATURE_INDEX_SUMMARIES,
    GEOMETRY_BACKUP_ADDRESS,
    decode_geometry,
    decode_index,
    decode_superblock,
    encode_geometry_backup,
    encode_index,
)
from csnapd.engine import Engine, MemoryDevice
from csnapd.engine.changes import Changes
from csnapd.engine.check import check_store
from csnapd.engine.check_summaries import SUMMARY_RULE
from tests.engine.helpers import assert_clean, format_device, new_geometry
from tests.engine.test_check import populated, rewrite

BACKGROUND, SINGLE = 1, 2


def _sweep_to_the_end(engine: Engine) -> int:
    """Run and commit sweep steps until nothing is left; the steps taken."""
    for steps in range(1, 1000):
        more = engine.sweep()
        engine.commit()
        if not more:
            return steps
    raise AssertionError("the sweep did not end in 1000 steps")


def _index_nodes(store: MemoryDevice) -> list[int]:
    """Addresses of the index nodes the superblock's tree reaches."""
    sb = decode_superblock(store.read(0, 4096))
    g = sb.geometry
    found, todo = [], [(sb.root, sb.depth)]
    while todo:
        address, level = todo.pop()
        if level == 0:
            continue
        found.append(address)
        node = decode_index(store.read(address * g.block_size, g.block_size), g.context, address)
        todo.extend((child, level - 1) for child in node.children)
    return found


def _one_exception_store() -> tuple[MemoryDevice, MemoryDevice, Engine]:
    """A background snapshot with 3,000 exceptions in many leaves, and
    snapshot SINGLE owning one exception (chunk 1500), opened."""
    g = new_geometry(origin_bytes=16 << 20, store_bytes=48 << 20)
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    engine = Engine.open(store, origin)
    engine.create_snapshot(BACKGROUND)
    engine.commit()
    for first in range(0, 3000, 500):
        engine.origin_write([(first, 500)])
        engine.commit()
    engine.create_snapshot(SINGLE)
    engine.commit()
    engine.snapshot_write(SINGLE, [(1500, 1)])
    engine.commit()
    return store, origin, engine


def test_a_changelist_reads_only_the_leaves_either_snapshot_may_differ_in() -> None:
    store, origin, engine = _one_exception_store()
    engine.close()
    engine = Engine.open(store, origin)
    depth = engine._state.depth
    end = engine.geometry.origin_chunks
    misses = engine.cache_stats.misses
    # The origin against SINGLE: only where SINGLE has an exception.
    assert engine.changes(None, SINGLE, 0, end, max_runs=16) == Changes(((1500, 1),), None)
    assert engine.cache_stats.misses - misses <= depth + 1
    # Two snapshots: where either has one (BACKGROUND's 3,000 chunks differ
    # from SINGLE, which reads the origin there, but for chunk 1500).
    answer = engine.changes(BACKGROUND, SINGLE, 0, end, max_runs=16, max_leaves=10_000)
    assert answer.runs == ((0, 3000),) and answer.next is None
    engine.close()


def test_sweeping_a_snapshot_owning_one_exception_reads_its_path_not_every_leaf() -> None:
    store, origin, engine = _one_exception_store()
    bit = engine.delete_snapshot(SINGLE).bit
    engine.commit()
    leaves = len(list(engine._tree.leaves()))
    depth = engine._state.depth
    engine.close()
    assert leaves >= 15 and depth >= 1

    # Cold cache: every block the sweep needs is read from the store.
    engine = Engine.open(store, origin)
    misses = engine.cache_stats.misses
    assert _sweep_to_the_end(engine) == 1
    # The path to the one leaf (depth + 1), the bitmap block of the freed
    # chunk and, for a merge, the left neighbour and the metadata bitmap.
    assert engine.cache_stats.misses - misses <= depth + 4 < leaves
    assert engine.stats.sweep_leaves == 1
    assert engine._state.snapshots[bit] is None  # the slot is free again
    engine.close()
    assert_clean(store)


def test_csnap_check_finds_a_summary_missing_a_bit() -> None:
    store, g, _ = populated()
    sb = decode_superblock(store.read(0, g.block_size))
    assert sb.depth >= 1
    node = decode_index(store.read(sb.root * g.block_size, g.block_size), g.context, sb.root)
    assert node.summaries is not None
    bit = 1 << next(b for b, r in enumerate(sb.snapshots) if r is not None)
    assert node.summaries[0] & bit
    summaries = (node.summaries[0] & ~bit, *node.summaries[1:])
    damaged = dataclasses.replace(node, summaries=summaries)
    rewrite(store, g, sb.root, encode_index(damaged, g.context))

    report = check_store(store)
    found = [p for p in report.problems if p.rule == SUMMARY_RULE]
    assert len(found) == 1 and found[0].block == sb.root, report.problems
    assert found[0].snapshots == (sb.snapshots[bit.bit_length() - 1].tag,)  # type: ignore[union-attr]

    # A superset is allowed: a bit too many is no problem.
    loose = dataclasses.replace(node, summaries=tuple((1 << 64) - 1 for _ in node.keys))
    rewrite(store, g, sb.root, encode_index(loose, g.context))
    assert_clean(store)


def test_a_store_without_summaries_opens_upgrades_and_sweeps() -> None:
    # Formatted as before summaries: no feature flag.
    g = dataclasses.replace(new_geometry(), features=0)
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    engine = Engine.open(store, origin)
    assert engine.geometry.features & FEATURE_INDEX_SUMMARIES
    for address in (0, GEOMETRY_BACKUP_ADDRESS):
        upgraded = decode_geometry(store.read(address * g.block_size, g.block_size))
        assert upgraded.features & FEATURE_INDEX_SUMMARIES, address
    engine.close()
    # A crash after the superblock's commit, before the backup's rewrite:
    # the next open rewrites the backup.
    store.write(GEOMETRY_BACKUP_ADDRESS * g.block_size, encode_geometry_backup(g))
    Engine.open(store, origin).close()
    backup = decode_geometry(store.read(GEOMETRY_BACKUP_ADDRESS * g.block_size, g.block_size))
    assert backup.features & FEATURE_INDEX_SUMMARIES

    # Index nodes written before the upgrade, in the legacy layout.
    store, g, _ = populated()
    nodes = _index_nodes(store)
    assert nodes
    for address in nodes:
        node = decode_index(store.read(address * g.block_size, g.block_size), g.context, address)
        legacy = dataclasses.replace(node, summaries=None)
        rewrite(store, g, address, encode_index(legacy, g.context))
    assert_clean(store)

    engine = Engine.open(store, MemoryDevice(g.origin_bytes))
    leaves = len(list(engine._tree.leaves()))
    engine.delete_snapshot(2)
    engine.commit()
    _sweep_to_the_end(engine)
    # With every summary read as all bits, the first sweep reads every leaf.
    assert engine.stats.sweep_leaves == leaves
    engine.close()
    assert_clean(store)
    for address in _index_nodes(store):
        node = decode_index(store.read(address * g.block_size, g.block_size), g.context, address)
        assert node.summaries is not None and all(s == 1 << 0 for s in node.summaries)


def test_a_bit_no_summary_holds_is_released_before_the_pass_ends() -> None:
    store, _origin, engine = _one_exception_store()
    spread = 3
    engine.create_snapshot(spread)
    engine.commit()
    engine.snapshot_write(spread, [(chunk, 1) for chunk in range(5, 3000, 100)])
    engine.commit()
    assert len(list(engine._tree.leaves())) > 20
    spread_bit = engine.delete_snapshot(spread).bit  # starts a pass
    engine.set_priority(BACKGROUND, 100)
    engine.set_priority(SINGLE, -100)
    single = 1 << engine.snapshot(SINGLE).bit
    squashed = engine.squash_for_reserve()  # SINGLE joins the pass, from chunk 0
    assert squashed is not None and squashed.tag == SINGLE
    engine.commit()
    assert engine._state.sweep_mask == single | 1 << spread_bit
    for _ in range(100):
        assert engine.sweep()
        engine.commit()
        if not engine._state.sweep_mask & single:
            break
    # SINGLE's one exception (chunk 1500) is gone and its bit is out of the
    # pass, while the pass still sweeps the spread snapshot's.
    assert engine._state.sweep_mask == 1 << spread_bit
    assert engine._state.sweep_cursor < 3000
    _sweep_to_the_end(engine)
    assert engine._state.snapshots[spread_bit] is None
    assert engine.snapshot(SINGLE).state == "squashed"
    engine.close()
    assert_clean(store)
