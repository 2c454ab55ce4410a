"""mkcsnap end to end in tmp_path: formats, refuses, and explains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from csnap_format import (
    bitmap_bits_per_block,
    decode_bitmap,
    decode_commit,
    decode_geometry,
    decode_leaf,
    decode_superblock,
    format_blocks,
)
from csnap_format.mkcsnap import main

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str | Path) -> int:
    return main([str(a) for a in args])


def read_block(path: Path, address: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(address * size)
        return f.read(size)


def count_clear_bits(bits: bytes, limit: int) -> int:
    value = int.from_bytes(bits, "little")
    return sum(1 for i in range(limit) if not value >> i & 1)


def verify_store(path: Path) -> None:
    """Decode every block mkcsnap wrote and check the free counts."""
    head = read_block(path, 0, 4096)
    g = decode_geometry(head)
    size = g.block_size
    sb = decode_superblock(read_block(path, 0, size))
    ctx = g.context
    assert sb.clean and sb.depth == 0 and sb.root == g.meta_start
    leaf = decode_leaf(read_block(path, g.meta_start, size), ctx, g.meta_start)
    assert leaf.chunks == ()
    record = decode_commit(read_block(path, g.journal_start, size), ctx, g.journal_start)
    assert (record.sequence, record.tail_sequence, record.homes) == (1, 1, ())
    bits = bitmap_bits_per_block(size)
    meta_free = data_free = 0
    for k in range(g.meta_bitmap_blocks):
        block = decode_bitmap(
            read_block(path, g.meta_bitmap_start + k, size),
            ctx,
            g.meta_bitmap_start + k,
        )
        meta_free += count_clear_bits(block.bits, min(bits, g.meta_blocks - k * bits))
    for k in range(g.data_bitmap_blocks):
        address = g.data_bitmap_start + k
        block = decode_bitmap(read_block(path, address, size), ctx, address)
        if k == 0 or k == g.data_bitmap_blocks - 1:
            data_free += count_clear_bits(block.bits, min(bits, g.store_chunks - k * bits))
        else:
            data_free += bits - sum(bin(b).count("1") for b in block.bits)
    assert meta_free == sb.meta_free == g.meta_blocks - 1
    assert data_free == sb.data_free == g.data_chunks
    # Byte for byte what the pure image generator says.
    for address, expected in format_blocks(g):
        assert read_block(path, address, size) == expected, f"block {address}"


def test_creates_sparse_files_and_a_valid_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    assert run("--store-size", "1G", "--origin-size", "1G", store, origin) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"formatted {store} (1 GiB) for origin {origin} (1 GiB)")
    assert "journal 4 MiB" in out
    assert store.stat().st_size == origin.stat().st_size == 1 << 30
    assert store.stat().st_blocks * 512 < 8 << 20  # sparse: only metadata written
    assert origin.stat().st_blocks == 0
    verify_store(store)


@pytest.mark.parametrize(
    ("chunk", "block", "store_size"),
    [
        ("4K", "4K", "1M"),
        ("64K", "4K", "64M"),
        ("64K", "64K", "256M"),
        ("1M", "4K", "1G"),
        ("1M", "1M", "1G"),
    ],
)
def test_chunk_and_block_sizes(tmp_path: Path, chunk: str, block: str, store_size: str) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    args = ["--chunk-size", chunk, "--block-size", block, "--store-size", store_size]
    assert run(*args, "--origin-size", "16M", store, origin) == 0
    verify_store(store)


@pytest.mark.slow
def test_one_tebibyte_sparse_store(tmp_path: Path) -> None:
    store, origin = tmp_path / "store", tmp_path / "origin"
    assert run("--store-size", "1T", "--origin-size", "1T", "--json", store, origin) == 0
    g = decode_superblock(read_block(store, 0, 4096)).geometry
    assert g.store_chunks == 1 << 28
    assert g.data_bitmap_blocks == -(-(1 << 28) // bitmap_bits_per_block(4096))
    verify_store(store)


def test_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, origin = tmp_path / "s", tmp_path / "o"
    assert (
        run(
            "--json",
            "--chunk-size",
            "64K",
            "--store-size",
            "64M",
            "--origin-size",
            "32M",
            store,
            origin,
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["chunk_size"] == 65536 and info["block_size"] == 4096
    assert info["store_bytes"] == 64 << 20 and info["origin_chunks"] == 512
    assert info["data_chunks"] * 65536 + info["metadata_bytes"] == info["store_bytes"]
    assert 0 < info["metadata_percent"] < 10


def test_uses_existing_files(tmp_path: Path) -> None:
    store, origin = tmp_path / "s", tmp_path / "o"
    for path in (store, origin):
        with path.open("wb") as f:
            f.truncate(16 << 20)
    assert run(store, origin) == 0
    verify_store(store)
    assert decode_geometry(read_block(store, 0, 4096)).origin_chunks == 4096


def test_refuses_existing_store_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store, origin = tmp_path / "s", tmp_path / "o"
    assert run("--store-size", "8M", "--origin-size", "8M", store, origin) == 0
    before = store.read_bytes()[:4096]
    capsys.readouterr()
    assert run(store, origin) == 1
    err = capsys.readouterr().err
    assert "already holds a csnap store (uuid" in err and "--force" in err
    assert err.count("\n") == 1
    assert store.read_bytes()[:4096] == before
    assert run("--force", store, origin) == 0
    assert store.read_bytes()[:4096] != before  # a new uuid
    verify_store(store)


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        (["--chunk-size", "3K"], 2, "chunk size 3072 is not a power of two"),
        (["--chunk-size", "2M"], 2, "not a power of two between 4K and 1M"),
        (
            ["--chunk-size", "8K", "--block-size", "16K"],
            2,
            "larger than the chunk size",
        ),
        (["--store-size", "12X"], 2, "cannot read size '12X'"),
        (["--journal-size", "lots"], 2, "cannot read size 'lots'"),
        (["--store-size", "100K"], 2, "too small to hold its own metadata"),
        (["--journal-size", "64K"], 2, "journal of 65536 bytes is too small"),
        (["--store-size", "0"], 2, "size must be positive"),
    ],
)
def test_bad_arguments(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    status: int,
    message: str,
) -> None:
    store, origin = tmp_path / "s", tmp_path / "o"
    if "--store-size" not in args:
        args = [*args, "--store-size", "64M"]
    assert run(*args, "--origin-size", "8M", store, origin) == status
    err = capsys.readouterr().err
    assert message in err and err.startswith("mkcsnap: error: ") and err.count("\n") == 1
    assert not store.exists() and not origin.exists()  # nothing created


def test_missing_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(tmp_path / "s", tmp_path / "o") == 1
    assert "does not exist (give --origin-size to create it)" in capsys.readouterr().err
    origin = tmp_path / "o"
    origin.write_bytes(bytes(1 << 20))
    capsys.readouterr()
    assert run(tmp_path / "s", origin) == 1
    assert "does not exist (give --store-size to create it)" in capsys.readouterr().err


def test_missing_origin_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--store-size", "8M", tmp_path / "s", tmp_path / "o") == 1
    err = capsys.readouterr().err
    assert f"origin {tmp_path / 'o'} does not exist (give --origin-size to create it)" in err


def test_origin_of_another_size_is_not_touched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    origin = tmp_path / "o"
    origin.write_bytes(b"user data" * 1000)
    assert run("--store-size", "8M", "--origin-size", "8M", tmp_path / "s", origin) == 1
    assert "exists with 9000 bytes" in capsys.readouterr().err
    assert origin.read_bytes() == b"user data" * 1000


def test_store_and_origin_the_same_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    same = tmp_path / "x"
    same.write_bytes(bytes(8 << 20))
    assert run(same, same) == 1
    assert "same file" in capsys.readouterr().err


def test_tools_shim_and_help() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mkcsnap"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": ""},
    ).stdout
    assert "--chunk-size" in out and "exit status" in out and "examples:" in out


def test_max_store_size_reserves_room_to_grow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-store-size sizes the data bitmap and the metadata area for the
    larger store; the store itself keeps the size asked for."""
    sizes = ["--json", "--store-size", "64M", "--origin-size", "16M"]
    assert run(*sizes, tmp_path / "plain", tmp_path / "o1") == 0
    plain = json.loads(capsys.readouterr().out)
    assert run(*sizes, "--max-store-size", "1G", tmp_path / "big", tmp_path / "o2") == 0
    big = json.loads(capsys.readouterr().out)
    assert big["store_bytes"] == plain["store_bytes"] == 64 << 20
    # Without a reservation, only the last bitmap block and the metadata slack.
    assert plain["max_store_bytes"] < 80 << 20
    assert big["max_store_bytes"] >= 1 << 30
    assert big["btree_area_bytes"] > 10 * plain["btree_area_bytes"]
    assert big["data_chunks"] < plain["data_chunks"]
    assert (
        run(
            "--store-size",
            "64M",
            "--origin-size",
            "16M",
            "--max-store-size",
            "32M",
            tmp_path / "small",
            tmp_path / "o3",
        )
        == 2
    )
    assert "below the store size" in capsys.readouterr().err
