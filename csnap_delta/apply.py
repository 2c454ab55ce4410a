"""Applying a delta to a raw image: check everything first, then write.

The first pass reads the whole delta and the target's bytes under every
extent, and refuses, having written nothing, when the delta is damaged or
cut short, when the target is not an image of the delta's size, or when
the target's bytes under an extent are neither snapshot FROM's (the base
the delta applies to) nor already snapshot TO's. The second pass writes
the extents whose bytes are still FROM's, then syncs. An extent that
already holds TO's bytes is left alone, so applying a delta again, or
after an interrupted apply, finishes the job.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import BinaryIO

from csnap_delta.devices import Device
from csnap_delta.layout import (
    FLAG_ZSTD,
    DeltaEnd,
    DeltaFormatError,
    DeltaHeader,
    ExtentHeader,
    SequenceDigest,
    decompress,
    digest,
)

__all__ = ["ApplyReport", "DeltaRefusedError", "apply_delta", "read_extents"]


class DeltaRefusedError(Exception):
    """The target is not what the delta applies to; nothing was written."""


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What applying did: extents and chunks in the delta, and chunks written."""

    header: DeltaHeader
    extents: int
    chunks: int
    written_chunks: int
    already_chunks: int
    #: Whether the target was read and written with O_DIRECT.
    direct: bool = False


def _read_exact(source: BinaryIO, size: int, what: str) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise DeltaFormatError(f"the delta is cut short in {what}")
    return data


def read_extents(source: BinaryIO) -> Iterator[tuple[DeltaHeader, ExtentHeader, bytes]]:
    """Every extent of a delta with its data, checked; ends after checking the end record.

    Raises:
        DeltaFormatError: damaged, cut short, out of order or followed by junk.
    """
    header = DeltaHeader.decode(source.read(DeltaHeader.SIZE))
    sequence = SequenceDigest()
    extents = chunks = 0
    after = 0
    size = header.chunk_size
    while True:
        record = _read_exact(source, ExtentHeader.SIZE, "a record")
        if record[:4] != b"CDEX":
            end = DeltaEnd.decode(record)
            if (end.extents, end.chunks, end.sequence) != (extents, chunks, sequence.digest()):
                raise DeltaFormatError(
                    f"the end record counts {end.extents} extents and {end.chunks} chunks, or"
                    f" another sequence, but the delta holds {extents} and {chunks}"
                )
            if source.read(1):
                raise DeltaFormatError("bytes follow the end record")
            return
        extent = ExtentHeader.decode(record, header)
        if extent.number != extents or extent.first < after:
            raise DeltaFormatError(
                f"extent {extent.number} (chunk {extent.first}) is out of order: expected"
                f" extent {extents} from chunk {after} on"
            )
        stored = _read_exact(source, extent.stored, f"extent {extent.number}")
        data = stored
        if extent.flags & FLAG_ZSTD:
            data = decompress(stored, extent.count * size)
        if digest(data) != extent.data_digest:
            raise DeltaFormatError(
                f"extent {extent.number} (chunks {extent.first}..{extent.first + extent.count - 1})"
                " does not match its checksum: the delta is damaged"
            )
        sequence.add(record)
        extents += 1
        chunks += extent.count
        after = extent.first + extent.count
        yield header, extent, data


def _pread(fd: Device, size: int, position: int) -> bytes:
    data = fd.pread(size, position)
    if len(data) != size:
        raise DeltaRefusedError(f"the target ended early reading {size} bytes at {position}")
    return data


def apply_delta(
    delta: str | os.PathLike[str], target: str | os.PathLike[str], *, direct: bool | None = None
) -> ApplyReport:
    """Apply the delta file `delta` to the raw image (file or block device) `target`.

    `direct` as for Device.open: None is O_DIRECT for a block device only.

    Raises:
        DeltaFormatError: the delta is damaged; nothing was written.
        DeltaRefusedError: the target is not snapshot FROM's image (nor
            partly TO's already); nothing was written.
        OSError: a file could not be read or written.
    """
    fd = Device.open(target, writable=True, direct=direct)
    try:
        with open(delta, "rb") as source:
            header = DeltaHeader.decode(source.read(DeltaHeader.SIZE))
            want = header.origin_chunks * header.chunk_size
            have = fd.size
            if have != want:
                raise DeltaRefusedError(
                    f"{os.fspath(target)} holds {have} bytes; this delta applies to an image of"
                    f" {want} bytes ({header.base_name}, {header.origin_chunks} chunks of"
                    f" {header.chunk_size})"
                )
        report = _check(delta, fd, header)
        _write(delta, fd, header)
        fd.fsync()
        return replace(report, direct=fd.direct is not None)
    finally:
        fd.close()


def _check(delta: str | os.PathLike[str], fd: Device, header: DeltaHeader) -> ApplyReport:
    """The first pass: everything is read and checked, nothing written."""
    extents = chunks = written = already = 0
    with open(delta, "rb") as source:
        for _, extent, data in read_extents(source):
            extents += 1
            chunks += extent.count
            now = digest(_pread(fd, len(data), extent.first * header.chunk_size))
            if now == extent.base_digest:
                written += extent.count
            elif now == extent.data_digest:
                already += extent.count
            else:
                last = extent.first + extent.count - 1
                raise DeltaRefusedError(
                    f"chunks {extent.first}..{last} of the target hold neither the bytes of"
                    f" {header.base_name} nor snapshot {header.to_tag}'s: the target is not"
                    f" an image of {header.base_name}; nothing was written"
                )
    return ApplyReport(header, extents, chunks, written, already)


def _write(delta: str | os.PathLike[str], fd: Device, header: DeltaHeader) -> None:
    """The second pass: the extents still holding FROM's bytes get TO's."""
    with open(delta, "rb") as source:
        for _, extent, data in read_extents(source):
            position = extent.first * header.chunk_size
            if digest(_pread(fd, len(data), position)) == extent.base_digest:
                done = fd.pwrite(data, position)
                if done != len(data):
                    raise OSError(f"short write of {done} of {len(data)} bytes at {position}")
