"""The datapath's per-CPU counters (struct lb_stat, in lb_stats by stat
reason and in lb_pol_drops by policy id), summed over CPUs: the one place
that reads them, for the metrics, `lbctl maps stats`, the tracer and the
policy views alike."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class CounterMap(Protocol):
    """A per-CPU array, kernel (loader.maps.BpfMap) or userspace (DictMap):
    lookup gives one struct lb_stat per CPU, or None."""

    def lookup(self, key: Any) -> Any: ...


class Count(NamedTuple):
    packets: int
    bytes: int


def count(m: CounterMap, index: int) -> Count:
    per_cpu = m.lookup(index) or []
    return Count(int(sum(s.packets for s in per_cpu)), int(sum(s.bytes for s in per_cpu)))
