"""`lbctl trace --datapath userspace`: the same probes, programmed by the
same reconciler, through the Python model of the programs instead of the
kernel. Needs neither root nor BPF."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from time import monotonic_ns

from lb.desired import DesiredState
from lb.instance import SMALL, Sizes
from lb.reconcile import Reconciler
from lb.trace import ENTRIES, Probe, TraceResult, probe_frame, trace_result
from lb.userspace.datapath import UserspaceDatapath
from lb.userspace.maps import DictMap, new_userspace_maps
from loader.maps import BpfMap

# The maps the control plane writes (as lb.instance.reconciler_for).
RECONCILED = ("lb_services", "lb_backends", "lb_maglev", "lb_rev_nat")


def reconciler_over(maps: Mapping[str, BpfMap], sizes: Sizes) -> Reconciler:
    """A reconciler for the maps of an instance of `sizes`."""
    return Reconciler({name: maps[name] for name in RECONCILED},
                      max_services=sizes.max_services, max_backends=sizes.max_backends,
                      maglev_slots=sizes.maglev_slots)


def userspace_datapath(state: DesiredState, sizes: Sizes = SMALL,
                       clock: Callable[[], int] = monotonic_ns
                       ) -> tuple[UserspaceDatapath, dict[str, DictMap]]:
    """A userspace datapath holding `state`, as `lb.trace.tracer` loads one
    in the kernel."""
    maps = new_userspace_maps(sizes)
    res = reconciler_over(maps, sizes).sync(state)
    if res.errors:
        raise RuntimeError("; ".join(res.errors))
    return UserspaceDatapath(maps, clock), maps


def run_userspace(state: DesiredState, probes: list[Probe]) -> list[TraceResult]:
    """Each probe through one datapath in turn (later probes see the
    connections earlier ones opened), as the kernel tracer does."""
    dp, _ = userspace_datapath(state)
    results = []
    for probe in probes:
        v = dp.run(ENTRIES[probe.entry], probe_frame(probe))
        results.append(trace_result(probe, v.reason, v.data))
    return results
