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


def test_a_window_learnt_ahead_is_ahead_until_a_read_first_uses_it() -> None:
    owned = OwnedMap(origin_chunks=40, window=16)
    assert owned.window_count == 3  # the last window is short
    owned.learn(0, [(0, 16, 100)])
    owned.learn(1, [(16, 16, 200)], ahead=True)
    assert owned.ahead == {1}
    assert owned.first_use(0, 4) == []  # window 0 was asked for by a read
    assert owned.first_use(14, 4) == [1]  # the read that reaches window 1
    assert owned.first_use(16, 1) == [] and owned.ahead == set()
    # Asked again by a read (a new answer), a window is no longer ahead.
    owned.learn(2, [], ahead=True)
    owned.learn(2, [(32, 8, 300)])
    assert owned.ahead == set()


def test_a_window_learnt_ahead_leaves_the_ahead_set_with_the_map() -> None:
    owned = OwnedMap(origin_chunks=(MAX_WINDOWS + 1) * 2, window=2)
    owned.learn(0, [(0, 2, 0)], ahead=True)
    for index in range(1, MAX_WINDOWS + 1):
        owned.learn(index, [(index * 2, 2, index * 2)])
    assert not owned.knows(0) and owned.ahead == set()
