"""lb_filter's and lb_pol_filter's contents: which (kind, address, port) members set which bit,
and the words as written, so that a sync writes only the words whose value
changed. The bits are bpf/lib/filter.h's; the hash is lb.encoding.filter_bit.

A member's bit is set before the entry it stands for becomes usable (`admit`,
at the start of a sync, for everything the sync may write) and cleared only
after that entry is gone (`settle`, at the end, over what is programmed):
the filter may say "maybe" about a packet that is no service traffic, never
"no" about one that is."""

from __future__ import annotations

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
        self.members: set[Member] = set()
        self._counts: Counter[int] = Counter()
        self._written: dict[int, int] = {}

    def admit(self, members: Iterable[Member]) -> int:
        """Set the bits of `members` (those already present stay); the words
        written."""
        new = set(members) - self.members
        self.members |= new
        return self._write({w for m in new if (w := self._count(m, 1)) is not None})

    def settle(self, members: set[Member]) -> int:
        """Make the filter hold exactly `members`; the words written."""
        dirty = {w for m in members - self.members if (w := self._count(m, 1)) is not None}
        dirty |= {w for m in self.members - members if (w := self._count(m, -1)) is not None}
        self.members = set(members)
        return self._write(dirty)

    def recover(self, members: set[Member]) -> int:
        """After a restart: the words the maps hold, then `members` settled
        over them (a word that differs is rewritten)."""
        raw = self.map.read_array(0, self.words)
        size = len(raw) // self.words
        self._written = {i: v for i in range(self.words)
                         if (v := int.from_bytes(raw[i * size:i * size + 8], "little"))}
        self.members, self._counts = set(), Counter()
        self.settle(members)
        return self._write(set(self._written))

    def _count(self, m: Member, delta: int) -> int | None:
        """Count `m` in or out of its bit: its word when the bit flips."""
        bit = filter_bit(m[0], ip_int(m[1]), m[2], self.words)
        before = self._counts[bit]
        self._counts[bit] = before + delta
        if self._counts[bit] <= 0:
            del self._counts[bit]
        return bit >> 6 if (before == 0) != (self._counts[bit] == 0) else None

    def _write(self, words: set[int]) -> int:
        written = 0
        for w in sorted(words):
            value = sum(1 << b for b in range(64) if (w << 6) | b in self._counts)
            if value != self._written.get(w, 0):
                self.map.update(w, value)
                written += 1
            if value:
                self._written[w] = value
            else:
                self._written.pop(w, None)
        return written
