"""The pre-filter's bookkeeping (lb/prefilter.py) over the twin's
maps: which bits are set, shared bits, words written, recovery."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import native
from lb.datapath.userspace.maps import new_userspace_maps
from lb.encoding import filter_bit, ip_int, ip_text
from lb.prefilter import BACKEND, FRONTEND, POLICED, VIP, Member, Prefilter
from tests.conftest import SMALL

WORDS = SMALL.filter_words


def words(m: object) -> dict[int, int]:
    raw = m.read_array(0, WORDS)  # type: ignore[attr-defined]
    size = len(raw) // WORDS
    return {i: v for i in range(WORDS)
            if (v := int.from_bytes(raw[i * size:i * size + 8], "little"))}


def bits_of(members: set[Member]) -> dict[int, int]:
    out: dict[int, int] = {}
    for kind, ip, port in members:
        b = filter_bit(kind, ip_int(ip), port, WORDS)
        out[b >> 6] = out.get(b >> 6, 0) | 1 << (b & 63)
    return out


def colliding_pair() -> tuple[Member, Member]:
    seen: dict[int, Member] = {}
    for i in range(200_000):
        m: Member = (BACKEND, f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", 8080)
        b = filter_bit(m[0], ip_int(m[1]), m[2], WORDS)
        if b in seen:
            return seen[b], m
        seen[b] = m
    raise AssertionError("no two members share a bit")


def test_the_map_holds_exactly_the_members_bits_and_writes_only_changed_words() -> None:
    m = new_userspace_maps(SMALL)["lb_filter"]
    f = Prefilter(m, WORDS)
    first = {(FRONTEND, "10.96.0.10", 80), (VIP, "10.96.0.10", 0),
             (BACKEND, "10.244.1.10", 8080), (BACKEND, "10.244.1.11", 8080)}
    assert f.admit(first) == len(bits_of(first))
    assert words(m) == bits_of(first)
    assert f.admit(first) == 0 and f.settle(first) == 0
    # A backend replaced: admitted before its entry, the old one cleared after.
    second = first - {(BACKEND, "10.244.1.11", 8080)} | {(BACKEND, "10.244.1.12", 8080)}
    f.admit(second)
    assert words(m) == bits_of(first | second)
    assert f.settle(second) == 1
    assert words(m) == bits_of(second)
    assert f.settle(set()) == len(bits_of(second)) and words(m) == {}


def test_a_bit_two_members_share_stays_until_both_are_gone() -> None:
    a, b = colliding_pair()
    m = new_userspace_maps(SMALL)["lb_filter"]
    f = Prefilter(m, WORDS)
    f.settle({a, b})
    assert words(m) == bits_of({a})
    assert f.settle({b}) == 0, "the bit still stands for b"
    assert words(m) == bits_of({b})
    assert f.settle(set()) == 1 and words(m) == {}


def test_recovery_rewrites_what_the_pinned_words_got_wrong() -> None:
    m = new_userspace_maps(SMALL)["lb_filter"]
    members = {(FRONTEND, "10.96.0.10", 80), (BACKEND, "10.244.1.10", 8080)}
    Prefilter(m, WORDS).settle(members | {(BACKEND, "10.244.9.9", 9)})
    stray = 5
    m.update(stray, 1 << 3)
    f = Prefilter(m, WORDS)
    f.recover(members)
    assert words(m) == bits_of(members)
    assert f.settle(members) == 0


MEMBER = st.tuples(st.sampled_from([FRONTEND, VIP, BACKEND]),
                   st.sampled_from([f"10.0.0.{i}" for i in range(6)]), st.sampled_from([0, 80]))


@settings(max_examples=300, deadline=None)
@given(st.lists(MEMBER, max_size=12), st.lists(MEMBER, max_size=12),
       st.lists(MEMBER, max_size=12))
def test_a_move_leaves_what_a_hold_then_a_release_leave(
        before: list[Member], held: list[Member], released: list[Member]) -> None:
    """The sync's end in one pass: the same holders, bit counts and words
    as holding then releasing (repeats and members never held included)."""
    one, two = (Prefilter(new_userspace_maps(SMALL)["lb_filter"], WORDS) for _ in range(2))
    for f in (one, two):
        f.hold(before)
    one.hold(held)
    one.release(released)
    two.move(held, released)
    assert two._refs == one._refs and two._counts[:] == one._counts[:]
    assert words(two.map) == words(one.map) == two._written


ADDRESS = st.one_of(st.integers(0, 2**32 - 1).map(ip_text), st.integers(0, 2**32 - 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([FRONTEND, VIP, BACKEND, POLICED]), ADDRESS,
                          st.integers(0, 65535)), max_size=40),
       st.lists(st.booleans(), max_size=40))
def test_the_native_count_is_the_python_one(members: list[Member], outs: list[bool]) -> None:
    """lb/native.c counts as _count_py does: the same counts, words and
    words reported, members counted in and then some of them out again."""
    assert native.lib() is not None, f"{native.PATH} is not built"
    c, py = (Prefilter(new_userspace_maps(SMALL)["lb_filter"], WORDS) for _ in range(2))
    gone = [m for m, out in zip(members, outs, strict=False) if out]
    for members_, delta in ((members, 1), (gone, -1)):
        assert c._count(members_, delta) == py._count_py(members_, delta)
    assert c._counts[:] == py._counts[:] and c._value == py._value


def test_a_bit_255_members_share_stays_set_for_good() -> None:
    """A byte per bit: at 255 members the bit is stuck, set (a "maybe" for
    traffic that is none, never a "no" for traffic that is)."""
    m = new_userspace_maps(SMALL)["lb_filter"]
    f = Prefilter(m, WORDS)
    member: Member = (BACKEND, "10.1.2.3", 80)
    bit = filter_bit(BACKEND, ip_int("10.1.2.3"), 80, WORDS)
    for _ in range(300):
        f._count([member], 1)
    assert f._counts[bit] == 255
    for _ in range(300):
        f._count([member], -1)
    assert f._counts[bit] == 255 and f._value[bit >> 6] >> (bit & 63) & 1


def test_a_member_that_is_no_address_is_refused_and_nothing_counted() -> None:
    f = Prefilter(new_userspace_maps(SMALL)["lb_filter"], WORDS)
    with pytest.raises(ValueError, match=r"10\.0\.0\.256"):
        f._count([(BACKEND, "10.0.0.1", 80), (BACKEND, "10.0.0.256", 80)], 1)
    assert not any(f._counts[:]) and not any(f._value)
