"""A corruption campaign: stores built by random histories, one injected
fault in their metadata at a time (a flipped bit, a zeroed block, two blocks
swapped, a block written to another's address, a stale copy of a block, a
flipped bit in an index key, a leaf lost with its images in the journal),
then csnap-check and --repair judged by what they must achieve:

- the damage is found, or it changed nothing the store means (its dump is
  unchanged);
- after --repair the store checks clean, every mapping of a block the fault
  did not touch is still there, and every snapshot reads its own data or an
  error, never another snapshot's or the origin's.

tests/crash/test_corruption.py runs a bounded sample; scripts/torture runs
thousands (CSNAP_CORRUPTION_INJECTIONS).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from csnap_format import (
    Geometry,
    decode_index,
    decode_leaf,
    decode_superblock,
)
from csnapd.engine import Engine, MemoryDevice, StoreCorruptError
from csnapd.engine.check import check_store
from csnapd.engine.dump import dump_store
from csnapd.engine.journal import scan_journal
from tests.engine.helpers import format_device, new_geometry, pattern

KINDS = ("flip", "zero", "swap", "misdirect", "stale", "key", "lost-leaf")


@dataclass
class History:
    """A store after a random history, and what each snapshot must read."""

    store: MemoryDevice
    origin: MemoryDevice
    g: Geometry
    #: tag -> version of each chunk, as the snapshot must read it.
    truth: dict[int, list[int]]
    #: The store halfway through the history: source of stale copies.
    older: MemoryDevice
    #: Leaf address -> its exceptions (chunk, share, store chunk).
    leaves: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)
    #: Every block in use: superblock, bitmaps, nodes, registry, replay window.
    live: list[int] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    registry: int = 0


def make_history(seed: int, operations: int = 40, *, late: int = 0) -> History:
    """`operations` random steps, then `late` snapshots each followed by one
    origin write to a few chunks near the start (their exceptions stay in
    the first leaf)."""
    g = new_geometry(store_bytes=16 << 20, origin_bytes=2 << 20)
    store, origin = MemoryDevice(g.store_bytes), MemoryDevice(g.origin_bytes)
    format_device(store, g)
    engine = Engine.open(store, origin)
    rng = random.Random(seed)
    version = [0] * g.origin_chunks
    truth: dict[int, list[int]] = {}
    serial = 0
    older = store.snapshot_copy()
    size = g.chunk_size
    for step in range(operations):
        if step == operations // 2:
            older = store.snapshot_copy()
        roll = rng.random()
        live = sorted(truth)
        if roll < 0.15 and len(live) < 6:
            tag = max(live, default=0) + 1
            engine.create_snapshot(tag)
            truth[tag] = list(version)
        elif roll < 0.22 and live:
            tag = rng.choice(live)
            engine.delete_snapshot(tag)
            del truth[tag]
        elif roll < 0.30:
            engine.sweep()
        elif roll < 0.35:
            engine.set_registered_clients(frozenset(rng.sample(range(1, 100), 3)))
        elif roll < 0.55 and live:
            tag = rng.choice(live)
            start = rng.randrange(g.origin_chunks - 8)
            for segment in engine.snapshot_write(tag, [(start, rng.randrange(1, 8))]):
                for i in range(segment.count):
                    serial += 1
                    chunk = segment.chunk + i
                    store.write(
                        (segment.store_chunk + i) * size, pattern(chunk, 1_000_000 + serial, size)
                    )
                    truth[tag][chunk] = 1_000_000 + serial
        else:
            count = rng.randrange(1, 40)
            start = rng.randrange(g.origin_chunks - count)
            engine.origin_write([(start, count)])
            engine.commit()
            for chunk in range(start, start + count):
                version[chunk] += 1
                origin.write(chunk * size, pattern(chunk, version[chunk], size))
        engine.commit()
    for _ in range(late):
        _late_snapshot(engine, origin, rng, truth, version)
    engine.close()
    history = History(store, origin, g, truth, older)
    _map(history)
    return history


def _late_snapshot(
    engine: Engine,
    origin: MemoryDevice,
    rng: random.Random,
    truth: dict[int, list[int]],
    version: list[int],
) -> None:
    """A new snapshot, then an origin write to 4 chunks among the first 12."""
    size = engine.chunk_size
    tag = max(truth, default=0) + 1
    engine.create_snapshot(tag)
    truth[tag] = list(version)
    start = rng.randrange(8)
    engine.origin_write([(start, 4)])
    for chunk in range(start, start + 4):
        version[chunk] += 1
        origin.write(chunk * size, pattern(chunk, version[chunk], size))
    engine.commit()


def _map(history: History) -> None:
    g, store = history.g, history.store
    images = scan_journal(store, g).images

    def block(address: int) -> bytes:
        return images.get(address) or store.read(address * g.block_size, g.block_size)

    sb = decode_superblock(block(0))
    stack = [(sb.root, sb.depth)]
    while stack:
        address, level = stack.pop()
        history.nodes.append(address)
        if level == 0:
            leaf = decode_leaf(block(address), g.context, address)
            out = []
            at = 0
            for chunk, count in zip(leaf.chunks, leaf.counts, strict=True):
                out += [(chunk, leaf.shares[j], leaf.targets[j]) for j in range(at, at + count)]
                at += count
            history.leaves[address] = out
            continue
        node = decode_index(block(address), g.context, address)
        stack.extend((child, level - 1) for child in node.children)
    bitmaps = range(g.meta_bitmap_start, g.meta_start)
    window = [
        g.journal_start + (slot + i) % g.journal_blocks
        for slot, n in scan_journal(store, g).spans.values()
        for i in range(n)
    ]
    history.registry = sb.registry
    history.live = [0, *bitmaps, *history.nodes, *([sb.registry] if sb.registry else []), *window]


def erase_journal_images(store: MemoryDevice, g: Geometry, address: int) -> None:
    """Zero every journal slot holding an image of block `address`."""
    size = g.block_size
    for slot in range(g.journal_blocks):
        at = (g.journal_start + slot) * size
        block = store.read(at, size)
        if block[:4] == b"CSNP" and int.from_bytes(block[16:24], "little") == address:
            store.write(at, bytes(size))


def inject(rng: random.Random, history: History, kind: str) -> tuple[MemoryDevice, set[int], str]:
    """A damaged copy of the store, the blocks written, and what was done."""
    g = history.g
    size = g.block_size
    store = history.store.snapshot_copy()

    def read(device: MemoryDevice, address: int) -> bytes:
        return device.read(address * size, size)

    def put(address: int, data: bytes) -> None:
        store.write(address * size, data)

    if kind == "flip":
        address = rng.choice(history.live)
        offset = rng.randrange(size)
        data = bytearray(read(store, address))
        data[offset] ^= 1 << rng.randrange(8)
        put(address, bytes(data))
        return store, {address}, f"bit flipped in block {address} at byte {offset}"
    if kind == "zero":
        address = rng.choice(history.live)
        put(address, bytes(size))
        return store, {address}, f"block {address} zeroed"
    nodes = history.nodes
    if kind == "key":
        # A bit of an index entry's key (not the first, which the parent's
        # key repeats): the node's checksum fails, its children stay.
        entries = [
            (address, i)
            for address in nodes
            if address not in history.leaves
            for i in range(1, len(decode_index(read(store, address), g.context, address).keys))
        ]
        if entries:
            address, i = rng.choice(entries)
            offset = 48 + 24 * i + rng.randrange(8)
            data = bytearray(read(store, address))
            data[offset] ^= 1 << rng.randrange(8)
            put(address, bytes(data))
            return store, {address}, f"bit flipped in key {i} of index node {address}"
    if kind == "lost-leaf" and history.leaves:
        # A leaf destroyed with its images in the journal: only older images
        # of its range in freed blocks are left to claim it.
        address = rng.choice(sorted(history.leaves))
        put(address, bytes(size))
        erase_journal_images(store, g, address)
        return store, {address}, f"leaf {address} and its journal images zeroed"
    if kind in ("swap", "misdirect") and len(nodes) >= 2:
        first, second = rng.sample(nodes, 2)
        if kind == "swap":
            a, b = read(store, first), read(store, second)
            put(first, b)
            put(second, a)
            return store, {first, second}, f"blocks {first} and {second} swapped"
        put(second, read(store, first))
        return store, {second}, f"block {first} written to block {second}"
    # A stale copy: a block in use gets its image from halfway through.
    candidates = [
        a for a in history.live if 1 <= a < g.meta_end and read(history.older, a) != read(store, a)
    ]
    if kind == "stale" and candidates:
        address = rng.choice(candidates)
        put(address, read(history.older, address))
        return store, {address}, f"block {address} holds its image from halfway through"
    address = rng.choice(history.live)
    put(address, bytes(size))
    return store, {address}, f"block {address} zeroed (no candidate for {kind})"


def _read_everything(history: History, store: MemoryDevice) -> list[str]:
    """Every chunk of every snapshot: wrong data is a failure, errors are not."""
    g = history.g
    size = g.chunk_size
    engine = Engine.open(store, history.origin)
    wrong = []
    try:
        for tag, versions in history.truth.items():
            for start in range(0, g.origin_chunks, 32):
                try:
                    pieces = [(start, engine.snapshot_read(tag, [(start, 32)]))]
                except StoreCorruptError:
                    pieces = []
                    for chunk in range(start, start + 32):
                        try:
                            pieces.append((chunk, engine.snapshot_read(tag, [(chunk, 1)])))
                        except StoreCorruptError:
                            continue
                for _, segments in pieces:
                    for seg in segments:
                        device = history.origin if seg.store_chunk is None else store
                        first = seg.chunk if seg.store_chunk is None else seg.store_chunk
                        data = device.read(first * size, seg.count * size)
                        for i in range(seg.count):
                            chunk = seg.chunk + i
                            want = pattern(chunk, versions[chunk], size)
                            if data[i * size : (i + 1) * size] != want:
                                wrong.append(f"snapshot {tag} chunk {chunk}")
    finally:
        engine.close()
    return wrong


def run_injection(history: History, rng: random.Random, kind: str, original: object) -> str:
    """One fault, judged; returns the outcome's name, raises AssertionError on a failure."""
    damaged, touched, what = inject(rng, history, kind)
    report = check_store(damaged.snapshot_copy())
    if report.exit_code == 0:
        assert dump_store(damaged.snapshot_copy()) == original, f"undetected: {what}"
        return "harmless"
    assert report.exit_code == 4, (what, report.fatal)
    repaired = check_store(damaged, repair=True)
    assert repaired.exit_code == 1, (what, [str(p) for p in repaired.remaining])
    assert check_store(damaged.snapshot_copy()).exit_code == 0, what
    mapping = {tuple(row) for row in dump_store(damaged.snapshot_copy())["exceptions"]}
    for address, exceptions in history.leaves.items():
        if address in touched:
            continue
        for chunk, share, target in exceptions:
            assert (chunk, share, target) in mapping, (
                f"{what}: chunk {chunk}'s copy {target} of untouched leaf {address} was lost"
            )
    wrong = _read_everything(history, damaged)
    assert not wrong, f"{what}: {wrong[:5]} read other data"
    return "repaired-with-loss" if repaired.lost else "repaired"


def campaign(seed: int, injections: int, histories: int = 1) -> Counter[str]:
    """`injections` faults spread over `histories` random stores."""
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    per = max(1, injections // histories)
    for n in range(histories):
        history = make_history(seed * 1000 + n)
        original = dump_store(history.store.snapshot_copy())
        for i in range(per):
            kind = KINDS[i % len(KINDS)]
            outcomes[run_injection(history, rng, kind, original)] += 1
            outcomes[kind] += 1
    return outcomes
