"""The owned map's placements: runs continue only where both the logical and
the store chunks do, whatever lies between them."""

from __future__ import annotations

from csnap_client.owned import MAX_WINDOWS, OwnedMap


def test_a_chunk_on_the_origin_between_store_neighbours_splits_the_run() -> None:
    owned = OwnedMap(origin_chunks=64, window=16)
    # Chunks 0 and 2..3 copied into store chunks 100 and 101..102; 1 on the origin.
    owned.learn(0, [(0, 1, 100), (2, 2, 101)], [(1, 1)])
    assert owned.lookup(0, 4, origin=True) == (((0, 1, 100), (2, 2, 101)), ((1, 1),))
    assert owned.lookup(0, 4) is None  # chunk 1 is not placed in the store
    assert owned.lookup(2, 2) == (((2, 2, 101),), ())


def test_unknown_windows_and_chunks_shared_with_other_snapshots_are_not_placed() -> None:
    owned = OwnedMap(origin_chunks=64, window=16)
    owned.learn(0, [(0, 4, 10)], [(5, 1)])  # chunk 4 shared with another snapshot
    assert owned.lookup(3, 2, origin=True) is None
    assert owned.lookup(15, 2) is None  # window 1 never asked about
    assert owned.missing(15, 2) == [1]
    # A snapshot write places chunk 4; a copy of chunk 5 makes it unknown.
    owned.note([(4, 1, 50)])
    owned.unshared([5])
    assert owned.lookup(3, 2) == (((3, 1, 13), (4, 1, 50)), ())
    assert owned.lookup(5, 1, origin=True) is None


def test_the_map_keeps_at_most_max_windows() -> None:
    owned = OwnedMap(origin_chunks=(MAX_WINDOWS + 5) * 2, window=2)
    for index in range(MAX_WINDOWS + 5):
        owned.learn(index, [(index * 2, 2, index * 2)])
    assert len(owned) == MAX_WINDOWS
    assert owned.missing(0, 2) == [0]  # the oldest went first
    assert owned.lookup((MAX_WINDOWS + 4) * 2, 2) is not None
