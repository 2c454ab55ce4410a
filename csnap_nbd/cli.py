"""csnap-nbd: the command line of the NBD gateway.

One process serves many NBD connections to the origin ("origin", also the
default export) and to every live snapshot ("snap-TAG"). Once listening it
prints one "listening URL" line per listener on stdout, then flushes
(scripts and tests read them); logs go to stderr. SIGTERM and SIGINT stop
it cleanly with exit status 0.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from csnap_client import Connector, tcp_connector
from csnap_common import single_errors
from csnap_common.allocator import return_freed_buffers
from csnap_common.cli import (
    add_direct,
    add_log_level,
    add_metrics,
    configure_logging,
    host_port_arg,
)
from csnap_common.credentials import (
    ROLE_CLIENT,
    CredentialsError,
    client_context,
    store_credentials,
)
from csnap_common.metrics import MetricsListenError, serve_metrics
from csnap_common.systemd import keep_watchdog_fed, notify_ready, notify_status, notify_stopping
from csnap_nbd.exports import LINGER_SECONDS, MAX_LINGER_SECONDS
from csnap_nbd.files import checked_agent_connectors
from csnap_nbd.metrics import GatewayMetrics
from csnap_nbd.server import GatewayConfig, GatewayStartError, serve
from csnap_nbd.settings import Settings
from csnap_nbd.tls import TlsConfigError, TlsMode, TlsPolicy, server_context

__all__ = ["main", "run"]

log = logging.getLogger("csnap.nbd")

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CANNOT_START = 3

#: The IANA port for NBD.
NBD_PORT = 10809

_EPILOG = """\
examples:
  csnap-nbd --server 127.0.0.1:7000 --origin origin.img --store store.img
  csnap-nbd --agent /run/csnap/agent.sock --unix /run/csnap/nbd.sock --read-only
  nbdinfo --list nbd://127.0.0.1:10809
  qemu-img convert -O raw nbd://127.0.0.1:10809/snap-3 snap-3.raw
  csnap-nbd --server 127.0.0.1:7000 --listen 0.0.0.0:10809 --tls=require \\
      --tls-certificates=/etc/csnap/nbd-pki
  nbdinfo 'nbds://nbd1.example.com/snap-3?tls-certificates=/etc/csnap/nbd-client'

Exports: "origin" (also the empty default name) and "snap-TAG" for each live
snapshot. Without --listen or --unix, listens on 127.0.0.1:10809. Each
listener is printed on stdout as "listening nbd://HOST:PORT" or
"listening nbd+unix:///?socket=PATH" (nbds with --tls=require) once
connections are accepted, then "metrics URL" with --metrics. SIGTERM or
SIGINT answer the requests in flight and exit 0.

TLS: --tls-certificates=DIR holds ca-cert.pem, server-cert.pem and
server-key.pem (scripts/nbd-certs DIR makes them). A TCP address outside
loopback is refused without TLS unless --tls=off is given.

csnapd is reached over mutual TLS with the client (data-path) credential in
--credentials DIR (ca-cert.pem, client-cert.pem, client-key.pem; made by
`csnap keys`), by default STORE.keys beside the store. With --server, give
--credentials or --store. csnapd's paths are used unless --origin and --store
are given (then csnapd must report the same files), and only if they are
absolute, not a symbolic link, a regular file or block device owned by this
user or root.

exit status: 0 stopped cleanly, 2 bad arguments, 3 could not start (a file
would not open or may not be opened, an address is in use, certificates would
not load, no TLS outside loopback).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csnap-nbd",
        description="Export a csnap origin and its snapshots over NBD.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--agent",
        metavar="PATH",
        help="find csnapd through the csnap-agent at this socket"
        " (the default, with $CSNAP_AGENT or @csnap-agent)",
    )
    where.add_argument(
        "--server", type=host_port_arg, metavar="HOST:PORT", help="csnapd's address, directly"
    )
    parser.add_argument(
        "--listen",
        type=host_port_arg,
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="TCP address to serve NBD on (repeatable; port 0 picks a free port)",
    )
    parser.add_argument(
        "--unix", action="append", default=[], metavar="PATH", help="Unix socket to serve NBD on"
    )
    parser.add_argument(
        "--read-only", action="store_true", help="advertise read-only exports, refuse writes"
    )
    parser.add_argument(
        "--linger",
        type=_linger_arg,
        default=LINGER_SECONDS,
        metavar="SECONDS",
        help="keep a snapshot's csnapd client, and the admin connection, this long after"
        f" their last use (0 to 3600; default {LINGER_SECONDS:g})",
    )
    _add_files(parser)
    _add_tls(parser)
    add_metrics(parser)
    add_log_level(parser)
    return parser


def _linger_arg(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= seconds <= MAX_LINGER_SECONDS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_LINGER_SECONDS:g} seconds: {text!r}")
    return seconds


def _add_files(parser: argparse.ArgumentParser) -> None:
    """The options naming what the gateway opens: the store, the origin, credentials."""
    parser.add_argument(
        "--store",
        metavar="PATH",
        help="the snapshot store to serve; csnapd must report this file"
        " (default: csnapd's, through an agent only)",
    )
    parser.add_argument(
        "--origin",
        metavar="PATH",
        help="the origin to serve; csnapd must report this file"
        " (default: csnapd's, through an agent only)",
    )
    add_direct(parser, "the origin and store")
    parser.add_argument(
        "--credentials",
        type=Path,
        metavar="DIR",
        help="the cluster's ca-cert.pem and the client-cert.pem and client-key.pem"
        " csnapd is reached with (default STORE.keys beside --store, or beside"
        " the store csnapd reports through an agent)",
    )


def _add_tls(parser: argparse.ArgumentParser) -> None:
    """The options of TLS towards NBD clients."""
    parser.add_argument(
        "--tls",
        choices=[m.value for m in TlsMode],
        help="off: no TLS; on: clients may upgrade with STARTTLS; require: only TLS"
        " clients (the default with --tls-certificates; otherwise off, and only"
        " loopback TCP addresses are allowed)",
    )
    parser.add_argument(
        "--tls-certificates",
        type=Path,
        metavar="DIR",
        help="directory with ca-cert.pem, server-cert.pem, server-key.pem",
    )
    parser.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="clients must present a certificate signed by DIR/ca-cert.pem",
    )


def _tls_policy(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TlsPolicy:
    """The TLS options as one policy; contradictory ones are usage errors.

    Raises:
        TlsConfigError: the certificate directory cannot be used.
    """
    directory: Path | None = args.tls_certificates
    if args.tls is None:
        # Certificates alone mean TLS, and all of it: never plaintext by surprise.
        mode = TlsMode.REQUIRE if directory is not None else TlsMode.OFF
    else:
        mode = TlsMode(args.tls)
    if mode is TlsMode.OFF:
        if directory is not None:
            parser.error("--tls-certificates with --tls=off: choose one")
        if args.tls_verify_peer:
            parser.error("--tls-verify-peer needs TLS (--tls=on or --tls=require)")
        return TlsPolicy(plaintext_anywhere=args.tls is not None)
    if directory is None:
        parser.error(f"--tls={mode.value} needs --tls-certificates=DIR")
    context = server_context(directory, verify_peer=args.tls_verify_peer)
    return TlsPolicy(mode, context)


def _connectors(args: argparse.Namespace) -> tuple[Connector, Connector]:
    """Data and admin connectors: a fixed address, or whatever the agent says
    (an agent of our own user or root: it vouches for the server).

    Raises:
        CredentialsError: the client credential does not load.
    """
    directory: Path | None = args.credentials
    if directory is None and args.store is not None:
        directory = store_credentials(args.store)
    if args.server is not None:
        assert directory is not None  # main() checked
        # The data-path credential serves the start-up queries too: they only read.
        host, port = args.server
        connector = tcp_connector(host, port, client_context(directory, ROLE_CLIENT))
        return connector, connector
    # Imported here: the agent helpers are only needed when an agent is used.
    import csnap_client

    return checked_agent_connectors(args.agent or csnap_client.default_agent(), directory)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the gateway; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.server is not None and args.credentials is None and args.store is None:
        parser.error("--server needs --credentials DIR, or --store (whose STORE.keys is used)")
    configure_logging(args.log_level, args.log_format, service="csnap-nbd")
    return_freed_buffers()
    try:
        tls = _tls_policy(parser, args)
    except TlsConfigError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    try:
        connect, admin_connect = _connectors(args)
    except CredentialsError as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    tcp = args.listen or ([] if args.unix else [("127.0.0.1", NBD_PORT)])
    config = GatewayConfig(
        connect=connect,
        admin_connect=admin_connect,
        tcp=tcp,
        unix=args.unix,
        settings=Settings(read_only=args.read_only),
        origin=args.origin,
        store=args.store,
        tls=tls,
        # csnapd authenticated itself with a server credential of the cluster,
        # or an agent of ours named it: either way its paths pass the files rule.
        vouched=True,
        direct=args.direct,
        linger=args.linger,
    )
    try:
        with single_errors():
            trio.run(_main, config, args.metrics)
    except (GatewayStartError, MetricsListenError) as exc:
        log.error("%s", exc)
        return EXIT_CANNOT_START
    return EXIT_OK


async def _main(config: GatewayConfig, metrics_address: tuple[str, int] | None) -> None:
    stop = trio.Event()
    serving = False
    async with trio.open_nursery() as nursery:

        async def signals() -> None:
            # Watched from the start: a SIGTERM while csnapd is still being
            # looked for stops the gateway too (there is nothing to drain).
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for signum in received:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    notify_stopping()
                    stop.set()
                    if not serving:
                        nursery.cancel_scope.cancel()
                    return

        async def serve_then_stop(task_status: trio.TaskStatus[list[str]]) -> None:
            await serve(config, stop=stop, task_status=task_status)
            nursery.cancel_scope.cancel()  # the watchdog's pings end with it

        nursery.start_soon(signals)
        nursery.start_soon(keep_watchdog_fed, trio.sleep)
        metrics_url = None
        if metrics_address is not None:
            registry = GatewayMetrics(config.stats).registry
            metrics_url = await nursery.start(serve_metrics, *metrics_address, registry)
        notify_status("looking for csnapd")
        urls = await nursery.start(serve_then_stop)
        serving = True
        for url in urls:
            print(f"listening {url}")
        if metrics_url is not None:
            print(f"metrics {metrics_url}")
        sys.stdout.flush()
        log.info(
            "listening on %s",
            ", ".join(urls),
            extra={"event": "gateway.listening", "address": " ".join(urls)},
        )
        notify_ready("serving on " + ", ".join(urls))
        await stop.wait()


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
