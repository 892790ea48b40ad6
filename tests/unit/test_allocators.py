from __future__ import annotations

import pytest

from lb.service.allocators import Exhausted, IdAllocator, SlabAllocator


def test_ids_start_at_one_and_are_reused() -> None:
    ids = IdAllocator(4)
    assert [ids.alloc(), ids.alloc(), ids.alloc()] == [1, 2, 3]
    with pytest.raises(Exhausted):
        ids.alloc()
    ids.free(2)
    assert ids.alloc() == 2


def test_a_freed_id_waits_for_the_fresh_ones_then_the_oldest_comes_first() -> None:
    ids = IdAllocator(6)
    assert [ids.alloc(), ids.alloc()] == [1, 2]
    ids.free(1)
    assert ids.alloc() == 3, "not the id just freed: old flows may still name it"
    ids.free(3)
    ids.free(2)
    assert [ids.alloc(), ids.alloc()] == [4, 5]
    assert [ids.alloc(), ids.alloc(), ids.alloc()] == [1, 3, 2], "freed longest ago first"
    with pytest.raises(Exhausted):
        ids.alloc()


def test_claimed_ids_are_never_handed_out() -> None:
    ids = IdAllocator(10)
    ids.claim(5)
    got = {ids.alloc() for _ in range(8)}
    assert 5 not in got and len(got) == 8


def test_slab_reuses_exact_sizes_and_splits_when_full() -> None:
    slab = SlabAllocator(1000)
    a = slab.alloc(251)
    b = slab.alloc(509)
    assert (a, b) == (0, 251)
    slab.free(a, 251)
    assert slab.alloc(251) == 0
    slab.free(b, 509)
    assert slab.alloc(240) == 760  # fresh space first
    assert slab.alloc(500) == 251  # then a larger free range is split
    with pytest.raises(Exhausted):
        slab.alloc(100)


def test_slab_rebuild_finds_the_gaps() -> None:
    slab = SlabAllocator(2000)
    slab.rebuild([(509, 251), (0, 251)])
    assert slab.in_use == 502
    assert slab.alloc(258) == 251  # the gap between the two ranges
    assert slab.alloc(251) == 760  # then fresh space after the highest range
