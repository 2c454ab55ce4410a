"""Hypothesis strategies that build valid on-disk structures for a geometry."""

from __future__ import annotations

from hypothesis import reject
from hypothesis import strategies as st

from csnap_format import (
    EXCEPTION_BYTES,
    LEAF_ENTRY_BYTES,
    MAX_SNAPSHOTS,
    CommitRecord,
    Geometry,
    IndexNode,
    LayoutError,
    Leaf,
    SnapshotRecord,
    SnapshotState,
    Superblock,
    index_capacity,
    leaf_room,
    plan_geometry,
    summary_index_capacity,
)

sequences = st.integers(min_value=0, max_value=(1 << 64) - 1)


@st.composite
def geometries(draw: st.DrawFn, max_store: int = 1 << 40) -> Geometry:
    chunk_bits = draw(st.integers(12, 20))
    block_bits = draw(st.integers(12, chunk_bits))
    chunk = 1 << chunk_bits
    block = 1 << block_bits
    journal_blocks = draw(st.integers(64, 200))
    minimum = (2 + journal_blocks + 3 + 70) * block + 4 * chunk
    store = draw(st.integers(minimum, max(minimum, max_store)))
    origin = draw(st.integers(chunk, 1 << 44))
    try:
        return plan_geometry(
            store_bytes=store,
            origin_bytes=origin,
            block_size=block,
            chunk_size=chunk,
            journal_bytes=journal_blocks * block,
            uuid=draw(st.binary(min_size=16, max_size=16)),
            created_ns=draw(sequences),
        )
    except LayoutError:
        reject()


def small_geometry() -> Geometry:
    """A fixed 4 KiB geometry for tests that do not care about sizes."""
    return plan_geometry(
        store_bytes=64 << 20,
        origin_bytes=64 << 20,
        uuid=bytes(range(16)),
        created_ns=1_700_000_000_000_000_000,
    )


@st.composite
def snapshot_tables(draw: st.DrawFn, g: Geometry) -> tuple[SnapshotRecord | None, ...]:
    records: list[SnapshotRecord | None] = []
    tags: set[int] = set()
    for _ in range(MAX_SNAPSHOTS):
        state = draw(st.sampled_from(list(SnapshotState)))
        if state == SnapshotState.FREE:
            records.append(None)
            continue
        tag = draw(st.integers(0, 0xFFFF_FFFF))
        if state != SnapshotState.DELETING:
            if tag in tags:
                records.append(None)
                continue
            tags.add(tag)
        records.append(
            SnapshotRecord(
                tag=tag,
                state=state,
                priority=draw(st.integers(-128, 127)),
                use_count=draw(st.integers(0, 0xFFFF_FFFF)),
                created_ns=draw(sequences),
                origin_chunks=draw(st.integers(1, (1 << 64) - 1)),
                unique_chunks=draw(sequences),
                shared_chunks=draw(sequences),
            )
        )
    return tuple(records)


@st.composite
def superblocks(draw: st.DrawFn) -> Superblock:
    g = draw(geometries())
    table = draw(snapshot_tables(g))
    deleting = sum(
        1 << bit
        for bit, r in enumerate(table)
        if r is not None and r.state in (SnapshotState.DELETING, SnapshotState.SQUASHED)
    )
    return Superblock(
        geometry=g,
        sequence=draw(sequences),
        clean=draw(st.booleans()),
        depth=draw(st.integers(0, 12)),
        root=draw(st.integers(g.meta_start, g.meta_end - 1)),
        meta_free=draw(st.integers(0, g.meta_blocks - 1)),
        data_free=draw(st.integers(0, g.data_chunks)),
        meta_cursor=draw(st.integers(g.meta_start, g.meta_end - 1)),
        data_cursor=draw(st.integers(g.data_start, g.store_chunks - 1)),
        sweep_cursor=draw(sequences),
        sweep_mask=draw(sequences) & deleting,
        exceptions=draw(st.integers(0, g.data_chunks)),
        registry=draw(st.just(0) | st.integers(g.meta_start, g.meta_end - 1)),
        snapshots=table,
        fence_token=draw(sequences),
        fence_ns=draw(sequences),
    )


@st.composite
def leaves(draw: st.DrawFn, g: Geometry) -> Leaf:
    room = leaf_room(g.block_size)
    base = draw(st.integers(0, g.origin_chunks - 1))
    span = min(1 << 32, g.origin_chunks - base)
    budget = room
    chunks: list[int] = []
    counts: list[int] = []
    shares: list[int] = []
    targets: list[int] = []
    wanted = draw(st.integers(0, room // (LEAF_ENTRY_BYTES + EXCEPTION_BYTES)))
    rel = sorted(draw(st.sets(st.integers(0, span - 1), max_size=wanted)))
    for r in rel:
        n = draw(st.integers(1, 4))
        if LEAF_ENTRY_BYTES + n * EXCEPTION_BYTES > budget:
            break
        budget -= LEAF_ENTRY_BYTES + n * EXCEPTION_BYTES
        bits = draw(st.lists(st.integers(0, 63), min_size=n, max_size=n, unique=True))
        masks = [1 << b for b in bits]
        # Fold some extra bits in without making two masks overlap.
        free = [b for b in range(64) if b not in bits]
        for i in range(n):
            extra = draw(st.sets(st.sampled_from(free), max_size=3)) if free else set()
            for b in extra:
                if b in free:
                    masks[i] |= 1 << b
                    free.remove(b)
        chunks.append(base + r)
        counts.append(n)
        shares.extend(masks)
        targets.extend(draw(st.integers(g.data_start, g.store_chunks - 1)) for _ in range(n))
    return Leaf(
        address=draw(st.integers(g.meta_start, g.meta_end - 1)),
        sequence=draw(sequences),
        base_chunk=base,
        chunks=tuple(chunks),
        counts=tuple(counts),
        shares=tuple(shares),
        targets=tuple(targets),
    )


@st.composite
def index_nodes(draw: st.DrawFn, g: Geometry) -> IndexNode:
    summarised = draw(st.booleans())
    capacity = (summary_index_capacity if summarised else index_capacity)(g.block_size)
    count = draw(st.integers(1, min(capacity, g.meta_blocks, g.origin_chunks, 300)))
    keys = sorted(
        draw(st.sets(st.integers(0, g.origin_chunks - 1), min_size=count, max_size=count))
    )
    children = draw(
        st.lists(
            st.integers(g.meta_start, g.meta_end - 1),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    return IndexNode(
        address=draw(st.integers(g.meta_start, g.meta_end - 1)),
        sequence=draw(sequences),
        level=draw(st.integers(1, 12)),
        keys=tuple(keys),
        children=tuple(children),
        summaries=(
            tuple(draw(st.lists(sequences, min_size=count, max_size=count))) if summarised else None
        ),
    )


@st.composite
def commit_records(draw: st.DrawFn, g: Geometry) -> CommitRecord:
    homes_pool = st.one_of(st.just(0), st.integers(g.meta_bitmap_start, g.meta_end - 1))
    homes = draw(st.lists(homes_pool, max_size=50, unique=True))
    sequence = draw(sequences)
    return CommitRecord(
        address=draw(st.integers(g.journal_start, g.journal_start + g.journal_blocks - 1)),
        sequence=sequence,
        tail_sequence=draw(st.integers(0, sequence)),
        payload_crc=draw(st.integers(0, 0xFFFF_FFFF)),
        homes=tuple(homes),
    )
