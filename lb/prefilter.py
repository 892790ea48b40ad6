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
(`admit`, `settle`)."""

from __future__ import annotations

import array
from collections import Counter
from collections.abc import Iterable

from lb.encoding import filter_bit, ip_int
from loader import layout
from loader.maps import BpfMap

FRONTEND = layout.const("LB_FILTER_FRONTEND")
VIP = layout.const("LB_FILTER_VIP")
BACKEND = layout.const("LB_FILTER_BACKEND")
POLICED = layout.const("LB_FILTER_POLICED")

# (kind, address as text or a host-order int, port)
Member = tuple[int, str | int, int]


class Prefilter:
    """Over a pre-filter map of `words` words (Sizes.filter_words)."""

    def __init__(self, words_map: BpfMap, words: int) -> None:
        self.map = words_map
        self.words = words
        self._refs: Counter[Member] = Counter()  # member -> holders
        self._counts: Counter[int] = Counter()  # bit -> members
        self._value: dict[int, int] = {}  # word -> its bits as counted
        self._written: dict[int, int] = {}

    @property
    def members(self) -> set[Member]:
        return set(self._refs)

    def admit(self, members: Iterable[Member]) -> int:
        """Set the bits of `members` (those already present stay); the words
        written."""
        new = set(members) - self._refs.keys()
        self._refs.update(new)
        return self._write({w for m in new if (w := self._count(m, 1)) is not None})

    def settle(self, members: set[Member]) -> int:
        """Make the filter hold exactly `members`; the words written."""
        have = set(self._refs)
        dirty = {w for m in members - have if (w := self._count(m, 1)) is not None}
        dirty |= {w for m in have - members if (w := self._count(m, -1)) is not None}
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
        net = Counter(held)
        net.subtract(released)
        refs, first, last = self._refs, [], []
        for m, d in net.items():
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
        dirty = {w for bit in self._bits(first) if (w := self._flip(bit, 1)) is not None}
        dirty |= {w for bit in self._bits(last) if (w := self._flip(bit, -1)) is not None}
        return self._write(dirty)

    def recover(self, members: Iterable[Member]) -> int:
        """After a restart: the words the maps hold, then `members` (one
        holder per repeat) counted over them (a word that differs is
        rewritten)."""
        raw = self.map.read_array(0, self.words)
        size = len(raw) // self.words
        self._written = {i: v for i in range(self.words)
                         if (v := int.from_bytes(raw[i * size:i * size + 8], "little"))}
        self._refs, self._counts, self._value = Counter(), Counter(), {}
        self.hold(members)
        return self._write(set(self._written))

    def _bits(self, members: list[Member]) -> list[int]:
        """The bit of each member."""
        words = self.words
        return [filter_bit(kind, ip_int(ip), port, words) for kind, ip, port in members]

    def _count(self, m: Member, delta: int) -> int | None:
        """Count `m` in or out of its bit: its word when the bit flips."""
        return self._flip(self._bits([m])[0], delta)

    def _flip(self, bit: int, delta: int) -> int | None:
        """Count a member in or out of `bit`: its word when the bit flips."""
        before = self._counts.get(bit, 0)
        after = before + delta
        if after > 0:
            self._counts[bit] = after
        else:
            self._counts.pop(bit, None)
        if (before == 0) == (after <= 0):
            return None
        w = bit >> 6
        self._value[w] = self._value.get(w, 0) ^ (1 << (bit & 63))
        return w

    def _write(self, words: set[int]) -> int:
        """Write the words whose value changed, in one batch (programming
        10k services from empty sets about 100k bits)."""
        keys, values = array.array("I"), array.array("Q")
        for w in sorted(words):
            value = self._value.get(w, 0)
            if not value:
                self._value.pop(w, None)
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
