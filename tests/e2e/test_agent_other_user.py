"""The agent's Unix socket admits only its own user and root
(docs/operations.md, "Securing a cluster"): a process of another user that
reaches the socket is refused with `wrong_role` naming its uid, and the
agent goes on serving its own.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import trio

from csnap_client import ServerError, find_server
from csnap_protocol import Connection, Error, ErrorCode, Role
from tests.e2e.processes import start_agent

#: The unprivileged user the intruding process becomes (Debian's nobody).
INTRUDER_UID = 65534


def _as_another_user(address: str, hello: bytes, out: int) -> None:
    """In a forked child: become INTRUDER_UID, say hello, write back what came."""
    try:
        os.setgroups([])
        os.setgid(INTRUDER_UID)
        os.setuid(INTRUDER_UID)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(address)
            sock.sendall(hello)
            while chunk := sock.recv(1 << 16):
                os.write(out, chunk)
    finally:
        os._exit(0)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 1 << 16):
        data += chunk
    return data


async def test_a_peer_of_another_user_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the suite runs as root: it becomes another user to test this"
    # An abstract socket: any user can reach it, so only the agent's own check stands.
    name = f"@csnap-test-other-user-{os.getpid()}"
    agent = await start_agent(Path(name), tmp_path / "agent.log")
    try:
        codec = Connection(Role.ADMIN, name="intruder")
        hello = codec.hello()
        read_end, write_end = os.pipe()
        child = os.fork()
        if child == 0:
            os.close(read_end)
            _as_another_user("\0" + name[1:], hello, write_end)
        os.close(write_end)
        with trio.fail_after(20):
            reply = await trio.to_thread.run_sync(_read_all, read_end)
            _, status = await trio.to_thread.run_sync(os.waitpid, child, 0)
        os.close(read_end)
        assert os.waitstatus_to_exitcode(status) == 0
        codec.receive_data(reply)
        refusal = codec.next_message()
        assert isinstance(refusal, Error), refusal
        assert refusal.code == ErrorCode.WRONG_ROLE
        assert f"uid {INTRUDER_UID} may not use this agent" in refusal.message
        # Its own user is still served (no server registered: it says so).
        with trio.fail_after(10), pytest.raises(ServerError) as answered:
            await find_server(name, wait=False)
        assert answered.value.error is ErrorCode.NO_SERVER
    finally:
        assert await agent.stop() == 0
