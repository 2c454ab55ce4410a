"""The client registry: which snapshot clients the store records as connected.

Owns the registry block of the store. After a crash, the clients it names are
the ones that may still hold read locks on origin chunks, so a starting server
reads it before it lets origin writes through.
"""

from __future__ import annotations

from csnap_format import Geometry, registry_capacity
from csnapd.engine.allocator import Allocator
from csnapd.engine.pager import Pager
from csnapd.engine.pages import RegistryPage
from csnapd.engine.state import StoreState
from csnapd.engine.transaction import Transaction

__all__ = ["ClientRegistry"]


class ClientRegistry:
    """The snapshot clients recorded in the store's registry block."""

    def __init__(
        self,
        state: StoreState,
        pager: Pager,
        meta: Allocator,
        geometry: Geometry,
        transaction: Transaction,
    ):
        self._state = state
        self._pager = pager
        self._meta = meta
        self._geometry = geometry
        self._txn = transaction

    def clients(self) -> tuple[frozenset[int], bool]:
        """The snapshot clients the registry names, and whether it overflowed."""
        self._txn.check_usable()
        if not self._state.registry:
            return frozenset(), False
        page = self._pager.registry(self._state.registry)
        return frozenset(page.clients), page.overflow

    def set_clients(self, clients: frozenset[int]) -> None:
        """Record which snapshot clients are connected (a request)."""
        self._txn.request(lambda: self._set(clients))

    def _set(self, clients: frozenset[int]) -> None:
        ids = tuple(sorted(clients))
        capacity = registry_capacity(self._geometry.block_size)
        overflow = len(ids) > capacity
        ids = ids[:capacity]
        state = self._state
        if not state.registry:
            if ids or overflow:
                address = self._meta.allocate_one()
                self._pager.create(RegistryPage(address, ids, overflow))
                state.registry = address
            return
        page = self._pager.registry(state.registry)
        if (page.clients, page.overflow) != (ids, overflow):
            page = self._pager.modify(page)
            page.clients, page.overflow = ids, overflow
