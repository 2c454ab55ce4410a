"""The whole product on one node, in the foreground: formats a demo store and
origin if they are absent, then starts csnap-agent, csnapd and csnap-nbd as
child processes, prefixes their logs, prints how to reach them, and on
Ctrl-C (SIGINT), SIGTERM or SIGHUP (its terminal closed) stops them in
order (gateway, server, agent), so the store is left clean. Running it
again reuses the store. A service that cannot start (a second run on the
same directory, a port in use) is one line on stderr and exit status 1.

The first line on stdout starts with "ready:" once every service answers.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from csnap_client import find_server
from csnap_common import format_size
from csnap_common.cli import configure_logging, size_arg

__all__ = ["main", "run"]

log = logging.getLogger("csnap-run")

#: Seconds each service gets to stop after SIGTERM before it is killed.
STOP_TIMEOUT = 30.0
#: Seconds each service gets to say it is listening.
START_TIMEOUT = 60.0
#: Signals that stop every service in order: Ctrl-C, kill, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class ChildFailedError(Exception):
    """A service exited or could not start."""


@dataclass(eq=False)
class Child:
    """A service started by the supervisor."""

    name: str
    process: trio.Process
    first_line: str = ""
    stopped: bool = False

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT):
                return await self.process.wait()
            log.error("%s did not stop within %gs; killing it", self.name, STOP_TIMEOUT)
            self.process.kill()
        return await self.process.wait()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scripts/run",
        description="Run csnap on one node: agent, metadata server and NBD gateway, on a"
        " demo store formatted on first use.",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data"), help="directory of the demo (default data)"
    )
    parser.add_argument("--store-size", type=size_arg, default="1G", metavar="SIZE")
    parser.add_argument("--origin-size", type=size_arg, default="1G", metavar="SIZE")
    parser.add_argument(
        "--nbd-listen",
        default="127.0.0.1:10809",
        metavar="HOST:PORT",
        help="TCP address of the NBD gateway (default 127.0.0.1:10809; port 0 picks one)",
    )
    parser.add_argument("--no-nbd", action="store_true", help="do not start the NBD gateway")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging("info")
    failure: ChildFailedError | None = None
    try:
        return trio.run(_main, args)
    except* ChildFailedError as group:
        failure = _first_failure(group)
    log.error("%s", failure)
    return 1


def _first_failure(group: BaseExceptionGroup[ChildFailedError]) -> ChildFailedError:
    """The first service failure in a (possibly nested) group of them."""
    first = group.exceptions[0]
    return first if isinstance(first, ChildFailedError) else _first_failure(first)


async def _main(args: argparse.Namespace) -> int:
    data: Path = args.data.resolve()
    await trio.Path(data).mkdir(parents=True, exist_ok=True)
    store, origin = data / "store.img", data / "origin.img"
    if not await trio.Path(store).exists():
        log.info(
            "formatting a demo store: %s (%s) for origin %s (%s), sparse",
            store,
            format_size(args.store_size),
            origin,
            format_size(args.origin_size),
        )
        await _run_tool(
            "mkcsnap",
            [
                "csnap_format.mkcsnap",
                "--store-size",
                str(args.store_size),
                "--origin-size",
                str(args.origin_size),
                str(store),
                str(origin),
            ],
        )
    else:
        log.info("reusing the store %s", store)
    children: list[Child] = []
    status = 0
    # Signals are ours from here on, during start-up too.
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        try:
            async with trio.open_nursery() as nursery:
                work = trio.CancelScope()

                async def on_signal() -> None:
                    async for signum in signals:
                        log.info("%s: stopping", signal.Signals(signum).name)
                        work.cancel()
                        return

                nursery.start_soon(on_signal)
                with work:
                    await _start_all(nursery, args, children, store, origin)
                    status = await _supervise(children)
                # Stop while their logs are still forwarded.
                status = await _stop_all(children) or status
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                status = await _stop_all(children) or status
    return status


async def _start_all(
    nursery: trio.Nursery,
    args: argparse.Namespace,
    children: list[Child],
    store: Path,
    origin: Path,
) -> None:
    data = store.parent
    agent_socket, nbd_socket = data / "agent.sock", data / "nbd.sock"
    agent = await _start(nursery, "agent", ["csnap_agent", "--socket", str(agent_socket)], children)
    await _start(
        nursery,
        "csnapd",
        ["csnapd", str(store), str(origin), "--agent", str(agent_socket)],
        children,
    )
    with trio.fail_after(START_TIMEOUT):
        where = await find_server(str(agent_socket), wait=True)
    lines = [f"agent {agent.first_line.partition(' ')[2]}", f"server {where.address}"]
    if not args.no_nbd:
        nbd = await _start(
            nursery,
            "nbd",
            [
                "csnap_nbd",
                "--agent",
                str(agent_socket),
                "--unix",
                str(nbd_socket),
                "--listen",
                args.nbd_listen,
            ],
            children,
            lines=2,
        )
        lines.append(f"nbd {nbd.first_line.replace('listening ', '')}")
    _banner(lines, agent_socket, nbd_socket, store, origin, with_nbd=not args.no_nbd)


async def _stop_all(children: list[Child]) -> int:
    """Stop every child not yet stopped, the last started first; 1 if one failed."""
    status = 0
    for child in reversed(children):
        if child.stopped:
            continue
        code = await child.stop()
        child.stopped = True
        if code == 0:
            log.info("%s stopped", child.name)
        else:
            log.error("%s exited with status %d", child.name, code)
            status = 1
    return status


async def _run_tool(name: str, argv: list[str]) -> None:
    result = await trio.run_process(
        [sys.executable, "-m", *argv], check=False, stdout=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise ChildFailedError(f"{name} failed with status {result.returncode}")


async def _start(
    nursery: trio.Nursery,
    name: str,
    argv: list[str],
    children: list[Child],
    *,
    lines: int = 1,
) -> Child:
    """Start `python -m argv`, forward its log, wait for its first stdout lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        # Not in our process group: a terminal's Ctrl-C reaches only the
        # supervisor, which stops the services in order.
        start_new_session=True,
    )
    child = Child(name, process)
    children.append(child)
    assert process.stdout is not None and process.stderr is not None
    nursery.start_soon(_forward, name, process.stderr)
    received: list[str] = []
    buffer = b""
    with trio.move_on_after(START_TIMEOUT):
        while len(received) < lines:
            data = await process.stdout.receive_some(4096)
            if not data:
                break
            buffer += data
            while b"\n" in buffer and len(received) < lines:
                line, _, buffer = buffer.partition(b"\n")
                received.append(line.decode(errors="replace").strip())
    if len(received) < lines:
        raise ChildFailedError(f"{name} did not start (see its log above)")
    child.first_line = ", ".join(received)
    nursery.start_soon(_forward, name, process.stdout)
    return child


async def _forward(name: str, stream: trio.abc.ReceiveStream) -> None:
    """Copy a child's output to our stderr, each line prefixed with its name.

    When our stderr is gone (its terminal closed), the output is still read
    and dropped: a child blocked on a full pipe could not stop.
    """
    buffer = b""
    writable = True
    async for data in stream:
        buffer += data
        lines = []
        while b"\n" in buffer:
            line, _, buffer = buffer.partition(b"\n")
            lines.append(f"[{name}] {line.decode(errors='replace')}\n")
        if writable and lines:
            try:
                sys.stderr.write("".join(lines))
                sys.stderr.flush()
            except OSError:
                writable = False


async def _supervise(children: list[Child]) -> int:
    """Wait until a child exits on its own; signals cancel this wait.

    Returns 0 when it was csnapd stopping cleanly (an administrator's
    `csnap shutdown`), 1 for any other exit.
    """
    status = 1
    async with trio.open_nursery() as nursery:

        async def watch(child: Child) -> None:
            nonlocal status
            code = await child.process.wait()
            child.stopped = True
            if child.name == "csnapd" and code == 0:
                status = 0
                log.info("csnapd was shut down (csnap shutdown); stopping the rest")
            else:
                log.error("%s exited on its own (status %d); stopping the rest", child.name, code)
            nursery.cancel_scope.cancel()

        for child in children:
            nursery.start_soon(watch, child)
    return status


def _banner(
    lines: list[str],
    agent_socket: Path,
    nbd_socket: Path,
    store: Path,
    origin: Path,
    *,
    with_nbd: bool,
) -> None:
    venv_bin = Path(sys.executable).parent
    cli = f"{shlex.quote(str(venv_bin / 'csnap'))} --agent {shlex.quote(str(agent_socket))}"
    print("ready: " + "; ".join(lines), flush=False)
    for line in lines:
        name, _, where = line.partition(" ")
        print(f"{name:<7} {where}")
    print(f"store   {store}\norigin  {origin}")
    print("try:")
    print(f"  {cli} create 1          # take snapshot 1 of the origin")
    print(f"  {cli} list")
    print(f"  {cli} status")
    if with_nbd:
        print(f"  nbdinfo --list 'nbd+unix:///?socket={nbd_socket}'")
        print(f"  qemu-img info 'nbd+unix:///origin?socket={nbd_socket}'")
    print("Ctrl-C stops everything and leaves the store clean.", flush=True)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
