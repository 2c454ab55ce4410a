"""Every on-disk structure survives encode -> decode unchanged, and the fast
struct codecs agree byte for byte with the construct declarations.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from csnap_format import (
    HEADER_SIZE,
    BitmapBlock,
    Registry,
    decode_bitmap,
    decode_commit,
    decode_geometry,
    decode_index,
    decode_leaf,
    decode_registry,
    decode_superblock,
    encode_bitmap,
    encode_commit,
    encode_geometry_backup,
    encode_index,
    encode_leaf,
    encode_registry,
    encode_superblock,
    layouts,
    registry_capacity,
)
from csnap_format.superblock import STATE_BUSY, STATE_CLEAN
from tests.format.strategies import (
    commit_records,
    geometries,
    index_nodes,
    leaves,
    superblocks,
)


@given(superblocks())
def test_superblock_roundtrip(sb: Any) -> None:
    assert decode_superblock(encode_superblock(sb)) == sb


@given(superblocks())
def test_superblock_agrees_with_construct_layout(sb: Any) -> None:
    data = encode_superblock(sb)
    parsed = layouts.SUPERBLOCK.parse(data)
    g = sb.geometry
    assert parsed.header.magic == b"CSNP"
    assert parsed.header.address == 0
    assert parsed.header.store_id == g.store_id
    assert parsed.header.sequence == sb.sequence
    assert parsed.geometry.uuid == g.uuid
    assert parsed.geometry.data_start == g.data_start
    assert parsed.geometry.journal_blocks == g.journal_blocks
    assert parsed.state.state == (STATE_CLEAN if sb.clean else STATE_BUSY)
    assert parsed.state.root == sb.root
    assert parsed.state.sweep_cursor == sb.sweep_cursor
    assert (parsed.state.fence_token, parsed.state.fence_ns) == (sb.fence_token, sb.fence_ns)
    for bit, record in enumerate(sb.snapshots):
        row = parsed.snapshots[bit]
        if record is None:
            assert row.state == 0 and row.tag == 0
        else:
            assert (row.tag, row.state, row.priority, row.use_count) == (
                record.tag,
                record.state,
                record.priority,
                record.use_count,
            )
            assert (row.created_ns, row.origin_chunks) == (
                record.created_ns,
                record.origin_chunks,
            )
    assert layouts.SUPERBLOCK.build(parsed) == data


@given(geometries())
def test_geometry_backup_decodes_to_the_same_geometry(g: Any) -> None:
    data = encode_geometry_backup(g)
    assert decode_geometry(data) == g
    assert layouts.GEOMETRY_BACKUP.build(layouts.GEOMETRY_BACKUP.parse(data)) == data


@given(st.data())
def test_leaf_roundtrip_and_layout(data: st.DataObject) -> None:
    g = data.draw(geometries(max_store=1 << 32))
    leaf = data.draw(leaves(g))
    ctx = g.context
    block = encode_leaf(leaf, ctx)
    assert decode_leaf(block, ctx, leaf.address) == leaf
    parsed = layouts.LEAF.parse(block, block_size=g.block_size)
    assert parsed.base_chunk == leaf.base_chunk
    assert [leaf.base_chunk + m.rchunk for m in parsed.map[:-1]] == list(leaf.chunks)
    assert [e.share for e in parsed.exceptions] == list(leaf.shares)
    assert [e.chunk for e in parsed.exceptions] == list(leaf.targets)
    counts = [(b.offset - a.offset) // 16 for a, b in itertools.pairwise(parsed.map)]
    assert counts == list(leaf.counts)


@given(st.data())
def test_index_roundtrip_and_layout(data: st.DataObject) -> None:
    g = data.draw(geometries(max_store=1 << 32))
    node = data.draw(index_nodes(g))
    ctx = g.context
    block = encode_index(node, ctx)
    assert decode_index(block, ctx, node.address) == node
    parsed = layouts.INDEX.parse(block)
    assert [(e.key, e.child) for e in parsed.entries] == list(
        zip(node.keys, node.children, strict=True)
    )
    summaries = [e.summary for e in parsed.entries] if parsed.flags & 1 else None
    assert summaries == (None if node.summaries is None else list(node.summaries))
    assert parsed.level == node.level
    assert layouts.INDEX.build(parsed) == block


@given(st.data())
def test_commit_roundtrip_and_layout(data: st.DataObject) -> None:
    g = data.draw(geometries(max_store=1 << 32))
    record = data.draw(commit_records(g))
    ctx = g.context
    block = encode_commit(record, ctx)
    assert decode_commit(block, ctx, record.address) == record
    parsed = layouts.COMMIT.parse(block)
    assert list(parsed.homes) == list(record.homes)
    assert parsed.tail_sequence == record.tail_sequence
    assert layouts.COMMIT.build(parsed) == block


@given(st.data())
def test_bitmap_roundtrip(data: st.DataObject) -> None:
    g = data.draw(geometries(max_store=1 << 32))
    # Bodies reach 1 MiB: draw a seed, not the bytes (hypothesis caps its data).
    seed = data.draw(st.integers(0, (1 << 64) - 1))
    body = random.Random(seed).randbytes(g.block_size - HEADER_SIZE)
    address = data.draw(st.integers(g.meta_bitmap_start, g.meta_start - 1))
    bitmap = BitmapBlock(address, data.draw(st.integers(0, 1 << 40)), body)
    block = encode_bitmap(bitmap, g.context)
    assert decode_bitmap(block, g.context, address) == bitmap
    assert layouts.BITMAP.parse(block).bits == body


@given(st.data())
def test_registry_roundtrip_and_layout(data: st.DataObject) -> None:
    g = data.draw(geometries(max_store=1 << 32))
    capacity = registry_capacity(g.block_size)
    clients = sorted(data.draw(st.sets(st.integers(0, (1 << 64) - 1), max_size=min(capacity, 40))))
    registry = Registry(
        data.draw(st.integers(g.meta_start, g.meta_end - 1)),
        data.draw(st.integers(0, 1 << 40)),
        tuple(clients),
        data.draw(st.booleans()),
    )
    block = encode_registry(registry, g.context)
    assert decode_registry(block, g.context, registry.address) == registry
    parsed = layouts.REGISTRY.parse(block)
    assert list(parsed.clients) == clients
    assert layouts.REGISTRY.build(parsed) == block
