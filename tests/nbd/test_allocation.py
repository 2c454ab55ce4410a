"""base:allocation: holes and zeroes where the origin file's holes prove them.

On the origin export, the origin file's holes; on a snapshot export, those
holes under chunks the snapshot still shares with the origin (a chunk the
origin overwrote was copied out first, and reads as data). Seen in process
through the data paths (exact descriptors, NBD_CMD_FLAG_REQ_ONE), and
through real clients: nbdinfo's map, and nbdcopy of a sparse snapshot.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from csnap_nbd.holes import HOLE_ZERO, find_holes
from tests.nbd.support import gateway, need, qemu_io, run
from tests.nbd.test_exports import exports_of
from tests.server.support import CHUNK, label, pwrite

HZ = HOLE_ZERO


def test_find_holes_in_a_sparse_file_and_nothing_in_a_pipe(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as f:
        f.truncate(16 * CHUNK)
    for chunk in (2, 3, 9):
        pwrite(path, chunk, label(chunk, 1))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert find_holes(fd, 0, 16 * CHUNK) == (
            [(0, 2 * CHUNK), (4 * CHUNK, 9 * CHUNK), (10 * CHUNK, 16 * CHUNK)],
            16 * CHUNK,
        )
        # Inside a hole, and cut at both ends.
        assert find_holes(fd, 5 * CHUNK + 1, 6 * CHUNK) == ([(5 * CHUNK + 1, 6 * CHUNK)], 6 * CHUNK)
        assert find_holes(fd, 2 * CHUNK, 4 * CHUNK) == ([], 4 * CHUNK)
        # At most `most` holes: the scan stops after the data that follows the last.
        assert find_holes(fd, 0, 16 * CHUNK, most=2) == (
            [(0, 2 * CHUNK), (4 * CHUNK, 9 * CHUNK)],
            10 * CHUNK,
        )
        # Past the end of the file nothing is proved.
        assert find_holes(fd, 12 * CHUNK, 20 * CHUNK) == ([(12 * CHUNK, 16 * CHUNK)], 20 * CHUNK)
    finally:
        os.close(fd)
    read_end, write_end = os.pipe()
    try:
        assert find_holes(read_end, 0, 1 << 20) == ([], 1 << 20)
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_allocation_proves_zeroes_only_where_the_export_reads_a_hole(
    tmp_path: Path,
) -> None:
    async with exports_of(tmp_path) as (server, exports):
        for chunk in (0, 1, 5):
            pwrite(server.origin, chunk, label(chunk, 1))
        async with server.admin() as admin:
            await admin.create_snapshot(1)
        async with exports.use(None) as origin, exports.use(1) as snap1:
            # The origin overwrites a chunk of data and a hole (both copied
            # out for snapshot 1 first); snapshot 1 writes into a hole.
            await origin.write(5 * CHUNK, memoryview(label(5, 2)), fua=False)
            await origin.write(8 * CHUNK, memoryview(label(8, 2)), fua=False)
            await snap1.write(12 * CHUNK + 100, memoryview(b"S" * 10), fua=False)

            whole = 16 * CHUNK
            assert await origin.allocation(0, whole, req_one=False) == [
                (2 * CHUNK, 0),
                (3 * CHUNK, HZ),
                (CHUNK, 0),
                (2 * CHUNK, HZ),
                (CHUNK, 0),
                (7 * CHUNK, HZ),
            ]
            assert await snap1.allocation(0, whole, req_one=False) == [
                (2 * CHUNK, 0),
                (3 * CHUNK, HZ),
                (CHUNK, 0),  # shared with the origin then copied out: the old data
                (2 * CHUNK, HZ),
                (CHUNK, 0),  # a hole copied out: zeroes in the store, as data
                (3 * CHUNK, HZ),
                (CHUNK, 0),  # the snapshot's own write; the origin still has a hole
                (3 * CHUNK, HZ),
            ]
            assert bytes(await snap1.read(8 * CHUNK, CHUNK)) == bytes(CHUNK)
            # Requests that start and end inside chunks; REQ_ONE: one descriptor.
            assert await origin.allocation(CHUNK + 100, 3 * CHUNK, req_one=False) == [
                (CHUNK - 100, 0),
                (2 * CHUNK + 100, HZ),
            ]
            assert await snap1.allocation(7 * CHUNK + 5, 6 * CHUNK, req_one=False) == [
                (CHUNK - 5, HZ),
                (CHUNK, 0),
                (3 * CHUNK, HZ),
                (CHUNK, 0),
                (5, HZ),
            ]
            assert await origin.allocation(0, whole, req_one=True) == [(2 * CHUNK, 0)]
            assert await snap1.allocation(2 * CHUNK, 10 * CHUNK, req_one=True) == [(3 * CHUNK, HZ)]
            assert await snap1.allocation(9 * CHUNK, CHUNK, req_one=True) == [(CHUNK, HZ)]


def data_chunks(out: str, size: int) -> set[int]:
    """The chunks nbdinfo's JSON base:allocation map calls data, after checking
    that it covers the export exactly in whole chunks, data (0) or holes that
    read as zeroes (3)."""
    chunks: set[int] = set()
    covered = 0
    for extent in json.loads(out):
        assert extent["offset"] == covered
        assert extent["offset"] % CHUNK == 0 and extent["length"] % CHUNK == 0, extent
        assert extent["type"] in (0, HZ), extent
        covered += extent["length"]
        if extent["type"] == 0:
            first = extent["offset"] // CHUNK
            chunks |= set(range(first, first + extent["length"] // CHUNK))
    assert covered == size
    return chunks


def chunks_of(ranges: list[tuple[int, int]]) -> set[int]:
    return {c for off, n in ranges for c in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


async def test_nbdinfo_maps_the_holes_and_nbdcopy_keeps_a_snapshot_sparse(tmp_path: Path) -> None:
    need("qemu-io", "nbdinfo", "nbdcopy")
    size = 4 << 20
    async with gateway(tmp_path, origin_size=size) as gw:
        before = [(0, 2 * CHUNK), (100 * CHUNK + 17, 100), (500 * CHUNK, 40 * CHUNK)]
        after = [(100 * CHUNK, CHUNK), (700 * CHUNK, 8 * CHUNK)]
        own = [(900 * CHUNK + 1, 3)]
        for offset, length in before:
            await run(*qemu_io(gw.url(), f"write -P 0x11 {offset} {length}"))
        await gw.create(1)
        for offset, length in after:
            await run(*qemu_io(gw.url(), f"write -P 0x22 {offset} {length}"))
        for offset, length in own:
            await run(*qemu_io(gw.url("snap-1"), f"write -P 0x33 {offset} {length}"))

        async def mapped(export: str) -> set[int]:
            out = await run("nbdinfo", "--map", "--json", gw.url(export, unix=True))
            return data_chunks(out.stdout, size)

        written = chunks_of(before) | chunks_of(after)
        assert await mapped("origin") == written
        # Chunks 700..707 were holes the origin overwrote: copied out, data.
        assert await mapped("snap-1") == written | chunks_of(own)

        expected = bytearray(size)
        for (offset, length), byte in [*((r, 0x11) for r in before), *((r, 0x33) for r in own)]:
            expected[offset : offset + length] = bytes([byte]) * length
        copy = tmp_path / "snap-1.raw"
        await run("nbdcopy", gw.url("snap-1"), str(copy))
        full = tmp_path / "snap-1-read.raw"
        await run("nbdcopy", "--no-extents", gw.url("snap-1"), str(full))
        assert copy.read_bytes() == full.read_bytes() == bytes(expected)
        await run("cmp", str(copy), str(full))
        # The copy skipped the holes: about as many blocks as data chunks.
        allocated = os.stat(copy).st_blocks * 512
        assert allocated <= (len(written | chunks_of(own)) + 16) * CHUNK, allocated
