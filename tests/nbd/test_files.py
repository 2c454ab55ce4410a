"""The gateway opens only files it was given or that a vouched-for csnapd
names: a process answering on csnapd's TCP port cannot make it open (let
alone export for writing) another file, and through an agent the paths
csnapd reports must be absolute, not symbolic links, regular files or
block devices owned by the gateway's user or root, and the agent itself
must run as the gateway's user or root. The rules one by one on real
files, then with real gateway processes against a fake csnapd and a fake
agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
import trio

from csnap_common.credentials import make_credentials, server_context
from csnap_nbd.files import FileRefusedError, FileRule, open_checked
from csnap_protocol import Role
from tests.e2e.processes import ROOT, poll, start, tail
from tests.nbd.fakeserver import serve_fake, tcp_listener, unix_listener
from tests.nbd.support import start_gateway, stop

NOBODY = 65534


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root: files and processes of another user are made")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@contextmanager
def opens_nothing() -> Iterator[None]:
    """The block leaves no descriptor open."""
    before = open_fds()
    yield
    assert open_fds() == before


def files(tmp_path: Path) -> tuple[Path, Path]:
    mine, other = tmp_path / "mine.img", tmp_path / "other.img"
    mine.write_bytes(b"m" * 4096)
    other.write_bytes(b"o" * 4096)
    return mine, other


def given(path: Path) -> FileRule:
    return FileRule("origin", "--origin", str(path), vouched=False)


VOUCHED = FileRule("origin", "--origin", None, vouched=True)


def test_a_given_file_is_opened_only_if_csnapd_names_the_same_file(tmp_path: Path) -> None:
    mine, other = files(tmp_path)
    link = tmp_path / "link.img"
    link.symlink_to(mine)
    hard = tmp_path / "hard.img"
    os.link(mine, hard)
    for reported in (mine, link, hard):
        fd, opened = open_checked(given(mine), str(reported), read_only=True)
        try:
            assert opened == str(mine) and os.pread(fd, 1, 0) == b"m"
        finally:
            os.close(fd)
    for reported in (other, tmp_path / "missing.img", tmp_path):
        with opens_nothing(), pytest.raises(FileRefusedError) as refused:
            open_checked(given(mine), str(reported), read_only=False)
        assert str(reported) in str(refused.value) and str(mine) in str(refused.value)
    with opens_nothing(), pytest.raises(FileRefusedError, match="cannot open"):
        open_checked(given(tmp_path / "gone.img"), str(mine), read_only=False)


def test_a_reported_path_needs_a_given_file_or_a_vouched_server(tmp_path: Path) -> None:
    mine, _ = files(tmp_path)
    unvouched = FileRule("store", "--store", None, vouched=False)
    with opens_nothing(), pytest.raises(FileRefusedError, match="give the store with --store"):
        open_checked(unvouched, str(mine), read_only=True)


def test_a_vouched_server_names_only_absolute_plain_files_of_our_user_or_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need_root()
    mine, other = files(tmp_path)
    fd, opened = open_checked(VOUCHED, str(mine), read_only=False)
    os.close(fd)
    assert opened == str(mine)
    link = tmp_path / "link.img"
    link.symlink_to(mine)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    os.chown(other, NOBODY, NOBODY)
    # Back where it was after the test: a later test in this worker may
    # resolve relative paths after tmp_path is gone.
    monkeypatch.chdir(tmp_path)
    refusals = {
        "mine.img": "relative path",
        str(link): "symbolic link",
        str(fifo): "neither a regular file nor a block device",
        "/dev/null": "neither a regular file nor a block device",
        str(tmp_path): "cannot open",
        str(other): f"owned by uid {NOBODY}",
    }
    for reported, reason in refusals.items():
        with opens_nothing(), pytest.raises(FileRefusedError, match=reason):
            open_checked(VOUCHED, reported, read_only=False)


# -- real gateways against a fake csnapd -------------------------------------------


async def run_gateway(*argv: str, limit: float = 30) -> subprocess.CompletedProcess[bytes]:
    """Run csnap-nbd to its exit, failing if it starts serving instead."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "csnap_nbd", "--listen", "127.0.0.1:0", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    out, err = b"", b""
    try:
        with trio.fail_after(limit):
            async with trio.open_nursery() as nursery:

                async def read_err() -> None:
                    nonlocal err
                    assert process.stderr is not None
                    while data := await process.stderr.receive_some(1 << 16):
                        err += data

                nursery.start_soon(read_err)
                while data := await process.stdout.receive_some(1 << 16):
                    out += data
                    assert b"listening" not in out, f"the gateway started serving: {err!r}"
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, out, err)


def secrets(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A file no gateway may touch, and a FIFO that blocks whoever opens it to read."""
    secret = tmp_path / "secret"
    content = b"root only\n" * 1000
    secret.write_bytes(content)
    secret.chmod(0o600)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return secret, fifo, content


async def test_a_server_naming_other_files_than_those_given_is_refused(tmp_path: Path) -> None:
    secret, fifo, content = secrets(tmp_path)
    mtime = secret.stat().st_mtime_ns
    mine, other = files(tmp_path)
    keys = tmp_path / "keys"
    make_credentials(keys)
    listener = await tcp_listener()
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        # A csnapd of the cluster (it holds a server credential) that names
        # other files than those the gateway was given.
        nursery.start_soon(
            partial(
                serve_fake, listener, origin=str(fifo), store=str(secret), tls=server_context(keys)
            )
        )
        server = ("--server", f"127.0.0.1:{port}", "--credentials", str(keys))
        given = ("--origin", str(mine), "--store", str(other))
        # Read-only: opening the FIFO to read would block, so a gateway that
        # opened a reported path would hang instead of exiting.
        result = await run_gateway(*server, *given, "--read-only")
        assert result.returncode == 3, result.stderr
        err = result.stderr.decode()
        assert f"csnapd reports origin '{fifo}', which is not {mine}" in err
        # Without the files, the reported paths must pass the rules: a FIFO
        # is neither a regular file nor a block device.
        result = await run_gateway(*server, "--read-only")
        assert result.returncode == 3, result.stderr
        assert b"neither a regular file nor a block device" in result.stderr
        # Without credentials (nor a store to find them beside): usage error.
        result = await run_gateway("--server", f"127.0.0.1:{port}")
        assert result.returncode == 2, result.stderr
        assert b"--server needs --credentials DIR, or --store" in result.stderr
        nursery.cancel_scope.cancel()
    assert secret.read_bytes() == content and secret.stat().st_mtime_ns == mtime
    assert mine.read_bytes() == b"m" * 4096 and other.read_bytes() == b"o" * 4096


async def test_a_process_squatting_on_csnapds_port_is_not_believed(tmp_path: Path) -> None:
    """Whoever answers on csnapd's port without a server credential of the
    cluster (in the clear, or with another cluster's) is never asked for
    files: the gateway keeps looking for csnapd and opens nothing."""
    secret, _fifo, content = secrets(tmp_path)
    keys, other = tmp_path / "keys", tmp_path / "other"
    make_credentials(keys)
    make_credentials(other)
    for tls in (None, server_context(other)):
        listener = await tcp_listener()
        port = listener.socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            fake = partial(serve_fake, listener, origin=str(secret), store=str(secret), tls=tls)
            nursery.start_soon(fake)
            log = tmp_path / "squatted.log"
            argv = ["csnap_nbd", "--server", f"127.0.0.1:{port}", "--credentials", str(keys)]
            gateway = start([*argv, "--listen", "127.0.0.1:0"], log, ready_timeout=5)
            with pytest.raises((RuntimeError, trio.TooSlowError)):
                await gateway  # never ready: it does not serve
            assert "authentication_failed" in log.read_text(), tail(log)
            nursery.cancel_scope.cancel()
    assert secret.read_bytes() == content


async def test_through_an_agent_reported_files_must_pass_the_rules(tmp_path: Path) -> None:
    need_root()
    mine, other = files(tmp_path)
    secret, fifo, content = secrets(tmp_path)
    os.chown(other, NOBODY, NOBODY)
    link = tmp_path / "link"
    link.symlink_to(secret)
    cases = {
        (str(link), str(mine)): "symbolic link",
        (str(mine), str(fifo)): "neither a regular file nor a block device",
        (str(mine), str(other)): f"owned by uid {NOBODY}",
        ("mine.img", str(mine)): "relative path",
    }
    for number, ((origin, store), reason) in enumerate(cases.items()):
        agent = str(tmp_path / f"agent{number}.sock")
        listener = await unix_listener(agent)
        async with trio.open_nursery() as nursery:
            fake = partial(serve_fake, listener, origin=origin, store=store, role=Role.AGENT)
            nursery.start_soon(fake)
            result = await run_gateway("--agent", agent, "--read-only")
            assert result.returncode == 3, (reason, result.stderr)
            assert reason in result.stderr.decode()
            nursery.cancel_scope.cancel()
    assert secret.read_bytes() == content
    # Files that pass: the gateway starts serving them.
    agent = str(tmp_path / "agent-ok.sock")
    listener = await unix_listener(agent)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: serve_fake(
                listener, origin=str(mine), store=str(mine), role=Role.AGENT, origin_chunks=1
            )
        )
        nbd, urls = await start_gateway(tmp_path, "--agent", agent, "--listen", "127.0.0.1:0")
        assert urls[0].startswith("nbd://")
        assert await stop(nbd) == 0
        nursery.cancel_scope.cancel()


async def test_an_agent_of_another_user_is_not_trusted(tmp_path: Path) -> None:
    need_root()
    mine, _ = files(tmp_path)
    agent = tmp_path / "agent.sock"
    fake = await start(
        [
            "tests.nbd.fakeserver",
            *("--unix", str(agent), "--uid", str(NOBODY)),
            *("--origin", str(mine), "--store", str(mine)),
        ],
        tmp_path / "fake.log",
    )
    log = tmp_path / "nbd.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        with log.open("wb") as err:
            process = await trio.lowlevel.open_process(
                [
                    sys.executable,
                    "-m",
                    "csnap_nbd",
                    "--agent",
                    str(agent),
                    "--listen",
                    "127.0.0.1:0",
                ],
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        try:
            with trio.fail_after(30):

                async def refused() -> bool:
                    return f"runs as uid {NOBODY}" in log.read_text()

                await poll(refused)
            assert "not trusting it" in log.read_text()
            process.terminate()
            with trio.fail_after(20):
                assert await process.wait() == 0
            assert process.stdout is not None
            assert await process.stdout.receive_some(1 << 16) == b""  # it never listened
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    finally:
        await fake.kill()
    assert "mine.img" not in tail(log)  # nothing was opened
