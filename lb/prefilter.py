"""lb_filter's and lb_pol_filter's contents: which (kind, address, port) members set which bit,
and the words as written, so that a sync writes only the words whose value
changed. The bits are bpf/lib/filter.h's; the hash is lb.encoding.filter_bit.

A member's bit is set before the entry it stands for becomes usable (`admit`,
at the start of a sync, for everything the sync may write) and cleared only
after that entry is gone (`settle`, at the end, over what is programmed):
the filter may say "maybe" about a packet that is no service traffic, never
"no" about one that is.

Members are counted per holder (`hold`, `release`): the services
reconciler holds one for each programmed frontend, ClusterIP and backend, and
so touches only what a change touches; the policy writer sets them whole
(`admit`, `settle`).

Bits are counted in lb/native.c (a sync from empty at 10k services counts
about 100k members), with one byte per bit: a bit shared by 255 members
stays set for good, which the filter allows."""

from __future__ import annotations

import array
import mmap
from collections import Counter
from collections.abc import Iterable

from lb import native
from lb.encoding import filter_bit, ip_int, ip_text
from loader import layout
from loader.maps import BpfMap

FRONTEND = layout.const("LB_FILTER_FRONTEND")
VIP = layout.const("LB_FILTER_VIP")
BACKEND = layout.const("LB_FILTER_BACKEND")
POLICED = layout.const("LB_FILTER_POLICED")

# (kind, address as text or a host-order int, port)
Member = tuple[int, str | int, int]

# A bit's count is one byte; at its largest the bit stays set (lb/native.c,
# FILTER_STUCK).
_STUCK = 0xFF


class Prefilter:
    """Over a pre-filter map of `words` words (Sizes.filter_words)."""

    def __init__(self, words_map: BpfMap, words: int) -> None:
        self.map = words_map
        self.words = words
        self._refs: Counter[Member] = Counter()  # member -> holders
        self._counts, self._value = self._zeroed()
        self._written: dict[int, int] = {}

    @property
    def members(self) -> set[Member]:
        return set(self._refs)

    def admit(self, members: Iterable[Member]) -> int:
        """Set the bits of `members` (those already present stay); the words
        written."""
        new = set(members) - self._refs.keys()
        self._refs.update(new)
        return self._write(self._count(list(new), 1))

    def settle(self, members: set[Member]) -> int:
        """Make the filter hold exactly `members`; the words written."""
        have = set(self._refs)
        dirty = self._count(list(members - have), 1) + self._count(list(have - members), -1)
        self._refs = Counter(members)
        return self._write(dirty)

    def hold(self, members: Iterable[Member]) -> int:
        """One more holder for each of `members` (repeats count); a bit is
        written when its first member arrives. The words written."""
        return self.move(members, ())

    def release(self, members: Iterable[Member]) -> int:
        """One holder fewer for each of `members`; a bit is cleared when its
        last member leaves. The words written."""
        return self.move((), members)

    def move(self, held: Iterable[Member], released: Iterable[Member]) -> int:
        """`hold(held)` then `release(released)` in one pass, each member
        counted once by its net change (a sync's end: what it programmed
        holds what the sync held for it meanwhile, a sync from empty about
        100k members, most of them netting out). The words written."""
        up, down = Counter(held), Counter(released)
        refs: Counter[Member] = self._refs
        if not down:
            # Holders only come (a sync's start): what had none is first.
            first = [m for m in up if m not in refs]
            refs.update(up)
            return self._write(self._count(first, 1))
        up.subtract(down)
        first, last = [], []
        for m, d in up.items():
            if not d:
                continue
            before = refs.get(m, 0)
            after = before + d
            if after > 0:
                refs[m] = after
            else:
                del refs[m]
            if before <= 0 < after:
                first.append(m)
            elif after <= 0 < before:
                last.append(m)
        return self._write(self._count(first, 1) + self._count(last, -1))

    def recover(self, members: Iterable[Member]) -> int:
        """After a restart: the words the maps hold, then `members` (one
        holder per repeat) counted over them (a word that differs is
        rewritten)."""
        raw = self.map.read_array(0, self.words)
        size = len(raw) // self.words
        self._written = {i: v for i in range(self.words)
                         if (v := int.from_bytes(raw[i * size:i * size + 8], "little"))}
        self._refs = Counter()
        self._counts, self._value = self._zeroed()
        self.hold(members)
        return self._write(list(self._written))

    def _zeroed(self) -> tuple[mmap.mmap, array.array[int]]:
        """No bit counted: a count per bit (in an anonymous mapping, whose
        pages cost memory only once a bit in them is used), a value per word."""
        return mmap.mmap(-1, self.words * 64), array.array("Q", bytes(8 * self.words))

    def _count(self, members: list[Member], delta: int) -> list[int]:
        """Count one holder of each of `members` in (delta 1) or out (-1) of
        its bit: the words whose value changed (a word may come twice)."""
        if not members:
            return []
        built = native.lib()
        if built is None:
            return self._count_py(members, delta)
        ffi, lib = built
        addrs = "\0".join([ip if isinstance(ip, str) else ip_text(ip)
                           for _, ip, _ in members]).encode() + b"\0"
        kinds = array.array("I", [kind for kind, _, _ in members])
        ports = array.array("I", [port for _, _, port in members])
        out = array.array("I", bytes(4 * len(members)))
        n = lib.xdplb_filter_count(
            addrs, native.address(ffi, kinds), native.address(ffi, ports), len(members), delta,
            self.words, native.address(ffi, self._counts, "uint8_t *"),
            native.address(ffi, self._value, "uint64_t *"), native.address(ffi, out))
        if n == -1:
            raise MemoryError(f"no memory to count {len(members)} pre-filter members")
        if n < 0:
            ip_int(members[-2 - n][1])  # raises the ValueError that names it
            raise ValueError(f"pre-filter member {members[-2 - n]}: no IPv4 address")
        return out[:n].tolist()

    def _count_py(self, members: list[Member], delta: int) -> list[int]:
        """_count without the native library: what xdplb_filter_count does."""
        counts, value, words = self._counts, self._value, self.words
        bits = [filter_bit(kind, ip_int(ip), port, words) for kind, ip, port in members]
        out = []
        for bit in bits:
            c = counts[bit]
            if c == _STUCK or (delta < 0 and c == 0):
                continue
            counts[bit] = c + 1 if delta > 0 else c - 1
            if c == (0 if delta > 0 else 1):
                value[bit >> 6] ^= 1 << (bit & 63)
                out.append(bit >> 6)
        return out

    def _write(self, words: list[int]) -> int:
        """Write the words whose value changed, in one batch (programming
        10k services from empty sets about 100k bits)."""
        keys, values = array.array("I"), array.array("Q")
        for w in sorted(set(words)):
            value = self._value[w]
            if value != self._written.get(w, 0):
                keys.append(w)
                values.append(value)
            if value:
                self._written[w] = value
            else:
                self._written.pop(w, None)
        if keys:
            self.map.update_batch(keys.tobytes(), values.tobytes(), len(keys))
        return len(keys)
