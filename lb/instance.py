"""One datapath instance: its pin directory, compiled programs and the
reconciler that keeps its maps in step. Shared by `lbctl run`, `lbctl
trace`, the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lb.model import Cluster, Node
from lb.policy.compiler import Limits
from lb.policy.kernel import MAPS as POLICY_MAPS
from lb.policy.kernel import PolicyWriter
from lb.reconcile import Reconciler
from loader.build import BPFFS, Datapath
from loader.maps import BpfMap
from loader.sizes import Sizes as Sizes

DEFAULT_INSTANCE = "lb"


def pin_dir_of(instance: str) -> Path:
    return BPFFS / instance


# Throwaway instances (lbctl trace, tests, the demo).
SMALL = Sizes(max_services=4096, max_backends=16384, maglev_slots=1 << 20, ct_size=65536)



RECONCILER_MAPS = ("lb_services", "lb_backends", "lb_maglev", "lb_rev_nat", "lb_config",
                   "lb_vips", "lb_svc_cidrs", "lb_source_ranges")
POLICY_WRITER_MAPS = (*POLICY_MAPS, "lb_pol_drops")


def reconciler_over(maps: Mapping[str, BpfMap], sizes: Sizes) -> Reconciler:
    """A reconciler for the maps (kernel or userspace) of an instance of `sizes`."""
    return Reconciler({name: maps[name] for name in RECONCILER_MAPS},
                      max_services=sizes.max_services, max_backends=sizes.max_backends,
                      maglev_slots=sizes.maglev_slots)


def policy_writer_over(maps: Mapping[str, BpfMap], sizes: Sizes) -> PolicyWriter:
    """A policy writer for those maps; with the drop counters, so a reused
    policy id starts its count at zero. The compiler refuses what the maps
    could not hold."""
    return PolicyWriter({name: maps[name] for name in POLICY_WRITER_MAPS}, Limits.of(sizes))


def reconciler_for(dp: Datapath) -> Reconciler:
    return reconciler_over({name: dp.map(name) for name in RECONCILER_MAPS}, dp.opts.sizes)


def policy_writer_for(dp: Datapath) -> PolicyWriter:
    return policy_writer_over({name: dp.map(name) for name in POLICY_WRITER_MAPS}, dp.opts.sizes)


def local_pod_ips(cluster: Cluster, node: Node) -> set[str]:
    """Addresses of this node's pods: where a packet's next hook is the
    receiving pod's own (its ingress policy)."""
    return {ip for pod in cluster.pods.values() if not pod.host_network
            and (node.name is None or pod.node_name == node.name) for ip in pod.ips}
