"""Runs of consecutive chunks: the one place where adjacent runs are joined.

A run is (first chunk, count). A mapped run is (first chunk, count, target):
the chunks first..first+count-1 live at target..target+count-1, or, with
target None, at no target at all (a snapshot chunk still shared with the
origin). Lists of runs are built in ascending order by appending, and a run
that continues the last one is merged into it, so that every answer names
the fewest runs.
"""

from __future__ import annotations

from typing import TypeVar

__all__ = ["append_run", "append_mapped_run"]

#: The target of a mapped run: a chunk number, or None for "no target".
_Target = TypeVar("_Target", bound=int | None)


def append_run(runs: list[tuple[int, int]], first: int, count: int) -> None:
    """Append the run (first, count) to `runs`, merged into the last run if it continues it."""
    if runs:
        last_first, last_count = runs[-1]
        if last_first + last_count == first:
            runs[-1] = (last_first, last_count + count)
            return
    runs.append((first, count))


def append_mapped_run(
    runs: list[tuple[int, int, _Target]], first: int, count: int, target: _Target
) -> None:
    """Append (first, count, target) to `runs`, merged into the last run if it continues it.

    It continues the last run when its chunks follow the last run's chunks and
    its target follows the last run's target (or both targets are None).
    """
    if runs:
        last_first, last_count, last_target = runs[-1]
        if last_first + last_count == first and (
            last_target is None
            if target is None
            else last_target is not None and last_target + last_count == target
        ):
            runs[-1] = (last_first, last_count + count, last_target)
            return
    runs.append((first, count, target))
