"""mkcsnap: format a snapshot store for an origin volume.

The one place in csnap_format that touches files. It plans the geometry
first, so that every argument problem is reported before any file is
created or changed; refuses to overwrite an existing csnap store without
--force; writes every block but the superblock, syncs, then writes the
superblock and syncs again.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass

from csnap_common import Progress, SizeError, format_size, parse_size
from csnap_format.errors import FormatError, LayoutError
from csnap_format.geometry import Geometry, check_unit_sizes, plan_geometry, store_capacity
from csnap_format.mkfs import format_block_count, format_blocks
from csnap_format.superblock import decode_geometry

__all__ = ["main", "run", "format_store", "FormatResult", "FormatRefusedError"]

#: Exit codes: scripts can tell a refused or failed format from a bad argument.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

_EPILOG = """\
sizes accept K, M, G, T suffixes (powers of 1024): 4K, 64M, 1G.

examples:
  mkcsnap --store-size 1G --origin-size 1G store.img origin.img
      create both as sparse files and format the store
  mkcsnap --chunk-size 64K /dev/vg/snapstore /dev/vg/data
      format an existing device for an existing origin

exit status: 0 formatted, 1 refused or failed (existing store without
--force, missing file, I/O error), 2 bad arguments (unreadable size, chunk
size not a power of two in 4K..1M, store too small for its own metadata,
--max-store-size below the store size).
"""


class _UsageError(Exception):
    """A bad argument: exit 2."""


class FormatRefusedError(Exception):
    """mkcsnap will not format: an existing store, a missing file, ... (exit 1)."""


@dataclass(frozen=True, slots=True)
class FormatResult:
    """What mkcsnap made, for the summary line and --json."""

    store: str
    origin: str
    geometry: Geometry

    def as_json(self) -> dict[str, object]:
        g = self.geometry
        return {
            "store": self.store,
            "origin": self.origin,
            "uuid": str(uuidlib.UUID(bytes=g.uuid)),
            "created_ns": g.created_ns,
            "block_size": g.block_size,
            "chunk_size": g.chunk_size,
            "store_bytes": g.store_bytes,
            "origin_bytes": g.origin_bytes,
            "store_chunks": g.store_chunks,
            "origin_chunks": g.origin_chunks,
            "data_chunks": g.data_chunks,
            "data_bytes": g.data_chunks * g.chunk_size,
            "journal_bytes": g.journal_blocks * g.block_size,
            "bitmap_bytes": (g.meta_bitmap_blocks + g.data_bitmap_blocks) * g.block_size,
            "btree_area_bytes": g.meta_blocks * g.block_size,
            "metadata_bytes": g.metadata_bytes,
            "metadata_percent": round(100 * g.metadata_bytes / g.store_bytes, 3),
            "max_store_bytes": store_capacity(g) * g.chunk_size,
        }

    def summary(self) -> str:
        g = self.geometry
        info = self.as_json()
        bitmap_bytes = (g.meta_bitmap_blocks + g.data_bitmap_blocks) * g.block_size
        return "\n".join(
            [
                f"formatted {self.store} ({format_size(g.store_bytes)}) "
                f"for origin {self.origin} ({format_size(g.origin_bytes)})",
                f"  uuid           {info['uuid']}",
                f"  chunk size     {format_size(g.chunk_size)}"
                f" (metadata blocks of {format_size(g.block_size)})",
                f"  data chunks    {g.data_chunks}"
                f" ({format_size(g.data_chunks * g.chunk_size)} for copies)",
                f"  origin chunks  {g.origin_chunks}",
                f"  metadata       {format_size(g.metadata_bytes)}"
                f" ({info['metadata_percent']}% of the store): journal"
                f" {format_size(g.journal_blocks * g.block_size)}, bitmaps"
                f" {format_size(bitmap_bytes)},"
                f" btree area {format_size(g.meta_blocks * g.block_size)}",
                f"  can grow to    {format_size(store_capacity(g) * g.chunk_size)}"
                " online (csnap resize; mkcsnap --max-store-size reserves more)",
            ]
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mkcsnap",
        description="Format a csnap snapshot store for an origin volume.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", help="snapshot store: a file or block device")
    parser.add_argument("origin", help="origin volume: a file or block device")
    parser.add_argument(
        "--chunk-size",
        default="4K",
        help="data chunk size, 4K..1M, a power of two (default 4K)",
    )
    parser.add_argument(
        "--block-size",
        default="4K",
        help="metadata block size, 4K..chunk size, a power of two (default 4K)",
    )
    parser.add_argument(
        "--journal-size",
        help="journal size (default 4M, or a sixteenth of a small store; at least 64 blocks)",
    )
    parser.add_argument(
        "--store-size", help="create STORE as a sparse file of this size (or resize it)"
    )
    parser.add_argument(
        "--origin-size",
        help="create ORIGIN as a sparse file of this size if it does not exist",
    )
    parser.add_argument(
        "--max-store-size",
        help="largest size the store may later grow to online with `csnap resize`"
        " (default: the store size; the bitmap and btree area are sized for it)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing csnap store")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def _size(text: str | None, option: str) -> int | None:
    if text is None:
        return None
    try:
        value = parse_size(text)
    except SizeError as exc:
        raise _UsageError(f"{option}: {exc}") from exc
    if value <= 0:
        raise _UsageError(f"{option}: size must be positive")
    return value


def _device_size(path: str) -> int:
    """Size in bytes of a regular file or block device."""
    st = os.stat(path)
    if stat.S_ISREG(st.st_mode):
        return st.st_size
    if stat.S_ISBLK(st.st_mode):
        fd = os.open(path, os.O_RDONLY)
        try:
            return os.lseek(fd, 0, os.SEEK_END)
        finally:
            os.close(fd)
    raise FormatRefusedError(f"{path} is neither a regular file nor a block device")


def _existing_store(path: str) -> str | None:
    """Describe the csnap store already at `path`, or None if there is none."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise FormatRefusedError(f"cannot read {path}: {exc.strerror}") from exc
    if not head.startswith(b"CSNP"):
        return None
    try:
        g = decode_geometry(head)
    except FormatError as exc:
        return f"what looks like a damaged csnap store ({exc})"
    created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(g.created_ns / 1e9))
    return f"a csnap store (uuid {uuidlib.UUID(bytes=g.uuid)}, created {created})"


def _prepare_origin(path: str, size: int | None) -> int:
    if not os.path.exists(path):
        if size is None:
            raise FormatRefusedError(
                f"origin {path} does not exist (give --origin-size to create it)"
            )
        return size
    actual = _device_size(path)
    if size is not None and size != actual:
        raise FormatRefusedError(
            f"origin {path} exists with {actual} bytes, not {size}; "
            "omit --origin-size to use it as it is"
        )
    return actual


def _prepare_store(path: str, size: int | None, force: bool) -> int:
    if not os.path.exists(path):
        if size is None:
            raise FormatRefusedError(
                f"store {path} does not exist (give --store-size to create it)"
            )
        return size
    found = _existing_store(path)
    if found and not force:
        raise FormatRefusedError(f"{path} already holds {found}; use --force to overwrite it")
    actual = _device_size(path)
    if size is not None and size != actual and not stat.S_ISREG(os.stat(path).st_mode):
        raise FormatRefusedError(f"--store-size cannot resize block device {path}")
    return size if size is not None else actual


def _create_sparse(path: str, size: int) -> None:
    """Create or resize a regular file to `size` bytes without writing data."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    dirfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def format_store(
    store: str,
    origin: str,
    *,
    chunk_size: int = 4096,
    block_size: int = 4096,
    journal_size: int | None = None,
    store_size: int | None = None,
    origin_size: int | None = None,
    max_store_size: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> FormatResult:
    """Format `store` for `origin`; see `mkcsnap --help` for the rules.

    Raises:
        LayoutError: the sizes cannot make a store.
        FormatRefusedError: an existing store without force, a missing file, ...
        OSError: a file could not be created, read or written.
    """
    check_unit_sizes(block_size=block_size, chunk_size=chunk_size)
    origin_bytes = _prepare_origin(origin, origin_size)
    store_bytes = _prepare_store(store, store_size, force)
    if os.path.exists(store) and os.path.exists(origin) and os.path.samefile(store, origin):
        raise FormatRefusedError(f"store and origin are the same file ({store})")
    geometry = plan_geometry(
        store_bytes=store_bytes,
        origin_bytes=origin_bytes,
        block_size=block_size,
        chunk_size=chunk_size,
        journal_bytes=journal_size,
        max_store_bytes=max_store_size,
        uuid=uuidlib.uuid4().bytes,
        created_ns=time.time_ns(),
    )
    if not os.path.exists(origin):
        _create_sparse(origin, origin_bytes)
    if store_size is not None and (not os.path.exists(store) or _device_size(store) != store_size):
        _create_sparse(store, store_size)
    _write_blocks(store, geometry, progress)
    return FormatResult(store, origin, geometry)


def _write_blocks(path: str, g: Geometry, progress: bool | None) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        pending: list[bytes] = []
        pending_at = 0
        with Progress(format_block_count(g), "formatting", enabled=progress) as bar:
            for address, block in format_blocks(g):
                if address == 0:
                    break  # the superblock goes last, after a sync
                if pending and address != pending_at + len(pending):
                    os.pwritev(fd, pending, pending_at * g.block_size)
                    pending = []
                if not pending:
                    pending_at = address
                pending.append(block)
                if len(pending) >= 256:
                    os.pwritev(fd, pending, pending_at * g.block_size)
                    pending_at += len(pending)
                    pending = []
                bar.advance()
            if pending:
                os.pwritev(fd, pending, pending_at * g.block_size)
            os.fsync(fd)
            os.pwrite(fd, block, 0)
            os.fsync(fd)
            bar.advance()
    finally:
        os.close(fd)


def main(argv: Sequence[str] | None = None) -> int:
    """Run mkcsnap; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result = format_store(
            args.store,
            args.origin,
            chunk_size=_size(args.chunk_size, "--chunk-size") or 0,
            block_size=_size(args.block_size, "--block-size") or 0,
            journal_size=_size(args.journal_size, "--journal-size"),
            store_size=_size(args.store_size, "--store-size"),
            origin_size=_size(args.origin_size, "--origin-size"),
            max_store_size=_size(args.max_store_size, "--max-store-size"),
            force=args.force,
        )
    except (_UsageError, LayoutError) as exc:
        print(f"mkcsnap: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FormatRefusedError as exc:
        print(f"mkcsnap: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        print(f"mkcsnap: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(result.as_json(), indent=2))
    else:
        print(result.summary())
    return EXIT_OK


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
