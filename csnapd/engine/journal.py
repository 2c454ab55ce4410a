"""The journal: how a transaction becomes durable, and how a store that was
not closed cleanly is brought back (docs/format.md, "Journal").

Writing transaction s with blocks b1..bn and copy-out data d1..dm:
  1. d1..dm were written to chunks the transaction allocated (not synced)
  2. write the commit record, with the CRC32 of each run of d1..dm, and
     b1..bn to free journal slots
  3. sync                                   -> durable: replies may go out
  4. write b1..bn to their home addresses   (the next sync covers them)

One sync makes the data and the record durable together (rule: data before
pointers, docs/rules.md): recovery takes the newest record only if its data
runs match their CRCs, so a record whose copies did not all reach the disk
counts as never written; it was never acknowledged. Only the newest record
is checked: a later record is written only after the sync of the one before
it returned, and from then on a copy may change legitimately (a snapshot
client writes into it). So a copy is handed to a client for writing only
once a later record is durable: `seal()`. When the runs do not fit in the
record, the data is synced before the record instead (two syncs).

The record's tail is the oldest transaction whose home writes no completed
sync has covered yet; recovery replays from there. Slots from the tail of
the newest durable record to its end are live and never overwritten; when
free slots run short a checkpoint record (no blocks, tail = itself) frees
them all.

Recovery reads every slot, takes the newest transaction whose images match
its payload CRC and carry its sequence (and whose data runs match theirs),
and replays from its tail in sequence order, stopping at the first missing
or damaged transaction (rule: replay in order, docs/rules.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from csnap_format import (
    SUPERBLOCK_ADDRESS,
    BlockType,
    CommitRecord,
    DataRun,
    FormatError,
    Geometry,
    commit_capacity,
    commit_fits,
    decode_commit,
    encode_commit,
    payload_crc,
    read_header,
)
from csnap_format.checksum import crc32
from csnap_format.constants import MAGIC
from csnapd.engine.device import BlockDevice
from csnapd.engine.errors import StoreIOError, StoreOpenError

__all__ = ["Journal", "RecoveryReport", "JournalStats", "scan_journal", "JournalScan"]


@dataclass(slots=True)
class JournalStats:
    """What the journal has done since the store was opened."""

    commits: int = 0
    checkpoints: int = 0
    syncs: int = 0
    blocks: int = 0


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    """What opening the store found in the journal."""

    #: Sequence of the newest durable transaction.
    newest_sequence: int
    #: Transactions replayed (from the newest's tail to the newest).
    replayed: int
    #: Block images written home by the replay.
    blocks: int
    #: Why replay stopped before the newest transaction, if it did.
    problem: str | None = None
    #: A newer record whose copy-out data did not all reach the disk: it
    #: counts as not committed (it was never acknowledged).
    uncommitted: str | None = None


@dataclass(slots=True)
class _Transaction:
    slot: int
    record: CommitRecord
    images: list[bytes]


@dataclass(slots=True)
class JournalScan:
    """The transactions recovery would replay, in order, and what it found."""

    newest: _Transaction
    replay: list[_Transaction]
    problem: str | None
    #: Sequence -> (slot, slots used) of the transactions in the replay range.
    spans: dict[int, tuple[int, int]] = field(default_factory=dict)
    #: A newer record passed over because its copy-out data did not match.
    uncommitted: str | None = None

    @property
    def images(self) -> dict[int, bytes]:
        """Home address -> newest image, as replay would leave the store."""
        out: dict[int, bytes] = {}
        for txn in self.replay:
            out.update(zip(txn.record.homes, txn.images, strict=True))
        return out


#: Block types that live in the metadata area.
_AREA_KINDS = frozenset({BlockType.INDEX, BlockType.LEAF, BlockType.REGISTRY})

#: Magic and type of a commit record, as they start its block.
_COMMIT_HEAD = MAGIC + int(BlockType.COMMIT).to_bytes(2, "little")

#: Recovery reads copy-out data to check it in pieces of at most this many bytes.
_CHECK_IO_BYTES = 8 << 20


def _image_kind(g: Geometry, home: int, image: bytes) -> BlockType:
    if home == SUPERBLOCK_ADDRESS:
        return BlockType.SUPERBLOCK
    if home < g.meta_start:
        return BlockType.BITMAP
    kind = int.from_bytes(image[4:6], "little")
    return BlockType(kind) if kind in _AREA_KINDS else BlockType.LEAF


def _images_belong(g: Geometry, record: CommitRecord, images: list[bytes]) -> bool:
    """Whether each image is an intact block of its home, written by `record`.

    docs/format.md, "Image sequence rule": an intact image of another
    transaction in the slot is stale, whatever the CRC says.
    """
    try:
        for home, image in zip(record.homes, images, strict=True):
            kind = _image_kind(g, home, image)
            header = read_header(
                image, kind, address=home, store_id=g.store_id, block_size=g.block_size
            )
            if header.sequence != record.sequence:
                return False
    except FormatError:
        return False
    return True


def _verified(
    raw: bytes, g: Geometry, candidates: list[tuple[int, CommitRecord]]
) -> _Transaction | None:
    """The candidate whose images are all present and intact, if any."""
    size, slots = g.block_size, g.journal_blocks
    for slot, record in candidates:
        images = []
        for i in range(len(record.homes)):
            at = (slot + 1 + i) % slots * size
            images.append(raw[at : at + size])
        if payload_crc(images) != record.payload_crc:
            continue
        if not _images_belong(g, record, images):
            continue
        return _Transaction(slot, record, images)
    return None


def data_mismatch(device: BlockDevice, g: Geometry, runs: Sequence[DataRun]) -> str | None:
    """The first data run whose chunks do not match its CRC, described; or None.

    Raises:
        StoreIOError: the data area cannot be read.
    """
    size = g.chunk_size
    for run in runs:
        crc = 0
        done = 0
        try:
            while done < run.chunks:
                step = min(run.chunks - done, max(1, _CHECK_IO_BYTES // size))
                crc = crc32(device.read((run.first_chunk + done) * size, step * size), crc)
                done += step
        except OSError as exc:
            raise StoreIOError(f"reading copy-out data: {exc.strerror or exc}") from exc
        if crc != run.crc:
            return f"store chunks {run.first_chunk}..{run.first_chunk + run.chunks - 1}"
    return None


def scan_journal(device: BlockDevice, g: Geometry) -> JournalScan:
    """Read the whole journal and work out what recovery must replay.

    Raises:
        StoreIOError: the journal cannot be read.
        StoreOpenError: no valid commit record at all.
    """
    size, slots = g.block_size, g.journal_blocks
    ctx = g.context
    try:
        raw = device.read(g.journal_start * size, slots * size)
    except OSError as exc:
        raise StoreIOError(f"reading the journal: {exc.strerror or exc}") from exc
    found: dict[int, list[tuple[int, CommitRecord]]] = {}
    view = memoryview(raw)
    for slot in range(slots):
        at = slot * size
        # Most slots hold block images: skip them on their type field alone.
        if raw[at : at + 6] != _COMMIT_HEAD:
            continue
        block = view[at : at + size]
        try:
            record = decode_commit(block, ctx, g.journal_start + slot)
        except FormatError:
            continue
        found.setdefault(record.sequence, []).append((slot, record))
    newest = None
    uncommitted = None
    for sequence in sorted(found, reverse=True):
        newest = _verified(raw, g, found[sequence])
        if newest is None:
            continue
        mismatch = data_mismatch(device, g, newest.record.data)
        if mismatch is None:
            break
        # Its sync never returned: nothing it carried was acknowledged.
        uncommitted = (
            f"transaction {sequence} is not committed: its copy-out data ({mismatch})"
            " did not reach the disk"
        )
        newest = None
    if newest is None:
        raise StoreOpenError("the journal holds no valid commit record")
    replay: list[_Transaction] = []
    problem = None
    spans = {}
    last = newest.record.sequence
    for sequence in range(newest.record.tail_sequence, last + 1):
        txn = newest if sequence == last else _verified(raw, g, found.get(sequence, []))
        if txn is None:
            problem = (
                f"transaction {sequence} is missing or damaged; replay stopped before it"
                f" ({last - sequence + 1} transactions not replayed)"
            )
            break
        replay.append(txn)
        spans[sequence] = (txn.slot, len(txn.record.homes) + 1)
    return JournalScan(newest, replay, problem, spans, uncommitted)


class Journal:
    """Writes transactions; see the module comment for the protocol."""

    def __init__(self, device: BlockDevice, g: Geometry, scan: JournalScan):
        self._device = device
        self._g = g
        self._ctx = g.context
        self._size = g.block_size
        self._slots = g.journal_blocks
        newest = scan.newest
        #: Next slot to write and next sequence to use.
        self.next_slot = (newest.slot + len(newest.record.homes) + 1) % self._slots
        self.next_sequence = newest.record.sequence + 1
        #: Live transactions: (sequence, first slot, slots), oldest first.
        self._live: deque[tuple[int, int, int]] = deque(
            (seq, slot, n) for seq, (slot, n) in sorted(scan.spans.items())
        )
        if newest.record.sequence not in scan.spans:  # replay stopped early
            self._live.append((newest.record.sequence, newest.slot, len(newest.record.homes) + 1))
        #: Oldest transaction whose home writes no completed sync covered.
        self._unsynced: int | None = None
        #: Copy-out data of the newest durable record, which recovery checks:
        #: no client may write into it until a later record is durable.
        self.unsealed: tuple[DataRun, ...] = newest.record.data
        self.stats = JournalStats()
        #: Most blocks one transaction may carry.
        self.max_blocks = min(commit_capacity(self._size), self._slots - 3)

    @classmethod
    def recover(cls, device: BlockDevice, g: Geometry) -> tuple[Journal, RecoveryReport]:
        """Replay the journal into the store and return a journal ready to write.

        Raises:
            StoreIOError, StoreOpenError
        """
        scan = scan_journal(device, g)
        blocks = 0
        try:
            for txn in scan.replay:
                for home, image in zip(txn.record.homes, txn.images, strict=True):
                    device.write(home * g.block_size, image)
                    blocks += 1
            device.sync()
        except OSError as exc:
            raise StoreIOError(f"replaying the journal: {exc.strerror or exc}") from exc
        report = RecoveryReport(
            scan.newest.record.sequence, len(scan.replay), blocks, scan.problem, scan.uncommitted
        )
        return cls(device, g, scan), report

    def _sync(self) -> None:
        self._device.sync()
        self.stats.syncs += 1
        self._unsynced = None

    def _free_slots(self) -> int:
        first = self._live[0][1]
        used = (self.next_slot - first) % self._slots
        return self._slots - used

    def _write_slots(self, buffers: list[bytes]) -> None:
        slot = self.next_slot
        head = min(len(buffers), self._slots - slot)
        base = self._g.journal_start
        self._device.writev((base + slot) * self._size, buffers[:head])
        if head < len(buffers):
            self._device.writev(base * self._size, buffers[head:])

    def _append(
        self, images: Sequence[tuple[int, bytes]], tail: int, data: tuple[DataRun, ...] = ()
    ) -> int:
        sequence = self.next_sequence
        record = CommitRecord(
            address=self._g.journal_start + self.next_slot,
            sequence=sequence,
            tail_sequence=tail,
            payload_crc=payload_crc(image for _, image in images),
            homes=tuple(home for home, _ in images),
            data=data,
        )
        self._write_slots([encode_commit(record, self._ctx), *(image for _, image in images)])
        self._sync()
        self.unsealed = data
        slots = len(images) + 1
        while self._live and self._live[0][0] < tail:
            self._live.popleft()
        self._live.append((sequence, self.next_slot, slots))
        self.next_slot = (self.next_slot + slots) % self._slots
        self.next_sequence += 1
        return sequence

    def checkpoint(self) -> None:
        """Make every home write durable and free every journal slot but one."""
        self._sync()
        self._append((), self.next_sequence)
        self.stats.checkpoints += 1

    def seal(self) -> None:
        """Make a record later than the newest durable one durable (no blocks).

        Afterwards no recovery checks the copy-out data of the records
        before it, so clients may write into those copies.
        """
        if self.unsealed:
            self.commit(0, lambda _: ())

    def commit(
        self,
        count: int,
        encode: Callable[[int], Sequence[tuple[int, bytes]]],
        *,
        data_written: bool = False,
        data: Sequence[DataRun] = (),
    ) -> int:
        """Make a transaction durable, then write its blocks home.

        Args:
            count: how many blocks the transaction carries.
            encode: given the transaction's sequence, returns the (home
                address, encoded block) pairs, each address once, each block
                stamped with that sequence.
            data_written: whether copy-out data was written for it.
            data: the runs of that data with their CRCs. When they fit in
                the record, one sync makes data and record durable; else
                (or without them) the data is synced first.

        Returns:
            the transaction's sequence.

        Raises:
            OSError: a write or sync failed. The caller must stop: nothing
                about the store's durability is known after a failed sync.
        """
        if count > self.max_blocks:
            raise ValueError(f"transaction of {count} blocks exceeds {self.max_blocks}")
        runs = tuple(data) if data_written and commit_fits(self._size, count, len(data)) else ()
        if data_written and not runs:
            self._sync()
        if count + 2 > self._free_slots():
            self.checkpoint()
        images = encode(self.next_sequence)
        if len(images) != count:
            raise ValueError(f"encode returned {len(images)} blocks, not {count}")
        tail = self._unsynced if self._unsynced is not None else self.next_sequence
        sequence = self._append(images, tail, runs)
        self.stats.commits += 1
        self.stats.blocks += len(images)
        self._write_homes(images)
        self._unsynced = sequence
        return sequence

    def _write_homes(self, images: Sequence[tuple[int, bytes]]) -> None:
        run: list[bytes] = []
        run_start = -1
        for home, image in sorted(images):
            if run and home == run_start + len(run):
                run.append(image)
                continue
            if run:
                self._device.writev(run_start * self._size, run)
            run, run_start = [image], home
        if run:
            self._device.writev(run_start * self._size, run)

    def sync(self) -> None:
        """Make the home writes durable (used at close)."""
        self._sync()


def committed_images(device: BlockDevice, g: Geometry, newest: int) -> dict[int, tuple[int, bytes]]:
    """Home address -> (sequence, image) of its newest image in any intact
    transaction still in the journal's slots, replayed or not.

    Every such transaction was committed, so a block in use whose home copy
    is older than its image here lost a write (csnap-check's `stale-block`).

    Args:
        newest: the sequence of the newest durable transaction (scan_journal's).

    Raises:
        StoreIOError: the journal cannot be read.
    """
    size, slots = g.block_size, g.journal_blocks
    try:
        raw = device.read(g.journal_start * size, slots * size)
    except OSError as exc:
        raise StoreIOError(f"reading the journal: {exc.strerror or exc}") from exc
    out: dict[int, tuple[int, bytes]] = {}
    view = memoryview(raw)
    for slot in range(slots):
        at = slot * size
        if raw[at : at + 6] != _COMMIT_HEAD:
            continue
        try:
            record = decode_commit(view[at : at + size], g.context, g.journal_start + slot)
        except FormatError:
            continue
        if record.sequence > newest:
            continue
        txn = _verified(raw, g, [(slot, record)])
        if txn is None:
            continue
        for home, image in zip(record.homes, txn.images, strict=True):
            if home not in out or out[home][0] < record.sequence:
                out[home] = (record.sequence, bytes(image))
    return out
