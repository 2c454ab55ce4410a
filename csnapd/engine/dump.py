"""The whole metadata of a store as one JSON-ready document, and back.

`dump_store` reads a store that checks without btree damage and returns the
document (schema in docs/operations.md, "Dumping and restoring metadata");
`restore_store` validates a document and writes it into a formatted store
of the same sizes, as a fresh btree switched in by one journaled
transaction (csnapd/engine/salvage.py). Dump then restore is the identity on
the document: every exception, snapshot record, registry entry and state
field comes back, though btree nodes may sit at other block addresses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from csnap_format import (
    LOST_CHUNK,
    MAX_SNAPSHOTS,
    FormatError,
    Geometry,
    Leaf,
    Registry,
    RevertProgress,
    SnapshotRecord,
    SnapshotState,
    Superblock,
    decode_index,
    decode_leaf,
    decode_registry,
    decode_superblock,
    encode_registry,
    encode_superblock,
)
from csnapd.engine.device import BlockDevice
from csnapd.engine.engine import read_geometry
from csnapd.engine.errors import EngineError, StoreIOError
from csnapd.engine.journal import Journal, scan_journal
from csnapd.engine.salvage import Exceptions, count_exceptions, write_tree

__all__ = ["DUMP_VERSION", "DumpError", "dump_store", "restore_store"]

#: The value of the document's "csnap_metadata_dump" key.
DUMP_VERSION = 1

#: Geometry fields a restore target must share with the dumped store.
_SIZES = ("block_size", "chunk_size", "store_chunks", "origin_chunks", "journal_blocks")
_STATE = ("clean", "meta_cursor", "data_cursor", "sweep_cursor", "sweep_mask")


class DumpError(EngineError):
    """The store cannot be dumped, or the document cannot be restored."""

    # Offline only (csnap-check): never on the wire, so the base's symbol.


def _read(device: BlockDevice, g: Geometry, address: int) -> bytes:
    try:
        return device.read(address * g.block_size, g.block_size)
    except OSError as exc:
        raise StoreIOError(f"reading block {address}: {exc.strerror or exc}") from exc


def _leaves(
    device: BlockDevice, g: Geometry, sb: Superblock, images: dict[int, bytes]
) -> Iterator[Leaf]:
    """The leaves in key order (the store is known to check clean)."""
    stack = [(sb.root, sb.depth)]
    while stack:
        address, level = stack.pop()
        block = images.get(address) or _read(device, g, address)
        if level == 0:
            yield decode_leaf(block, g.context, address)
            continue
        node = decode_index(block, g.context, address)
        stack.extend((child, level - 1) for child in reversed(node.children))


def dump_store(device: BlockDevice) -> dict[str, Any]:
    """The store's metadata as a JSON-ready document.

    The caller checks the store first: a damaged btree raises DumpError.
    """
    g = read_geometry(device)
    # Read as a server would see the store after replay, without writing.
    images = scan_journal(device, g).images
    try:
        sb = decode_superblock(images.get(0) or _read(device, g, 0))
        exceptions: list[list[int | None]] = []
        for leaf in _leaves(device, g, sb, images):
            at = 0
            for chunk, count in zip(leaf.chunks, leaf.counts, strict=True):
                for j in range(at, at + count):
                    target = leaf.targets[j]
                    exceptions.append(
                        [chunk, leaf.shares[j], None if target == LOST_CHUNK else target]
                    )
                at += count
        registry = None
        if sb.registry:
            raw = images.get(sb.registry) or _read(device, g, sb.registry)
            block = decode_registry(raw, g.context, sb.registry)
            registry = {"clients": list(block.clients), "overflow": block.overflow}
    except FormatError as exc:
        raise DumpError(f"the store is damaged ({exc}); run csnap-check --repair first") from exc
    return {
        "csnap_metadata_dump": DUMP_VERSION,
        "geometry": {
            **{name: getattr(g, name) for name in _SIZES},
            "meta_blocks": g.meta_blocks,
            "uuid": g.uuid.hex(),
        },
        "state": {
            **{name: getattr(sb, name) for name in _STATE},
            "revert": None if sb.revert is None else dataclasses.asdict(sb.revert),
        },
        "snapshots": [
            {"bit": bit, **_record_json(record)}
            for bit, record in enumerate(sb.snapshots)
            if record is not None
        ],
        "registry": registry,
        "exceptions": exceptions,
    }


def _record_json(record: SnapshotRecord) -> dict[str, Any]:
    out = dataclasses.asdict(record)
    out["state"] = SnapshotState(record.state).name.lower()
    return out


def _revert(value: object) -> RevertProgress | None:
    """The revert in progress a document's state names (absent or null: none)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise DumpError("state 'revert' is neither null nor an object")
    names = [f.name for f in dataclasses.fields(RevertProgress)]
    return RevertProgress(**{name: _int(value.get(name), f"revert {name}") for name in names})


def _int(value: object, what: str, limit: int = 1 << 64) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise DumpError(f"{what} is not an integer in 0..{limit - 1}: {value!r}")
    return value


def _snapshots(doc: dict[str, Any]) -> list[SnapshotRecord | None]:
    table: list[SnapshotRecord | None] = [None] * MAX_SNAPSHOTS
    rows = doc.get("snapshots")
    if not isinstance(rows, list):
        raise DumpError("'snapshots' is not a list")
    states = {state.name.lower(): state for state in SnapshotState if state != 0}
    for row in rows:
        if not isinstance(row, dict):
            raise DumpError(f"a snapshot is not an object: {row!r}")
        bit = _int(row.get("bit"), "a snapshot's bit", MAX_SNAPSHOTS)
        if table[bit] is not None:
            raise DumpError(f"two snapshots have bit {bit}")
        state = states.get(str(row.get("state")))
        if state is None:
            raise DumpError(f"snapshot bit {bit} has an unknown state {row.get('state')!r}")
        priority = row.get("priority")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise DumpError(f"snapshot bit {bit}: priority is not an integer")
        table[bit] = SnapshotRecord(
            tag=_int(row.get("tag"), "a tag", 1 << 32),
            state=state,
            priority=priority,
            use_count=_int(row.get("use_count"), "a use count", 1 << 32),
            created_ns=_int(row.get("created_ns"), "a creation time"),
            origin_chunks=_int(row.get("origin_chunks"), "a snapshot's origin size"),
            unique_chunks=_int(row.get("unique_chunks"), "a unique count"),
            shared_chunks=_int(row.get("shared_chunks"), "a shared count"),
        )
    return table


def _exceptions(doc: dict[str, Any], g: Geometry, allowed: int) -> Exceptions:
    rows = doc.get("exceptions")
    if not isinstance(rows, list):
        raise DumpError("'exceptions' is not a list")
    out: Exceptions = {}
    used: set[int] = set()
    last = -1
    for row in rows:
        if not isinstance(row, list) or len(row) != 3:
            raise DumpError(f"an exception is not [chunk, share, target]: {row!r}")
        chunk = _int(row[0], "a chunk", g.origin_chunks)
        share = _int(row[1], f"chunk {chunk}'s share mask")
        target = LOST_CHUNK if row[2] is None else _int(row[2], f"chunk {chunk}'s copy")
        if chunk < last:
            raise DumpError(f"exceptions are not in chunk order at chunk {chunk}")
        last = chunk
        if not share or share & ~allowed:
            raise DumpError(f"chunk {chunk}: share mask {share:#x} is empty or of no snapshot")
        pairs = out.setdefault(chunk, [])
        if any(share & other for other, _ in pairs):
            raise DumpError(f"chunk {chunk}: two exceptions share a snapshot")
        if target != LOST_CHUNK:
            if not g.data_start <= target < g.store_chunks:
                raise DumpError(f"chunk {chunk}: copy {target} is outside the data area")
            if target in used:
                raise DumpError(f"copy {target} is used by two exceptions")
            used.add(target)
        pairs.append((share, target))
    return out


def _registry(doc: dict[str, Any], g: Geometry) -> Registry | None:
    row = doc.get("registry")
    if row is None:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("clients"), list):
        raise DumpError("'registry' is neither null nor {clients, overflow}")
    clients = tuple(_int(c, "a client id") for c in row["clients"])
    registry = Registry(g.meta_start, 0, clients, bool(row.get("overflow")))
    try:
        decode_registry(encode_registry(registry, g.context), g.context, g.meta_start)
    except (FormatError, ValueError) as exc:
        raise DumpError(f"the registry is not valid: {exc}") from exc
    return registry


def _tree_blocks(device: BlockDevice, g: Geometry, sb: Superblock) -> set[int]:
    """Every block the current tree may reach (damaged ones included)."""
    seen: set[int] = set()
    stack = [(sb.root, sb.depth)]
    while stack:
        address, level = stack.pop()
        if address in seen or not g.meta_start <= address < g.meta_end:
            continue
        seen.add(address)
        if level == 0:
            continue
        try:
            node = decode_index(_read(device, g, address), g.context, address)
        except FormatError:
            continue
        stack.extend((child, level - 1) for child in node.children)
    if sb.registry:
        seen.add(sb.registry)
    return seen


def _check_sizes(doc: dict[str, Any], g: Geometry) -> None:
    """Refuse a dump of a store of other sizes than `g`'s."""
    sizes = doc.get("geometry")
    if not isinstance(sizes, dict):
        raise DumpError("'geometry' is not an object")
    for name in (*_SIZES, "meta_blocks"):
        if sizes.get(name) != getattr(g, name):
            raise DumpError(
                f"the dump is of a store with {name} {sizes.get(name)}; this one has"
                f" {getattr(g, name)}"
            )


def _check_counts(table: list[SnapshotRecord | None], exceptions: Exceptions) -> int:
    """Refuse a snapshot table whose counts its exceptions do not make; how many there are."""
    total, unique, shared = count_exceptions(exceptions)
    for bit, record in enumerate(table):
        if record is not None and (record.unique_chunks, record.shared_chunks) != (
            unique[bit],
            shared[bit],
        ):
            raise DumpError(
                f"snapshot {record.tag} counts {record.unique_chunks} unique and"
                f" {record.shared_chunks} shared chunks; its exceptions make"
                f" {unique[bit]} and {shared[bit]}"
            )
    return total


def restore_store(device: BlockDevice, doc: object) -> int:
    """Write a dumped document into a formatted store; returns exceptions written.

    Raises:
        DumpError: the document is not valid, or not for a store of this
            store's sizes; nothing was written.
    """
    if not isinstance(doc, dict) or doc.get("csnap_metadata_dump") != DUMP_VERSION:
        raise DumpError(f"not a csnap metadata dump of version {DUMP_VERSION}")
    g = read_geometry(device)
    _check_sizes(doc, g)
    Journal.recover(device, g)
    try:
        current = decode_superblock(_read(device, g, 0))
    except FormatError as exc:
        raise DumpError(f"the target store's superblock is damaged: {exc}") from exc
    table = _snapshots(doc)
    state = doc.get("state")
    if not isinstance(state, dict):
        raise DumpError("'state' is not an object")
    fields = {name: _int(state.get(name), f"state {name}") for name in _STATE[1:]}
    allowed = sum(1 << bit for bit, r in enumerate(table) if r is not None)
    exceptions = _exceptions(doc, g, allowed)
    registry = _registry(doc, g)
    total = _check_counts(table, exceptions)
    sb = dataclasses.replace(
        current,
        clean=bool(state.get("clean")),
        snapshots=tuple(table),
        meta_cursor=fields["meta_cursor"],
        data_cursor=fields["data_cursor"],
        sweep_cursor=fields["sweep_cursor"],
        sweep_mask=fields["sweep_mask"],
        revert=_revert(state.get("revert")),
    )
    try:
        decode_superblock(encode_superblock(sb))
    except (FormatError, ValueError) as exc:
        raise DumpError(f"the snapshot table or state is not valid: {exc}") from exc
    write_tree(
        device,
        g,
        sb,
        sorted(exceptions.items()),
        avoid=_tree_blocks(device, g, current),
        registry=registry,
        keep_registry=False,
    )
    return total
