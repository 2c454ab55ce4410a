"""csnap-check's verification of the index summaries (docs/rules.md,
"Subtree summaries").

Owns one rule, `summary-covers`: every index entry's summary holds every
share bit of every exception in the entry's subtree. A summary holding
more bits is allowed (the sweep clears them when it next passes), one
missing a bit is not: the sweep would skip exceptions it must clear and
the changelist chunks that differ.

Walks the tree a second time, after the structural walk, reading blocks
through the same view; nodes that do not decode, or whose level is not
what their parent says, are left to the structural walk, which reports
them: their subtrees count as holding every bit, so no summary above them
is blamed for what cannot be read. A problem here is repaired by rebuilding
the btree (salvage), whose summaries are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from csnap_format import ALL_BITS, FormatError, Superblock, decode_index, decode_leaf

__all__ = ["check_summaries", "SUMMARY_RULE"]

#: The rule name a missing summary bit is reported under.
SUMMARY_RULE = "summary-covers"


class _Report(Protocol):
    def __call__(
        self,
        area: str,
        message: str,
        *,
        block: int | None = None,
        chunks: tuple[int, int] | None = None,
        share: int = 0,
        rule: str = "",
    ) -> None: ...


def check_summaries(block: Callable[[int], bytes], sb: Superblock, problem: _Report) -> None:
    """Report every index entry whose summary lacks a bit used below it."""
    g = sb.geometry
    ctx = g.context
    seen: set[int] = set()

    def union(address: int, level: int, hi: int) -> int:
        """The share bits used below `address`; ALL_BITS where it cannot be read."""
        if address in seen or not g.meta_start <= address < g.meta_end:
            return ALL_BITS
        seen.add(address)
        try:
            if level == 0:
                mask = 0
                for share in decode_leaf(block(address), ctx, address).shares:
                    mask |= share
                return mask
            node = decode_index(block(address), ctx, address)
        except FormatError:
            return ALL_BITS
        if node.level != level:
            return ALL_BITS
        summaries = node.summaries or (ALL_BITS,) * len(node.keys)
        bounds = [*node.keys[1:], hi]
        total = 0
        for key, child, end, summary in zip(
            node.keys, node.children, bounds, summaries, strict=True
        ):
            below = union(child, level - 1, end)
            missing = below & ~summary
            if missing and below != ALL_BITS:
                problem(
                    "btree",
                    f"the summary of child {child} lacks share bits {missing:#x} used below it",
                    block=address,
                    chunks=(key, max(key, end - 1)),
                    share=missing,
                    rule=SUMMARY_RULE,
                )
            total |= below
        return total

    union(sb.root, sb.depth, g.origin_chunks)
