"""csnap-nbd driven by real NBD clients from Debian (nbdinfo, nbdcopy,
qemu-io, qemu-img): exports and their properties, copy-on-write seen from
both sides, snapshot writes of every alignment, block status against
csnapd's own answers, flush and FUA, read-only mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.compare import assert_same_bytes
from tests.nbd.support import (
    CHUNK,
    ORIGIN_SIZE,
    chunks_of,
    gateway,
    mapped_chunks,
    nbdcopy_to_bytes,
    need,
    origin_image,
    qemu_io,
    run,
)

pytestmark = [pytest.mark.e2e]


def patch(image: bytearray, offset: int, data: bytes) -> None:
    image[offset : offset + len(data)] = data


async def test_list_shows_every_export_with_its_size_and_contexts(tmp_path: Path) -> None:
    need("nbdinfo")
    async with gateway(tmp_path) as gw:
        await gw.create(1)
        await gw.create(5)
        listed = json.loads((await run("nbdinfo", "--list", "--json", gw.tcp)).stdout)
        exports = {e["export-name"]: e for e in listed["exports"]}
        assert sorted(exports) == ["origin", "snap-1", "snap-5"]
        for export in exports.values():
            assert export["export-size"] == ORIGIN_SIZE
            assert sorted(export["contexts"]) == [
                "base:allocation",
                "csnap:diff:1",
                "csnap:diff:5",
                "csnap:exceptions",
            ]
            assert export["is_read_only"] is False
            assert export["can_flush"] and export["can_fua"] and export["can_zero"]
            assert export["can_multi_conn"] is True
            assert export["block_size_minimum"] == 1
            assert export["block_size_preferred"] == CHUNK
            assert export["block_size_maximum"] == 32 << 20
        assert listed["structured"] is True

        # The default (empty) export name is the origin; the Unix socket serves the same.
        default = json.loads((await run("nbdinfo", "--json", gw.tcp)).stdout)
        assert default["exports"][0]["export-size"] == ORIGIN_SIZE
        unix = json.loads((await run("nbdinfo", "--json", gw.url("snap-5", unix=True))).stdout)
        assert unix["exports"][0]["export-name"] == "snap-5"

        # A deleted snapshot is no longer listed, and an unknown name is refused.
        await gw.delete(1)
        listed = json.loads((await run("nbdinfo", "--list", "--json", gw.tcp)).stdout)
        assert sorted(e["export-name"] for e in listed["exports"]) == ["origin", "snap-5"]
        for name in ("snap-1", "snap-99", "nonsense"):
            missing = await run("nbdinfo", gw.url(name), check=False)
            assert missing.returncode != 0, name


async def test_snapshot_keeps_the_old_data_while_the_origin_changes(tmp_path: Path) -> None:
    need("qemu-io", "nbdcopy")
    before = origin_image()
    async with gateway(tmp_path, image=before) as gw:
        await gw.create(1)
        writes = [(0, 4096, 0xA1), (10_000, 5_000, 0xA2), (1 << 20, 3 << 20, 0xA3), (77, 1, 0xA4)]
        after = bytearray(before)
        for offset, length, byte in writes:
            await run(*qemu_io(gw.url(), f"write -P {byte:#x} {offset} {length}"))
            patch(after, offset, bytes([byte]) * length)
        await run(*qemu_io(gw.url(), "flush"))

        # Byte-exact images through both listeners, several connections each.
        assert_same_bytes(
            await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path, "snap.raw"), before, "snap-1"
        )
        assert_same_bytes(
            await nbdcopy_to_bytes(gw.url(unix=True), tmp_path, "origin.raw"), after, "origin"
        )
        assert_same_bytes(gw.origin.read_bytes(), after, "origin file")
        # qemu-io's own pattern check on an unaligned range of each side.
        await run(*qemu_io(gw.url(), "read -P 0xa2 10000 5000", read_only=True))
        snap = gw.url("snap-1", unix=True)
        await run(*qemu_io(snap, "read -v 10000 16", read_only=True))
        # And qemu-img agrees the snapshot is the old image.
        expected = tmp_path / "before.raw"
        expected.write_bytes(before)
        compared = await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(expected), snap)
        assert "identical" in compared.stdout


async def test_snapshot_writes_of_any_alignment_keep_the_rest_of_each_chunk(
    tmp_path: Path,
) -> None:
    need("qemu-io", "nbdcopy")
    before = origin_image()
    async with gateway(tmp_path, image=before) as gw:
        await gw.create(3)
        await gw.create(4)
        # Chunk 40 is copied out for both snapshots by an origin write, so a
        # partial write to snap-4 there starts from a store copy, not the origin.
        await run(*qemu_io(gw.url(), "write -P 0x5a 163840 4096"))
        origin_after = bytearray(before)
        patch(origin_after, 40 * CHUNK, b"\x5a" * CHUNK)

        snap4 = bytearray(before)
        writes = [
            (1000, 3000, 0xC1),  # inside chunk 0
            (4000, 10_000, 0xC2),  # across chunks 0..3, both ends partial
            (40 * CHUNK + 100, 50, 0xC3),  # inside the chunk both snapshots share in the store
            (2 * CHUNK, CHUNK, 0xC4),  # exactly one chunk, over an earlier partial write
            (ORIGIN_SIZE - 7, 7, 0xC5),  # the last bytes of the export
            (300 * CHUNK + 1, 64 * CHUNK, 0xC6),  # many chunks, off by one byte
        ]
        for offset, length, byte in writes:
            await run(*qemu_io(gw.url("snap-4"), f"write -P {byte:#x} {offset} {length}"))
            patch(snap4, offset, bytes([byte]) * length)
        # Zeroes go the same way as data.
        await run(*qemu_io(gw.url("snap-4"), f"write -z {500 * CHUNK + 3} 5000"))
        patch(snap4, 500 * CHUNK + 3, bytes(5000))

        assert_same_bytes(
            await nbdcopy_to_bytes(gw.url("snap-4"), tmp_path, "s4.raw"), snap4, "snap-4"
        )
        assert_same_bytes(
            await nbdcopy_to_bytes(gw.url("snap-3"), tmp_path, "s3.raw"), before, "snap-3"
        )
        assert_same_bytes(
            await nbdcopy_to_bytes(gw.url(), tmp_path, "o.raw"), origin_after, "origin"
        )
        assert_same_bytes(gw.origin.read_bytes(), origin_after, "origin file")


async def test_block_status_reports_the_chunks_csnapd_has_copied(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo")
    async with gateway(tmp_path) as gw:
        await gw.create(1)
        await gw.create(2)
        origin_writes = [
            (5 * CHUNK, 3 * CHUNK),
            (100 * CHUNK + 17, 100),
            (4000 * CHUNK, 96 * CHUNK),
        ]
        snapshot_writes = [(9 * CHUNK + 1, 1), (3000 * CHUNK, 8 * CHUNK)]
        for offset, length in origin_writes:
            await run(*qemu_io(gw.url(), f"write -P 0x11 {offset} {length}"))
        for offset, length in snapshot_writes:
            await run(*qemu_io(gw.url("snap-2"), f"write -P 0x22 {offset} {length}"))

        async def mapped(export: str) -> set[int]:
            return await mapped_chunks(gw.url(export), "csnap:exceptions")

        written = chunks_of(origin_writes)
        assert await mapped("snap-1") == written == await gw.copied(1)
        assert await mapped("snap-2") == written | chunks_of(snapshot_writes) == await gw.copied(2)
        # For the origin: chunks some live snapshot holds a copy of, its own or shared.
        assert await mapped("origin") == written | chunks_of(snapshot_writes)
        assert await mapped("origin") == await gw.copied(None)

        # base:allocation proves zeroes only from the origin file's holes, and
        # this origin file was written whole: all data, no holes, no zeroes.
        out = await run("nbdinfo", "--map=base:allocation", "--json", gw.url("snap-2"))
        assert {e["type"] for e in json.loads(out.stdout)} == {0}
        qmap = await run("qemu-img", "map", "-f", "raw", "--output=json", gw.url())
        assert all(e["data"] and not e["zero"] for e in json.loads(qmap.stdout))


async def test_flush_and_fua_writes_succeed_on_every_export(tmp_path: Path) -> None:
    need("qemu-io")
    async with gateway(tmp_path) as gw:
        await gw.create(1)
        for export in ("origin", "snap-1"):
            await run(
                *qemu_io(
                    gw.url(export),
                    "write -f -P 0x33 8192 4096",  # FUA
                    "write -f -z 65536 4096",  # FUA zeroes
                    "discard 131072 4096",  # TRIM: a hint
                    "flush",
                    "read -P 0x33 8192 4096",
                    "read -P 0 65536 4096",
                )
            )


async def test_read_only_gateway_serves_reads_and_refuses_writes(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo", "nbdcopy")
    before = origin_image()
    async with gateway(tmp_path, "--read-only", image=before) as gw:
        await gw.create(1)
        info = json.loads((await run("nbdinfo", "--json", gw.url("snap-1"))).stdout)
        export = info["exports"][0]
        assert export["is_read_only"] is True
        assert export["can_zero"] is False and export["can_trim"] is False
        assert_same_bytes(await nbdcopy_to_bytes(gw.url("snap-1"), tmp_path), before, "snap-1")
        # qemu refuses to open a read-only export for writing at all...
        refused = await run(*qemu_io(gw.url(), "write -P 1 0 512"), check=False)
        assert refused.returncode != 0
        # ...and the raw-client tests check the gateway's own EPERM.
        assert_same_bytes(gw.origin.read_bytes(), before, "origin file")
