"""The engine's counters since the store was opened."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EngineStats"]


@dataclass(slots=True)
class EngineStats:
    """Counters since the store was opened."""

    requests: int = 0
    failed_requests: int = 0
    commits: int = 0
    copied_chunks: int = 0
    copy_reads: int = 0
    copy_writes: int = 0
    deferred_commits: int = 0
    #: Writes too big for one transaction, carried by several.
    split_requests: int = 0
    #: Btree leaves the sweep visited (reclaiming deleted and squashed snapshots).
    sweep_leaves: int = 0
