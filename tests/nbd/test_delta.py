"""`csnap delta` and `csnap apply` against real processes (csnap-agent,
csnapd, csnap-nbd): a full copy of snapshot 1 made with nbdcopy, plus the
delta 1 -> 2 applied to it, is snapshot 2's image byte for byte, with and
without compression, and again after a second apply; a damaged delta, an
image of another base or size, are refused and leave the image untouched.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import trio

from csnap_client import find_server
from csnap_delta.layout import DeltaHeader, ExtentHeader
from tests.compare import assert_same_bytes
from tests.e2e.processes import csnap, start_agent
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    Gateway,
    chunks_of,
    gateway,
    nbdcopy_to_bytes,
    need,
    qemu_io,
    run,
    stop,
)

pytestmark = [pytest.mark.e2e]


async def write_all(gw: Gateway, export: str, writes: list[tuple[int, int]], byte: int) -> None:
    commands = [f"write -P {byte:#x} {offset} {length}" for offset, length in writes]
    await run(*qemu_io(gw.url(export), *commands))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_full_copy_plus_the_delta_is_the_newer_snapshot(tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy")
    sock = tmp_path / "agent.sock"
    agent = await start_agent(sock, tmp_path / "agent.log")
    try:
        async with gateway(tmp_path, csnapd_args=["--agent", str(sock)]) as gw:
            with trio.fail_after(30):
                await find_server(str(sock), wait=True)
            between = [(3 * CHUNK, CHUNK), (100 * CHUNK + 17, 100), (2000 * CHUNK, 300 * CHUNK)]
            await write_all(gw, "origin", [(0, 2 * CHUNK)], 0x11)
            assert (await csnap(sock, "create", "1")).returncode == 0
            await write_all(gw, "origin", between, 0x22)
            assert (await csnap(sock, "create", "2")).returncode == 0
            await write_all(gw, "origin", [(3 * CHUNK, 10), (4000 * CHUNK, CHUNK)], 0x33)
            own = [(1500 * CHUNK + 3, 1)]
            await write_all(gw, "snap-2", own, 0x44)
            changed = chunks_of(between) | chunks_of(own)

            full = tmp_path / "snap-1.raw"
            full.write_bytes(await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path, "copy-1.raw"))
            newer = await nbdcopy_to_bytes(gw.url("snap-2"), tmp_path, "copy-2.raw")

            plain, packed = tmp_path / "1-2.delta", tmp_path / "1-2.zdelta"
            made = await csnap(sock, "--json", "delta", "1", "2", "-o", str(plain))
            assert made.returncode == 0, made.stderr
            # Exactly the changed chunks, and little more than their bytes.
            assert json.loads(made.stdout)["chunks"] == len(changed)
            made = await csnap(sock, "delta", "1", "2", "-o", str(packed), "--compress")
            assert made.returncode == 0, made.stderr
            assert plain.stat().st_size <= 1.02 * len(changed) * CHUNK + 256
            assert packed.stat().st_size < plain.stat().st_size
            header = DeltaHeader.decode(plain.read_bytes()[: DeltaHeader.SIZE])
            assert (header.from_tag, header.to_tag, header.chunk_size) == (1, 2, CHUNK)
            assert header.origin_chunks * CHUNK == ORIGIN_SIZE

            # A full delta, from nothing: onto an all-zero image it makes snapshot 1.
            whole = tmp_path / "full-1.delta"
            made = await csnap(sock, "delta", "none", "1", "-o", str(whole), "--compress")
            assert made.returncode == 0, made.stderr
            assert DeltaHeader.decode(whole.read_bytes()[: DeltaHeader.SIZE]).full
            zeroes = tmp_path / "zeroes.raw"
            zeroes.write_bytes(bytes(ORIGIN_SIZE))
            applied = await csnap(sock, "apply", str(whole), "--to", str(zeroes))
            assert applied.returncode == 0, applied.stderr
            assert_same_bytes(zeroes.read_bytes(), full.read_bytes(), "full delta applied")

            for delta in (plain, packed):
                image = tmp_path / f"restore-{delta.suffix}.raw"
                shutil.copyfile(full, image)
                applied = await csnap(sock, "apply", str(delta), "--to", str(image))
                assert applied.returncode == 0, applied.stderr
                assert_same_bytes(image.read_bytes(), newer, f"{delta.name} applied")
                # Again: every extent is already in place; nothing changes.
                again = await csnap(sock, "--json", "apply", str(delta), "--to", str(image))
                assert again.returncode == 0 and '"written_chunks": 0' in again.stdout
                assert_same_bytes(image.read_bytes(), newer, f"{delta.name} applied twice")

            # Refusals leave the image as it was.
            image = tmp_path / "refused.raw"
            shutil.copyfile(full, image)
            before = sha(image)
            damaged = tmp_path / "damaged.delta"
            data = bytearray(plain.read_bytes())
            data[DeltaHeader.SIZE + ExtentHeader.SIZE + 5] ^= 0x40  # the first extent's data
            damaged.write_bytes(bytes(data))
            cut = tmp_path / "cut.delta"
            cut.write_bytes(plain.read_bytes()[:-10])
            for bad, why in ((damaged, "checksum"), (cut, "cut short")):
                refused = await csnap(sock, "apply", str(bad), "--to", str(image))
                assert refused.returncode == 1 and why in refused.stderr, refused.stderr
                assert sha(image) == before
            other = tmp_path / "other-base.raw"
            other.write_bytes(bytes(ORIGIN_SIZE))
            refused = await csnap(sock, "apply", str(plain), "--to", str(other))
            assert refused.returncode == 1 and "not an image of snapshot 1" in refused.stderr
            assert other.read_bytes() == bytes(ORIGIN_SIZE)
            small = tmp_path / "small.raw"
            small.write_bytes(bytes(CHUNK))
            refused = await csnap(sock, "apply", str(plain), "--to", str(small))
            assert refused.returncode == 1 and "holds 4096 bytes" in refused.stderr
            # No delta from a snapshot that does not exist, and no file left.
            missing = await csnap(sock, "delta", "1", "9", "-o", str(tmp_path / "none.delta"))
            assert missing.returncode == 1 and not (tmp_path / "none.delta").exists()
            assert not list(await trio.Path(tmp_path).glob("*.partial"))
    finally:
        with trio.CancelScope(shield=True):
            await stop(agent)


async def test_a_store_receives_a_delta_and_ends_with_the_same_snapshot(tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy")
    sender_dir, receiver_dir = tmp_path / "sender", tmp_path / "receiver"
    sender_dir.mkdir()
    receiver_dir.mkdir()
    sender_sock, receiver_sock = tmp_path / "sender.sock", tmp_path / "receiver.sock"
    agents = [
        await start_agent(sender_sock, tmp_path / "sender-agent.log"),
        await start_agent(receiver_sock, tmp_path / "receiver-agent.log"),
    ]
    try:
        async with gateway(sender_dir, csnapd_args=["--agent", str(sender_sock)]) as sender:
            with trio.fail_after(30):
                await find_server(str(sender_sock), wait=True)
            await write_all(sender, "origin", [(0, 2 * CHUNK)], 0x11)
            assert (await csnap(sender_sock, "create", "1")).returncode == 0
            between = [(5 * CHUNK, 3 * CHUNK), (3000 * CHUNK + 9, 9)]
            await write_all(sender, "origin", between, 0x22)
            assert (await csnap(sender_sock, "create", "2")).returncode == 0
            await write_all(sender, "snap-2", [(77 * CHUNK, CHUNK)], 0x33)
            first = await nbdcopy_to_bytes(sender.url("snap-1"), tmp_path, "s1.raw")
            second = await nbdcopy_to_bytes(sender.url("snap-2"), tmp_path, "s2.raw")
            delta = tmp_path / "1-2.delta"
            made = await csnap(sender_sock, "delta", "1", "2", "-o", str(delta), "--compress")
            assert made.returncode == 0, made.stderr
            whole = tmp_path / "full-1.delta"
            made = await csnap(sender_sock, "delta", "none", "1", "-o", str(whole), "--compress")
            assert made.returncode == 0, made.stderr

        # The receiver's origin starts as snapshot 1 (a full copy), and takes snapshot 1.
        async with gateway(
            receiver_dir, image=first, csnapd_args=["--agent", str(receiver_sock)]
        ) as receiver:
            with trio.fail_after(30):
                await find_server(str(receiver_sock), wait=True)
            assert (await csnap(receiver_sock, "create", "1")).returncode == 0
            # A receive before the origin is as snapshot 1 left it is refused.
            await write_all(receiver, "origin", [(9 * CHUNK, 1)], 0x55)
            refused = await csnap(receiver_sock, "receive", str(delta))
            assert refused.returncode == 1 and "origin changed since" in refused.stderr
            listed = await csnap(receiver_sock, "--json", "list")
            assert '"tag": 2' not in listed.stdout
            await write_all(receiver, "origin", [(9 * CHUNK, 1)], first[9 * CHUNK])
            # Chunk 9 was written (with its old bytes): it still counts as changed.
            refused = await csnap(receiver_sock, "receive", str(delta))
            assert refused.returncode == 1 and "origin changed since" in refused.stderr

        # A fresh store of zeroes receives the full delta (snapshot 1 is created),
        # then the delta 1 -> 2: both snapshots are the sender's, byte for byte.
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        async with gateway(
            fresh, image=bytes(ORIGIN_SIZE), csnapd_args=["--agent", str(receiver_sock)]
        ) as receiver:
            with trio.fail_after(30):
                await find_server(str(receiver_sock), wait=True)
            refused = await csnap(receiver_sock, "receive", str(delta))
            assert refused.returncode == 1 and "no snapshot 1" in refused.stderr
            received = await csnap(receiver_sock, "receive", str(whole))
            assert received.returncode == 0, received.stderr
            # Through O_DIRECT (--direct on a file), as on a shared disk.
            received = await csnap(receiver_sock, "--json", "receive", str(delta), "--direct")
            assert received.returncode == 0, received.stderr
            assert json.loads(received.stdout)["direct"] is True
            got = await nbdcopy_to_bytes(receiver.url("snap-2"), tmp_path, "r2.raw")
            assert_same_bytes(got, second, "received snapshot 2")
            kept = await nbdcopy_to_bytes(receiver.url("snap-1"), tmp_path, "r1.raw")
            assert_same_bytes(kept, first, "the receiver's snapshot 1")
            again = await csnap(receiver_sock, "receive", str(delta))
            assert again.returncode == 1 and "already has a snapshot 2" in again.stderr
    finally:
        with trio.CancelScope(shield=True):
            for agent in agents:
                await stop(agent)
