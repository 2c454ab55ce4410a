"""The byte layout of a delta file, sans-IO: header, extent records, end record.

Every integer is little-endian. The layout is documented byte by byte in
docs/format.md, "Delta files", and a test checks those tables against the
structs here. Digests are BLAKE2b-128 (hashlib); each fixed-size part ends
in a CRC-32 (zlib) of the bytes before it, so a damaged header is reported
as damage and not misread. Extent payloads may be zstd frames.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import zstandard

__all__ = [
    "MAGIC",
    "VERSION",
    "FLAG_ZSTD",
    "FLAG_FULL",
    "HEADER",
    "EXTENT",
    "END",
    "EXTENT_MAGIC",
    "END_MAGIC",
    "DIGEST_BYTES",
    "MAX_EXTENT_BYTES",
    "DeltaFormatError",
    "DeltaHeader",
    "ExtentHeader",
    "DeltaEnd",
    "digest",
    "SequenceDigest",
    "extent_chunks",
    "compress",
    "decompress",
    "LAYOUTS",
    "field_rows",
]

MAGIC = b"CSNAPDLT"
VERSION = 1
#: Header flag, and extent flag: extent payloads are (this one is) a zstd frame.
FLAG_ZSTD = 1
#: Header flag: a full delta, from nothing (an all-zero image) to TO; from_tag is 0.
FLAG_FULL = 2
EXTENT_MAGIC = b"CDEX"
END_MAGIC = b"CDND"
DIGEST_BYTES = 16
#: Most bytes of chunk data one extent carries (uncompressed).
MAX_EXTENT_BYTES = 4 << 20

#: magic, version, flags, chunk size, store uuid, origin chunks, from tag, to
#: tag, from created, to created, written, reserved; then the CRC.
HEADER = struct.Struct("<8sHHI16sQIIQQQ52s")
#: magic, chunk count, first chunk, stored bytes, flags, base digest, data
#: digest, extent number; then the CRC.
EXTENT = struct.Struct("<4sIQII16s16sI")
#: magic, zero, extents, chunks, sequence digest (32 bytes), zero; then the CRC.
END = struct.Struct("<4sIQQ32sI")
_CRC = struct.Struct("<I")

assert HEADER.size + _CRC.size == 128
assert EXTENT.size + _CRC.size == 64
assert END.size + _CRC.size == 64


#: Field names of each fixed-size part, in order; each part ends in its CRC.
LAYOUTS: dict[str, tuple[struct.Struct, tuple[str, ...]]] = {
    "HEADER": (
        HEADER,
        (
            "magic",
            "version",
            "flags",
            "chunk_size",
            "store_uuid",
            "origin_chunks",
            "from_tag",
            "to_tag",
            "from_created_ns",
            "to_created_ns",
            "written_ns",
            "reserved",
            "crc",
        ),
    ),
    "EXTENT": (
        EXTENT,
        (
            "magic",
            "count",
            "first",
            "stored",
            "flags",
            "base_digest",
            "data_digest",
            "number",
            "crc",
        ),
    ),
    "END": (END, ("magic", "zero", "extents", "chunks", "sequence", "zero2", "crc")),
}
_TYPES = {"Q": "u64", "I": "u32", "H": "u16"}


def field_rows(name: str) -> list[tuple[int, int, str, str]]:
    """(offset, size, type, field) of each field of part `name`, its CRC last."""
    layout, names = LAYOUTS[name]
    rows: list[tuple[int, int, str, str]] = []
    offset = 0
    count = ""
    fields = iter(names)
    for code in layout.format[1:] + "I":
        if code.isdigit():
            count += code
            continue
        size = int(count) if code == "s" else struct.calcsize("<" + code)
        kind = f"bytes[{count}]" if code == "s" else _TYPES[code]
        rows.append((offset, size, kind, next(fields)))
        offset += size
        count = ""
    return rows


class DeltaFormatError(Exception):
    """The bytes are not a delta file of this version, or are damaged."""


@dataclass(frozen=True, slots=True)
class DeltaHeader:
    """What a delta is between: the store, its geometry, the two snapshots."""

    flags: int
    chunk_size: int
    store_uuid: bytes
    origin_chunks: int
    from_tag: int
    to_tag: int
    from_created_ns: int
    to_created_ns: int
    written_ns: int

    SIZE = 128

    def encode(self) -> bytes:
        body = HEADER.pack(
            MAGIC,
            VERSION,
            self.flags,
            self.chunk_size,
            self.store_uuid,
            self.origin_chunks,
            self.from_tag,
            self.to_tag,
            self.from_created_ns,
            self.to_created_ns,
            self.written_ns,
            bytes(52),
        )
        return body + _CRC.pack(zlib.crc32(body))

    @property
    def full(self) -> bool:
        """A delta from nothing: its base is an all-zero image."""
        return bool(self.flags & FLAG_FULL)

    @property
    def base_name(self) -> str:
        """What the delta starts from, in words."""
        return "an all-zero image" if self.full else f"snapshot {self.from_tag}"

    @classmethod
    def decode(cls, data: bytes) -> DeltaHeader:
        if len(data) < cls.SIZE:
            raise DeltaFormatError(f"the file is {len(data)} bytes: too short for a delta header")
        if data[:8] != MAGIC:
            raise DeltaFormatError("not a csnap delta file (bad magic)")
        body = data[: HEADER.size]
        _check_crc(body, data[HEADER.size : cls.SIZE], "the delta header")
        (_, version, flags, chunk_size, uuid, origin_chunks, from_tag, to_tag, from_ns, to_ns,
         written_ns, reserved) = HEADER.unpack(body)  # fmt: skip
        if version != VERSION:
            raise DeltaFormatError(f"delta version {version}; this csnap reads version {VERSION}")
        if flags & ~(FLAG_ZSTD | FLAG_FULL) or any(reserved):
            raise DeltaFormatError("the delta header has flags or reserved bytes this csnap lacks")
        if chunk_size < 512 or chunk_size & (chunk_size - 1) or origin_chunks < 1:
            raise DeltaFormatError(
                f"the delta header has chunk size {chunk_size} and {origin_chunks} chunks"
            )
        return cls(
            flags, chunk_size, uuid, origin_chunks, from_tag, to_tag, from_ns, to_ns, written_ns
        )


@dataclass(frozen=True, slots=True)
class ExtentHeader:
    """`count` chunks from `first`, `stored` payload bytes following this record."""

    number: int
    first: int
    count: int
    stored: int
    flags: int
    base_digest: bytes
    data_digest: bytes

    SIZE = 64

    def encode(self) -> bytes:
        body = EXTENT.pack(
            EXTENT_MAGIC,
            self.count,
            self.first,
            self.stored,
            self.flags,
            self.base_digest,
            self.data_digest,
            self.number,
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes, header: DeltaHeader) -> ExtentHeader:
        body = data[: EXTENT.size]
        _check_crc(body, data[EXTENT.size : cls.SIZE], "an extent record")
        magic, count, first, stored, flags, base, data_digest, number = EXTENT.unpack(body)
        if magic != EXTENT_MAGIC:
            raise DeltaFormatError("an extent record has a bad magic")
        size = count * header.chunk_size
        if not 1 <= count <= extent_chunks(header.chunk_size):
            raise DeltaFormatError(f"extent {number} has {count} chunks")
        if first + count > header.origin_chunks:
            raise DeltaFormatError(
                f"extent {number} (chunks {first}..{first + count - 1}) reaches past the"
                f" origin's {header.origin_chunks} chunks"
            )
        if flags & ~FLAG_ZSTD or (flags and not header.flags & FLAG_ZSTD):
            raise DeltaFormatError(f"extent {number} has unknown flags {flags:#x}")
        if not flags and stored != size:
            raise DeltaFormatError(f"extent {number} stores {stored} bytes for {size}")
        if stored > size + (size >> 4) + 1024:
            raise DeltaFormatError(f"extent {number} stores {stored} bytes for {size}")
        return cls(number, first, count, stored, flags, base, data_digest)


@dataclass(frozen=True, slots=True)
class DeltaEnd:
    """The last record: how many extents and chunks came, and their sequence digest."""

    extents: int
    chunks: int
    sequence: bytes

    SIZE = 64

    def encode(self) -> bytes:
        body = END.pack(END_MAGIC, 0, self.extents, self.chunks, self.sequence, 0)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def decode(cls, data: bytes) -> DeltaEnd:
        body = data[: END.size]
        _check_crc(body, data[END.size : cls.SIZE], "the end record")
        magic, zero, extents, chunks, sequence, zero2 = END.unpack(body)
        if magic != END_MAGIC or zero or zero2:
            raise DeltaFormatError("the end record is damaged")
        return cls(extents, chunks, sequence)


def _check_crc(body: bytes, crc: bytes, what: str) -> None:
    if len(crc) != _CRC.size or zlib.crc32(body) != _CRC.unpack(crc)[0]:
        raise DeltaFormatError(f"{what} is damaged or cut short (checksum mismatch)")


def digest(data: bytes | bytearray | memoryview) -> bytes:
    """The 16-byte digest of an extent's bytes."""
    return hashlib.blake2b(data, digest_size=DIGEST_BYTES).digest()


class SequenceDigest:
    """BLAKE2b-256 over every extent record in order: binds the extents to their order."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b(digest_size=32)

    def add(self, record: bytes) -> None:
        self._hash.update(record)

    def digest(self) -> bytes:
        return self._hash.digest()


def extent_chunks(chunk_size: int) -> int:
    """Most chunks one extent carries."""
    return max(1, MAX_EXTENT_BYTES // chunk_size)


def compress(data: bytes | bytearray, level: int = 3) -> bytes | None:
    """`data` as one zstd frame, or None when that would not be smaller."""
    frame = zstandard.ZstdCompressor(level=level).compress(bytes(data))
    return frame if len(frame) < len(data) else None


def decompress(frame: bytes, size: int) -> bytes:
    """The `size` bytes a zstd frame holds; anything else is damage."""
    try:
        data = zstandard.ZstdDecompressor().decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"a compressed extent is damaged: {exc}") from exc
    if len(data) != size:
        raise DeltaFormatError(f"a compressed extent holds {len(data)} bytes, not {size}")
    return data
