"""Byte ranges against chunks, checked against a byte-by-byte model: pieces
cover a request exactly, placements put every byte where csnapd said (and
never touch the rest of a partial chunk), and extents describe exactly the
request with the right flag per byte.
"""

from __future__ import annotations

import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from csnap_nbd.geometry import (
    Piece,
    chunk_runs,
    extents,
    halves,
    origin_placements,
    pieces,
    store_placements,
)

CHUNK_SIZES = st.sampled_from([1, 2, 3, 8, 512, 4096])


@st.composite
def requests(draw: st.DrawFn) -> tuple[int, int, int, int]:
    chunk_size = draw(CHUNK_SIZES)
    chunks = draw(st.integers(1, 64))
    size = chunk_size * chunks
    offset = draw(st.integers(0, size - 1))
    length = draw(st.integers(0, size - offset))
    max_chunks = draw(st.integers(1, 9))
    return chunk_size, offset, length, max_chunks


@given(requests())
def test_pieces_cover_the_request_exactly(request: tuple[int, int, int, int]) -> None:
    chunk_size, offset, length, max_chunks = request
    got = list(pieces(offset, length, chunk_size, max_chunks))
    if length == 0:
        assert got == []
        return
    assert got[0].start == offset and got[-1].end == offset + length
    for before, after in itertools.pairwise(got):
        assert before.end == after.start
        assert before.first + before.count == after.first
    for piece in got:
        assert 1 <= piece.count <= max_chunks
        assert piece.first == piece.start // chunk_size
        assert piece.first + piece.count - 1 == (piece.end - 1) // chunk_size


@given(requests())
def test_halves_of_a_piece_cover_it_exactly(request: tuple[int, int, int, int]) -> None:
    chunk_size, offset, length, max_chunks = request
    for piece in pieces(offset, length, chunk_size, max_chunks):
        if piece.count == 1:
            continue
        first, second = halves(piece, chunk_size)
        assert (first.first, first.start) == (piece.first, piece.start)
        assert (second.end, second.first + second.count) == (piece.end, piece.first + piece.count)
        assert first.end == second.start == second.first * chunk_size
        assert first.first + first.count == second.first
        assert 1 <= first.count <= second.count <= first.count + 1


@given(requests(), st.integers(0, 2**32))
def test_store_and_origin_placements_put_each_byte_where_csnapd_said(
    request: tuple[int, int, int, int], seed: int
) -> None:
    chunk_size, offset, length, max_chunks = request
    rng = random.Random(seed)
    for piece in pieces(offset, length, chunk_size, max_chunks):
        # csnapd's answer: some chunks in scattered store chunks, the rest origin.
        chunks = list(range(piece.first, piece.first + piece.count))
        in_store = {c: rng.randrange(1000) * 64 + c % 64 for c in chunks if rng.random() < 0.5}
        segments = [(c, 1, s) for c, s in in_store.items()]
        rng.shuffle(segments)
        origin = [(c, 1) for c in chunks if c not in in_store]
        placed: dict[int, tuple[str, int]] = {}
        for kind, placements in (
            ("store", store_placements(segments, piece, offset, chunk_size)),
            ("origin", origin_placements(origin, piece, offset, chunk_size)),
        ):
            for p in placements:
                for k in range(p.size):
                    assert p.buffer + k not in placed
                    placed[p.buffer + k] = (kind, p.position + k)
        # Exactly the request's bytes of this piece, each from the right place.
        assert sorted(placed) == list(range(piece.start - offset, piece.end - offset))
        for buffer, (kind, position) in placed.items():
            byte = offset + buffer
            chunk, within = divmod(byte, chunk_size)
            if chunk in in_store:
                assert (kind, position) == ("store", in_store[chunk] * chunk_size + within)
            else:
                assert (kind, position) == ("origin", byte)


@given(requests(), st.sets(st.integers(0, 80)))
def test_extents_describe_each_byte_with_its_chunk_flag(
    request: tuple[int, int, int, int], flagged_chunks: set[int]
) -> None:
    chunk_size, offset, length, max_chunks = request
    for piece in pieces(offset, length, chunk_size, max_chunks):
        flagged = _ranges(sorted(flagged_chunks))
        got = extents(piece, flagged, chunk_size, 1)
        assert all(n > 0 for n, _ in got)
        assert all(a[1] != b[1] for a, b in itertools.pairwise(got))
        byte = piece.start
        for n, flag in got:
            for b in range(byte, byte + n):
                assert flag == (1 if b // chunk_size in flagged_chunks else 0)
            byte += n
        assert byte == piece.end


def test_extents_of_an_unaligned_request() -> None:
    # Chunks 1..6, from 10 bytes into chunk 1 to 10 bytes into chunk 6;
    # chunks 3 and 4 have copies.
    piece = Piece(first=1, count=6, start=4096 + 10, end=6 * 4096 + 10)
    assert extents(piece, [(3, 2)], 4096, 1) == [(2 * 4096 - 10, 0), (2 * 4096, 1), (4096 + 10, 0)]
    assert extents(piece, [], 4096, 1) == [(5 * 4096, 0)]
    assert extents(piece, [(0, 100)], 4096, 1) == [(5 * 4096, 1)]


def _ranges(chunks: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for c in chunks:
        if out and out[-1][0] + out[-1][1] == c:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def test_chunk_runs_sorts_merges_and_drops_repeats() -> None:
    assert chunk_runs([]) == []
    assert chunk_runs([7, 3, 4, 3, 9, 8, 5]) == [(3, 3), (7, 3)]
    assert chunk_runs(range(10, 14)) == [(10, 4)]
