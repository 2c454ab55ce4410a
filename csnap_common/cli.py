# What every csnap command line shares: argparse types for sizes and
# addresses, the --log-level option, and one log format on stderr.
from __future__ import annotations

import argparse
import logging
import sys

from csnap_common.addresses import AddressError, split_host_port
from csnap_common.sizes import SizeError, parse_size

__all__ = ["size_arg", "host_port_arg", "add_log_level", "configure_logging"]

LOG_LEVELS = ("debug", "info", "warning", "error")


def size_arg(text: str) -> int:
    """argparse type: "64M", "1G", "4096" -> bytes."""
    try:
        return parse_size(text)
    except SizeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def host_port_arg(text: str) -> tuple[str, int]:
    """argparse type: "HOST:PORT" or "[v6]:PORT" -> (host, port)."""
    try:
        return split_host_port(text)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="default info")


def configure_logging(level: str) -> None:
    """Log lines on stderr: time, logger, level, message."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
