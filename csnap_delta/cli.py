"""The `csnap delta` and `csnap apply` verbs: their arguments, their work, their output.

The csnap command line (csnap_agent.ctl) adds these verbs to its parser and
calls run_delta / run_apply; failures come out as DeltaWriteError,
DeltaFormatError or DeltaRefusedError, which it reports as refusals.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from csnap_client import agent_admin_connector, agent_connector
from csnap_common import format_size
from csnap_delta.apply import apply_delta
from csnap_delta.receive import receive_delta
from csnap_delta.write import write_delta

__all__ = ["add_verbs", "run_delta", "run_apply", "run_receive", "render"]

VerbFactory = Callable[[str, str, str], argparse.ArgumentParser]


def add_verbs(verb: VerbFactory, tag: Callable[[str], int]) -> None:
    """Add `delta` and `apply` to a parser, through its `verb(name, summary, example)`."""
    delta = verb(
        "delta",
        "Write the chunks that may differ between snapshots FROM and TO into FILE, each"
        " extent with checksums of its bytes in both, for `csnap apply` on an image of FROM."
        " Reads the store and origin files (the paths csnapd reports, or --store/--origin).",
        "csnap delta 3 5 -o 3-5.delta --compress",
    )
    delta.add_argument("base", type=tag, metavar="FROM", help="the snapshot the delta starts from")
    delta.add_argument("target", type=tag, metavar="TO", help="the snapshot it leads to")
    delta.add_argument("-o", "--output", required=True, metavar="FILE", help="the delta file")
    delta.add_argument("--compress", action="store_true", help="zstd-compress the extents")
    delta.add_argument("--store", metavar="PATH", help="the store file to read (default: csnapd's)")
    delta.add_argument("--origin", metavar="PATH", help="the origin to read (default: csnapd's)")
    apply = verb(
        "apply",
        "Apply a delta to a raw image of its FROM snapshot, which then holds TO. Checks the"
        " delta's checksums, the image's size and that it holds FROM's bytes (or already"
        " TO's) under every extent before writing anything; applying again is harmless.",
        "csnap apply 3-5.delta --to backup.raw",
    )
    apply.add_argument("delta", metavar="FILE", help="the delta file")
    apply.add_argument("--to", required=True, dest="target", metavar="TARGET", help="the image")
    receive = verb(
        "receive",
        "Receive a delta into this store, which holds snapshot FROM and whose origin has not"
        " changed since: the origin becomes TO (the store's snapshots keep their data), then"
        " snapshot TO is created. Checks everything first; receiving again after an"
        " interruption finishes the job.",
        "csnap receive 3-5.delta",
    )
    receive.add_argument("delta", metavar="FILE", help="the delta file")
    receive.add_argument("--origin", metavar="PATH", help="the origin to write (default: csnapd's)")


async def run_delta(agent: str, args: argparse.Namespace) -> dict[str, Any]:
    """`csnap delta`: write the file; what was written."""
    report = await write_delta(
        agent_connector(agent),
        agent_admin_connector(agent),
        args.base,
        args.target,
        args.output,
        compressed=args.compress,
        store=args.store,
        origin=args.origin,
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
    }


def run_apply(args: argparse.Namespace) -> dict[str, Any]:
    """`csnap apply`: check, then write; what was done."""
    report = apply_delta(args.delta, args.target)
    return {
        "from": report.header.from_tag,
        "to": report.header.to_tag,
        "target": args.target,
        "extents": report.extents,
        "chunks": report.chunks,
        "written_chunks": report.written_chunks,
        "already_chunks": report.already_chunks,
    }


async def run_receive(agent: str, args: argparse.Namespace) -> dict[str, Any]:
    """`csnap receive`: check, write the origin, create TO; what was done."""
    report = await receive_delta(
        agent_connector(agent), agent_admin_connector(agent), args.delta, origin=args.origin
    )
    return {
        "from": report.header.from_tag,
        "to": report.header.to_tag,
        "extents": report.extents,
        "chunks": report.chunks,
        "written_chunks": report.written_chunks,
        "already_chunks": report.already_chunks,
    }


def render(verb: str, result: dict[str, Any]) -> str:
    """The human output of `delta`, `apply` or `receive`."""
    if verb == "delta":
        return (
            f"delta {result['from']} -> {result['to']}: {result['chunks']} chunks in"
            f" {result['extents']} extents ({format_size(result['data_bytes'])} of data),"
            f" {format_size(result['file_bytes'])} written to {result['file']}\n"
        )
    if verb == "receive":
        return (
            f"received snapshot {result['from']} -> {result['to']}: {result['written_chunks']}"
            f" chunks written, {result['already_chunks']} already in place; snapshot"
            f" {result['to']} created\n"
        )
    return (
        f"{result['target']}: snapshot {result['from']} -> {result['to']}:"
        f" {result['written_chunks']} chunks written, {result['already_chunks']} already"
        f" in place\n"
    )
