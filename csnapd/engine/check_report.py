"""What a check of a store found: its problems, its counts, its exit code.

Problem is one finding (its area, the rule it breaks, the blocks, chunks and
snapshots it touches); CheckReport gathers them with the recount and what a
repair did, and turns into csnap-check's JSON and exit code.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from csnap_format import Geometry

#: Exit codes, as fsck's.
EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_ERRORS = 4
EXIT_FAILED = 8


class Runs(Sequence[tuple[int, int]]):
    """Chunks as (start, count) runs, packed two 8-byte words each: a repair
    may mark a million scattered chunks lost."""

    __slots__ = ("_words",)

    def __init__(self, runs: Sequence[tuple[int, int]] = ()) -> None:
        self._words = array("Q")
        for start, count in runs:
            self._words.extend((start, count))

    def add(self, chunk: int) -> None:
        """Add `chunk`, not below any chunk added before."""
        words = self._words
        if words and words[-2] + words[-1] == chunk:
            words[-1] += 1
        else:
            words.extend((chunk, 1))

    def __len__(self) -> int:
        return len(self._words) // 2

    @overload
    def __getitem__(self, index: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, int] | list[tuple[int, int]]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._words[2 * index], self._words[2 * index + 1]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        words = iter(self._words)
        return zip(words, words, strict=True)

    def __repr__(self) -> str:
        return f"Runs({list(self)})"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with the store."""

    #: "superblock", "btree", "bitmap", "counter", "journal".
    area: str
    message: str
    #: Metadata block the problem is in, where there is one.
    block: int | None = None
    #: Logical or store chunk concerned, where there is one.
    chunk: int | None = None
    #: Whether --repair can fix it (every problem but an unreadable store).
    repairable: bool = False
    #: Logical chunks affected, first and last, where known.
    chunks: tuple[int, int] | None = None
    #: Tags of the snapshots affected, where known.
    snapshots: tuple[int, ...] = ()
    #: The rule broken, a short stable name (docs/operations.md, "Checking a store").
    rule: str = ""

    def __str__(self) -> str:
        where = f" (block {self.block})" if self.block is not None else ""
        extra = []
        if self.chunks is not None:
            first, last = self.chunks
            extra.append(f"chunks {first}..{last}" if last != first else f"chunk {first}")
        if self.snapshots:
            extra.append("snapshots " + ", ".join(map(str, self.snapshots)))
        affects = f"; affects {'; '.join(extra)}" if extra else ""
        rule = f" [{self.rule}]" if self.rule else ""
        return f"{self.area}{where}{rule}: {self.message}{affects}"

    def as_json(self) -> dict[str, object]:
        return {
            "area": self.area,
            "rule": self.rule,
            "message": self.message,
            "block": self.block,
            "chunk": self.chunk,
            "chunks": list(self.chunks) if self.chunks is not None else None,
            "snapshots": list(self.snapshots),
            "repairable": self.repairable,
        }


@dataclass(slots=True)
class CheckReport:
    """What a check found."""

    geometry: Geometry | None = None
    problems: list[Problem] = field(default_factory=list)
    #: Transactions in the journal's replay window (replayed at next open).
    journal_transactions: int = 0
    journal_newest: int = 0
    replayed: bool = False
    #: What --repair rewrote; empty when it rewrote nothing.
    repaired: list[str] = field(default_factory=list)
    #: Problems the repair fixed (a check after it found them gone).
    fixed: set[Problem] = field(default_factory=set)
    #: Problems a check after the repair still found.
    remaining: list[Problem] = field(default_factory=list)
    #: Snapshot tag -> logical chunks the repair marked lost, as (start, count) runs.
    lost: dict[int, Runs] = field(default_factory=dict)
    #: Exceptions that name a lost copy (marked by a repair, now or before).
    lost_marks: int = 0
    #: Snapshot tag -> chunks the store marks lost for it, as (start, count) runs.
    marked_lost: dict[int, Runs] = field(default_factory=dict)
    #: Exceptions the repair recovered from leaves the tree no longer reached.
    recovered_from_scan: int = 0
    #: Why --repair rewrote nothing although some problems were repairable.
    repair_refused: str | None = None
    depth: int = 0
    leaves: int = 0
    index_nodes: int = 0
    exceptions: int = 0
    data_used: int = 0
    meta_used: int = 0
    fatal: str | None = None

    @property
    def exit_code(self) -> int:
        if self.fatal is not None:
            return EXIT_FAILED
        if self.problems:
            left = [p for p in self.problems if not self.was_repaired(p)]
            return EXIT_ERRORS if left or self.remaining else EXIT_REPAIRED
        return EXIT_CLEAN

    def was_repaired(self, problem: Problem) -> bool:
        """Whether --repair fixed this problem: a check after it found it gone."""
        return problem in self.fixed

    def as_json(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "fatal": self.fatal,
            "problems": [{**p.as_json(), "repaired": self.was_repaired(p)} for p in self.problems],
            "remaining": [p.as_json() for p in self.remaining],
            "lost": {
                str(tag): [list(run) for run in runs] for tag, runs in sorted(self.lost.items())
            },
            "lost_marks": self.lost_marks,
            "marked_lost": {
                str(tag): [list(run) for run in runs]
                for tag, runs in sorted(self.marked_lost.items())
            },
            "recovered_from_scan": self.recovered_from_scan,
            "journal": {
                "transactions": self.journal_transactions,
                "newest_sequence": self.journal_newest,
                "replayed": self.replayed,
            },
            "repaired": self.repaired,
            "repair_refused": self.repair_refused,
            "btree": {
                "depth": self.depth,
                "leaves": self.leaves,
                "index_nodes": self.index_nodes,
                "exceptions": self.exceptions,
            },
            "data_chunks_used": self.data_used,
            "metadata_blocks_used": self.meta_used,
        }
