"""The gateway's admin connection to csnapd, shared by its questions.

The gateway asks csnapd, over an admin connection, which snapshots are live
(NBD_OPT_LIST, and the lookup of a snapshot export no client of the gateway
has open) and how large the origin is now (every NBD connection to the
origin: csnap resize may have grown it). A client that connects again and
again (qemu-img, nbdcopy, a backup tool opening one connection per step)
would otherwise cost csnapd a new connection, and the TLS handshake, per NBD
connection. One admin connection serves every question asked while it is
open; it stays open LINGER seconds after the last answer, and a question
that finds it broken (csnapd restarted) asks again on a new one. The
answers are as fresh as on a new connection: each is asked when needed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from csnap_client import AdminClient, ConnectionLostError, Connector, open_admin

__all__ = ["AdminLink"]

log = logging.getLogger("csnap.nbd.admin")

Answer = TypeVar("Answer")


class AdminLink:
    """One admin connection opened on demand; `run` must be running for `ask`."""

    def __init__(self, connect: Connector, linger: float):
        self._connect = connect
        self._linger = linger
        self._admin: AdminClient | None = None
        self._opening = trio.Lock()
        #: Questions being asked now, and when the last one was answered.
        self._asking = 0
        self._answered = 0.0
        #: Set to close the current connection (it broke).
        self._drop = trio.Event()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the connection until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def ask(self, question: Callable[[AdminClient], Awaitable[Answer]]) -> Answer:
        """`question`'s answer over the shared connection, again on a new one
        if the shared one broke.

        Raises:
            OSError, ServerError, ConnectionLostError: as open_admin and the
                question do.
        """
        self._asking += 1
        try:
            admin = await self._current()
            try:
                return await question(admin)
            except (ConnectionLostError, OSError) as exc:
                # Idempotent questions only: asking again changes nothing.
                log.info("admin connection to csnapd lost (%s); asking on a new one", exc)
                self._forget(admin)
                return await question(await self._current())
        finally:
            self._asking -= 1
            self._answered = trio.current_time()

    async def _current(self) -> AdminClient:
        async with self._opening:
            if self._admin is None:
                assert self._nursery is not None, "AdminLink.run is not running"
                await self._nursery.start(self._hold)
            assert self._admin is not None
            return self._admin

    def _forget(self, admin: AdminClient) -> None:
        if self._admin is admin:
            self._admin = None
            self._drop.set()

    async def _hold(self, *, task_status: trio.TaskStatus[None]) -> None:
        drop = self._drop = trio.Event()
        admin: AdminClient | None = None
        try:
            async with open_admin(self._connect) as admin:
                self._admin = admin
                task_status.started()
                while not drop.is_set():
                    deadline = self._answered + self._linger
                    if self._asking:
                        deadline = trio.current_time() + self._linger
                    with trio.move_on_at(deadline):
                        await drop.wait()
                    if not self._asking and trio.current_time() >= self._answered + self._linger:
                        # Forgotten before any await: a new question opens anew.
                        self._forget(admin)
                        break
        except Exception as exc:
            if admin is None:
                raise  # not opened: nursery.start hands it to the asker
            log.info("admin connection to csnapd ended: %s", exc)
        finally:
            if admin is not None:
                self._forget(admin)
