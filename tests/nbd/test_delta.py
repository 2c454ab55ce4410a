"""`csnap delta` and `csnap apply` against real processes (csnap-agent,
csnapd, csnap-nbd): a full copy of snapshot 1 made with nbdcopy, plus the
delta 1 -> 2 applied to it, is snapshot 2's image byte for byte, with and
without compression, and again after a second apply; a damaged delta, an
image of another base or size, are refused and leave the image untouched.
"""

from __future__ import annotations

import hashlib
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
            made = await csnap(sock, "delta", "1", "2", "-o", str(packed), "--compress")
            assert made.returncode == 0, made.stderr
            # Exactly the changed chunks, and little more than their bytes.
            assert f'"chunks": {len(changed)}' in (await csnap_json(sock, plain))
            assert plain.stat().st_size <= 1.02 * len(changed) * CHUNK + 256
            assert packed.stat().st_size < plain.stat().st_size
            header = DeltaHeader.decode(plain.read_bytes()[: DeltaHeader.SIZE])
            assert (header.from_tag, header.to_tag, header.chunk_size) == (1, 2, CHUNK)
            assert header.origin_chunks * CHUNK == ORIGIN_SIZE

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


async def csnap_json(sock: Path, delta: Path) -> str:
    """Write the delta again, with --json, and return what the command printed."""
    again = await csnap(sock, "--json", "delta", "1", "2", "-o", str(delta))
    assert again.returncode == 0, again.stderr
    return again.stdout
