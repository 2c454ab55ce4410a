"""The page cache: metadata blocks in their editable form, bounded in number,
with the dirty set of the open transaction and per-request undo.

Rules:
  * A page is edited only after `modify(page)` (or `create(page)`), which
    records its prior state for rollback and pins it as dirty.
  * Dirty pages are never evicted; they leave the dirty set at commit.
  * Nothing is evicted while a request is being applied (between
    `begin_request` and its end), so a page a request holds is never
    replaced by a second copy behind its back. The cache may therefore
    exceed its capacity by one request's working set, briefly.
  * Start-up reads nothing: pages are loaded on first use.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from csnap_format import (
    BlockContext,
    FormatError,
    Geometry,
    decode_bitmap,
    decode_index,
    decode_leaf,
    decode_registry,
)
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import StoreCorruptError, StoreIOError
from csnapd.engine.pages import BitmapPage, IndexPage, LeafPage, Page, RegistryPage

__all__ = ["Pager", "CacheStats"]

_P = TypeVar("_P", LeafPage, IndexPage, BitmapPage, RegistryPage)
_Decoder = Callable[[bytes, BlockContext, int], _P]


def _decode_leaf(data: bytes, ctx: BlockContext, address: int) -> LeafPage:
    return LeafPage.from_format(decode_leaf(data, ctx, address))


def _decode_index(data: bytes, ctx: BlockContext, address: int) -> IndexPage:
    return IndexPage.from_format(decode_index(data, ctx, address))


def _decode_bitmap(data: bytes, ctx: BlockContext, address: int) -> BitmapPage:
    return BitmapPage.from_format(decode_bitmap(data, ctx, address))


def _decode_registry(data: bytes, ctx: BlockContext, address: int) -> RegistryPage:
    return RegistryPage.from_format(decode_registry(data, ctx, address))


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class Pager:
    """Bounded cache of pages over the store device."""

    def __init__(self, device: BlockDevice, geometry: Geometry, capacity: int):
        self._device = device
        self._ctx = geometry.context
        self._block_size = geometry.block_size
        #: Most pages kept when no request is running.
        self.capacity = max(16, capacity)
        self._pages: OrderedDict[int, Page] = OrderedDict()
        #: Pages changed since the last commit, in the order first changed.
        self.dirty: dict[int, Page] = {}
        self._undo: dict[int, tuple[Page | None, bool]] | None = None
        self.stats = CacheStats()
        #: A commit is being written from the dirty pages (in another
        #: thread): no page may change until it is settled.
        self.writing = False

    def __len__(self) -> int:
        return len(self._pages)

    # -- reading ---------------------------------------------------------------

    def leaf(self, address: int) -> LeafPage:
        return self._get(address, LeafPage, _decode_leaf)

    def index(self, address: int) -> IndexPage:
        return self._get(address, IndexPage, _decode_index)

    def bitmap(self, address: int) -> BitmapPage:
        return self._get(address, BitmapPage, _decode_bitmap)

    def registry(self, address: int) -> RegistryPage:
        return self._get(address, RegistryPage, _decode_registry)

    def _get(self, address: int, kind: type[_P], decode: _Decoder[_P]) -> _P:
        page = self._pages.get(address)
        if page is None:
            self.stats.misses += 1
            page = self._load(address, decode)
            self._pages[address] = page
            if self._undo is None:
                self._evict()
        else:
            self.stats.hits += 1
            self._pages.move_to_end(address)
        if not isinstance(page, kind):
            raise StoreCorruptError(
                f"block {address} is reached as a {kind.__name__} but holds"
                f" a {type(page).__name__}: the btree or bitmaps are damaged"
            )
        return page

    def _load(self, address: int, decode: _Decoder[_P]) -> _P:
        try:
            data = self._device.read(address * self._block_size, self._block_size)
        except OSError as exc:
            raise StoreIOError(f"reading metadata block {address}: {exc.strerror or exc}") from exc
        try:
            return decode(data, self._ctx, address)
        except FormatError as exc:
            raise StoreCorruptError(str(exc)) from exc

    # -- changing --------------------------------------------------------------

    def _remember(self, address: int, page: Page | None) -> None:
        if self._undo is not None and address not in self._undo:
            self._undo[address] = (
                page.copy() if page is not None else None,
                address in self.dirty,
            )

    def _refuse_while_writing(self) -> None:
        if self.writing:
            # The page objects are what the commit's thread encodes.
            raise RuntimeError("a request changed the store while a commit was being written")

    def modify(self, page: _P) -> _P:
        """Declare that `page` is about to change; returns it for chaining."""
        self._refuse_while_writing()
        address = page.address
        self._remember(address, page)
        self.dirty[address] = page
        return page

    def create(self, page: Page) -> None:
        """Add a page for a newly allocated block."""
        self._refuse_while_writing()
        self._remember(page.address, None)
        self._pages[page.address] = page
        self.dirty[page.address] = page

    def forget(self, address: int) -> None:
        """Drop a freed block: it is neither cached nor written any more."""
        self._refuse_while_writing()
        self._remember(address, self._pages.get(address))
        self._pages.pop(address, None)
        self.dirty.pop(address, None)

    # -- requests and transactions -------------------------------------------

    def begin_request(self) -> None:
        """Start recording undo information for one request."""
        self._undo = {}

    @property
    def changed(self) -> bool:
        """Whether the request under way changed, added or dropped a page."""
        return bool(self._undo)

    def end_request(self) -> None:
        """The request succeeded: keep its changes."""
        self._undo = None
        self._evict()

    def rollback_request(self) -> None:
        """The request failed: put back every page as it was before it."""
        undo, self._undo = self._undo or {}, None
        for address, (copy, was_dirty) in undo.items():
            if copy is None:
                self._pages.pop(address, None)
                self.dirty.pop(address, None)
                continue
            self._pages[address] = copy
            if was_dirty:
                self.dirty[address] = copy
            else:
                self.dirty.pop(address, None)
        self._evict()

    def committed(self) -> None:
        """The dirty pages are durable: they become ordinary cached pages."""
        self.dirty.clear()
        self._evict()

    def drop_all(self) -> None:
        """Forget every page (after a failed commit nothing cached is trusted)."""
        self._pages.clear()
        self.dirty.clear()
        self._undo = None

    def _evict(self) -> None:
        excess = len(self._pages) - self.capacity
        if excess <= 0:
            return
        victims = []
        for address in self._pages:
            if address not in self.dirty:
                victims.append(address)
                if len(victims) == excess:
                    break
        for address in victims:
            del self._pages[address]
        self.stats.evictions += len(victims)
