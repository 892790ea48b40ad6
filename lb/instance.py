"""One datapath instance: its pin directory, compiled programs and the
reconciler that keeps its maps in step. Shared by `lbctl run`, `lbctl
trace`, the demo and the benchmarks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from lb.model import Cluster, Node
from lb.policy.compiler import Limits
from lb.policy.kernel import MAPS as POLICY_MAPS
from lb.policy.kernel import PolicyWriter
from lb.reconcile import Reconciler
from loader.build import BPFFS, BuildOptions, Datapath
from loader.maps import BpfMap

DEFAULT_INSTANCE = "lb"


def pin_dir_of(instance: str) -> Path:
    return BPFFS / instance


@dataclass(frozen=True)
class Sizes:
    """Map capacities; the defaults suit a node with tens of thousands of
    services. Tools that load throwaway instances use smaller ones."""

    max_services: int = 65536
    max_backends: int = 65536
    maglev_slots: int = 1 << 22
    ct_size: int = 262144
    pol_endpoints: int = 4096
    pol_ipcache: int = 262144
    pol_rules: int = 1 << 20
    pol_portsets: int = 65536

    def options(self, pin_dir: Path, defines: dict[str, str] | None = None) -> BuildOptions:
        # Every size is a BuildOptions field of the same name.
        return BuildOptions(pin_dir=pin_dir, defines=dict(defines or {}), **asdict(self))


SMALL = Sizes(max_services=4096, max_backends=16384, maglev_slots=1 << 20, ct_size=65536)


RECONCILER_MAPS = ("lb_services", "lb_backends", "lb_maglev", "lb_rev_nat", "lb_config",
                   "lb_vips", "lb_svc_cidrs", "lb_source_ranges")
POLICY_WRITER_MAPS = (*POLICY_MAPS, "lb_pol_drops")


def reconciler_over(maps: Mapping[str, BpfMap], sizes: Sizes | BuildOptions) -> Reconciler:
    """A reconciler for the maps (kernel or userspace) of an instance of `sizes`."""
    return Reconciler({name: maps[name] for name in RECONCILER_MAPS},
                      max_services=sizes.max_services, max_backends=sizes.max_backends,
                      maglev_slots=sizes.maglev_slots)


def policy_writer_over(maps: Mapping[str, BpfMap], sizes: Sizes | BuildOptions
                       ) -> PolicyWriter:
    """A policy writer for those maps; with the drop counters, so a reused
    policy id starts its count at zero. The compiler refuses what the maps
    could not hold."""
    limits = Limits(endpoints=sizes.pol_endpoints, ipcache=sizes.pol_ipcache,
                    rules=sizes.pol_rules, portsets=sizes.pol_portsets,
                    policies=sizes.pol_portsets)
    return PolicyWriter({name: maps[name] for name in POLICY_WRITER_MAPS}, limits)


def reconciler_for(dp: Datapath) -> Reconciler:
    return reconciler_over({name: dp.map(name) for name in RECONCILER_MAPS}, dp.opts)


def policy_writer_for(dp: Datapath) -> PolicyWriter:
    return policy_writer_over({name: dp.map(name) for name in POLICY_WRITER_MAPS}, dp.opts)


def local_pod_ips(cluster: Cluster, node: Node) -> set[str]:
    """Addresses of this node's pods: where a packet's next hook is the
    receiving pod's own (its ingress policy)."""
    return {ip for pod in cluster.pods.values() if not pod.host_network
            and (node.name is None or pod.node_name == node.name) for ip in pod.ips}
