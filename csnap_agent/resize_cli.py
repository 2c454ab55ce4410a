"""`csnap resize`: grow (or safely shrink) the origin and the store online.

Owns the verb's arguments, the request it makes through the agent, and how
its result is shown. The sizes are checked here only for being sizes; every
other check is csnapd's (docs/protocol.md, `resize`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from csnap_client import AdminClient
from csnap_common import format_size
from csnap_common.cli import size_arg

__all__ = ["add_verb", "usage_problem", "run_resize", "render"]

VerbMaker = Callable[[str, str, str], argparse.ArgumentParser]


def _size(text: str) -> int:
    value = size_arg(text)
    if not 0 < value < 1 << 64:
        raise argparse.ArgumentTypeError(f"a size is 1 byte .. 2^64-1 bytes, got {text!r}")
    return value


def add_verb(verb: VerbMaker) -> None:
    """Declare `csnap resize`."""
    resize = verb(
        "resize",
        "Grow the origin and/or the store while csnapd and its clients run. Grow the"
        " file or device first (or give --grow-files for regular files). Each snapshot"
        " keeps the size it was taken at. Shrinking is refused unless nothing in use"
        " lies past the new end. The store grows up to what mkcsnap --max-store-size"
        " reserved.",
        "csnap resize --origin-size 20G --store-size 8G",
    )
    resize.add_argument("--origin-size", type=_size, metavar="SIZE", help="new origin size")
    resize.add_argument("--store-size", type=_size, metavar="SIZE", help="new store size")
    resize.add_argument(
        "--grow-files",
        action="store_true",
        help="let csnapd grow a regular store or origin file that is smaller than SIZE",
    )


def usage_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments before anything is sent, or None."""
    if args.origin_size is None and args.store_size is None:
        return "resize: give --origin-size, --store-size or both"
    return None


async def run_resize(admin: AdminClient, args: argparse.Namespace) -> dict[str, Any]:
    """Send the resize."""
    return await admin.resize(
        origin_bytes=args.origin_size, store_bytes=args.store_size, grow_files=args.grow_files
    )


def render(result: dict[str, Any]) -> str:
    """The resize's outcome for people."""
    chunk = result["chunk_size"]

    def change(name: str) -> str:
        before, after = result[f"{name}_chunks_before"], result[f"{name}_chunks"]
        if before == after:
            return f"{name:<7}{format_size(after * chunk)} (unchanged)"
        return f"{name:<7}{format_size(before * chunk)} -> {format_size(after * chunk)}"

    lines = [
        change("origin"),
        change("store"),
        f"data   {format_size(result['data_free'] * chunk)} free of"
        f" {format_size(result['data_chunks'] * chunk)};"
        f" the store can grow to {format_size(result['capacity_chunks'] * chunk)}",
    ]
    if result["grown_files"]:
        lines.append(f"grown  csnapd grew the {' and '.join(result['grown_files'])} file")
    return "\n".join(lines) + "\n"
