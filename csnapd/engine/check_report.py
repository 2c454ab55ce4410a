"""What a check of a store found: its problems, its counts, its exit code.

Problem is one finding (its area, the rule it breaks, the blocks, chunks and
snapshots it touches); CheckReport gathers them with the recount and what a
repair did, and turns into csnap-check's JSON and exit code.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

from csnap_format import Geometry

#: Exit codes, as fsck's.
EXIT_CLEAN = 0
EXIT_REPAIRED = 1
EXIT_ERRORS = 4
EXIT_FAILED = 8


class Runs(Sequence[tuple[int, int]]):
    """Chunks, added in increasing order, as (start, count) runs.

    Held packed, two 8-byte words a run; once that takes more room than a
    bitmap up to the highest chunk (a repair may mark every other chunk of
    a snapshot lost), as that bitmap.
    """

    __slots__ = ("_bits", "_words")

    def __init__(self, runs: Iterable[tuple[int, int]] = ()) -> None:
        self._words: array[int] | None = array("Q")
        self._bits = bytearray()
        for start, count in runs:
            for chunk in range(start, start + count):
                self.add(chunk)

    def add(self, chunk: int) -> None:
        """Add `chunk`, above every chunk added before."""
        words = self._words
        if words is None:
            bits = self._bits
            at = chunk >> 3
            if at >= len(bits):
                bits.extend(bytes(at + 1 - len(bits)))
            bits[at] |= 1 << (chunk & 7)
        elif words and words[-2] + words[-1] == chunk:
            words[-1] += 1
        else:
            words.extend((chunk, 1))
            if len(words) * 8 > (chunk >> 3) + 64:
                self._to_bits()

    def _to_bits(self) -> None:
        runs = list(self)
        self._words = None
        for start, count in runs:
            for chunk in range(start, start + count):
                self.add(chunk)

    def __len__(self) -> int:
        if self._words is not None:
            return len(self._words) // 2
        return sum(1 for _ in self._bit_runs())

    @overload
    def __getitem__(self, index: int) -> tuple[int, int]: ...
    @overload
    def __getitem__(self, index: slice) -> list[tuple[int, int]]: ...
    def __getitem__(self, index: int | slice) -> tuple[int, int] | list[tuple[int, int]]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return list(itertools.islice(iter(self), start, max(start, stop), step))
        if index < 0:
            index += len(self)
        run = next(itertools.islice(iter(self), index, None), None) if index >= 0 else None
        if run is None:
            raise IndexError(index)
        return run

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self._words is None:
            return self._bit_runs()
        words = iter(self._words)
        return zip(words, words, strict=True)

    def _bit_runs(self) -> Iterator[tuple[int, int]]:
        start = -1
        for at, byte in enumerate(self._bits):
            if byte in (0, 0xFF):
                if byte and start < 0:
                    start = at << 3
                elif not byte and start >= 0:
                    yield start, (at << 3) - start
                    start = -1
                continue
            for bit in range(8):
                chunk = (at << 3) + bit
                if byte >> bit & 1:
                    if start < 0:
                        start = chunk
                elif start >= 0:
                    yield start, chunk - start
                    start = -1
        if start >= 0:
            yield start, (len(self._bits) << 3) - start

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
