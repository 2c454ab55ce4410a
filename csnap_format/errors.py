"""Errors raised when bytes are not a valid csnap structure.

Rule: decoding arbitrary bytes raises a FormatError subclass and nothing
else. Every error names the block (its address, where known) and says what
was wrong, so an operator reading a log knows where to look.
"""

from __future__ import annotations

__all__ = [
    "FormatError",
    "BadMagicError",
    "WrongBlockTypeError",
    "ChecksumError",
    "MisdirectedBlockError",
    "ForeignBlockError",
    "UnsupportedVersionError",
    "CorruptBlockError",
    "LayoutError",
]


class FormatError(Exception):
    """Bytes read from a store that do not decode to a valid structure."""

    def __init__(self, what: str, *, block: int | None = None, kind: str = "block"):
        super().__init__(what)
        #: What was wrong, in words.
        self.what = what
        #: The metadata block address the bytes came from, if known.
        self.block = block
        #: What the bytes were meant to be ("leaf", "superblock", ...).
        self.kind = kind

    def __str__(self) -> str:
        where = f"{self.kind} at block {self.block}" if self.block is not None else self.kind
        return f"{where}: {self.what}"


class BadMagicError(FormatError):
    """The block does not start with the csnap magic: never written, or garbage."""


class WrongBlockTypeError(FormatError):
    """A valid csnap block, but of another type than the one expected."""


class ChecksumError(FormatError):
    """The stored checksum does not match the contents: a torn or damaged write."""


class MisdirectedBlockError(FormatError):
    """The block names another address than the one it was read from."""


class ForeignBlockError(FormatError):
    """The block belongs to another store (an earlier format of the same device)."""


class UnsupportedVersionError(FormatError):
    """The store was made by a format version or with features we cannot read."""


class CorruptBlockError(FormatError):
    """The checksum is right but a field is out of range or inconsistent."""


class LayoutError(ValueError):
    """The sizes asked for cannot make a store (too small, bad chunk size, ...)."""
