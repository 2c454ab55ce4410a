"""python -m bench.trees: csnapd's CPU per request in two source trees, side
by side, in alternating rounds of one run.

  python -m bench.trees BASE [NEW] [--workload W] [--rounds N] [--count C]

BASE and NEW are git revisions of this repository (checked out into
temporary worktrees, removed afterwards) or directories holding a tree;
NEW defaults to this checkout as it is. Each tree gets its own csnapd on
loopback, with its own store beside the other's, one load generator (this
process, with this checkout's client library) and the same workload
(bench.server_bench's WORKLOADS) for both; rounds alternate, the order
turning every round, so that a slow stretch of the machine falls on both.

Each csnapd runs from a directory outside both trees: `python -m` puts the
current directory first on the module path, so a csnapd started from
inside a checkout would run that checkout's code whatever its PYTHONPATH
says. Before each is started, the same interpreter, environment and
directory are asked where `csnapd` comes from; the run stops if it is not
the tree meant.

Prints csnapd's CPU per request (utime + stime of every thread, from /proc)
and requests per second, each round's and their medians; --json FILE
writes the same.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.common import PYTHON_ENV, ROOT, progress
from bench.server_bench import (
    CHUNK,
    SNAPSHOT,
    WORKLOADS,
    Chunks,
    Server,
    csnapd,
    data_clients,
    fill,
    make_store,
    run_round,
)
from csnap_client import open_admin

#: Chunks each workload cycles over (or uses up, for those that copy).
REGION = 4096


@dataclass
class Tree:
    """One source tree under comparison."""

    name: str
    #: As given: a revision or a directory.
    revision: str
    path: Path
    #: csnapd CPU microseconds per request and requests per second, by round.
    cpu_us: list[float] = field(default_factory=list)
    per_s: list[float] = field(default_factory=list)


@contextmanager
def checked_out(revision: str, path: Path) -> Iterator[Path]:
    """A directory as it is, or `revision` of this repository checked out
    at `path` as a worktree, removed when the block ends."""
    as_directory = Path(revision)
    if as_directory.is_dir():
        yield as_directory.resolve()
        return
    git = ["git", "-C", str(ROOT)]
    subprocess.run(
        [*git, "worktree", "add", "--detach", "--quiet", str(path), revision],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield path.resolve()
    finally:
        subprocess.run(
            [*git, "worktree", "remove", "--force", str(path)],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def add_tree_arguments(parser: argparse.ArgumentParser) -> None:
    """The two trees a comparison takes: BASE, and NEW (this checkout by default)."""
    parser.add_argument("base", help="a git revision of this repository, or a directory")
    parser.add_argument(
        "new", nargs="?", default=str(ROOT), help="the same (default: this checkout as it is)"
    )


@contextmanager
def both_checked_out(base: str, new: str) -> Iterator[tuple[Path, list[tuple[str, str, Path]]]]:
    """A scratch directory, and (name, revision, path) of the trees "base"
    and "new" checked out in it (or as they are, for directories); all
    removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="csnap-trees-") as scratch, ExitStack() as stack:
        directory = Path(scratch)
        yield (
            directory,
            [
                (name, revision, stack.enter_context(checked_out(revision, directory / name)))
                for name, revision in (("base", base), ("new", new))
            ],
        )


def tree_env(tree: Path) -> dict[str, str]:
    return {**PYTHON_ENV, "PYTHONPATH": str(tree)}


def csnapd_source(tree: Path, cwd: Path) -> Path:
    """Where `python -m csnapd` would take csnapd from, run as the comparison runs it."""
    found = subprocess.run(
        [sys.executable, "-c", "import csnapd; print(csnapd.__file__)"],
        env=tree_env(tree),
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(found.stdout.strip()).resolve().parent


@asynccontextmanager
async def tree_csnapd(tree: Path, store: Path, origin: Path, cwd: Path) -> AsyncIterator[Server]:
    """csnapd from `tree`, started in `cwd`; stopped with SIGTERM when the block ends."""
    source = csnapd_source(tree, cwd)
    if source != tree / "csnapd":
        raise RuntimeError(f"csnapd would come from {source}, not from the tree {tree}")
    log = store.with_suffix(".log")
    async with csnapd(store, origin, log, env=tree_env(tree), cwd=cwd) as server:
        yield server


async def compare(trees: list[Tree], directory: Path, args: argparse.Namespace) -> None:
    (workload,) = (w for w in WORKLOADS if w.name == args.workload)
    # As the server part does it: "region" cycles over chunks copied out
    # first, "untouched" over chunks never written, and "fresh" uses its
    # chunks up, so it gets room for every round's.
    copies = workload.chunks == "fresh"
    origin_chunks = max(REGION, (args.rounds + 1) * args.count) if copies else REGION
    async with AsyncExitStack() as stack:
        rounds = {}
        for tree in trees:
            store, origin = make_store(
                directory, f"{tree.name}-store", 2 * origin_chunks * CHUNK, origin_chunks * CHUNK
            )
            server = await stack.enter_async_context(
                tree_csnapd(tree.path, store, origin, directory)
            )
            admin = await stack.enter_async_context(open_admin(server.connect))
            await admin.create_snapshot(SNAPSHOT)
            if workload.chunks == "region":
                await fill(server.connect, 0, REGION)
            clients = await stack.enter_async_context(
                data_clients(server.connect, args.clients, workload.snapshot)
            )
            chunks = Chunks(0, origin_chunks, wrap=not copies)
            rounds[tree.name] = (server, admin, clients, chunks)
        for number in range(args.rounds + 1):  # the first warms both up
            order = trees if number % 2 else trees[::-1]
            for tree in order:
                server, admin, clients, chunks = rounds[tree.name]
                count = args.count if number else max(1, args.count // 4)
                measured = await run_round(
                    server, admin, clients, workload.operation, chunks, count, args.seconds
                )
                if number == 0:
                    continue
                assert measured.server_cpu_ns is not None, "csnapd's CPU time is read from /proc"
                requests = max(1, measured.server_requests)
                tree.cpu_us.append(measured.server_cpu_ns / 1e3 / requests)
                tree.per_s.append(measured.server_requests / (measured.elapsed_ns / 1e9))
                progress(f"trees: round {number}: {tree.name} {tree.cpu_us[-1]:.1f} us/request")


def render(trees: list[Tree], args: argparse.Namespace) -> str:
    lines = [
        f"# {args.workload}, {args.clients} clients, {args.rounds} alternating rounds"
        f" of {args.count}; csnapd CPU per request from /proc",
    ]
    for tree in trees:
        rounds = " / ".join(f"{x:.1f}" for x in tree.cpu_us)
        cpu, rate = statistics.median(tree.cpu_us), statistics.median(tree.per_s)
        lines.append(
            f"{tree.name:5s} {tree.revision}: median {cpu:.1f} us/request,"
            f" {rate:,.0f} requests/s (rounds: {rounds})"
        )
    base, new = trees
    change = statistics.median(new.cpu_us) / statistics.median(base.cpu_us) - 1
    lines.append(f"new against base: {change:+.1%} CPU per request")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.trees",
        description="csnapd's CPU per request in two source trees, in alternating rounds",
    )
    add_tree_arguments(parser)
    names = [w.name for w in WORKLOADS]
    parser.add_argument("--workload", choices=names, default="snapshot_read_store")
    parser.add_argument("--clients", type=int, default=8, help="clients, one request each")
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds per tree")
    parser.add_argument("--count", type=int, default=15000, help="requests per round")
    parser.add_argument("--seconds", type=float, default=30.0, help="time limit of a round")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if min(args.clients, args.rounds, args.count) < 1:
        parser.error("--clients, --rounds and --count must be at least 1")
    with both_checked_out(args.base, args.new) as (directory, checked):
        trees = [Tree(*tree) for tree in checked]
        trio.run(compare, trees, directory, args)
    print(render(trees, args))
    if args.json:
        figures: dict[str, Any] = {
            "workload": args.workload,
            "clients": args.clients,
            "trees": {
                tree.name: {
                    "revision": tree.revision,
                    "path": str(tree.path),
                    "cpu_us": tree.cpu_us,
                    "per_s": tree.per_s,
                }
                for tree in trees
            },
        }
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
