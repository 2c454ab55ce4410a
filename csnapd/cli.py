"""csnapd: the command line of the metadata server.

The first line of stdout is "listening HOST:PORT" once the server accepts
connections (scripts and tests read it); logs go to stderr. SIGTERM and
SIGINT finish in-flight work, mark the store clean and exit 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from csnap_common import single_errors
from csnap_common.allocator import return_freed_buffers
from csnap_common.cli import (
    add_direct,
    add_log_level,
    add_metrics,
    configure_logging,
    host_port_arg,
    size_arg,
)
from csnap_common.metrics import MetricsListenError, serve_metrics
from csnap_common.systemd import keep_watchdog_fed, notify_ready, notify_status, notify_stopping
from csnapd.credentials import CredentialsError
from csnapd.engine import EngineError, FencedError, StoreLockedError
from csnapd.metrics import CsnapdMetrics
from csnapd.server import ServerConfig, ServerFailedError, ServerFencedError, serve
from csnapd.space_watch import DEFAULT_WARN_AT, SpacePolicy, keep_free_arg, warn_at_arg

__all__ = ["main", "run"]

log = logging.getLogger("csnapd")

EXIT_OK = 0
EXIT_FAILED = 1  # the engine failed while serving: restart to replay
EXIT_USAGE = 2
EXIT_CANNOT_START = 3  # the store could not be opened (locked, damaged, missing)
EXIT_FENCED = 4  # lost its lease or saw a newer token: another server owns the store

_EPILOG = """\
examples:
  csnapd store.img origin.img --listen 127.0.0.1:7000
  csnapd store.img origin.img --agent @csnap-agent
  csnap keys /etc/csnap/keys
  csnapd /dev/vg/snapstore /dev/vg/data --listen 0.0.0.0:7000 --cache-size 256M \
      --credentials /etc/csnap/keys

Every connection is mutual TLS with a credential of the cluster's CA. Without
--credentials, csnapd uses STORE.keys beside a store file, and makes it when
listening on loopback; elsewhere it refuses to start without credentials.

The first line on stdout is "listening HOST:PORT" once connections are
accepted (port 0 picks a free port); with --agent, once the port is bound and
the server waits on standby for the agent to start it; with --metrics, the
next line is "metrics URL" (docs/operations.md, Monitoring). SIGTERM or SIGINT finish the work in
flight, mark the store clean and exit 0.

exit status: 0 stopped cleanly, 1 the store failed while serving (restart
replays the journal), 2 bad arguments, 3 the store could not be opened
(missing, not a store, or held by another csnapd) or no credentials, 4
fenced: its agent's cluster election was lost (lease not renewed in time, or
a newer fencing token in the store); restart it to stand by again.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csnapd",
        description="The csnap metadata server: owns a snapshot store and answers clients.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("store", help="the snapshot store (made by mkcsnap)")
    parser.add_argument("origin", help="the origin volume the store was made for")
    parser.add_argument(
        "--listen",
        type=host_port_arg,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:0, a free port)",
    )
    parser.add_argument(
        "--agent",
        metavar="SOCKET",
        help="register with this node's csnap-agent (a Unix socket path, or @name)"
        " and wait on standby, store unopened, until it starts this server",
    )
    parser.add_argument(
        "--cache-size",
        type=size_arg,
        default="64M",
        metavar="SIZE",
        help="metadata cache bound, e.g. 64M (default 64M)",
    )
    _add_clients(parser)
    _add_space(parser)
    add_direct(parser, "the store and origin")
    add_metrics(parser)
    parser.add_argument(
        "--credentials",
        type=Path,
        metavar="DIR",
        help="the cluster's ca-cert.pem and this server's server-cert.pem and"
        " server-key.pem (made by `csnap keys DIR`; default STORE.keys, made"
        " there when listening on loopback)",
    )
    add_log_level(parser)
    return parser


def _add_clients(parser: argparse.ArgumentParser) -> None:
    """The options bounding what clients may hold, and for how long."""
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after a crash, how long origin writes wait for snapshot clients"
        " to re-declare their reads (default 30)",
    )
    parser.add_argument(
        "--barrier-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long a snapshot create waits for origin clients (default 30)",
    )
    parser.add_argument(
        "--lease",
        type=_lease_arg,
        default=5.0,
        metavar="SECONDS",
        help="how long a data-path client may stay silent before it is dropped and"
        " its read locks and barrier duty released (default 5; clients send"
        " keepalives every third of it)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        help="connections open at once, counted from accept (default 1024)",
    )
    parser.add_argument("--max-in-flight", type=int, default=256, help="requests per connection")


def _add_space(parser: argparse.ArgumentParser) -> None:
    """The options of the store-full policy: the warning threshold and the reserve."""
    parser.add_argument(
        "--warn-at",
        type=warn_at_arg,
        default=DEFAULT_WARN_AT,
        metavar="PERCENT",
        help=f"log store.filling and set the status reply's space_warning when the data"
        f" area's use reaches this share, e.g. 80%% (default {DEFAULT_WARN_AT}%%; off to disable)",
    )
    parser.add_argument(
        "--keep-free",
        type=keep_free_arg,
        default=None,
        metavar="PERCENT",
        help="squash expendable snapshots in the background, lowest priority first, to"
        " keep this share of the data area free, e.g. 5%% (default off)",
    )


def _lease_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.05 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"a lease is 0.05 to 3600 seconds, not {text!r}")
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Run csnapd; returns the exit status."""
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format, service="csnapd")
    return_freed_buffers()
    host, port = args.listen
    config = ServerConfig(
        store=args.store,
        origin=args.origin,
        host=host,
        port=port,
        cache_bytes=args.cache_size,  # argparse applies size_arg to the default too
        grace=args.grace,
        barrier_timeout=args.barrier_timeout,
        lease=args.lease,
        max_connections=args.max_connections,
        max_in_flight=args.max_in_flight,
        agent=args.agent,
        space=SpacePolicy(warn_at=args.warn_at, keep_free=args.keep_free),
        credentials=args.credentials,
        direct=args.direct,
    )
    try:
        with single_errors():
            trio.run(_main, config, args.metrics)
    except MetricsListenError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    except CredentialsError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    except StoreLockedError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    except FencedError as exc:
        log.critical("fenced before serving: %s", exc)
        return EXIT_FENCED
    except EngineError as exc:
        log.error("cannot open the store: %s", exc)
        return EXIT_CANNOT_START
    except ServerFailedError as exc:
        log.critical("%s", exc)
        return EXIT_FAILED
    except ServerFencedError as exc:
        log.critical("fenced: %s", exc)
        return EXIT_FENCED
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", host, port, exc.strerror or exc)
        return EXIT_CANNOT_START
    return EXIT_OK


async def _main(config: ServerConfig, metrics_address: tuple[str, int] | None) -> None:
    stop = trio.Event()
    metrics = CsnapdMetrics(standby=config.agent is not None)
    async with trio.open_nursery() as nursery:

        async def serve_then_stop(task_status: trio.TaskStatus[str]) -> None:
            await serve(config, stop=stop, on_start=metrics.attach, task_status=task_status)
            nursery.cancel_scope.cancel()  # also after an admin's shutdown

        nursery.start_soon(_signals, stop)
        nursery.start_soon(keep_watchdog_fed, trio.sleep)
        metrics_url = None
        if metrics_address is not None:
            # Before the store opens: a standby server is scraped too.
            metrics_url = await nursery.start(
                partial(serve_metrics, *metrics_address, metrics.registry, guard=metrics.guard)
            )
        if config.agent is None:
            notify_status(f"opening the store {config.store}")
        else:  # ready once registered on standby: see csnapd.agent_link
            notify_status(f"registering with agent {config.agent}")
        address = await nursery.start(serve_then_stop)
        print(f"listening {address}", flush=True)
        if metrics_url is not None:
            print(f"metrics {metrics_url}", flush=True)
        if config.agent is None:
            notify_ready(f"active: serving {config.store} on {address}")


async def _signals(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            notify_stopping()
            stop.set()
            return


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
