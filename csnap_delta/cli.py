"""The `csnap delta`, `apply`, `receive` and `send` verbs: their arguments,
their work, their output.

The csnap command line adds these verbs to its parser (csnap_agent.ctl_parser)
and calls run_delta, run_apply, run_receive and run_send (csnap_agent.ctl);
failures come out as DeltaWriteError, DeltaFormatError or DeltaRefusedError,
which it reports as refusals.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from csnap_client import agent_admin_connector, agent_store_connector, open_admin
from csnap_common import Progress, format_size
from csnap_common.cli import add_direct, host_port_arg, size_arg
from csnap_common.credentials import (
    ROLE_ADMIN,
    client_context,
    server_context,
    store_credentials,
)
from csnap_delta.apply import apply_delta
from csnap_delta.layout import DeltaFormatError, DeltaHeader
from csnap_delta.receive import receive_delta
from csnap_delta.transfer import send_delta, serve_receive
from csnap_delta.write import write_delta
from csnap_protocol import StatusReply

__all__ = ["add_verbs", "run_delta", "run_apply", "run_receive", "run_send", "render"]

VerbFactory = Callable[[str, str, str], argparse.ArgumentParser]


def add_verbs(verb: VerbFactory, tag: Callable[[str], int]) -> None:
    """Add `delta`, `apply`, `receive` and `send` to a parser, through its
    `verb(name, summary, example)`; `tag` parses a snapshot's tag."""
    _add_delta(verb, tag)
    _add_apply(verb)
    _add_receive(verb)
    _add_send(verb, tag)


def _add_delta(verb: VerbFactory, tag: Callable[[str], int]) -> None:
    """Declare `csnap delta`."""
    delta = verb(
        "delta",
        "Write the chunks that may differ between snapshots FROM and TO into FILE, each"
        " extent with checksums of its bytes in both, for `csnap apply` on an image of FROM."
        " Reads the store and origin files (the paths csnapd reports, or --store/--origin).",
        "csnap delta 3 5 -o 3-5.delta --compress",
    )
    delta.add_argument(
        "base",
        type=_base(tag),
        metavar="FROM",
        help="the snapshot the delta starts from; 'none' for a full delta from an all-zero image",
    )
    delta.add_argument("target", type=tag, metavar="TO", help="the snapshot it leads to")
    delta.add_argument("-o", "--output", required=True, metavar="FILE", help="the delta file")
    delta.add_argument("--compress", action="store_true", help="zstd-compress the extents")
    delta.add_argument("--store", metavar="PATH", help="the store file to read (default: csnapd's)")
    delta.add_argument("--origin", metavar="PATH", help="the origin to read (default: csnapd's)")
    add_direct(delta, "the store and origin")


def _add_apply(verb: VerbFactory) -> None:
    """Declare `csnap apply`."""
    apply = verb(
        "apply",
        "Apply a delta to a raw image of its FROM snapshot, which then holds TO. Checks the"
        " delta's checksums, the image's size and that it holds FROM's bytes (or already"
        " TO's) under every extent before writing anything; applying again is harmless.",
        "csnap apply 3-5.delta --to backup.raw",
    )
    apply.add_argument("delta", metavar="FILE", help="the delta file")
    apply.add_argument("--to", required=True, dest="target", metavar="TARGET", help="the image")
    add_direct(apply, "the image")


def _add_receive(verb: VerbFactory) -> None:
    """Declare `csnap receive`."""
    receive = verb(
        "receive",
        "Receive a delta into this store, which holds snapshot FROM and whose origin has not"
        " changed since: the origin becomes TO (the store's snapshots keep their data), then"
        " snapshot TO is created. Checks everything first; receiving again after an"
        " interruption finishes the job.",
        "csnap receive 3-5.delta",
    )
    source = receive.add_mutually_exclusive_group(required=True)
    source.add_argument("delta", metavar="FILE", nargs="?", help="the delta file")
    source.add_argument(
        "--listen",
        type=host_port_arg,
        metavar="HOST:PORT",
        help="receive from `csnap send` instead: listen here until one delta is received",
    )
    receive.add_argument(
        "--spool",
        metavar="DIR",
        default=".",
        help="with --listen: where a delta is kept while it arrives (default: here)",
    )
    receive.add_argument("--origin", metavar="PATH", help="the origin to write (default: csnapd's)")
    add_direct(receive, "the origin")
    receive.add_argument(
        "--credentials",
        type=Path,
        metavar="DIR",
        help="with --listen: this store's cluster CA and server credential, which senders'"
        " admin credentials must match (default: STORE.keys beside this node's store)",
    )


def _add_send(verb: VerbFactory, tag: Callable[[str], int]) -> None:
    """Declare `csnap send`."""
    send = verb(
        "send",
        "Send the delta FROM -> TO to a `csnap receive --listen` on another node, whose store"
        " then ends with snapshot TO. The delta is first written to a file (--delta), kept"
        " until the receiver has it; a cut transfer resumes where it stopped when sent again.",
        "csnap send 1 2 --to replica:7800 --compress --rate 50M",
    )
    send.add_argument(
        "base",
        type=_base(tag),
        metavar="FROM",
        help="the snapshot the receiver holds; 'none' for a full send to a store of zeroes",
    )
    send.add_argument("target", type=tag, metavar="TO", help="the snapshot to send")
    send.add_argument(
        "--to", required=True, dest="receiver", type=host_port_arg, metavar="HOST:PORT"
    )
    send.add_argument(
        "--delta",
        metavar="FILE",
        help="the delta file to write and send (default csnap-FROM-TO.delta)",
    )
    send.add_argument("--compress", action="store_true", help="zstd-compress the extents")
    send.add_argument("--rate", type=size_arg, metavar="SIZE", help="at most SIZE bytes per second")
    send.add_argument("--store", metavar="PATH", help="the store file to read (default: csnapd's)")
    send.add_argument("--origin", metavar="PATH", help="the origin to read (default: csnapd's)")
    add_direct(send, "the store and origin")
    send.add_argument(
        "--credentials",
        type=Path,
        metavar="DIR",
        help="an admin credential of the receiving store's cluster CA (made there with"
        " `csnap keys DIR --role admin`; default: STORE.keys beside this node's store)",
    )


def _base(tag: Callable[[str], int]) -> Callable[[str], int | None]:
    """argparse type: a tag, or "none" for no base (a full delta)."""

    def parse(text: str) -> int | None:
        return None if text == "none" else tag(text)

    return parse


async def run_delta(agent: str, args: argparse.Namespace) -> dict[str, Any]:
    """`csnap delta`: write the file; what was written."""
    with Progress(0, f"writing {Path(args.output).name}") as bar:

        def shown(done: int, total: int) -> None:
            bar.total = total
            bar.advance(done - bar.done)

        report = await write_delta(
            agent_store_connector(agent),
            agent_admin_connector(agent),
            args.base,
            args.target,
            args.output,
            compressed=args.compress,
            store=args.store,
            origin=args.origin,
            progress=shown,
            direct=args.direct,
        )
    return {
        "from": args.base,
        "to": args.target,
        "file": args.output,
        "chunk_size": report.header.chunk_size,
        "extents": report.extents,
        "chunks": report.chunks,
        "data_bytes": report.data_bytes,
        "file_bytes": report.file_bytes,
        "direct": {"store": report.store_direct, "origin": report.origin_direct},
    }


def run_apply(args: argparse.Namespace) -> dict[str, Any]:
    """`csnap apply`: check, then write; what was done."""
    report = apply_delta(args.delta, args.target, direct=args.direct)
    return {
        "from": None if report.header.full else report.header.from_tag,
        "to": report.header.to_tag,
        "target": args.target,
        "extents": report.extents,
        "chunks": report.chunks,
        "written_chunks": report.written_chunks,
        "already_chunks": report.already_chunks,
        "direct": report.direct,
    }


async def run_receive(agent: str, args: argparse.Namespace) -> dict[str, Any]:
    """`csnap receive`: check, write the origin, create TO; what was done."""
    if args.listen is not None:

        def listening(address: str) -> None:
            print(f"listening {address}", flush=True)

        directory = args.credentials or await _store_credentials(agent)
        report = await serve_receive(
            args.listen,
            Path(args.spool),
            agent_store_connector(agent),
            agent_admin_connector(agent),
            tls=server_context(directory),
            listening=listening,
            origin=args.origin,
            direct=args.direct,
        )
    else:
        report = await receive_delta(
            agent_store_connector(agent),
            agent_admin_connector(agent),
            args.delta,
            origin=args.origin,
            direct=args.direct,
        )
    return {
        "from": None if report.header.full else report.header.from_tag,
        "to": report.header.to_tag,
        "extents": report.extents,
        "chunks": report.chunks,
        "written_chunks": report.written_chunks,
        "already_chunks": report.already_chunks,
        "direct": report.direct,
    }


async def run_send(agent: str, args: argparse.Namespace) -> dict[str, Any]:
    """`csnap send`: write the delta file (or reuse it), then send it; what was done."""
    base = "none" if args.base is None else args.base
    delta = Path(args.delta or f"csnap-{base}-{args.target}.delta")
    admin_connect = agent_admin_connector(agent)
    async with open_admin(admin_connect) as admin:
        status = await admin.status()
    if not await trio.Path(delta).exists() or not _same_delta(delta, status, args):
        await write_delta(
            agent_store_connector(agent),
            admin_connect,
            args.base,
            args.target,
            delta,
            compressed=args.compress,
            store=args.store,
            origin=args.origin,
            direct=args.direct,
        )
    host, port = args.receiver
    directory = args.credentials or await _store_credentials(agent)
    tls = client_context(directory, ROLE_ADMIN)
    with Progress(0, f"sending {delta.name}") as bar:

        def shown(done: int, total: int) -> None:
            bar.total = total
            bar.advance(done - bar.done)

        report = await send_delta(delta, host, port, tls=tls, rate=args.rate, progress=shown)
    await trio.Path(delta).unlink()
    return {
        "from": args.base,
        "to": args.target,
        "receiver": f"{host}:{port}",
        "bytes": report.total_bytes,
        "resumed_at": report.resumed_at,
        "message": report.message,
    }


async def _store_credentials(agent: str) -> Path:
    """STORE.keys beside the store this node's csnapd serves."""
    async with open_admin(agent_admin_connector(agent)) as admin:
        info = await admin.server_info()
    return store_credentials(str(info["store"]))


def _same_delta(delta: Path, status: StatusReply, args: argparse.Namespace) -> bool:
    """Whether `delta` is the delta FROM -> TO of these very snapshots (kept from a cut send)."""
    with open(delta, "rb") as source:
        try:
            header = DeltaHeader.decode(source.read(DeltaHeader.SIZE))
        except DeltaFormatError:
            return False
    created = {s.tag: s.created_ns for s in status.snapshots}
    full = args.base is None
    return (
        header.store_uuid == status.store.uuid
        and header.full == full
        and (header.from_tag, header.to_tag) == (0 if full else args.base, args.target)
        and header.from_created_ns == (0 if full else created.get(args.base))
        and header.to_created_ns == created.get(args.target)
    )


def _from(result: dict[str, Any]) -> str:
    return "nothing" if result["from"] is None else f"snapshot {result['from']}"


def render(verb: str, result: dict[str, Any]) -> str:
    """The human output of `delta`, `apply` or `receive`."""
    if verb == "delta":
        return (
            f"delta {_from(result)} -> {result['to']}: {result['chunks']} chunks in"
            f" {result['extents']} extents ({format_size(result['data_bytes'])} of data),"
            f" {format_size(result['file_bytes'])} written to {result['file']}\n"
        )
    if verb == "send":
        resumed = f", resumed at byte {result['resumed_at']}" if result["resumed_at"] else ""
        return (
            f"sent {_from(result)} -> snapshot {result['to']} to {result['receiver']}:"
            f" {format_size(result['bytes'])}{resumed}; {result['message']}\n"
        )
    if verb == "receive":
        return (
            f"received {_from(result)} -> snapshot {result['to']}: {result['written_chunks']}"
            f" chunks written, {result['already_chunks']} already in place; snapshot"
            f" {result['to']} created\n"
        )
    return (
        f"{result['target']}: {_from(result)} -> snapshot {result['to']}:"
        f" {result['written_chunks']} chunks written, {result['already_chunks']} already"
        f" in place\n"
    )
