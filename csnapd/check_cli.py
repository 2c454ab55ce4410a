"""csnap-check: verify a snapshot store offline, and repair its bitmaps.

Exit status as fsck's: 0 clean, 1 problems found and all repaired, 4
problems left, 8 could not run (not a store, unreadable, in use).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence

from csnap_common import Progress, format_size
from csnapd.engine import FileDevice, StoreLockedError
from csnapd.engine.check import EXIT_FAILED, CheckReport, check_store

__all__ = ["main"]

_EPILOG = """\
checks: the superblock; the journal (transactions a server would replay at
its next start); every btree node (checksums, levels, key order and ranges,
share masks only of existing snapshots); a recount of every chunk and block
against the allocation bitmaps (leaked, doubly used, marked free while in
use); the free counts, the exception count and each snapshot's counters.

With --repair each problem is labelled [repaired] or [not repaired].

exit status: 0 clean, 1 problems found and all repaired, 4 problems left,
8 the check could not run (not a csnap store, unreadable, in use by csnapd)
or its repair could not be written.

examples:
  csnap-check store.img
  csnap-check --repair --json /dev/vg/snapstore
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csnap-check",
        description="Verify a csnap snapshot store that no server has open.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", help="the snapshot store (file or block device)")
    parser.add_argument(
        "--replay",
        action="store_true",
        help="write the journal's pending transactions home, as csnapd would at start",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="rebuild the bitmaps, free counts and counters from the btree (implies --replay)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _summary(path: str, report: CheckReport, *, repair: bool) -> str:
    lines = []
    g = report.geometry
    if g is not None:
        lines.append(
            f"store {path}: uuid {uuid.UUID(bytes=g.uuid)}, {format_size(g.store_bytes)},"
            f" {format_size(g.chunk_size)} chunks, origin of {g.origin_chunks} chunks"
        )
    if report.fatal is not None:
        lines.append(f"cannot check: {report.fatal}")
        return "\n".join(lines)
    pending = report.journal_transactions
    journal = f"journal: newest transaction {report.journal_newest}"
    if report.replayed:
        journal += f"; {pending} transactions replayed"
    elif pending:
        journal += f"; {pending} would be replayed at the next start (checked as replayed)"
    lines.append(journal)
    lines.append(
        f"btree: depth {report.depth}, {report.index_nodes} index nodes,"
        f" {report.leaves} leaves, {report.exceptions} exceptions"
    )
    if g is not None:
        lines.append(
            f"space: {report.data_used} of {g.data_chunks} data chunks and"
            f" {report.meta_used} of {g.meta_blocks} metadata blocks in use"
        )
    for problem in report.problems:
        label = ""
        if repair:
            label = " [repaired]" if report.was_repaired(problem) else " [not repaired]"
        lines.append(f"problem: {problem}{label}")
    lines.extend(f"repaired: {what}" for what in report.repaired)
    if report.repair_refused is not None:
        lines.append(f"repaired nothing: {report.repair_refused}")
    count = len(report.problems)
    if not count:
        lines.append("clean")
    elif report.exit_code == 1:
        lines.append(f"{count} problems found, all repaired")
    else:
        hint = (
            " (run with --repair to rebuild the bitmaps)"
            if all(p.repairable for p in report.problems) and not report.repaired
            else ""
        )
        lines.append(f"{count} problems left{hint}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run csnap-check; returns the exit status."""
    args = _parser().parse_args(argv)
    writes = args.replay or args.repair
    try:
        device = FileDevice(args.store, writable=writes, lock=True)
    except StoreLockedError:
        print(
            f"csnap-check: {args.store} is in use by a running csnapd; stop it first",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except OSError as exc:
        print(f"csnap-check: cannot open {args.store}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    try:
        bar = Progress(1, "checking")
        with bar:

            def progress(done: int, total: int) -> None:
                bar.total = max(total, 1)
                bar.advance(done - bar.done)

            report = check_store(device, replay=args.replay, repair=args.repair, progress=progress)
    finally:
        device.close()
    if args.json:
        print(json.dumps({"store": args.store, **report.as_json()}, indent=2))
    else:
        print(_summary(args.store, report, repair=args.repair))
    return report.exit_code


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
