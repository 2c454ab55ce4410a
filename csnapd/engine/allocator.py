"""Next-fit allocation over a bitmap, for the metadata area (btree nodes) and
for the data area (copies of chunks).

Rules:
  * Free counts and cursors live in the store state and are exact.
  * Runs are taken contiguously where the bitmap allows, so a copy-out of
    consecutive chunks is one write.
  * A unit freed by the open transaction is marked `reserved` in its page:
    not handed out again until that transaction is durable (rule: no reuse before durable), so a
    crash can never leave a durable exception pointing at a chunk that a
    later, lost transaction reused.
"""

from __future__ import annotations

from dataclasses import dataclass

from csnap_format import Geometry, bitmap_bits_per_block
from csnap_format.runs import append_run
from csnapd.engine.errors import MetadataFullError, StoreCorruptError, StoreFullError
from csnapd.engine.pager import Pager
from csnapd.engine.pages import BitmapPage
from csnapd.engine.state import StoreState

__all__ = ["Allocator", "Space", "metadata_space", "data_space"]


@dataclass(frozen=True, slots=True)
class Space:
    """One allocation space: which units its bitmap covers."""

    name: str
    bitmap_start: int
    bitmap_blocks: int
    #: Unit number of bit 0 of the first bitmap block.
    first_unit: int
    #: Units covered: [first_unit, first_unit + units).
    units: int
    #: Units that may be allocated: [low, first_unit + units).
    low: int
    bits_per_block: int


def metadata_space(g: Geometry) -> Space:
    return Space(
        "metadata",
        g.meta_bitmap_start,
        g.meta_bitmap_blocks,
        g.meta_start,
        g.meta_blocks,
        g.meta_start,
        bitmap_bits_per_block(g.block_size),
    )


def data_space(g: Geometry) -> Space:
    return Space(
        "data",
        g.data_bitmap_start,
        g.data_bitmap_blocks,
        0,
        g.store_chunks,
        g.data_start,
        bitmap_bits_per_block(g.block_size),
    )


class Allocator:
    """Allocates and frees units of one space, through the page cache."""

    def __init__(self, pager: Pager, state: StoreState, space: Space):
        self._pager = pager
        self.state = state
        self.space = space
        self._full_mask = (1 << space.bits_per_block) - 1
        #: Bitmap pages holding reserved bits, to release after commit.
        self._reserved_pages: set[int] = set()

    # The free count and cursor live in the state under per-space names.
    def _free(self) -> int:
        return self.state.meta_free if self.space.name == "metadata" else self.state.data_free

    def _set(self, free: int, cursor: int) -> None:
        if self.space.name == "metadata":
            self.state.meta_free, self.state.meta_cursor = free, cursor
        else:
            self.state.data_free, self.state.data_cursor = free, cursor

    def _cursor(self) -> int:
        return self.state.meta_cursor if self.space.name == "metadata" else self.state.data_cursor

    def _full(self, wanted: int, pending: int) -> Exception:
        usable = self._free() - pending
        later = f" ({pending} more once the open transaction commits)" if pending else ""
        if self.space.name == "metadata":
            return MetadataFullError(
                f"the metadata area has {usable} free blocks{later}, {wanted} needed",
                pending_frees=pending,
                wanted=wanted,
            )
        return StoreFullError(
            f"the snapshot store is full: {usable} free chunks{later}, {wanted} needed",
            pending_frees=pending,
            wanted=wanted,
        )

    def pending_frees(self) -> int:
        """Units freed by the open transaction: free, but not yet usable."""
        return sum(
            self._pager.bitmap(address).reserved.bit_count() for address in self._reserved_pages
        )

    def _page(self, index: int) -> BitmapPage:
        return self._pager.bitmap(self.space.bitmap_start + index)

    def allocate(self, count: int) -> list[tuple[int, int]]:
        """Allocate `count` units as few contiguous runs as the bitmap allows.

        Returns (first unit, length) runs in allocation order.

        Raises:
            StoreFullError, MetadataFullError: not enough free units.
        """
        free = self._free()
        pending = self.pending_frees() if self._reserved_pages else 0
        if count > free - pending:
            raise self._full(count, pending)
        space = self.space
        bits = space.bits_per_block
        rel = self._cursor() - space.first_unit
        runs: list[tuple[int, int]] = []
        need = count
        pages_seen = 0
        while need:
            index, offset = divmod(rel, bits)
            page = self._page(index)
            taken = page.bits | page.reserved
            avail = ~taken & self._full_mask
            avail >>= offset
            if not avail:
                pages_seen += 1
                if pages_seen > space.bitmap_blocks + 1:
                    raise StoreCorruptError(
                        f"the {space.name} free count says {free} units are free"
                        " but the bitmap has none: run csnap-check"
                    )
                rel = 0 if index + 1 >= space.bitmap_blocks else (index + 1) * bits
                continue
            start = offset + (avail & -avail).bit_length() - 1
            after = taken >> start
            run_end = start + (after & -after).bit_length() - 1 if after else bits
            length = min(need, run_end - start)
            self._pager.modify(page).bits |= ((1 << length) - 1) << start
            first = space.first_unit + index * bits + start
            append_run(runs, first, length)
            need -= length
            rel = index * bits + start + length
        cursor = space.first_unit + rel
        if cursor >= space.first_unit + space.units:
            cursor = space.low
        self._set(free - count, cursor)
        return runs

    def allocate_one(self) -> int:
        """Allocate a single unit."""
        return self.allocate(1)[0][0]

    def free(self, unit: int) -> None:
        """Free `unit`; it stays unavailable until the transaction is durable.

        Raises:
            StoreCorruptError: the unit is outside the space or already free.
        """
        space = self.space
        if not space.low <= unit < space.first_unit + space.units:
            raise StoreCorruptError(f"freeing {space.name} unit {unit} outside the area")
        index, bit = divmod(unit - space.first_unit, space.bits_per_block)
        page = self._page(index)
        if not page.bits >> bit & 1:
            raise StoreCorruptError(
                f"freeing {space.name} unit {unit}, which the bitmap says is free: run csnap-check"
            )
        self._pager.modify(page)
        page.bits &= ~(1 << bit)
        page.reserved |= 1 << bit
        self._reserved_pages.add(page.address)
        self._set(self._free() + 1, self._cursor())

    def is_allocated(self, unit: int) -> bool:
        """Whether `unit`'s bit is set."""
        index, bit = divmod(unit - self.space.first_unit, self.space.bits_per_block)
        return bool(self._page(index).bits >> bit & 1)

    def committed(self) -> None:
        """The open transaction is durable: its freed units are free now."""
        for address in self._reserved_pages:
            page = self._pager.bitmap(address)
            page.reserved = 0
        self._reserved_pages.clear()
