"""Maglev consistent hashing for service backend tables.

Each backend set of a service port owns a range of ``size`` slots in a flat BPF array; the
datapath sends a flow to the backend in slot ``hash(5-tuple) % size``.  This module computes
the contents of that range with the population algorithm of Maglev (Eisenbud et al., NSDI
2016, section 3.4):

* every backend gets a permutation of the slots, ``(offset + j * skip) % size`` with
  ``offset = h1(name) % size`` and ``skip = h2(name) % (size - 1) + 1`` (``size`` is prime, so
  every skip generates a full permutation);
* backends take turns claiming their most preferred slot that is still free, until the
  table is full.

The result depends only on the set of backend names and the table size (``kept_size`` keeps
the size while backends come and go), and the name hashes are keyed BLAKE2b rather than
Python's per-process randomised ``hash()``, so every node computes the same table: a flow that
ECMP lands on another node still reaches the same backend.
"""

from __future__ import annotations

import array
import hashlib
import itertools
import struct
from collections.abc import Sequence
from typing import Any

import cffi

from lb import native

# Primes, roughly doubling, so a table can keep about SLOTS_PER_BACKEND slots per backend.
TABLE_SIZES: tuple[int, ...] = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)

# Maglev gives each backend floor(size / n) or ceil(size / n) slots, so at >= 100 slots per
# backend no backend's share is more than 1% away from equal.
SLOTS_PER_BACKEND = 100

MAX_BACKENDS = TABLE_SIZES[-1] // SLOTS_PER_BACKEND

# A table shrinks only when it is this many sizes above what its backends
# need (about 4x the slots), so a count going up and down across one size
# boundary does not rebuild the table each time.
SHRINK_STEPS = 2

# Domain separation: these hashes are part of the cross-node contract and must not collide
# by accident with any other use of BLAKE2b on the same strings.
_HASH_PERSON = b"xdplb-maglev-v1"
# Keyed once; each name hashes a copy (half the cost of keying per name).
_HASH_BASE = hashlib.blake2b(digest_size=16, person=_HASH_PERSON)
# The personalization as BLAKE2b's parameter block holds it, for lb/native.c.
_PERSON_BLOCK = _HASH_PERSON.ljust(16, b"\0")
_TWO_U64 = struct.Struct("<QQ")


def table_size(n_backends: int, smallest: int = TABLE_SIZES[0]) -> int:
    """Return the table size for ``n_backends`` backends.

    The smallest prime in ``TABLE_SIZES`` that is at least ``SLOTS_PER_BACKEND * n_backends``
    and at least ``smallest`` (a size of the ladder: a node's floor, for fewer moved flows at
    small counts, see README); 0 for no backends.  It depends on nothing but the count and
    the floor, so all nodes with one floor agree on it.

    Raises ValueError for a negative count or more than ``MAX_BACKENDS`` backends.
    """
    if n_backends < 0:
        raise ValueError(f"backend count must not be negative, got {n_backends}")
    if smallest not in TABLE_SIZES:
        raise ValueError(f"{smallest} is not a Maglev table size")
    if n_backends == 0:
        return 0
    wanted = max(SLOTS_PER_BACKEND * n_backends, smallest)
    for size in TABLE_SIZES:
        if size >= wanted:
            return size
    raise ValueError(
        f"{n_backends} backends do not fit the Maglev table: the largest table has "
        f"{TABLE_SIZES[-1]} slots, enough for at most {MAX_BACKENDS} backends at "
        f"{SLOTS_PER_BACKEND} slots each"
    )


def kept_size(current: int, n_backends: int, smallest: int = TABLE_SIZES[0]) -> int:
    """Return the size a table of ``current`` slots takes for ``n_backends``.

    A table keeps its size while it holds the count at ``SLOTS_PER_BACKEND`` slots each, so
    a backend added or removed moves only about 1/n of the slots (a new size would move
    nearly all of them, as Cilium's fixed table and Katran's fixed ring avoid). It grows
    to ``table_size`` when the count no longer fits, and shrinks to it only when it is
    ``SHRINK_STEPS`` sizes too large.  ``current`` 0 (no table yet) gives ``table_size``.
    """
    fresh = table_size(n_backends, smallest)
    if current == 0 or fresh == 0 or fresh > current:
        return fresh
    if current not in TABLE_SIZES:
        raise ValueError(f"{current} is not a Maglev table size")
    if TABLE_SIZES.index(current) - TABLE_SIZES.index(fresh) >= SHRINK_STEPS:
        return fresh
    return current


def name_hashes(name: str) -> tuple[int, int]:
    """Return the two independent 64-bit hashes (h1, h2) of a backend name.

    Both halves of one keyed BLAKE2b digest of the UTF-8 name, read little-endian.  Stable
    across processes, machines and Python versions.
    """
    h = _HASH_BASE.copy()
    h.update(name.encode("utf-8"))
    h1, h2 = _TWO_U64.unpack(h.digest())
    return h1, h2


def permutation_params(name: str, size: int) -> tuple[int, int]:
    """Return ``(offset, skip)`` of ``name``'s slot permutation in a table of prime ``size``.

    The backend's j-th preferred slot is ``(offset + j * skip) % size``.
    """
    _check_prime(size)
    return _params(name, size)


def populate(backends: Sequence[str], size: int,
             labels: Sequence[int] | None = None) -> list[int]:
    """``populate_array`` as a list."""
    return populate_array(backends, size, labels).tolist()


def populate_array(backends: Sequence[str], size: int,
                   labels: Sequence[int] | None = None) -> array.array[int]:
    """Fill a Maglev table of ``size`` slots; return, per slot, an index into ``backends``
    (or, given ``labels``, the label of that backend: ``labels[index]``, e.g. its id).

    ``backends`` are stable names such as ``"10.244.1.5:8080/TCP"``.  They are sorted by name
    (code point order) before population, so the order of the input does not change which
    backend a slot gets; the returned values are nonetheless indices into the sequence as
    passed, i.e. ``backends[table[slot]]`` is the backend of ``slot``.

    ``size`` must be a prime (see ``table_size``) and at least ``len(backends)``.  No backends
    give an empty table, which is only valid with ``size == 0``.  Duplicate names are
    rejected: they would share one permutation and make the table depend on input order.
    """
    n = len(backends)
    if n == 0:
        if size != 0:
            raise ValueError(f"cannot fill {size} slots without backends")
        return array.array("I")
    _check_prime(size)
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} backends")
    if size < n:
        raise ValueError(f"table of {size} slots is too small for {n} backends")
    built = native.lib()
    if built is not None:
        return _native_populate(built, backends, size, labels)
    return _python_populate(backends, size, labels)


def _python_populate(backends: Sequence[str], size: int,
                     labels: Sequence[int] | None) -> array.array[int]:
    """populate_array without the native library (and its reference)."""
    n = len(backends)
    order = sorted(range(n), key=backends.__getitem__)
    if len(set(backends)) != n:
        for a, b in itertools.pairwise(order):
            if backends[a] == backends[b]:
                raise ValueError(f"duplicate backend name {backends[a]!r}")
    params = [_params(backends[i], size) for i in order]
    turn_labels = [labels[i] for i in order] if labels is not None else order
    return array.array("I", _fill(turn_labels, [offset for offset, _ in params],
                                  [skip for _, skip in params], size))


def _native_populate(built: tuple[cffi.FFI, Any], backends: Sequence[str], size: int,
                     labels: Sequence[int] | None) -> array.array[int]:
    """populate_array in lb/native.c: the same sort, hashes and loop."""
    ffi, lib = built
    names = [b.encode("utf-8") for b in backends]
    lens = array.array("I", map(len, names))
    ids = array.array("I", labels if labels is not None else range(len(backends)))
    entry = array.array("I", bytes(4 * size))
    ret = lib.xdplb_maglev_populate(
        b"".join(names), native.address(ffi, lens), native.address(ffi, ids), len(backends),
        size, _PERSON_BLOCK, native.address(ffi, entry))
    if ret == -1:
        raise MemoryError(f"no memory for a Maglev table of {size} slots")
    if ret < 0:
        raise ValueError(f"duplicate backend name {backends[-2 - ret]!r}")
    return entry


def _fill(labels: list[int], offsets: list[int], skips: list[int], size: int) -> list[int]:
    """Run the Maglev round-robin for backends given in turn order.

    Backend ``k`` (the k-th turn) writes ``labels[k]`` into the slots it wins.
    """
    n = len(labels)
    entry = [-1] * size
    taken = bytearray(size)
    # Per backend, the slot it tries next: its most preferred slot not yet seen taken.  Kept
    # as a reduced slot number rather than a permutation index so a probe is an add, a compare
    # and a byte lookup, with no multiplication or modulo.
    pos = offsets[:]
    rounds, last = divmod(size, n)
    turns = list(zip(range(n), skips, labels, strict=True))
    for r in range(rounds + (1 if last else 0)):
        if r == rounds:
            # The table fills part-way through the final round.
            turns = turns[:last]
        for k, skip, label in turns:
            c = pos[k]
            while taken[c]:
                c += skip
                if c >= size:
                    c -= size
            taken[c] = 1
            entry[c] = label
            c += skip
            pos[k] = c - size if c >= size else c
    return entry


def _params(name: str, size: int) -> tuple[int, int]:
    h1, h2 = name_hashes(name)
    return h1 % size, h2 % (size - 1) + 1


def _check_prime(size: int) -> None:
    # Maglev needs a prime size so that every skip in [1, size - 1] visits every slot.
    if size in TABLE_SIZES:
        return
    if size < 2 or any(size % d == 0 for d in range(2, int(size**0.5) + 1)):
        raise ValueError(f"Maglev table size must be a prime, got {size}")
