"""csnap: the administrator's command line, spoken to a node's agent.

Every verb opens one admin connection to the agent, which relays it to the
active server. Output is a table for people, or JSON with --json. The exit
status says what happened, so scripts need not parse messages:
  0 done, 1 refused by the server, 2 bad usage, 3 no such snapshot,
  4 the agent or the server could not be reached (or did not answer in time).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import trio

from csnap_agent import resize_cli
from csnap_client import (
    AdminClient,
    ConnectionLostError,
    ServerError,
    agent_admin_connector,
    default_agent,
    find_server,
    open_admin,
)
from csnap_common import Progress, format_size
from csnap_common.credentials import ROLES, CredentialsError, make_credentials
from csnap_delta import DeltaFormatError, DeltaRefusedError, DeltaWriteError
from csnap_delta import cli as delta_cli
from csnap_delta.transfer import DeltaTransferError
from csnap_protocol import ErrorCode

__all__ = [
    "main",
    "run",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_USAGE",
    "EXIT_NO_SUCH",
    "EXIT_UNREACHABLE",
]

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_NO_SUCH = 3
EXIT_UNREACHABLE = 4

_UNREACHABLE_CODES = {
    ErrorCode.NO_SERVER,
    ErrorCode.NOT_ACTIVE,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.TOO_MANY_CONNECTIONS,
    ErrorCode.SERVER_FAILED,
}

_EPILOG = """\
verbs (csnap VERB --help for each):
  create TAG [--priority N]   take a snapshot of the origin now
  delete TAG                  delete a snapshot (space is reclaimed in the background)
  revert TAG                  make the origin's content equal to snapshot TAG's
  list                        live and squashed snapshots, oldest first
  status [TAG]                store size and free space, and every snapshot
  priority TAG N              set a snapshot's priority (-128..127)
  usecount TAG [DELTA]        read, or add DELTA to, a snapshot's use count
  server                      the active server (where, node, token, clients), the standbys
  shutdown                    stop the server cleanly (the store is marked clean)
  resize --origin-size SIZE --store-size SIZE
                              grow the origin and/or the store online
  delta FROM TO -o FILE       write the chunks that differ between two snapshots
  apply FILE --to TARGET      apply a delta to a raw image of its FROM snapshot
  receive FILE                receive a delta into this store: creates snapshot TO
  receive --listen HOST:PORT  receive one delta from `csnap send`
  send FROM TO --to HOST:PORT send a delta to a receiving store (resumable)
  keys DIR [--role ROLE]      make a cluster CA and credentials in DIR (no agent needed)

examples:
  csnap create 7 --priority 10
  csnap revert 7
  csnap --json list
  csnap --agent /run/csnap/agent.sock status
  csnap keys /etc/csnap/keys

exit status: 0 done, 1 refused by the server (snapshot exists, 64 snapshots
live, use count not zero, store full, unsafe shrink, ...), 2 bad usage, 3 no such snapshot,
4 the agent or the server could not be reached or did not answer in time.
"""


class _Failure(Exception):
    def __init__(self, status: int, name: str, message: str):
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message


def _decimal(text: str, *, signed: bool) -> int | None:
    """`text` as a plain decimal number, or None: ASCII digits only (and a
    leading sign when `signed`); no spaces, no 0x, no underscores."""
    digits = text[1:] if signed and text[:1] in ("+", "-") else text
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 20:
        return None
    return int(text)


def _tag(text: str) -> int:
    value = _decimal(text, signed=False)
    if value is None:
        raise argparse.ArgumentTypeError(f"a tag is a decimal number, got {text!r}")
    if not 0 <= value <= 0xFFFF_FFFF:
        raise argparse.ArgumentTypeError(f"a tag is 0..4294967295, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a timeout is a number of seconds, got {text!r}"
        ) from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a timeout is a positive number of seconds, got {text}")
    return value


def _ranged(low: int, high: int, what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _decimal(text, signed=True)
        if value is None:
            raise argparse.ArgumentTypeError(f"{what} is a decimal number, got {text!r}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{what} is {low}..{high}, got {value}")
        return value

    return parse


_priority = _ranged(-128, 127, "a priority")
_delta = _ranged(-(1 << 31), (1 << 31) - 1, "a delta")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--agent",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="the agent's socket, a path or @name (default $CSNAP_AGENT or @csnap-agent)",
    )
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--timeout",
        type=_seconds,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="give up after this long (default 120)",
    )
    parser = argparse.ArgumentParser(
        prog="csnap",
        description="Create, delete and inspect csnap snapshots through the node's agent.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, summary: str, example: str) -> argparse.ArgumentParser:
        return verbs.add_parser(
            name,
            help=summary,
            description=summary,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[common],
        )

    create = verb(
        "create",
        "Take a snapshot of the origin now. Origin writes already granted finish first,"
        " so the snapshot is exactly the origin at this moment.",
        "csnap create 7 --priority 10",
    )
    create.add_argument("tag", type=_tag, help="the new snapshot's tag (a number)")
    create.add_argument("--priority", type=_priority, default=0, help="-128..127 (default 0)")
    delete = verb(
        "delete",
        "Delete a snapshot. Its tag is gone at once; its space is reclaimed in the"
        " background. Refused while its use count is not zero.",
        "csnap delete 7",
    )
    delete.add_argument("tag", type=_tag)
    revert = verb(
        "revert",
        "Make the origin's content equal to snapshot TAG's, online. Origin writes already"
        " granted finish first, and origin writes wait until the revert is done; every other"
        " snapshot keeps its content and TAG survives. Waits for the end, showing progress on"
        " a terminal (no time limit unless --timeout); with --no-wait, returns once started"
        " (csnap status shows how far it is).",
        "csnap revert 7",
    )
    revert.add_argument("tag", type=_tag)
    revert.add_argument("--no-wait", action="store_true", help="return once the revert has started")
    verb("list", "List live snapshots, oldest first.", "csnap list --json")
    status = verb(
        "status",
        "Store size and free space, and per snapshot: creation time, priority, use count,"
        " state, chunks it owns alone and chunks it shares. With TAG, that snapshot only.",
        "csnap status 7",
    )
    status.add_argument("tag", type=_tag, nargs="?")
    priority = verb("priority", "Set a snapshot's priority (-128..127).", "csnap priority 7 -5")
    priority.add_argument("tag", type=_tag)
    priority.add_argument("priority", type=_priority)
    usecount = verb(
        "usecount",
        "Show a snapshot's use count, or add DELTA to it. A snapshot in use cannot be deleted.",
        "csnap usecount 7 +1",
    )
    usecount.add_argument("tag", type=_tag)
    usecount.add_argument("delta", type=_delta, nargs="?", default=0)
    verb(
        "server",
        "Where the active server listens, since when, its node, fencing token, state and"
        " clients, and the servers standing by to take over.",
        "csnap server",
    )
    verb(
        "shutdown",
        "Stop the server: work in flight finishes and the store is marked clean.",
        "csnap shutdown",
    )
    delta_cli.add_verbs(verb, _tag)
    resize_cli.add_verb(verb)
    keys = verb(
        "keys",
        "Make credentials in DIR: the cluster CA (ca-cert.pem, ca-key.pem) when DIR has"
        " none, then a new credential for each ROLE (ROLE-cert.pem, ROLE-key.pem; all"
        " three by default), replacing what is there. Files are mode 0600, DIR 0700."
        " server: csnapd's; admin: may do everything (csnap-agent's); client: I/O and"
        " read-only queries (csnap-nbd's).",
        "csnap keys /etc/csnap/keys --role client",
    )
    keys.add_argument("directory", type=Path, metavar="DIR")
    keys.add_argument("--role", action="append", choices=ROLES, help="repeatable")
    keys.add_argument(
        "--days", type=_ranged(1, 36500, "days"), default=825, help="validity (default 825)"
    )
    return parser


def _keys(args: argparse.Namespace, out: TextIO) -> int:
    try:
        written = make_credentials(args.directory, args.role or ROLES, days=args.days)
    except CredentialsError as exc:
        print(f"csnap: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    for path in written:
        out.write(f"{path}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Run one verb; returns the exit status."""
    out = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    if args.verb == "resize" and (problem := resize_cli.usage_problem(args)):
        parser.error(problem)
    if args.verb == "keys":
        return _keys(args, out)
    agent = getattr(args, "agent", None) or default_agent()
    as_json = getattr(args, "json", False)
    # A delta takes as long as its data: no limit unless one is asked for.
    timeout = getattr(
        args, "timeout", math.inf if args.verb in ("delta", "send", "receive", "revert") else 120.0
    )
    try:
        if args.verb == "apply":
            result = _apply(args)
        else:
            result = trio.run(_run_verb, args, agent, timeout)
    except _Failure as failure:
        if as_json:
            json.dump({"error": {"name": failure.name, "message": failure.message}}, out, indent=2)
            out.write("\n")
        print(f"csnap: {failure.message}", file=sys.stderr)
        return failure.status
    if as_json:
        json.dump(_jsonable(result), out, indent=2)
        out.write("\n")
    else:
        out.write(_render(args.verb, args, result))
    return EXIT_OK


def _apply(args: argparse.Namespace) -> Any:
    try:
        return delta_cli.run_apply(args)
    except (DeltaFormatError, DeltaRefusedError) as exc:
        raise _Failure(EXIT_REFUSED, "delta_refused", str(exc)) from exc
    except DeltaTransferError as exc:
        if exc.cut:
            raise _Failure(EXIT_UNREACHABLE, "transfer_cut", str(exc)) from exc
        raise _Failure(EXIT_REFUSED, "delta_refused", str(exc)) from exc
    except OSError as exc:
        raise _Failure(EXIT_REFUSED, "io_error", f"{exc.filename}: {exc.strerror}") from exc


async def _run_verb(args: argparse.Namespace, agent: str, limit: float) -> Any:
    try:
        with trio.fail_after(limit):
            if args.verb == "server":
                return await _server(agent)
            if args.verb == "delta":
                return await delta_cli.run_delta(agent, args)
            if args.verb == "receive":
                return await delta_cli.run_receive(agent, args)
            if args.verb == "send":
                return await delta_cli.run_send(agent, args)
            async with open_admin(agent_admin_connector(agent)) as admin:
                return await _VERBS[args.verb](admin, args)
    except trio.TooSlowError:
        raise _Failure(EXIT_UNREACHABLE, "timeout", f"no answer within {limit:g} seconds") from None
    except OSError as exc:
        raise _Failure(
            EXIT_UNREACHABLE,
            "agent_unreachable",
            f"cannot reach the agent at {agent}: {exc.strerror or exc}"
            " (is csnap-agent running? --agent or $CSNAP_AGENT names its socket)",
        ) from exc
    except ConnectionLostError as exc:
        raise _Failure(EXIT_UNREACHABLE, "connection_lost", f"connection lost: {exc}") from exc
    except ServerError as exc:
        raise _Failure(_status_of(exc), exc.name, exc.message) from exc
    except DeltaWriteError as exc:
        raise _Failure(EXIT_REFUSED, "delta_failed", str(exc)) from exc
    except (DeltaFormatError, DeltaRefusedError) as exc:
        raise _Failure(EXIT_REFUSED, "delta_refused", str(exc)) from exc


def _render_standbys(standbys: list[dict[str, Any]]) -> str:
    if not standbys:
        return "standbys   none\n"
    lines = [
        f"{s['address']}" + (f" on node {s['node']}" if s["node"] else "") + f", pid {s['pid']}"
        for s in standbys
    ]
    return "".join(f"{'standbys' if n == 0 else '':<10} {line}\n" for n, line in enumerate(lines))


def _status_of(exc: ServerError) -> int:
    code = exc.error
    if code is ErrorCode.NO_SUCH_SNAPSHOT:
        return EXIT_NO_SUCH
    if code in _UNREACHABLE_CODES:
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


async def _server(agent: str) -> dict[str, Any]:
    where = await find_server(agent, wait=False, standbys=True)
    async with open_admin(agent_admin_connector(agent)) as admin:
        info = await admin.server_info()
    return {
        **info,
        "active_since_ns": where.since_ns,
        "node": where.node,
        "token": where.token,
        "standbys": [asdict(s) for s in where.standbys],
    }


async def _status(admin: AdminClient, args: argparse.Namespace) -> Any:
    reply = await admin.status()
    if args.tag is None:
        return {
            "store": asdict(reply.store),
            "snapshots": [asdict(s) for s in reply.snapshots],
            "deleting": [asdict(s) for s in reply.deleting],
        }
    for snapshot in reply.snapshots:
        if snapshot.tag == args.tag:
            return {"store": asdict(reply.store), "snapshot": asdict(snapshot)}
    raise ServerError(
        int(ErrorCode.NO_SUCH_SNAPSHOT),
        ErrorCode.NO_SUCH_SNAPSHOT.symbol,
        f"no live snapshot has tag {args.tag}",
    )


#: Seconds between looks at a revert's progress.
_REVERT_POLL = 0.2


async def _revert(admin: AdminClient, args: argparse.Namespace) -> Any:
    started = await admin.revert_snapshot(args.tag)
    total = started["total"]
    if args.no_wait:
        return {"tag": args.tag, "total": total, "restored": 0, "done": False}
    shown = 0
    with Progress(total, f"reverting the origin to snapshot {args.tag}") as bar:
        while True:
            store = (await admin.status()).store
            if not store.reverting or store.revert_tag != args.tag:
                bar.advance(total - shown)
                return {"tag": args.tag, "total": total, "restored": total, "done": True}
            bar.advance(store.revert_restored - shown)
            shown = store.revert_restored
            await trio.sleep(_REVERT_POLL)


async def _shutdown(admin: AdminClient, args: argparse.Namespace) -> Any:
    await admin.shutdown()
    return {"shutdown": True}


async def _list(admin: AdminClient, args: argparse.Namespace) -> Any:
    # The chunk size comes with the store status, so sizes can be shown.
    reply = await admin.status()
    snapshots = [asdict(s) for s in reply.snapshots]
    return {"chunk_size": reply.store.chunk_size, "snapshots": snapshots}


_VERBS: dict[str, Callable[[AdminClient, argparse.Namespace], Awaitable[Any]]] = {
    "create": lambda admin, args: admin.create_snapshot(args.tag, args.priority),
    "delete": lambda admin, args: admin.delete_snapshot(args.tag),
    "revert": _revert,
    "list": _list,
    "status": _status,
    "priority": lambda admin, args: admin.set_priority(args.tag, args.priority),
    "usecount": lambda admin, args: admin.change_use_count(args.tag, args.delta),
    "shutdown": _shutdown,
    "resize": resize_cli.run_resize,
}


# -- output ----------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _when(ns: int) -> str:
    if not ns:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [headers, *rows]
    return "".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        + "\n"
        for line in lines
    )


_SNAPSHOT_HEADERS = ("TAG", "CREATED", "PRIORITY", "USE", "STATE", "OWNS ALONE", "SHARES")


def _snapshot_row(snapshot: dict[str, Any], chunk_size: int) -> list[str]:
    def amount(chunks: int) -> str:
        return f"{chunks} ({format_size(chunks * chunk_size)})"

    return [
        str(snapshot["tag"]),
        _when(snapshot["created_ns"]),
        str(snapshot["priority"]),
        str(snapshot["use_count"]),
        snapshot["state"],
        amount(snapshot["unique_chunks"]),
        amount(snapshot["shared_chunks"]),
    ]


def _render(verb: str, args: argparse.Namespace, result: Any) -> str:
    if verb in ("delta", "apply", "receive", "send"):
        return delta_cli.render(verb, result)
    if verb == "revert":
        if not result["done"]:
            return (
                f"reverting the origin to snapshot {result['tag']}: {result['total']} chunks"
                " to restore (csnap status shows how far it is)\n"
            )
        return f"origin reverted to snapshot {result['tag']} ({result['total']} chunks restored)\n"
    if verb in ("create", "delete", "priority", "usecount"):
        done = {
            "create": "created",
            "delete": "deleted (space is reclaimed in the background)",
            "priority": f"priority {result['priority']}",
            "usecount": f"use count {result['use_count']}",
        }[verb]
        return f"snapshot {result['tag']}: {done}\n"
    if verb == "list":
        snapshots = result["snapshots"]
        if not snapshots:
            return "no snapshots\n"
        rows = [_snapshot_row(s, result["chunk_size"]) for s in snapshots]
        return _table(_SNAPSHOT_HEADERS, rows)
    if verb == "status":
        return _render_status(result)
    if verb == "resize":
        return resize_cli.render(result)
    if verb == "server":
        return (
            f"server     {result['address']}\n"
            f"state      {result['state']}\n"
            f"active     since {_when(result['active_since_ns'])}\n"
            + (f"node       {result['node']}\n" if result["node"] else "")
            + (f"token      {result['token']}\n" if result["token"] else "")
            + f"started    {_when(result['started_ns'])}\n"
            f"store      {result['store']}\n"
            f"origin     {result['origin']}\n"
            f"clients    {result['clients']} connected: {result['origin_clients']} origin,"
            f" {result['snapshot_clients']} snapshot\n"
            f"commits    {result['commits']}\n"
            f"requests   {result['requests']}\n" + _render_standbys(result["standbys"])
        )
    return "server stopped; the store is clean\n"


def _render_status(result: dict[str, Any]) -> str:
    store = result["store"]
    chunk = store["chunk_size"]
    data, free = store["data_chunks"], store["data_free"]
    used = data - free
    lines = [
        f"store      {format_size(store['store_chunks'] * chunk)}"
        f" ({store['store_chunks']} chunks of {format_size(chunk)})",
        f"origin     {format_size(store['origin_chunks'] * chunk)}"
        f" ({store['origin_chunks']} chunks)",
        f"data       {format_size(used * chunk)} used, {format_size(free * chunk)} free"
        f" of {format_size(data * chunk)} ({100 * used / data if data else 0:.1f}% used)",
        f"metadata   {store['meta_blocks'] - store['meta_free']} of {store['meta_blocks']}"
        f" blocks used",
        f"exceptions {store['exceptions']}",
    ]
    if store.get("space_warning"):
        lines.append(
            f"warning    the data area is past its warning threshold of {store['warn_at']}% used"
        )
    if store.get("keep_free"):
        lines.append(f"reserve    csnapd squashes snapshots to keep {store['keep_free']}% free")
    if store.get("reverting"):
        lines.append(
            f"revert     the origin is being reverted to snapshot {store['revert_tag']}:"
            f" {store['revert_restored']} of {store['revert_total']} chunks restored;"
            " origin writes wait"
        )
    lines.append("")
    if "snapshot" in result:
        snapshots = [result["snapshot"]]
    else:
        snapshots = result["snapshots"]
    if snapshots:
        lines.append(_table(_SNAPSHOT_HEADERS, [_snapshot_row(s, chunk) for s in snapshots]))
    else:
        lines.append("no snapshots\n")
    deleting = result.get("deleting") or []
    if deleting:
        tags = ", ".join(str(s["tag"]) for s in deleting)
        swept = store["sweep_cursor"] / store["origin_chunks"] if store["origin_chunks"] else 0
        lines.append(
            f"being deleted (space not yet reclaimed): {tags}; the sweep has visited"
            f" {swept:.0%} of the origin's chunks\n"
        )
    return "\n".join(lines)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
