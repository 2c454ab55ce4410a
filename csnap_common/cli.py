"""What every csnap command line shares: argparse types for sizes and
addresses, the --log-level and --log-format options, and logs on stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import TracebackType

from csnap_common.addresses import AddressError, split_host_port
from csnap_common.logs import TEXT_FORMAT, JsonFormatter
from csnap_common.sizes import SizeError, parse_size

__all__ = [
    "size_arg",
    "host_port_arg",
    "add_log_level",
    "add_metrics",
    "configure_logging",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def size_arg(text: str) -> int:
    """argparse type: "64M", "1G", "4096" -> bytes."""
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_direct(parser: argparse.ArgumentParser, what: str) -> None:
    """--direct / --no-direct: O_DIRECT for `what` (csnap_common.direct_io)."""
    parser.add_argument(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"read and write {what} with O_DIRECT, bypassing this host's page cache"
        " (default: for block devices, which another host may share; --direct for"
        " files too, --no-direct never)",
    )


def host_port_arg(text: str) -> tuple[str, int]:
    """argparse type: "HOST:PORT" or "[v6]:PORT" -> (host, port)."""
    try:
        return split_host_port(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, as every service takes them."""
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="default info")
    parser.add_argument(
        "--log-format",
        default="text",
        choices=LOG_FORMATS,
        help="text lines (the default), or one JSON object per line"
        " (fields in docs/operations.md, Logs)",
    )


def add_metrics(parser: argparse.ArgumentParser) -> None:
    """--metrics HOST:PORT, as every service takes it."""
    parser.add_argument(
        "--metrics",
        type=host_port_arg,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 picks a free"
        ' port; its URL is printed as "metrics URL"); see docs/operations.md, Monitoring',
    )


def configure_logging(level: str, log_format: str = "text", *, service: str = "csnap") -> None:
    """Log lines on stderr: text (time, logger, level, message) or JSON objects.

    In JSON, Python's warnings and an uncaught exception's traceback are log
    records too, so that stderr holds nothing but JSON lines.
    """
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


def _log_uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("csnap").critical(
        "stopped by an unexpected error: %s",
        value,
        exc_info=(kind, value, traceback),
        extra={"event": "service.crashed"},
    )
