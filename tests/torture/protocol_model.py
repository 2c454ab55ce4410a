"""The plain model the protocol fuzzer keeps of what csnapd's views must read.

Every chunk the test writes holds label(chunk, version), with a version no
other write uses, so any chunk read back says which write it came from.

The origin is a log of the writes the test performed, in order. A snapshot
is the origin at one moment (a cut: the first k writes of the log) plus the
writes made through the snapshot itself. The test does not see the moment
csnapd takes it, only a window: every write performed before the create was
sent is in (k >= lo), and none performed after its reply arrived (k <= hi).
The barrier (docs/protocol.md, "Snapshot create with the barrier") makes
this a single cut: a read of the snapshot must fit one k for every chunk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from tests.server.support import CHUNK, label

__all__ = ["OriginLog", "SnapshotModel", "decode_chunk", "Mismatch"]


class Mismatch(AssertionError):
    """A view reads something the model says it cannot."""


def decode_chunk(chunk: int, data: bytes) -> int:
    """The version a chunk's contents carry; Mismatch if they are no label of `chunk`."""
    if len(data) != CHUNK:
        raise Mismatch(f"chunk {chunk}: read {len(data)} bytes, expected {CHUNK}")
    labelled, version = struct.unpack_from("<QQ", data)
    if labelled != chunk or data != label(chunk, version):
        raise Mismatch(
            f"chunk {chunk} holds no write of chunk {chunk} (first bytes name chunk {labelled},"
            f" version {version}{'' if data == label(labelled, version) else ', torn'})"
        )
    return int(version)


@dataclass
class OriginLog:
    """The origin writes the test performed, in order (version 0: the initial contents)."""

    #: chunk -> [(log position, version)], ascending.
    history: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    length: int = 0

    def write(self, chunk: int, version: int) -> None:
        self.history.setdefault(chunk, []).append((self.length, version))
        self.length += 1

    def now(self, chunk: int) -> int:
        writes = self.history.get(chunk)
        return writes[-1][1] if writes else 0

    def cuts_with(self, chunk: int, version: int) -> tuple[int, int] | None:
        """The cuts k (first k writes) after which `chunk` reads `version`: [first, last]."""
        writes = self.history.get(chunk, [])
        positions = [p for p, _ in writes]
        if version == 0:
            return (0, positions[0] if positions else self.length)
        for i, (position, written) in enumerate(writes):
            if written == version:
                until = positions[i + 1] if i + 1 < len(positions) else self.length
                return (position + 1, until)
        return None


@dataclass
class SnapshotModel:
    """What one snapshot (one generation of a tag) must read."""

    tag: int
    #: The cut window: lo writes at least, hi at most (None: reply not yet seen).
    lo: int
    hi: int | None = None
    #: chunk -> the versions written through snapshot_write_ok, in order.
    own: dict[int, list[int]] = field(default_factory=dict)
    #: chunk -> versions of write_snapshot_data requests whose reply the test
    #: never reads (a peer that does not read, or one gone before the reply):
    #: csnapd writes those itself, so each may or may not be in the snapshot.
    maybe: dict[int, set[int]] = field(default_factory=dict)
    use_count: int = 0
    deleted: bool = False

    def check(self, origin: OriginLog, reads: dict[int, bytes], sent_after: int) -> None:
        """Every chunk of `reads` is the model's, all shared ones from one cut.

        `sent_after`: the last version written when the read was sent. A
        write through the snapshot done by then must be seen (or one done
        since); one done since may be seen or not: another connection's
        read may have been answered before that write was granted.
        """
        assert self.hi is not None, "a snapshot is checked only once created"
        lo, hi = self.lo, self.hi
        for chunk in sorted(reads):
            version = decode_chunk(chunk, reads[chunk])
            written = self.own.get(chunk, [])
            settled = [v for v in written if v <= sent_after]
            if version in written and (version > sent_after or version == settled[-1]):
                continue
            if version in self.maybe.get(chunk, ()) and (not settled or version > settled[-1]):
                continue  # sent after the last write seen, so possibly applied after it
            if settled:
                raise Mismatch(
                    f"snapshot {self.tag} chunk {chunk}: version {version}, but its own"
                    f" write (snapshot_write_ok) was version {settled[-1]}"
                )
            cuts = origin.cuts_with(chunk, version)
            if cuts is None:
                raise Mismatch(
                    f"snapshot {self.tag} chunk {chunk}: version {version} was never written"
                    " to the origin (nor through this snapshot)"
                )
            lo, hi = max(lo, cuts[0]), min(hi, cuts[1])
            if lo > hi:
                raise Mismatch(
                    f"snapshot {self.tag} chunk {chunk}: version {version} is the origin's only"
                    f" between writes {cuts[0]} and {cuts[1]} of the log, outside the moments"
                    f" this snapshot can have been taken given the chunks before it"
                    f" (window {self.lo}..{self.hi})"
                )
