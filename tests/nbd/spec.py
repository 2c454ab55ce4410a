"""What the NBD specification says a server answers to a request, written
from the specification (doc/proto.md of the NBD project) and docs/nbd.md,
independently of csnap_nbd's own checks: the tests compare the gateway's
replies with it."""

from __future__ import annotations

from dataclasses import dataclass

from csnap_nbd.wire.constants import Command, CommandFlag, Errno

__all__ = ["Session", "expected_error", "COMMANDS", "FLAGS"]

#: The gateway's advertised maximum block size.
MAX_BLOCK = 32 << 20
#: Every command number worth sending: the eight served, RESIZE, and unknown ones.
COMMANDS = (*range(9), 42, 0xFFFF)
#: Single flags and a few combinations, documented and not.
FLAGS = (
    0,
    int(CommandFlag.FUA),
    int(CommandFlag.NO_HOLE),
    int(CommandFlag.DF),
    int(CommandFlag.REQ_ONE),
    int(CommandFlag.FAST_ZERO),
    int(CommandFlag.PAYLOAD_LEN),
    1 << 9,
    int(CommandFlag.FUA | CommandFlag.REQ_ONE),
    int(CommandFlag.FUA | CommandFlag.NO_HOLE),
    0xFFFF,
)


@dataclass(frozen=True)
class Session:
    """What a connection negotiated."""

    size: int
    structured: bool
    contexts: int
    read_only: bool


def _valid_flags(command: int, session: Session) -> int:
    """Command flags the client may send: documented for the command and advertised."""
    flags = int(CommandFlag.FUA)  # SEND_FUA is always advertised
    if command == Command.READ and session.structured:
        flags |= int(CommandFlag.DF)  # SEND_DF comes with structured replies
    if command == Command.WRITE_ZEROES:
        flags |= int(CommandFlag.NO_HOLE)  # FAST_ZERO is never advertised
    if command == Command.BLOCK_STATUS:
        flags |= int(CommandFlag.REQ_ONE)
    return flags


def expected_error(command: int, flags: int, offset: int, length: int, session: Session) -> int:
    """The error the reply carries (0 for success); DISC has no reply at all."""
    if command not in range(8):
        return Errno.EINVAL  # unknown command (RESIZE is not served)
    if command in (Command.WRITE, Command.TRIM, Command.WRITE_ZEROES) and session.read_only:
        return Errno.EPERM
    if flags & ~_valid_flags(command, session):
        return Errno.EINVAL
    if command == Command.BLOCK_STATUS and not (session.structured and session.contexts):
        return Errno.EINVAL
    if command == Command.FLUSH:
        return Errno.EINVAL if offset or length else 0
    sized = (Command.READ, Command.WRITE, Command.WRITE_ZEROES, Command.CACHE)
    if command in sized and length > MAX_BLOCK:
        return Errno.EINVAL
    if command == Command.BLOCK_STATUS and length == 0:
        return Errno.EINVAL
    if offset + length > session.size:
        return Errno.ENOSPC if command in (Command.WRITE, Command.WRITE_ZEROES) else Errno.EINVAL
    return 0
