"""`lbctl trace --datapath userspace`: the same probes, programmed by the
same reconciler and policy writer, through the Python model of the programs
instead of the kernel. Needs neither root nor BPF."""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic_ns

from lb.desired import DesiredState
from lb.instance import SMALL, Sizes, local_pod_ips, policy_writer_over, reconciler_over
from lb.model import Cluster, Node
from lb.trace import Probe, Tracer, TraceResult
from lb.userspace.datapath import UserspaceDatapath
from lb.userspace.maps import DictMap, new_userspace_maps


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


def run_userspace(state: DesiredState, probes: list[Probe], cluster: Cluster | None = None,
                  node: Node | None = None) -> list[TraceResult]:
    """Each probe through one datapath in turn (later probes see the
    connections earlier ones opened), as the kernel tracer does. With the
    cluster and node, NetworkPolicy is programmed and a packet bound for a
    local pod crosses that pod's hook too."""
    dp, maps = userspace_datapath(state)
    local_pods: set[str] = set()
    names: dict[int, str] = {}
    if cluster is not None and node is not None:
        policy = policy_writer_over(maps, SMALL)
        errors = policy.sync(cluster, node)
        if errors:
            raise RuntimeError("; ".join(map(str, errors)))
        local_pods, names = local_pod_ips(cluster, node), dict(policy.current.policies)
    tracer = Tracer(dp, local_pods, names)
    return [tracer.run(p) for p in probes]
