"""Human-readable sizes for command lines: "64M", "1G", "4KiB", "4096".

Suffixes are binary (K = 1024), as in dd, truncate and qemu-img: storage
people write 4K for a 4096-byte chunk and expect it. A size must come out
as a whole number of bytes; "1.5K" is 1536, "0.3K" is refused.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["SizeError", "format_size", "parse_size"]

_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTPE]?)(I?B?)\s*", re.IGNORECASE)


class SizeError(ValueError):
    """A size string that cannot be read as a whole number of bytes."""


def parse_size(text: str) -> int:
    """Return the number of bytes that `text` names.

    Accepts a plain byte count ("4096") or a number with a binary suffix
    ("4K", "64M", "1G", "1.5G", "4KiB", "2t").

    Raises:
        SizeError: the text is not a size, or not a whole number of bytes.
    """
    match = _SIZE_RE.fullmatch(text)
    if match is None or (match.group(3) and not match.group(2)):
        raise SizeError(
            f"cannot read size {text!r}: expected a number with an optional "
            "K, M, G, T or P suffix (powers of 1024), e.g. 64M"
        )
    number = Fraction(match.group(1))
    value = number * 1024 ** _UNITS[match.group(2).upper()]
    if value.denominator != 1:
        raise SizeError(f"size {text!r} is not a whole number of bytes")
    return int(value)


def format_size(nbytes: int) -> str:
    """Render a byte count the way a person reads it: "4 KiB", "1.5 GiB"."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        value /= 1024
        if value < 1024 or unit == "EiB":
            text = f"{value:.1f}".removesuffix(".0")
            return f"{text} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover
