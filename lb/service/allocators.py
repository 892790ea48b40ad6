"""Allocators for the datapath's numbered resources: ids (services, service
ports, backends) and ranges of the Maglev slab. Both can be rebuilt from what
the pinned maps hold, so a restarted agent keeps every number in use."""

from __future__ import annotations

from collections import defaultdict, deque


class Exhausted(RuntimeError):
    """No id or slab range is left; the object is refused, others stay.
    `map_name` names the map that has no room, for the refusal metric."""

    def __init__(self, message: str, map_name: str = "") -> None:
        super().__init__(message)
        self.map_name = map_name


class IdAllocator:
    """Small integers in [1, limit); 0 means "none" in every map.

    Fresh ids first, then the one freed longest ago: a flow's conntrack entry
    names its service and backend by id, and an id handed straight to a new
    backend of the same service would carry old flows to it with their reply
    entries naming the old address. Cilium's service and backend ids advance
    the same way (pkg/loadbalancer/reconciler/id.go, nextID)."""

    def __init__(self, limit: int, what: str = "ids", map_name: str = "") -> None:
        self.limit = limit
        self.what = what
        self.map_name = map_name
        self._next = 1
        self._free: deque[int] = deque()
        self._used: set[int] = set()

    def alloc(self) -> int:
        if self._next < self.limit:
            ident = self._next
            self._next += 1
        elif self._free:
            ident = self._free.popleft()
        else:
            raise Exhausted(f"all {self.limit - 1} {self.what} are in use", self.map_name)
        self._used.add(ident)
        return ident

    def claim(self, ident: int) -> None:
        """Mark an id found in the maps as used."""
        if not 0 < ident < self.limit:
            raise ValueError(f"id {ident} outside [1, {self.limit})")
        self._used.add(ident)
        if ident >= self._next:
            # Ids skipped over stay available.
            self._free.extend(range(self._next, ident))
            self._next = ident + 1
        elif ident in self._free:
            self._free.remove(ident)

    def in_use(self, ident: int) -> bool:
        return ident in self._used

    def free(self, ident: int) -> None:
        if ident in self._used:
            self._used.remove(ident)
            self._free.append(ident)

    def __len__(self) -> int:
        return len(self._used)


class SlabAllocator:
    """Ranges of a flat array. Table sizes come from a short ladder of
    primes, so freed ranges are kept in exact-size lists and reused as they
    are; fresh space comes from a bump pointer; as a last resort a larger
    free range is split."""

    def __init__(self, capacity: int, map_name: str = "") -> None:
        self.capacity = capacity
        self.map_name = map_name
        self._top = 0
        self._free: dict[int, list[int]] = defaultdict(list)
        self.in_use = 0

    def alloc(self, size: int) -> int:
        if size <= 0:
            raise ValueError("size must be positive")
        if self._free.get(size):
            off = self._free[size].pop()
        elif self._top + size <= self.capacity:
            off = self._top
            self._top += size
        else:
            off = self._split(size)
        self.in_use += size
        return off

    def _split(self, size: int) -> int:
        for big in sorted(s for s, offs in self._free.items() if s > size and offs):
            off = self._free[big].pop()
            self._free[big - size].append(off + size)
            return off
        raise Exhausted(
            f"Maglev slab full: {size} slots wanted, {self.capacity - self.in_use} free "
            f"of {self.capacity} but not in one piece", self.map_name
        )

    def free(self, off: int, size: int) -> None:
        self._free[size].append(off)
        self.in_use -= size

    def rebuild(self, used: list[tuple[int, int]]) -> None:
        """Start from the ranges the maps hold; the gaps between them are free."""
        self._free.clear()
        self.in_use = 0
        pos = 0
        for off, size in sorted(used):
            if off < pos:
                raise ValueError(f"overlapping Maglev ranges at slot {off}")
            if off > pos:
                self._free[off - pos].append(pos)
            pos = off + size
            self.in_use += size
        self._top = pos
