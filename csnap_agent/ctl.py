"""csnap: the administrator's command line, spoken to a node's agent.

Every verb opens one admin connection to the agent, which relays it to the
active server. Output is a table for people, or JSON with --json. The exit
status says what happened, so scripts need not parse messages:
  0 done, 1 refused by the server, 2 bad usage, 3 no such snapshot,
  4 the agent or the server could not be reached (or did not answer in time).

This module owns running a verb: the requests each makes and how failures
become exit statuses. Its arguments are declared in csnap_agent.ctl_parser
and its output laid out in csnap_agent.ctl_render.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import Any, TextIO

import trio

from csnap_agent import ctl_parser, resize_cli
from csnap_agent.ctl_render import jsonable, render
from csnap_client import (
    AdminClient,
    ConnectionLostError,
    ServerError,
    agent_admin_connector,
    default_agent,
    find_server,
    open_admin,
)
from csnap_common import Progress
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


class _Failure(Exception):
    """A verb failed: the exit status, an error name for JSON, and why."""

    def __init__(self, status: int, name: str, message: str):
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message


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
    parser = ctl_parser.parser()
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
        json.dump(jsonable(result), out, indent=2)
        out.write("\n")
    else:
        out.write(render(args.verb, result))
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


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
