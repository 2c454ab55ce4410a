"""What engine requests return: plain frozen values, safe to hand to the
transport layer.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "OriginWriteResult",
    "ReadSegment",
    "WriteSegment",
    "SnapshotInfo",
    "StoreStatus",
]


@dataclass(frozen=True, slots=True)
class OriginWriteResult:
    """An origin write may proceed; `copied` chunks were copied out first."""

    copied: int


@dataclass(frozen=True, slots=True)
class ReadSegment:
    """Where `count` chunks of a snapshot from logical `chunk` are read.

    `store_chunk` is the first of `count` consecutive store chunks, or None
    when the snapshot shares these chunks with the origin (read the origin at
    the same logical chunks, under a read lock).
    """

    chunk: int
    count: int
    store_chunk: int | None


@dataclass(frozen=True, slots=True)
class WriteSegment:
    """A snapshot writes `count` chunks from logical `chunk` at `store_chunk`.."""

    chunk: int
    count: int
    store_chunk: int


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot as the administrator sees it."""

    tag: int
    bit: int
    state: str
    priority: int
    use_count: int
    created_ns: int
    origin_chunks: int
    #: Chunks this snapshot alone uses: the space deleting it frees.
    unique_chunks: int
    #: Chunks it shares with other snapshots.
    shared_chunks: int


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """Totals of the store and every snapshot."""

    uuid: bytes
    created_ns: int
    chunk_size: int
    block_size: int
    store_chunks: int
    origin_chunks: int
    data_chunks: int
    data_free: int
    meta_blocks: int
    meta_free: int
    exceptions: int
    clean: bool
    sequence: int
    snapshots: tuple[SnapshotInfo, ...]
    #: Snapshots deleted whose space the sweep has not yet reclaimed.
    deleting: tuple[SnapshotInfo, ...]
    #: Next logical chunk the sweep visits (meaningful while deleting).
    sweep_cursor: int
