"""csnap-agent: the command line of a node's agent.

The first line of stdout is "listening unix:PATH" once peers can connect;
logs go to stderr. SIGTERM and SIGINT close the socket (removing its file)
and exit 0; registered servers keep running and register again with the
next agent. Under socket activation the service manager's socket is used
instead of --socket, and left in place on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from csnap_agent.agent import Agent
from csnap_agent.coordinator import Coordinator
from csnap_agent.etcd import EtcdClient
from csnap_agent.etcd_coordinator import DEFAULT_TTL, EtcdCoordinator, parse_endpoints
from csnap_agent.metrics import AgentMetrics
from csnap_client import DEFAULT_AGENT
from csnap_common import single_errors, unix_address
from csnap_common.allocator import return_freed_buffers
from csnap_common.cli import add_log_level, add_metrics, configure_logging
from csnap_common.metrics import MetricsListenError, serve_metrics
from csnap_common.systemd import (
    ActivationError,
    keep_watchdog_fed,
    listen_sockets,
    notify_ready,
    notify_stopping,
)

__all__ = ["main", "run", "open_agent_listener", "AgentSocketError"]

log = logging.getLogger("csnap-agent")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CANNOT_START = 3

_EPILOG = f"""\
examples:
  csnap-agent                                 # listens on {DEFAULT_AGENT}
  csnap-agent --socket /run/csnap/agent.sock
  csnapd store.img origin.img --agent /run/csnap/agent.sock
  csnap --agent /run/csnap/agent.sock list
  csnap-agent --etcd-endpoints http://10.0.0.1:2379,http://10.0.0.2:2379 --node node-a

With --etcd-endpoints the agent holds one election per store in etcd, under
a lease, and follows the active server wherever it runs; every node's agent
must name the same endpoints and --store-name, and its own --node.

A socket name starting with @ is in Linux's abstract namespace (no file).
Only processes of the agent's own user, and root, may use it; a socket file
is created with mode 0600. Started by systemd socket activation
($LISTEN_FDS), the agent serves on the one socket it is passed instead.

exit status: 0 stopped cleanly, 2 bad arguments, 3 the socket could not be
created (in use by a running agent, or no permission).
"""


class AgentSocketError(Exception):
    """The agent's socket cannot be created."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csnap-agent",
        description="A node's csnap control point: servers register with it, clients"
        " find the server through it, administrators reach the server through it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket",
        default=os.environ.get("CSNAP_AGENT") or DEFAULT_AGENT,
        metavar="PATH",
        help=f"Unix socket to listen on, or @name (default $CSNAP_AGENT or {DEFAULT_AGENT})",
    )
    parser.add_argument(
        "--credentials",
        type=Path,
        metavar="DIR",
        help="the cluster's ca-cert.pem and the admin-cert.pem and admin-key.pem"
        " requests are relayed with (default: STORE.keys beside the active server's store)",
    )
    cluster = parser.add_argument_group("cluster (etcd)")
    cluster.add_argument(
        "--etcd-endpoints",
        metavar="URL[,URL...]",
        help="elect the active server through etcd at these client URLs (default: this"
        " node alone decides)",
    )
    cluster.add_argument(
        "--node",
        help="this node's name in the cluster; required with --etcd-endpoints",
    )
    cluster.add_argument(
        "--store-name",
        default="store",
        metavar="NAME",
        help="the store's name in etcd: one election per name (default: store)",
    )
    cluster.add_argument(
        "--lease-ttl",
        type=int,
        default=DEFAULT_TTL,
        metavar="SECONDS",
        help=f"seconds an elected server's lease lasts unrenewed (default {DEFAULT_TTL})",
    )
    add_metrics(parser)
    add_log_level(parser)
    return parser


def _cluster_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check the cluster options together; exits with a usage error."""
    if args.etcd_endpoints is None:
        if args.node is not None:
            parser.error("--node needs --etcd-endpoints")
        return
    try:
        args.etcd_endpoints = parse_endpoints(args.etcd_endpoints)
    except ValueError as exc:
        parser.error(f"--etcd-endpoints: {exc}")
    if not args.node:
        parser.error("--etcd-endpoints needs --node NAME")
    if not 2 <= args.lease_ttl <= 3600:
        parser.error("--lease-ttl: etcd takes 2..3600 seconds")
    if not args.store_name or "/" in args.store_name:
        parser.error("--store-name: a non-empty name without /")


def open_agent_listener(path: str) -> socket.socket:
    """Bind and listen on the agent socket, replacing a stale socket file.

    Raises:
        AgentSocketError: another agent is listening there, or binding failed.
    """
    address = unix_address(path)
    if not path.startswith("@") and os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise AgentSocketError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # left by an agent that died: nobody answers
        else:
            raise AgentSocketError(f"another agent is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AgentSocketError(f"another agent is listening on {path}") from exc
        raise AgentSocketError(f"cannot listen on {path}: {exc.strerror}") from exc
    finally:
        os.umask(old_umask)
    sock.listen(128)
    return sock


def activated_listener() -> tuple[socket.socket, str] | None:
    """The socket the service manager passed, with its name; None if not activated.

    Raises:
        AgentSocketError: it passed something else than one Unix stream socket.
    """
    try:
        sockets = listen_sockets()
    except ActivationError as exc:
        raise AgentSocketError(str(exc)) from exc
    if not sockets:
        return None
    if len(sockets) != 1 or any(
        sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM for sock in sockets
    ):
        for sock in sockets:
            sock.close()
        kinds = ", ".join(f"{sock.family.name}/{sock.type.name}" for sock in sockets)
        raise AgentSocketError(
            f"socket activation passed {kinds}; the agent takes one Unix stream socket"
            " (ListenStream=)"
        )
    name = sockets[0].getsockname()
    path = "@" + name[1:].decode(errors="replace") if isinstance(name, bytes) else str(name)
    return sockets[0], path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the agent; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _cluster_args(parser, args)
    configure_logging(args.log_level, args.log_format, service="csnap-agent")
    # One line per etcd request (several a second) would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return_freed_buffers()
    try:
        activated = activated_listener()
        if activated is not None:
            listener, path = activated
            log.info("using the socket %s passed by the service manager", path)
        else:
            listener, path = open_agent_listener(args.socket), args.socket
    except AgentSocketError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    try:
        with single_errors():
            trio.run(_main, listener, path, args)
    except MetricsListenError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    finally:
        # A passed socket belongs to the service manager: it stays for the next start.
        if activated is None and not path.startswith("@"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return EXIT_OK


async def _main(sock: socket.socket, path: str, args: argparse.Namespace) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    if args.etcd_endpoints is None:
        await _serve(listener, path, Agent(credentials=args.credentials), args.metrics)
        return
    async with EtcdClient(args.etcd_endpoints) as client:
        coordinator: Coordinator = EtcdCoordinator(
            client, node=args.node, name=args.store_name, ttl=args.lease_ttl
        )
        log.info(
            "electing through etcd at %s as node %s",
            ",".join(args.etcd_endpoints),
            args.node,
            extra={"event": "agent.cluster", "node": args.node},
        )
        await _serve(listener, path, Agent(coordinator, credentials=args.credentials), args.metrics)


async def _serve(
    listener: trio.SocketListener,
    path: str,
    agent: Agent,
    metrics_address: tuple[str, int] | None,
) -> None:
    async with trio.open_nursery() as nursery:
        metrics_url = None
        if metrics_address is not None:
            registry = AgentMetrics(agent).registry
            metrics_url = await nursery.start(serve_metrics, *metrics_address, registry)
        await nursery.start(agent.serve, listener)
        nursery.start_soon(keep_watchdog_fed, trio.sleep)
        # Signals are ours before anyone is told the agent is up.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            log.info("listening on %s", path, extra={"event": "agent.listening", "address": path})
            print(f"listening unix:{path}", flush=True)
            if metrics_url is not None:
                print(f"metrics {metrics_url}", flush=True)
            notify_ready(f"listening on {path}")
            async for signum in signals:
                log.info("%s: stopping", signal.Signals(signum).name)
                notify_stopping()
                break
        await listener.aclose()
        nursery.cancel_scope.cancel()


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
