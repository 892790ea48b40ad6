"""Tests for the Maglev table builder: balance, disruption, determinism and table sizes."""

from __future__ import annotations

import array
import hashlib
import operator
import os
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import native
from lb.service import maglev
from lb.service.maglev import (
    MAX_BACKENDS,
    SHRINK_STEPS,
    SLOTS_PER_BACKEND,
    TABLE_SIZES,
    kept_size,
    name_hashes,
    permutation_params,
    populate,
    populate_array,
    table_size,
)

REPO = Path(__file__).resolve().parents[2]


def pod_backends(n: int) -> list[str]:
    return [f"10.244.{i // 250}.{i % 250 + 2}:8080/TCP" for i in range(n)]


def names_per_slot(backends: Sequence[str], size: int) -> list[str]:
    return [backends[i] for i in populate(backends, size)]


def slots_moved(old: Sequence[str | None], new: Sequence[str | None]) -> int:
    """Slots whose backend differs between two tables of the same size."""
    assert len(old) == len(new)
    return sum(a != b for a, b in zip(old, new, strict=True))


def is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def textbook_populate(backends: Sequence[str], size: int) -> list[int]:
    """Literal transcription of the paper's pseudocode, for checking the optimised loop."""
    names = sorted(backends)
    permutation = []
    for name in names:
        offset, skip = permutation_params(name, size)
        permutation.append([(offset + j * skip) % size for j in range(size)])
    next_index = [0] * len(names)
    entry = [-1] * size
    filled = 0
    while True:
        for i in range(len(names)):
            c = permutation[i][next_index[i]]
            while entry[c] >= 0:
                next_index[i] += 1
                c = permutation[i][next_index[i]]
            entry[c] = i
            next_index[i] += 1
            filled += 1
            if filled == size:
                position = {name: k for k, name in enumerate(backends)}
                return [position[names[e]] for e in entry]


# --- table_size ---------------------------------------------------------------------------


def test_ladder_is_ascending_primes() -> None:
    assert all(is_prime(p) for p in TABLE_SIZES)
    assert list(TABLE_SIZES) == sorted(set(TABLE_SIZES))
    assert MAX_BACKENDS == 1310


@pytest.mark.parametrize(
    ("n", "size"),
    [
        (0, 0),
        (1, 251),
        (2, 251),
        (3, 509),
        (5, 509),
        (6, 1021),
        (10, 1021),
        (11, 2039),
        (100, 16381),
        (164, 32749),
        (655, 65521),
        (656, 131071),
        (1000, 131071),
        (1310, 131071),
    ],
)
def test_table_size(n: int, size: int) -> None:
    assert table_size(n) == size


def test_table_size_is_smallest_ladder_prime_with_100_slots_per_backend() -> None:
    for n in range(1, MAX_BACKENDS + 1):
        size = table_size(n)
        assert size >= SLOTS_PER_BACKEND * n
        smaller = [p for p in TABLE_SIZES if p < size]
        assert not smaller or smaller[-1] < SLOTS_PER_BACKEND * n


@pytest.mark.parametrize("n", [MAX_BACKENDS + 1, 10_000])
def test_table_size_too_many_backends(n: int) -> None:
    with pytest.raises(ValueError, match=f"{n} backends do not fit"):
        table_size(n)


def test_table_size_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        table_size(-1)


# --- kept_size: a table keeps its size while its count changes -------------------------------


def test_kept_size_grows_when_the_count_no_longer_fits() -> None:
    assert kept_size(0, 2) == 251
    assert kept_size(251, 2) == 251
    assert kept_size(251, 3) == 509  # 300 slots needed
    assert kept_size(1021, 10) == 1021
    assert kept_size(1021, 11) == 2039
    assert kept_size(251, 1000) == 131071
    assert kept_size(509, 0) == 0  # no backends, no table


def test_kept_size_shrinks_only_far_below() -> None:
    assert SHRINK_STEPS == 2
    # 1021 slots hold 10; they stay for 3..10 backends (a size or none below).
    assert [kept_size(1021, n) for n in (10, 6, 5, 3)] == [1021] * 4
    # Two backends need 251, two sizes below 1021: the table shrinks to it.
    assert kept_size(1021, 2) == 251
    assert kept_size(131071, 328) == 131071
    assert kept_size(131071, 327) == 32749


def test_kept_size_rejects_a_size_not_on_the_ladder() -> None:
    with pytest.raises(ValueError, match="not a Maglev table size"):
        kept_size(1000, 2)


def test_a_count_going_up_and_down_across_a_boundary_resizes_once() -> None:
    size, sizes = 0, []
    for n in [5, 6, 5, 6, 5, 6, 5, 4, 5, 6]:
        size = kept_size(size, n)
        sizes.append(size)
    assert sizes == [509] + [1021] * 9


# --- the C population loop --------------------------------------------------------------------


def test_native_fill_is_built() -> None:
    # tools/setup.sh builds it; without it a 1,000-backend table takes 0.2 s in Python.
    assert native.lib() is not None, f"{native.PATH} is not built"


def test_native_fill_equals_the_python_loop() -> None:
    rng = random.Random(1860)
    cases = [(n, size) for size in (2, 3, 13, 251) for n in (1, 2, size)]
    cases += [(rng.randrange(1, 1311), TABLE_SIZES[-1]) for _ in range(3)]
    cases += [(rng.randrange(1, 200), rng.choice(TABLE_SIZES[:6])) for _ in range(30)]
    for n, size in cases:
        names = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{i % 256}:{i}/TCP"
                 for i in range(n)]
        order = sorted(range(n), key=names.__getitem__)
        params = [permutation_params(names[i], size) for i in order]
        python = maglev._fill(order, [o for o, _ in params], [k for _, k in params], size)
        assert populate_array(names, size).tolist() == python, (n, size)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=300), min_size=1, max_size=30),
       st.sampled_from(TABLE_SIZES[:3]), st.booleans())
def test_the_native_table_is_the_python_one(names: list[str], size: int,
                                            labelled: bool) -> None:
    """Hashes (names of one to three BLAKE2b blocks, any code points), sort
    and loop in C equal the Python reference; a repeated name is refused by
    both."""
    labels = [7 * i + 3 for i in range(len(names))] if labelled else None
    if len(set(names)) != len(names):
        for populate_with in (populate_array, maglev._python_populate):
            with pytest.raises(ValueError, match="duplicate backend name"):
                populate_with(names, size, labels)
        return
    assert populate_array(names, size, labels) == maglev._python_populate(names, size, labels)


# --- the moved fraction, backend by backend from 1 to 1,000 and back ----------------------------

# Beyond the share that must move (1/N of the larger set), Maglev moves some other slots
# too; the extra share shrinks with the backend count.  Worst measured over the sweeps
# below (percent of slots): 3.4 (N < 30), 2.3 (< 100), 1.7 (< 300), 1.3 (<= 1,000).
def extra_allowed(n: int) -> float:
    return 0.04 if n < 30 else 0.03 if n < 100 else 0.02 if n < 300 else 0.015


def sweep(counts: Sequence[int], smallest: int = TABLE_SIZES[0]
          ) -> list[tuple[int, int, int, int, float | None]]:
    """(N before, N after, size before, size after, fraction of slots moved) for each
    step of `counts`, sizes kept as the reconciler keeps them; None across a resize."""
    backends = pod_backends(max(counts))
    steps: list[tuple[int, int, int, int, float | None]] = []
    size, before = 0, array.array("I")
    for i, n in enumerate(counts):
        new_size = kept_size(size, n, smallest)
        after = populate_array(backends[:n], new_size)
        if i:
            moved = (sum(map(operator.ne, before, after)) / new_size
                     if new_size == size else None)
            steps.append((counts[i - 1], n, size, new_size, moved))
        size, before = new_size, after
    return steps


@pytest.mark.parametrize("direction", ["add", "remove"])
def test_one_backend_more_or_less_moves_about_its_share(direction: str) -> None:
    counts = list(range(1, 1002)) if direction == "add" else list(range(1001, 0, -1))
    steps = sweep(counts)
    assert len(steps) == 1000
    resized = [(a, b, s, t) for a, b, s, t, m in steps if m is None]
    for a, b, s, _, moved in steps:
        if moved is None:
            continue
        n = max(a, b)
        # At least the slots of the backend that went or came: floor(size / N).
        assert round(moved * s) >= s // n, (a, b, s, moved)
        assert moved <= 1 / n + extra_allowed(n), (a, b, s, moved)
    if direction == "add":
        # Growth only where the count passes what the size holds at 100 slots each.
        assert all(s < SLOTS_PER_BACKEND * b <= t for a, b, s, t in resized)
        assert [t for *_, t in resized] == list(TABLE_SIZES[1:])
    else:
        # Shrinks only SHRINK_STEPS sizes below: 4 instead of the 9 sizes passed.
        assert [(a, b) for a, b, *_ in resized] == [(328, 327), (82, 81), (21, 20), (6, 5)]


def test_with_the_largest_floor_every_step_moves_its_share_within_one_percent() -> None:
    # --maglev-min-table-size 131071: one size for every count up to 1,310.  Tables for N
    # and N + 1 backends are compared once: adding the last one, or removing it again.
    steps = sweep(range(1, 1002), smallest=TABLE_SIZES[-1])
    assert {(s, t) for _, _, s, t, _ in steps} == {(TABLE_SIZES[-1], TABLE_SIZES[-1])}
    worst = 0.0
    for a, b, _, _, moved in steps:
        assert moved is not None
        assert moved <= 1 / b + 0.01, (a, b, moved)
        worst = max(worst, moved - 1 / b)
    assert worst > 0.003  # Maglev's own churn is there, just small


def test_kept_size_honours_the_floor() -> None:
    assert table_size(2, 16381) == 16381
    assert table_size(200, 16381) == 32749
    assert kept_size(16381, 1, 16381) == 16381
    assert kept_size(0, 3, 1021) == 1021
    with pytest.raises(ValueError, match="not a Maglev table size"):
        table_size(3, 1000)


def test_the_reconciler_sizes_tables_from_its_floor() -> None:
    from lb.datapath.instance import reconciler_for, throwaway
    from lb.service import desired
    from lb.sources.manifests import build_cluster
    from tests.packet.test_datapath import NODE, web

    cluster = build_cluster((d, "t") for d in web(["10.244.1.10", "10.244.1.11"])).cluster
    for floor in (TABLE_SIZES[0], 16381):
        with throwaway("userspace") as dp:
            rec = reconciler_for(dp, floor)
            assert not rec.sync(desired.compute(cluster, NODE)).errors
            assert {t.size for t in rec.tables.values()} == {floor}
    with throwaway("userspace") as dp, pytest.raises(ValueError, match="not a Maglev"):
        reconciler_for(dp, 1000)


# --- populate: argument checks -------------------------------------------------------------


def test_no_backends() -> None:
    assert populate([], 0) == []
    with pytest.raises(ValueError, match="without backends"):
        populate([], 251)


@pytest.mark.parametrize("size", [0, 1, 4, 250, 1000])
def test_size_must_be_prime(size: int) -> None:
    with pytest.raises(ValueError, match="must be a prime"):
        populate(["10.0.0.1:80/TCP"], size)
    with pytest.raises(ValueError, match="must be a prime"):
        permutation_params("10.0.0.1:80/TCP", size)


def test_size_must_hold_every_backend() -> None:
    with pytest.raises(ValueError, match="too small"):
        populate(pod_backends(3), 2)


def test_duplicate_names_rejected() -> None:
    with pytest.raises(ValueError, match=re.escape("duplicate backend name '10.0.0.1:80/TCP'")):
        populate(["10.0.0.1:80/TCP", "10.0.0.2:80/TCP", "10.0.0.1:80/TCP"], 251)


def test_single_backend_gets_every_slot() -> None:
    assert populate(["10.0.0.1:80/TCP"], 251) == [0] * 251


# --- populate: the algorithm -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["10.244.1.5:8080/TCP", "[fd00::1]:53/UDP", "x"])
@pytest.mark.parametrize("size", [2, 3, 13, 251, 1021])
def test_permutation_visits_every_slot(name: str, size: int) -> None:
    offset, skip = permutation_params(name, size)
    assert 0 <= offset < size
    assert 1 <= skip < size
    assert len({(offset + j * skip) % size for j in range(size)}) == size


def test_matches_textbook_algorithm() -> None:
    rng = random.Random(20160316)
    cases = [(n, size) for size in (2, 3, 7, 13, 101) for n in range(1, min(size, 6) + 1)]
    cases += [(n, size) for n in (1, 2, 3, 10, 37) for size in TABLE_SIZES[:3]]
    for n, size in cases:
        backends = [f"10.{rng.randrange(256)}.{rng.randrange(256)}.{i}:80/TCP" for i in range(n)]
        assert populate(backends, size) == textbook_populate(backends, size), (n, size)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 100, 1000])
def test_each_share_within_one_percent_of_equal(n: int) -> None:
    # Criterion: every backend's slot count c satisfies |c - size/n| <= 1% of size/n.
    # Round-robin gives each backend one slot per round, so counts are floor or ceil of
    # size/n (the first size % n backends in name order get the extra slot); with
    # size >= 100 n, a deviation below one slot is below 1%.
    size = table_size(n)
    backends = pod_backends(n)
    counts = Counter(populate(backends, size))
    assert sorted(counts) == list(range(n))
    equal = size / n
    for count in counts.values():
        assert abs(count - equal) <= 0.01 * equal
    base, extra = divmod(size, n)
    assert set(counts.values()) <= {base, base + 1}
    assert sum(c == base + 1 for c in counts.values()) == extra


# --- disruption ------------------------------------------------------------------------------

# Maglev's tables are not minimally disruptive: beyond the slots that must move, changing the
# backend set shifts the round-robin and moves some other slots too.  At ~100 slots per backend
# that extra share is up to a few percent for tens of backends, and it shrinks as the table
# grows (see test_extra_churn_shrinks_with_larger_tables).  The allowances below are the
# extra share permitted on top of 1/N (removal) or 1/(N+1) (addition); 0.01 wherever the
# algorithm meets 1%.  Worst extras measured over several name sets: removal 0.2% (N=2),
# 0.7% (3), 4.1% (10), 1.6% (100), 0.6% (1000); addition 3.7%, 4.9%, 3.5%, 1.5%, 0.6%.
REMOVE_ALLOWANCE = {2: 0.01, 3: 0.01, 10: 0.05, 100: 0.02, 1000: 0.01}
ADD_ALLOWANCE = {2: 0.05, 3: 0.05, 10: 0.05, 100: 0.02, 1000: 0.01}


def removal_picks(n: int) -> list[int]:
    if n <= 10:
        return list(range(n))
    return sorted({0, 1, n // 3, n // 2, n - 2, n - 1})


@pytest.mark.parametrize("n", sorted(REMOVE_ALLOWANCE))
def test_removing_one_backend_moves_about_its_share(n: int) -> None:
    # Same table size before and after: the slot a flow hashes to is unchanged, so
    # comparing tables slot by slot counts exactly the flows that change backend.
    size = table_size(n)
    backends = pod_backends(n)
    old = names_per_slot(backends, size)
    for gone in removal_picks(n):
        remaining = backends[:gone] + backends[gone + 1 :]
        new = names_per_slot(remaining, size)
        own = old.count(backends[gone])
        moved = slots_moved(old, new)
        # The removed backend's slots all move; everything else moved is extra churn.
        assert backends[gone] not in new
        assert moved >= own
        assert moved / size <= 1 / n + REMOVE_ALLOWANCE[n], (gone, moved / size)


@pytest.mark.parametrize("n", sorted(ADD_ALLOWANCE))
def test_adding_one_backend_moves_about_its_share(n: int) -> None:
    size = table_size(n)
    backends = pod_backends(n)
    old = names_per_slot(backends, size)
    for extra in ("192.168.0.1:8080/TCP", "10.244.200.77:8080/TCP", "[fd00::beef]:8080/TCP"):
        new = names_per_slot([*backends, extra], size)
        moved = slots_moved(old, new)
        assert moved >= new.count(extra)
        assert moved / size <= 1 / (n + 1) + ADD_ALLOWANCE[n], (extra, moved / size)


def test_extra_churn_shrinks_with_larger_tables() -> None:
    # With 10 backends, ~1600 slots each keep removal within 1/N + 1%.
    n, size = 10, 16381
    backends = pod_backends(n)
    old = names_per_slot(backends, size)
    for gone in range(n):
        new = names_per_slot(backends[:gone] + backends[gone + 1 :], size)
        assert slots_moved(old, new) / size <= 1 / n + 0.01


def flows_moved_across_sizes(
    old_backend: Callable[[int], str], new_backend: Callable[[int], str], flows: range
) -> float:
    return sum(old_backend(h) != new_backend(h) for h in flows) / len(flows)


def test_crossing_a_ladder_step_remaps_most_flows() -> None:
    # Going from 3 to 2 backends changes the size from 509 to 251, so flows land on unrelated
    # slots.  Over a full period of both moduli (Chinese remainder theorem) the pair of slots
    # is uniform, so the share of flows that keep their backend is sum(share_old * share_new):
    # about 1/3 here, versus 2/3 at a fixed size.
    backends = pod_backends(3)
    old_size, new_size = table_size(3), table_size(2)
    assert (old_size, new_size) == (509, 251)
    old = names_per_slot(backends, old_size)
    new = names_per_slot(backends[:2], new_size)
    moved = flows_moved_across_sizes(
        lambda h: old[h % old_size], lambda h: new[h % new_size], range(old_size * new_size)
    )
    old_counts, new_counts = Counter(old), Counter(new)
    kept = sum(old_counts[b] * new_counts[b] for b in backends) / (old_size * new_size)
    assert moved == pytest.approx(1 - kept)
    assert 0.65 < moved < 0.68
    fixed = slots_moved(old, names_per_slot(backends[:2], old_size)) / old_size
    assert fixed < 0.34


# --- determinism -----------------------------------------------------------------------------


def test_same_input_same_table() -> None:
    backends = pod_backends(100)
    size = table_size(100)
    assert populate(backends, size) == populate(list(backends), size)


def test_labels_stand_for_their_backends() -> None:
    backends = pod_backends(10)
    shuffled = backends[::-1]
    ids = [1000 + 7 * i for i in range(10)]
    size = table_size(10)
    labelled = populate(shuffled, size, labels=ids)
    assert labelled == [ids[i] for i in populate(shuffled, size)]
    assert sorted(set(labelled)) == sorted(ids)
    with pytest.raises(ValueError, match="9 labels for 10 backends"):
        populate(backends, size, labels=ids[:9])


def test_input_order_does_not_matter() -> None:
    backends = pod_backends(50)
    size = table_size(50)
    reference = names_per_slot(backends, size)
    rng = random.Random(7)
    for _ in range(5):
        shuffled = backends[:]
        rng.shuffle(shuffled)
        table = populate(shuffled, size)
        # Indices refer to the caller's sequence, and resolve to the same names.
        assert [shuffled[i] for i in table] == reference
    assert populate(list(reversed(backends)), size) == [
        len(backends) - 1 - i for i in populate(backends, size)
    ]


def test_name_hashes_pinned() -> None:
    # Every node must compute identical tables; these values must never change.
    assert name_hashes("10.244.1.5:8080/TCP") == (16227775723809716103, 1991283289883280637)
    assert name_hashes("[fd00:10:244::7]:53/UDP") == (12673467346556542029, 8215763322163780198)
    assert permutation_params("10.244.1.5:8080/TCP", 251) == (168, 138)
    assert permutation_params("10.244.1.5:8080/TCP", 131071) == (92385, 43748)
    assert permutation_params("[fd00:10:244::7]:53/UDP", 251) == (50, 199)


def test_name_hashes_are_keyed_blake2b() -> None:
    # The hash is spelt out so another implementation can reproduce it.
    name = "10.244.1.5:8080/TCP"
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=b"xdplb-maglev-v1").digest()
    h1 = int.from_bytes(digest[:8], "little")
    h2 = int.from_bytes(digest[8:], "little")
    assert name_hashes(name) == (h1, h2)


PINNED_BACKENDS = ["10.244.1.5:8080/TCP", "10.244.2.7:8080/TCP", "10.244.3.9:8080/TCP"]
PINNED_PREFIX = [1, 0, 2, 0, 0, 1, 2, 1, 0, 1, 1, 1, 1, 0, 0, 2, 0, 0, 2, 2, 1, 2, 1, 2]
PINNED_SHA256 = "3ee0a747da281892941e3545b7574f0d24fad1381785d7ab1a3791503a0b91a4"


def test_table_pinned() -> None:
    table = populate(PINNED_BACKENDS, 251)
    assert table[: len(PINNED_PREFIX)] == PINNED_PREFIX
    assert hashlib.sha256(bytes(table)).hexdigest() == PINNED_SHA256


@pytest.mark.parametrize("seed", ["0", "12345"])
def test_table_independent_of_python_hash_seed(seed: str) -> None:
    code = (
        "import hashlib; from lb.service.maglev import populate; "
        f"print(hashlib.sha256(bytes(populate({PINNED_BACKENDS!r}, 251))).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == PINNED_SHA256
