"""The open transaction: atomic requests, group commit, and writes split over several.

Owns everything between two commits: the store state as last committed,
whether data was written to the store since, how many requests are pending,
and whether a commit ever failed.

  * A request changes pages and the store state of the open transaction. If
    it fails, every change it made is rolled back and the transaction goes on
    without it.
  * `commit()` makes every request applied since the last commit durable with
    one journal transaction and one sync (group commit): the record carries
    the CRC of every run of copy-out data the requests wrote. A caller must
    not report a request's result before the commit that carries it returns.
  * A request that hands a client store chunks to write into (`hand_out`)
    while recovery would still check one of them against its copy's CRC
    makes the commit write one more, empty record after its own: only then
    may the reply go out (rule: data before pointers, docs/rules.md).
  * A request that would overflow the transaction commits the earlier ones
    first. A write too big for one transaction on its own is carried by
    several: it is applied in pieces of chunks, each piece committed before
    the next starts, and only the last left pending for the caller's commit
    (docs/protocol.md, "Requests larger than one transaction"). Its first,
    whole attempt ran to the end before it was rolled back, so the space and
    the reads the pieces need are known to be there.
  * If a commit fails, the engine refuses all further work
    (EngineFailedError): after a failed sync nothing is known to be durable,
    and the only safe way on is to reopen the store and replay the journal.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import TypeVar

from csnap_format import DataRun, Geometry, encode_superblock
from csnap_format.checksum import crc32
from csnapd.engine.allocator import Allocator
from csnapd.engine.errors import (
    EngineFailedError,
    MetadataFullError,
    RequestTooLargeError,
    StoreFullError,
)
from csnapd.engine.journal import Journal
from csnapd.engine.pager import Pager
from csnapd.engine.pages import Page, RegistryPage, encode_page
from csnapd.engine.state import StoreState
from csnapd.engine.stats import EngineStats
from csnapd.engine.validation import Ranges

__all__ = ["CommitWrite", "Transaction"]

log = logging.getLogger("csnapd.engine")

_T = TypeVar("_T")

#: Fraction of a transaction one piece of a split write aims to fill: room
#: for pieces whose chunks need more metadata than the average.
_PIECE_FILL = 0.75


class _TransactionOverflowError(RequestTooLargeError):
    """A request alone changes more metadata blocks than one transaction holds."""

    def __init__(self, message: str, *, blocks: int):
        super().__init__(message)
        #: Metadata blocks (superblock included) the whole request changed.
        self.blocks = blocks


class CommitWrite:
    """One commit between Transaction.prepare_commit and settle_commit: what
    it writes, taken when it was prepared, and how the write went."""

    def __init__(
        self,
        journal: Journal,
        geometry: Geometry,
        pages: list[Page],
        registry_written: bool,
        state: StoreState | None,
        data: tuple[DataRun, ...] | None,
        seal: bool,
    ):
        self._journal = journal
        self._geometry = geometry
        self._pages = pages
        #: The pages include the client registry: the superblock, which
        #: records its current version, goes with them.
        self._registry_written = registry_written
        #: The store state to write in the superblock; None: unchanged.
        self._state = state
        #: The copy-out runs the record carries; None: no data written.
        self._data = data
        self._seal = seal
        #: The transaction's sequence once written; None if there was nothing
        #: to write (or only a seal).
        self.sequence: int | None = None
        #: The client registry's sequence, when the commit writes it.
        self.registry_sequence: int | None = None
        #: Why the write failed (an OSError, or a defect); settle_commit turns
        #: it into EngineFailedError.
        self.error: Exception | None = None

    def write(self) -> None:
        """Write and sync the transaction (blocking; any thread). Touches the
        journal, the device and the pages it encodes, nothing else of the
        engine. Never raises: the failure is kept for settle_commit."""
        try:
            self._write()
        except Exception as exc:
            self.error = exc

    def _write(self) -> None:
        pages, state, geometry = self._pages, self._state, self._geometry
        if not pages and state is None:
            if self._seal:
                self._journal.seal()
            return
        registry_written = self._registry_written

        def encode(sequence: int) -> list[tuple[int, bytes]]:
            images = [(page.address, encode_page(page, sequence, geometry)) for page in pages]
            if state is not None:
                if registry_written:
                    state.registry_sequence = self.registry_sequence = sequence
                sb = state.to_superblock(geometry, sequence)
                images.append((0, encode_superblock(sb)))
            return images

        self.sequence = self._journal.commit(
            len(pages) + (state is not None),
            encode,
            data_written=self._data is not None,
            data=self._data or (),
        )
        if self._seal:
            self._journal.seal()


class Transaction:
    """The requests applied since the last commit, and the commit that makes them durable."""

    def __init__(
        self,
        journal: Journal,
        pager: Pager,
        state: StoreState,
        geometry: Geometry,
        allocators: tuple[Allocator, ...],
        stats: EngineStats,
    ):
        self._journal = journal
        self._pager = pager
        self._state = state
        self._committed = state.copy()
        self._geometry = geometry
        self._allocators = allocators
        self._stats = stats
        self._failure: BaseException | None = None
        self._data_written = False
        #: Runs of copy-out data written since the last commit, with their CRCs.
        self._runs: list[DataRun] = []
        #: Whether a request handed out a chunk whose copy recovery would
        #: check: the commit must be followed by a later durable record.
        self._seal = False
        self._superblock_wanted = False
        self._pending_requests = 0
        #: A commit is being written (prepare_commit .. settle_commit): only
        #: requests that change nothing may run.
        self._writing = False
        #: Most metadata blocks (superblock included) one transaction carries:
        #: three such transactions fit the journal, so checkpoints are rare.
        self.max_blocks = min(journal.max_blocks, max(8, (geometry.journal_blocks - 4) // 3 - 1))

    @property
    def failed(self) -> bool:
        """Whether a commit failed; nothing more is accepted."""
        return self._failure is not None

    @property
    def pending(self) -> bool:
        """Whether requests were applied that no commit has made durable."""
        return bool(self._pager.dirty) or self._state != self._committed or self._seal

    def rewrite_superblock(self) -> None:
        """Write the superblock with the next commit even if the state is unchanged
        (its geometry changed: a store upgrade)."""
        self._superblock_wanted = True

    def check_usable(self) -> None:
        """Refuse work after a failed commit."""
        if self._failure is not None:
            raise EngineFailedError(f"an earlier commit failed ({self._failure}); reopen the store")

    def note_copy(self, first_chunk: int, chunks: int, data: bytes | memoryview) -> None:
        """Record that the open request wrote `data` to store chunks
        first_chunk.. (synced with the commit's record, which carries its CRC)."""
        self._data_written = True
        runs = self._runs
        if runs and runs[-1].first_chunk + runs[-1].chunks == first_chunk:
            last = runs[-1]
            runs[-1] = DataRun(last.first_chunk, last.chunks + chunks, crc32(data, last.crc))
        else:
            runs.append(DataRun(first_chunk, chunks, crc32(data)))

    def hand_out(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Note that a reply lets a client write into these (store chunk, count)
        ranges: if recovery would check any of them against a copy's CRC, the
        commit seals it first (module comment)."""
        if self._writing:
            # The seal would be owed to a commit already written.
            raise RuntimeError("chunks were handed out while a commit was being written")
        if self._seal:
            return
        runs = sorted(
            (run.first_chunk, run.first_chunk + run.chunks)
            for run in (*self._journal.unsealed, *self._runs)
        )
        if not runs:
            return
        starts = [start for start, _ in runs]
        for first, count in ranges:
            # The last run starting before the range's end is the only one
            # that can overlap it when runs do not overlap each other.
            i = bisect.bisect_left(starts, first + count) - 1
            if i >= 0 and runs[i][1] > first:
                self._seal = True
                return

    def request(self, work: Callable[[], _T]) -> _T:
        """Apply `work` as one atomic request of the open transaction."""
        self.check_usable()
        self._stats.requests += 1
        for attempt in (1, 2):
            saved = self._state.copy()
            data_written = self._data_written, len(self._runs), self._runs[-1:]
            self._pager.begin_request()
            try:
                result = work()
            except (StoreFullError, MetadataFullError) as exc:
                self._rollback(saved, data_written)
                if attempt == 1 and exc.pending_frees:
                    # Space freed by the open transaction becomes usable once
                    # it is durable: commit, then try once more.
                    self.commit()
                    continue
                self._stats.failed_requests += 1
                raise
            except BaseException:
                self._rollback(saved, data_written)
                self._stats.failed_requests += 1
                raise
            if self._writing and self._state != saved:
                # (Pages are refused as they change: Pager.modify.)
                self._rollback(saved, data_written)
                raise RuntimeError("a request changed the store while a commit was being written")
            blocks = len(self._pager.dirty) + 1
            if blocks <= self.max_blocks:
                self._pager.end_request()
                self._pending_requests += 1
                return result
            self._rollback(saved, data_written)
            if attempt == 2 or self._pending_requests == 0:
                self._stats.failed_requests += 1
                raise _TransactionOverflowError(
                    f"the request changes {blocks} metadata blocks; one transaction"
                    f" holds {self.max_blocks}",
                    blocks=blocks,
                )
            self._stats.deferred_commits += 1
            self.commit()
        raise AssertionError("unreachable")  # pragma: no cover

    def lookup(self, work: Callable[[], _T]) -> _T:
        """Apply `work`, which only reads, as one request of the open transaction.

        As request(), without the copy of the state that a failed request
        puts back: a lookup has nothing to put back. One that changed a page
        is rolled back and refused; while a commit is being written, it is
        request() itself, whose check covers the state too.
        """
        if self._writing:
            return self.request(work)
        self.check_usable()
        self._stats.requests += 1
        self._pager.begin_request()
        try:
            result = work()
            if self._pager.changed:
                raise RuntimeError("a lookup changed the store")
        except BaseException:
            self._pager.rollback_request()
            self._stats.failed_requests += 1
            raise
        # Not counted pending: a lookup leaves nothing for a commit to free.
        self._pager.end_request()
        return result

    def _rollback(self, saved: StoreState, data_written: tuple[bool, int, list[DataRun]]) -> None:
        self._pager.rollback_request()
        self._state.assign(saved)
        self._data_written, runs, last = data_written
        # The request may have extended the last run: put it back as it was.
        self._runs[runs - len(last) :] = last

    def commit(self) -> int | None:
        """Make every request applied so far durable; returns the sequence.

        Returns None when there was nothing to commit.

        Raises:
            EngineFailedError: the commit failed; the engine is now unusable.
        """
        commit = self.prepare_commit()
        commit.write()
        return self.settle_commit(commit)

    def prepare_commit(self) -> CommitWrite:
        """The commit of every request applied so far, to be written.

        Between this and `settle_commit`, `CommitWrite.write` (blocking: the
        journal's writes and sync) may run in another thread while this one
        applies read-only requests; a request that changes anything then is
        a programming error and raises RuntimeError (see `request`).
        """
        self.check_usable()
        pages = list(self._pager.dirty.values())
        # The superblock records which version of the registry is current
        # (docs/format.md, "Client registry state"), so it goes with it.
        registry_written = any(isinstance(page, RegistryPage) for page in pages)
        state_changed = (
            registry_written or self._state != self._committed or self._superblock_wanted
        )
        self._writing = self._pager.writing = True
        return CommitWrite(
            self._journal,
            self._geometry,
            pages,
            registry_written,
            self._state.copy() if state_changed else None,
            tuple(self._runs) if self._data_written else None,
            self._seal,
        )

    def settle_commit(self, commit: CommitWrite) -> int | None:
        """After `commit.write()` returned: start the next transaction.

        Raises:
            EngineFailedError: the write failed; the engine is now unusable.
        """
        self._writing = self._pager.writing = False
        if commit.error is not None:
            raise self._failed(commit.error) from commit.error
        if commit.registry_sequence is not None:
            self._state.registry_sequence = commit.registry_sequence
        if commit.sequence is not None:
            self._committed_now()
        self._seal = False
        return commit.sequence

    def _failed(self, exc: Exception) -> EngineFailedError:
        """A commit failed: refuse everything from now on."""
        self._failure = exc
        self._pager.drop_all()
        log.critical("commit failed, refusing all further work: %s", exc)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        return EngineFailedError(
            f"commit failed: {reason}; the store must be reopened"
            " (journal replay) before it is used again"
        )

    def _committed_now(self) -> None:
        """The journal holds the open transaction: start the next one."""
        self._data_written = False
        self._runs = []
        self._seal = False
        self._superblock_wanted = False
        for allocator in self._allocators:
            allocator.committed()
        self._pager.committed()
        self._committed = self._state.copy()
        self._pending_requests = 0
        self._stats.commits += 1

    def split_request(self, ranges: Ranges, work: Callable[[Ranges], _T]) -> list[_T]:
        """Apply `work` to `ranges` as one request, or in pieces if it must be.

        Returns the result of each piece, in ascending chunk order. Every
        piece but the last is committed before the next starts; the last is
        left pending for the caller's commit, as any request is.
        """
        try:
            return [self.request(lambda: work(ranges))]
        except _TransactionOverflowError as exc:
            overflow = exc
        # The whole attempt ran to its end before it was rolled back: every
        # chunk it allocated was free and every copy it read was readable.
        # The pieces do the same work, with commits between them that can
        # only add free space (frees of the open transaction become usable).
        self._stats.split_requests += 1
        total = sum(count for _, count in ranges)
        budget = int(self.max_blocks * _PIECE_FILL)
        size = max(1, total * budget // overflow.blocks)
        todo = sorted(ranges)
        results: list[_T] = []
        while todo:
            piece, rest = _take(todo, size)
            if self.pending:
                self.commit()
            try:
                results.append(self.request(partial(work, piece)))
            except _TransactionOverflowError:
                if size == 1:
                    raise RequestTooLargeError(
                        "one chunk changes more metadata than one transaction holds"
                        f" ({self.max_blocks} blocks): the journal is too small"
                    ) from None
                size = max(1, size // 2)
                continue
            todo = rest
        return results


def _take(ranges: list[tuple[int, int]], size: int) -> tuple[Ranges, list[tuple[int, int]]]:
    """The first `size` chunks of `ranges`, and the ranges left after them."""
    piece: list[tuple[int, int]] = []
    for n, (start, count) in enumerate(ranges):
        if count >= size:
            piece.append((start, size))
            rest = ranges[n + 1 :]
            if count > size:
                rest = [(start + size, count - size), *rest]
            return piece, rest
        piece.append((start, count))
        size -= count
    return piece, []
