"""csnap-check: verify a snapshot store offline, salvage a damaged one, and
dump or restore its whole metadata as JSON.

Exit status as fsck's: 0 clean, 1 problems found and all repaired, 4
problems left, 8 could not run (not a store, unreadable, in use).
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from csnap_common import Progress, format_size
from csnapd.engine import EngineError, FileDevice, StoreLockedError
from csnapd.engine.check import (
    EXIT_CLEAN,
    EXIT_ERRORS,
    EXIT_FAILED,
    CheckReport,
    check_store,
)
from csnapd.engine.dump import dump_store, restore_store

__all__ = ["main"]

_EPILOG = """\
checks: the superblock (or, when it is damaged, its newest copy in the
journal); the journal (transactions a server would replay at its next
start); every btree node (checksums, addresses, types, levels, key order and
ranges, share masks only of existing snapshots); the client registry; a
recount of every chunk and block against the allocation bitmaps (leaked,
doubly used, marked free while in use); the free counts, the exception count
and each snapshot's counters. Each problem names its block, the rule it
breaks, and the logical chunks and snapshots it affects.

--repair replays the journal, then: bitmaps and counters are rewritten from
the recount; a damaged btree, registry or superblock is salvaged: every
readable leaf (scanning the metadata area when index nodes are lost) goes
into a fresh btree, switched in by one journaled transaction. Chunks whose
mapping could not be recovered are listed per snapshot ("lost:") and read as
an error on that snapshot from then on. A check after the repair labels each
problem [repaired] or [not repaired].

--dump writes the whole metadata as JSON (docs/operations.md); --restore
writes such a dump into a formatted store of the same sizes.

exit status: 0 clean, 1 problems found and all repaired, 4 problems left,
8 the check could not run (not a csnap store, unreadable, in use by csnapd,
a bad dump) or its repair could not be written. --dump and --restore exit 0
when done.

examples:
  csnap-check store.img
  csnap-check --repair --json /dev/vg/snapstore
  csnap-check --dump meta.json store.img
  csnap-check --restore meta.json new-store.img
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
        help="fix what the check finds: rebuild bitmaps and counters, salvage a damaged"
        " btree into a fresh one and mark what is lost (implies --replay)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr even when it is not a terminal",
    )
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--dump",
        metavar="FILE",
        help="write the store's whole metadata as JSON to FILE ('-' for stdout)",
    )
    what.add_argument(
        "--restore",
        metavar="FILE",
        help="write the metadata dumped in FILE into the store (formatted, same sizes)",
    )
    return parser


def _lost_lines(report: CheckReport) -> list[str]:
    lines = []
    for tag, runs in report.lost.items():
        shown = ", ".join(f"{s}..{s + n - 1}" if n > 1 else str(s) for s, n in runs[:8])
        more = f" and {len(runs) - 8} more ranges" if len(runs) > 8 else ""
        total = sum(n for _, n in runs)
        lines.append(f"lost: snapshot {tag}, {total} chunks: {shown}{more} (they read as errors)")
    if not report.lost:
        for tag, runs in report.marked_lost.items():
            total = sum(n for _, n in runs)
            shown = ", ".join(f"{s}..{s + n - 1}" if n > 1 else str(s) for s, n in runs[:8])
            more = f" and {len(runs) - 8} more ranges" if len(runs) > 8 else ""
            lines.append(
                f"lost: snapshot {tag}, {total} chunks marked lost by a repair: {shown}{more}"
            )
    return lines


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
    lines.extend(_lost_lines(report))
    if report.repair_refused is not None:
        lines.append(f"repaired nothing: {report.repair_refused}")
    lines.extend(f"still wrong after the repair: {p}" for p in report.remaining)
    count = len(report.problems)
    if not count:
        lines.append("clean")
    elif report.exit_code == 1:
        lines.append(f"{count} problems found, all repaired")
    else:
        hint = " (run with --repair to salvage the store)" if not repair else ""
        lines.append(f"{count} problems left{hint}")
    return "\n".join(lines)


def _open(path: str, *, writable: bool) -> FileDevice | None:
    try:
        return FileDevice(path, writable=writable, lock=True)
    except StoreLockedError:
        print(f"csnap-check: {path} is in use by a running csnapd; stop it first", file=sys.stderr)
    except OSError as exc:
        print(f"csnap-check: cannot open {path}: {exc.strerror}", file=sys.stderr)
    return None


def _dump(args: argparse.Namespace, progress: Progress) -> int:
    device = _open(args.store, writable=False)
    if device is None:
        return EXIT_FAILED
    try:
        report = check_store(device, progress=_advance(progress))
        if report.exit_code != EXIT_CLEAN:
            print(_summary(args.store, report, repair=False), file=sys.stderr)
            print("csnap-check: not dumping a damaged store; repair it first", file=sys.stderr)
            return EXIT_FAILED if report.fatal else EXIT_ERRORS
        doc = dump_store(device)
    except EngineError as exc:
        print(f"csnap-check: dumping {args.store}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        device.close()
    text = json.dumps(doc, indent=1) + "\n"
    if args.dump == "-":
        sys.stdout.write(text)
        return EXIT_CLEAN
    Path(args.dump).write_text(text)
    count = len(doc["exceptions"])
    if args.json:
        print(json.dumps({"store": args.store, "dumped_exceptions": count, "exit_code": 0}))
    else:
        print(f"dumped {count} exceptions of {args.store} to {args.dump}")
    return EXIT_CLEAN


def _restore(args: argparse.Namespace) -> int:
    try:
        doc = json.loads(Path(args.restore).read_text())
    except (OSError, ValueError) as exc:
        print(f"csnap-check: cannot read the dump {args.restore}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    device = _open(args.store, writable=True)
    if device is None:
        return EXIT_FAILED
    try:
        count = restore_store(device, doc)
    except EngineError as exc:
        print(f"csnap-check: restoring into {args.store}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        device.close()
    message = f"restored {count} exceptions into {args.store}"
    if args.json:
        print(json.dumps({"store": args.store, "restored_exceptions": count, "exit_code": 0}))
    else:
        print(message)
    return EXIT_CLEAN


def _advance(bar: Progress) -> Callable[[int, int], None]:
    def progress(done: int, total: int) -> None:
        bar.total = max(total, 1)
        bar.advance(done - bar.done)

    return progress


def main(argv: Sequence[str] | None = None) -> int:
    """Run csnap-check; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.dump is not None or args.restore is not None) and (args.repair or args.replay):
        parser.error("--dump and --restore do not combine with --repair or --replay")
    # Asked for, progress shows at once; on a terminal only after a moment.
    bar = Progress(
        1, "checking", enabled=True if args.progress else None, delay=0 if args.progress else 0.5
    )
    if args.restore is not None:
        return _restore(args)
    if args.dump is not None:
        with bar:
            return _dump(args, bar)
    device = _open(args.store, writable=args.replay or args.repair)
    if device is None:
        return EXIT_FAILED
    try:
        with bar:
            report = check_store(
                device, replay=args.replay, repair=args.repair, progress=_advance(bar)
            )
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


if __name__ == "__main__":
    run()
