"""The resize driver: `Engine.resize`, moving a running engine to a new
geometry one transaction at a time.

Owns the order of an online resize: what is pending is committed first,
the plan is checked (csnapd.engine.resize), each step rebuilds the engine's
parts for its geometry and commits one transaction, a step that fails puts
the parts back for the geometry before it, and the geometry backup is
rewritten once the last step is durable at home.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from csnap_format import Geometry, store_capacity
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import StoreIOError
from csnapd.engine.journal import Journal
from csnapd.engine.pager import Pager
from csnapd.engine.resize import (
    ResizeResult,
    apply_resize,
    plan_resize,
    resize_steps,
    write_geometry_backup,
)
from csnapd.engine.squash import Squashed, Squasher
from csnapd.engine.state import StoreState
from csnapd.engine.transaction import Transaction

__all__ = ["OnlineResize"]

log = logging.getLogger("csnapd.engine")


class OnlineResize:
    """`Engine.resize`, over the engine's state (Engine mixes this in)."""

    geometry: Geometry
    _store: BlockDevice
    _origin: BlockDevice
    _journal: Journal
    _state: StoreState
    _pager: Pager
    _txn: Transaction
    _squasher: Squasher
    #: Squashes noted by a squasher a resize step replaced, not yet taken.
    _squashed_earlier: list[Squashed]
    _clock: Callable[[], int]
    #: Build the engine's parts for a geometry (Engine._assemble).
    _assemble: Callable[[Geometry], None]

    def resize(
        self,
        *,
        origin_bytes: int | None = None,
        store_bytes: int | None = None,
        grow_files: bool = False,
    ) -> ResizeResult:
        """Grow (or safely shrink) the origin and the store, online.

        Commits what is pending, then commits the resize as a transaction of
        its own and rewrites the geometry backup (csnapd.engine.resize).

        Raises:
            ResizeRefusedError: a subclass naming why; nothing was changed.
            StoreIOError, EngineFailedError: the store could not be written.
        """
        self._txn.check_usable()
        self._txn.commit()
        before = self.geometry
        after, grown = plan_resize(
            before,
            self._state,
            self._pager,
            (self._store, self._origin),
            origin_bytes=origin_bytes,
            store_bytes=store_bytes,
            grow_files=grow_files,
        )
        for step in resize_steps(before, after, self._txn.max_blocks):
            self._resize_step(step)
        self._rewrite_backup(after)
        return ResizeResult(
            origin_chunks_before=before.origin_chunks,
            origin_chunks=after.origin_chunks,
            store_chunks_before=before.store_chunks,
            store_chunks=after.store_chunks,
            capacity_chunks=store_capacity(after),
            data_chunks=after.data_chunks,
            data_free=self._state.data_free,
            grown_files=grown,
        )

    def _resize_step(self, after: Geometry) -> None:
        """Commit one transaction that moves the geometry to `after`."""
        before = self.geometry
        now = self._clock()
        self._squashed_earlier += self._squasher.take_squashed()
        self._assemble(after)
        try:
            self._txn.request(lambda: apply_resize(before, after, self._state, self._pager, now))
            self._txn.commit()
        except BaseException:
            if not self._txn.failed:
                self._assemble(before)
            raise

    def _rewrite_backup(self, after: Geometry) -> None:
        """Rewrite the geometry backup once block 0 is durable at home.

        Block 0 goes first, so one copy of the geometry is always whole.
        """
        try:
            self._journal.sync()
            write_geometry_backup(self._store, after)
        except (OSError, StoreIOError) as exc:
            # The resize is durable: answering an error would say it was not.
            log.error(
                "resized, but the geometry backup in block 1 could not be rewritten (%s);"
                " it is rewritten when the store is next opened",
                exc,
            )
