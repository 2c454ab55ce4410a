"""`csnap send` and `csnap receive --listen` between two stores, the receiver
(its agent, csnapd, gateway and `csnap receive`) in a network namespace of
its own, reached over a veth pair: a send cut mid-stream (the sender killed)
resumes where it stopped, and the receiver ends with snapshot 2 identical
to the sender's and its snapshot 1 unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from csnap_client import find_server
from csnap_common.credentials import store_credentials
from csnap_format.mkcsnap import format_store
from tests.compare import assert_same_bytes
from tests.e2e.processes import ROOT, Daemon, csnap, poll, start_agent, tail
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    Gateway,
    gateway,
    nbdcopy_to_bytes,
    need,
    open_log,
    qemu_io,
    ready_lines,
    run,
    stop,
)

pytestmark = [pytest.mark.e2e]

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


async def sh(*argv: str) -> None:
    await trio.run_process(list(argv), capture_stdout=True, capture_stderr=True)


@asynccontextmanager
async def namespace(tag: str) -> AsyncIterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (name, our address, its address)."""
    name, here, there = f"csnap-{tag}", f"cs{tag}a", f"cs{tag}b"
    # A subnet of its own per test process, so that parallel runs do not meet.
    subnet = f"10.231.{int(tag) % 250}"
    ours, theirs = f"{subnet}.1", f"{subnet}.2"
    await sh("ip", "netns", "add", name)
    try:
        await sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        await sh("ip", "link", "set", there, "netns", name)
        await sh("ip", "addr", "add", f"{ours}/24", "dev", here)
        await sh("ip", "link", "set", here, "up")
        inside = ("ip", "netns", "exec", name, "ip")
        await sh(*inside, "addr", "add", f"{theirs}/24", "dev", there)
        await sh(*inside, "link", "set", there, "up")
        await sh(*inside, "link", "set", "lo", "up")
        yield name, ours, theirs
    finally:
        with trio.CancelScope(shield=True):
            await trio.run_process(["ip", "link", "del", here], check=False, capture_stderr=True)
            await sh("ip", "netns", "del", name)


async def start_in(ns: str, argv: list[str], log: Path, *, lines: int = 1) -> tuple[Daemon, str]:
    """`python -m argv` inside namespace `ns`; returns it and its first `lines` lines."""
    err = open_log(log)
    process = await trio.lowlevel.open_process(
        ["ip", "netns", "exec", ns, sys.executable, "-m", *argv],
        stdout=subprocess.PIPE,
        stderr=err,
        env=ENV,
    )
    err.close()
    text = await ready_lines(process, lines, argv[0], log)
    return Daemon(process, text.splitlines()[0], log), text


async def write_all(gw: Gateway, writes: list[tuple[int, int]], byte: int) -> None:
    commands = [f"write -P {byte:#x} {offset} {length}" for offset, length in writes]
    await run(*qemu_io(gw.url("origin"), *commands))


async def test_send_is_cut_resumes_and_the_receiver_ends_with_the_same_snapshot(
    tmp_path: Path,
) -> None:
    need("qemu-io", "nbdcopy", "ip")
    sender_sock = tmp_path / "sender.sock"
    sender_agent = await start_agent(sender_sock, tmp_path / "sender-agent.log")
    daemons: list[Daemon] = [sender_agent]
    try:
        sender_dir = tmp_path / "sender"
        sender_dir.mkdir()
        async with gateway(sender_dir, csnapd_args=["--agent", str(sender_sock)]) as sender:
            with trio.fail_after(30):
                await find_server(str(sender_sock), wait=True)
            await write_all(sender, [(0, 2 * CHUNK)], 0x11)
            assert (await csnap(sender_sock, "create", "1")).returncode == 0
            # Patterns qemu-io writes are one byte repeated; uncompressed, the
            # delta is about 1.3 MiB: at 256 KiB/s the first send lasts seconds.
            await write_all(sender, [(40 * CHUNK, 320 * CHUNK), (3000 * CHUNK + 5, 5)], 0x22)
            assert (await csnap(sender_sock, "create", "2")).returncode == 0
            first = await nbdcopy_to_bytes(sender.url("snap-1"), tmp_path, "s1.raw")
            second = await nbdcopy_to_bytes(sender.url("snap-2"), tmp_path, "s2.raw")

            async with namespace(str(os.getpid() % 100_000)) as (ns, _, address):
                receiver_dir = tmp_path / "receiver"
                receiver_dir.mkdir()
                store, origin = receiver_dir / "store.img", receiver_dir / "origin.img"
                format_store(
                    str(store),
                    str(origin),
                    store_size=64 << 20,
                    origin_size=ORIGIN_SIZE,
                    progress=False,
                )
                origin.write_bytes(first)
                receiver_sock = receiver_dir / "agent.sock"
                agent, _ = await start_in(
                    ns, ["csnap_agent", "--socket", str(receiver_sock)], receiver_dir / "agent.log"
                )
                daemons.append(agent)
                server, _ = await start_in(
                    ns,
                    ["csnapd", str(store), str(origin), "--agent", str(receiver_sock)],
                    receiver_dir / "csnapd.log",
                )
                daemons.append(server)
                with trio.fail_after(30):
                    await find_server(str(receiver_sock), wait=True)
                socket = receiver_dir / "nbd.sock"
                nbd, _ = await start_in(
                    ns,
                    ["csnap_nbd", "--unix", str(socket), "--origin", str(origin), "--store",
                     str(store), "--agent", str(receiver_sock)],
                    receiver_dir / "nbd.log",
                )  # fmt: skip
                daemons.append(nbd)
                assert (await csnap(receiver_sock, "create", "1")).returncode == 0

                spool = receiver_dir / "spool"
                spool.mkdir()
                listener, said = await start_in(
                    ns,
                    ["csnap_agent.ctl", "--agent", str(receiver_sock), "receive", "--listen",
                     f"{address}:0", "--spool", str(spool)],
                    receiver_dir / "receive.log",
                )  # fmt: skip
                daemons.append(listener)
                port = said.split()[1].rpartition(":")[2]

                async def partial_arrived() -> bool:
                    return any(p.endswith(".partial") for p in os.listdir(spool))

                delta = tmp_path / "1-2.delta"
                receiver = f"{address}:{port}"
                argv = [sys.executable, "-m", "csnap_agent.ctl", "--agent", str(sender_sock),
                        "send", "1", "2", "--to", receiver, "--delta", str(delta)]  # fmt: skip
                # The sender's own cluster credential is not the receiver's:
                # refused at the handshake, before a byte of the delta arrives.
                with trio.fail_after(60):
                    foreign = await trio.run_process(
                        argv, capture_stdout=True, capture_stderr=True, env=ENV, check=False
                    )
                assert foreign.returncode != 0
                assert "TLS handshake" in foreign.stderr.decode(), foreign.stderr.decode()
                assert os.listdir(spool) == []
                # An admin credential of the receiver's CA is let in.
                argv += ["--credentials", str(store_credentials(store))]
                # The first send is killed mid-stream: a part arrives and stays.
                cut = await trio.lowlevel.open_process([*argv, "--rate", "256K"], env=ENV)
                try:
                    with trio.fail_after(30):
                        await poll(partial_arrived)
                    await trio.sleep(1.0)
                finally:
                    cut.kill()
                    await cut.wait()
                (partial,) = [spool / p for p in os.listdir(spool)]
                held = partial.stat().st_size
                delta_bytes = delta.stat().st_size
                assert 0 < held < delta_bytes

                # Sent again: it resumes where the first stopped.
                with trio.fail_after(60):
                    again = await trio.run_process(
                        [*argv, "--json"], capture_stdout=True, capture_stderr=True, env=ENV,
                        check=False,
                    )  # fmt: skip
                assert again.returncode == 0, again.stderr.decode()
                # The receiver may still have spooled what was in flight when
                # the first sender died: it resumes at least where we looked.
                sent = json.loads(again.stdout)
                assert sent["resumed_at"] >= held and sent["bytes"] == delta_bytes, sent
                with trio.fail_after(30):
                    assert await listener.process.wait() == 0, tail(listener.log)
                assert not os.listdir(spool)
                assert not delta.exists()

                url = f"nbd+unix:///snap-2?socket={socket}"
                got = await nbdcopy_to_bytes(url, tmp_path, "r2.raw")
                assert_same_bytes(got, second, "received snapshot 2")
                url = f"nbd+unix:///snap-1?socket={socket}"
                kept = await nbdcopy_to_bytes(url, tmp_path, "r1.raw")
                assert_same_bytes(kept, first, "the receiver's snapshot 1")
                for daemon in reversed(daemons[1:]):
                    await stop(daemon)
    finally:
        with trio.CancelScope(shield=True):
            for daemon in reversed(daemons):
                if daemon.process.returncode is None:
                    daemon.process.kill()
                    await daemon.process.wait()
