"""The crash harness proves itself: with each of six journal defects planted
(a checksum that covers only the commit record's first bytes, homes written
before the commit is durable, replay to the wrong address, a freed chunk
reused before its free is durable, a record taken whatever its copies hold,
a copy handed to a client while recovery still checks it: docs/rules.md,
"everything journaled", "replay in order", "no reuse before durable", "data
before pointers"), it must find a crash state that recovers wrongly within
its first thousand states.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import pytest

from csnap_format import Geometry
from csnapd.engine import EngineError
from csnapd.engine import journal as journal_module
from csnapd.engine.allocator import Allocator
from csnapd.engine.device import BlockDevice
from csnapd.engine.journal import Journal, RecoveryReport, scan_journal
from csnapd.engine.transaction import Transaction
from tests.crash.harness import CrashCheckError, enumerate_crashes, run_workload

FIRST_STATES = 1000


def _partial_crc(images: Iterable[bytes | bytearray | memoryview]) -> int:
    """A checksum over the first 12 bytes only."""
    for image in images:
        return zlib.crc32(bytes(image[:12]))
    return 0


def _no_check(*args: object, **kw: object) -> bool:
    """Stands in for the per-image header and sequence check."""
    return True


def _plant_partial_checksum(mp: pytest.MonkeyPatch) -> None:
    """A transaction checksum that covers 12 bytes and
    nothing else checks the journaled images (ours carry their own checksum,
    which would catch the tear, so that check goes too)."""
    mp.setattr(journal_module, "payload_crc", _partial_crc)
    mp.setattr(journal_module, "_images_belong", _no_check)


def _homes_first(original: Callable[..., int]) -> Callable[..., int]:
    """Home blocks written before the commit record is durable."""

    def append(self: Journal, images: list[tuple[int, bytes]], *rest: object) -> int:
        self._write_homes(images)
        return original(self, images, *rest)

    return append


def _recover_to_wrong_home(device: BlockDevice, g: Geometry) -> tuple[Journal, RecoveryReport]:
    """Replay writes each block of commit i to that commit's i-th home."""
    scan = scan_journal(device, g)
    for number, txn in enumerate(scan.replay):
        homes = txn.record.homes
        for image in txn.images:
            device.write(homes[min(number, len(homes) - 1)] * g.block_size, image)
    device.sync()
    report = RecoveryReport(scan.newest.record.sequence, len(scan.replay), 0, scan.problem)
    return Journal(device, g, scan), report


def _reuse_at_once(original: Callable[[Allocator, int], None]) -> Callable[[Allocator, int], None]:
    """Rule 4 broken: a freed unit may be handed out again in the same transaction."""

    def free(self: Allocator, unit: int) -> None:
        original(self, unit)
        self.committed()

    return free


def _plant_homes_first(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Journal, "_append", _homes_first(Journal._append))


def _plant_wrong_home(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Journal, "recover", staticmethod(_recover_to_wrong_home))


def _plant_early_reuse(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(Allocator, "free", _reuse_at_once(Allocator.free))


def _plant_unchecked_copies(mp: pytest.MonkeyPatch) -> None:
    """Recovery takes the newest record without checking its copies' CRCs."""
    mp.setattr(journal_module, "data_mismatch", lambda *args: None)


def _plant_unsealed_hand_out(mp: pytest.MonkeyPatch) -> None:
    """A client may write into a copy recovery still checks (no seal record)."""
    mp.setattr(Transaction, "hand_out", lambda self, ranges: None)


DEFECTS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "partial commit checksum": _plant_partial_checksum,
    "homes before the commit": _plant_homes_first,
    "replay to the wrong address": _plant_wrong_home,
    "freed chunk reused before durable": _plant_early_reuse,
    "copy data unchecked at recovery": _plant_unchecked_copies,
    "copy handed out before sealed": _plant_unsealed_hand_out,
}


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_planted_defect_is_caught(defect: str, monkeypatch: pytest.MonkeyPatch) -> None:
    DEFECTS[defect](monkeypatch)
    caught = False
    for seed in range(3):
        try:
            # A store kept nearly full, so that allocation wraps onto chunks
            # freed in the same transaction when nothing stops it (a full
            # store refuses rather than squashes: squashing commits its frees
            # before any reuse); every fourth write boundary, so a thousand
            # states reach far enough.
            workload = run_workload(seed, 100, store_bytes=1 << 20, reclaim=False)
            enumerate_crashes(workload, seed=seed, limit=FIRST_STATES, stride=4)
        except (CrashCheckError, EngineError) as exc:
            caught = True
            print(f"\n{defect}: {type(exc).__name__}: {str(exc)[:200]}")
            break
    assert caught, f"{defect} survived {FIRST_STATES} crash states of three workloads"
