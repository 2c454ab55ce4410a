"""Which origin and store files the gateway may open, and opening them.

The gateway learns the files' paths from csnapd's server information. Over
TCP csnapd proves itself with a server credential of the cluster (mutual
TLS); through an agent, the agent's user is checked. Even so, a path csnapd
reports is used only under one of two rules (docs/nbd.md, "Which files the
gateway opens"):

  given     --origin/--store name the files: those are opened, and the
            path csnapd reports must name the same file (same device and
            inode, or the same block device), else the gateway refuses;
  vouched   csnapd authenticated itself, or was found through a csnap-agent
            running as the gateway's own user or root (checked on the
            agent's socket with SO_PEERCRED; the agent serves only servers
            of its own user or root): the reported path is opened if it is absolute,
            its last component is not a symbolic link (O_NOFOLLOW), and
            it is a regular file or block device owned by the gateway's
            user or root (checked on the open descriptor, so nothing can
            be swapped in between).

Anything else is refused with both paths named, before any file is opened.
"""

from __future__ import annotations

import os
import socket
import ssl
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import trio

from csnap_client import (
    Connector,
    agent_admin_connector,
    find_server,
    open_admin,
    open_agent_stream,
    open_tls_stream,
)
from csnap_common import split_host_port
from csnap_common.credentials import ROLE_CLIENT, client_context, store_credentials
from csnap_nbd.backing import Backing, BackingIOError

__all__ = [
    "FileRefusedError",
    "FileRule",
    "open_backing",
    "open_checked",
    "check_agent_peer",
    "checked_agent_connectors",
    "UntrustedAgentError",
]

_PEERCRED = struct.Struct("3i")


class FileRefusedError(Exception):
    """A path csnapd reports may not be opened (or would not open)."""


class UntrustedAgentError(ConnectionError):
    """The agent socket is served by a process of another user."""


@dataclass(frozen=True, slots=True)
class FileRule:
    """How to decide on the path csnapd reports for one file."""

    #: "origin" or "store", for messages.
    what: str
    #: The option that names it (--origin, --store).
    option: str
    #: The path given with that option, if any.
    given: str | None
    #: csnapd was found through an agent whose credentials were checked.
    vouched: bool


def open_backing(
    *,
    reported_origin: str,
    reported_store: str,
    origin: str | None,
    store: str | None,
    vouched: bool,
    read_only: bool,
    direct: bool | None = None,
) -> Backing:
    """Both files, each opened under its rule (the module comment), with
    O_DIRECT as `direct` says (csnap_nbd.backing).

    Raises:
        FileRefusedError: a path is not allowed, or a file would not open.
    """
    rules = (
        FileRule("origin", "--origin", origin, vouched),
        FileRule("store", "--store", store, vouched),
    )
    # Both are checked before either is opened for good: a refusal opens nothing.
    origin_fd, origin_path = open_checked(rules[0], reported_origin, read_only=read_only)
    try:
        store_fd, store_path = open_checked(rules[1], reported_store, read_only=read_only)
    except BaseException:
        os.close(origin_fd)
        raise
    try:
        return Backing.adopt(
            origin_fd, store_fd, origin=origin_path, store=store_path, direct=direct
        )
    except BackingIOError as exc:
        raise FileRefusedError(str(exc)) from exc


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
        return True
    # Two device nodes (e.g. /dev/sdb and a node made elsewhere) of one disk.
    return stat.S_ISBLK(a.st_mode) and stat.S_ISBLK(b.st_mode) and a.st_rdev == b.st_rdev


def open_checked(rule: FileRule, reported: str, *, read_only: bool) -> tuple[int, str]:
    """Open the file `rule` allows for the path csnapd reports; (fd, path opened).

    Raises:
        FileRefusedError: the path is not allowed, or the file would not open.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
    if rule.given is not None:
        return _open_given(rule, reported, rule.given, flags)
    if not rule.vouched:
        raise FileRefusedError(
            f"csnapd reports {rule.what} {reported!r}, but csnapd is reached over TCP,"
            f" which does not authenticate it: give the {rule.what} with {rule.option}"
        )
    return _open_vouched(rule, reported, flags)


def _open_given(rule: FileRule, reported: str, given: str, flags: int) -> tuple[int, str]:
    try:
        wanted = os.stat(given)
    except OSError as exc:
        raise FileRefusedError(f"cannot open {given}: {exc.strerror}") from exc
    try:
        named = os.stat(reported)
    except OSError as exc:
        raise FileRefusedError(
            f"csnapd reports {rule.what} {reported!r}, which is not {given}"
            f" given with {rule.option} ({reported}: {exc.strerror}); refusing to serve"
        ) from exc
    if not _same_file(named, wanted):
        raise FileRefusedError(
            f"csnapd reports {rule.what} {reported!r}, which is not {given}"
            f" given with {rule.option}; refusing to serve"
        )
    fd = _open(given, flags)
    # What was opened is what was compared, not a file swapped in meanwhile.
    if not _same_file(os.fstat(fd), wanted):
        os.close(fd)
        raise FileRefusedError(f"{given} changed while it was being opened; refusing to serve")
    return fd, given


def _open_vouched(rule: FileRule, reported: str, flags: int) -> tuple[int, str]:
    if not os.path.isabs(reported):
        raise FileRefusedError(
            f"csnapd reports {rule.what} {reported!r}, a relative path: start csnapd"
            f" with absolute paths, or give the {rule.what} with {rule.option}"
        )
    try:
        # O_NONBLOCK: opening a FIFO to read would otherwise wait for a writer.
        fd = os.open(reported, flags | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise FileRefusedError(
            f"cannot open {rule.what} {reported} reported by csnapd: {exc.strerror}"
            " (a symbolic link is not followed: give the real path)"
        ) from exc
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise FileRefusedError(
                f"csnapd reports {rule.what} {reported}, which is neither a regular file"
                " nor a block device; refusing to serve"
            )
        if st.st_uid not in (os.geteuid(), 0):
            raise FileRefusedError(
                f"csnapd reports {rule.what} {reported}, owned by uid {st.st_uid}, neither"
                f" this gateway's user (uid {os.geteuid()}) nor root; give it with {rule.option}"
                " if it is meant to be served"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, reported


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags)
    except OSError as exc:
        raise FileRefusedError(f"cannot open {path}: {exc.strerror}") from exc


def check_agent_peer(sock: socket.socket | trio.socket.SocketType, where: str) -> None:
    """Refuse an agent socket served by a process of neither our user nor root.

    The agent vouches for the server whose paths the gateway then opens; an
    abstract socket name can be taken by anyone, so its owner is checked.

    Raises:
        UntrustedAgentError: another user's process listens there.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    if uid not in (os.geteuid(), 0):
        raise UntrustedAgentError(
            f"the agent at {where} runs as uid {uid} (pid {pid}), neither this gateway's"
            f" user (uid {os.geteuid()}) nor root; not trusting it"
        )


def checked_agent_connectors(path: str, credentials: Path | None) -> tuple[Connector, Connector]:
    """Data and admin connectors through the agent at `path`, each of which
    first checks that the agent runs as our user or root.

    The data connector reaches csnapd with the client credential in
    `credentials`; None: STORE.keys beside the store the server reports.
    """
    admin = agent_admin_connector(path)
    contexts: list[ssl.SSLContext] = []

    async def tls() -> ssl.SSLContext:
        if not contexts:
            directory = credentials
            if directory is None:
                async with open_admin(checked_admin) as session:
                    info = await session.server_info()
                directory = store_credentials(str(info["store"]))
            contexts.append(client_context(directory, ROLE_CLIENT))
        return contexts[0]

    async def data() -> trio.abc.Stream:
        where = await find_server(path, wait=True)
        host, port = split_host_port(where.address)
        return await open_tls_stream(host, port, await tls())

    async def checked_admin() -> trio.abc.Stream:
        stream = await admin()
        try:
            assert isinstance(stream, trio.SocketStream)
            check_agent_peer(stream.socket, path)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream

    async def checked_data() -> trio.abc.Stream:
        # The agent names the server's address: it is vouched for first.
        probe = await open_agent_stream(path)
        try:
            check_agent_peer(probe.socket, path)
        finally:
            await trio.aclose_forcefully(probe)
        return await data()

    return checked_data, checked_admin
