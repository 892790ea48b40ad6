"""One datapath instance: its pin directory, compiled programs and the
reconciler that keeps its maps in step. Shared by `lbctl run`, `lbctl
trace`, the demo and the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lb.model import Cluster, Node
from lb.policy.compiler import Limits
from lb.policy.kernel import MAPS as POLICY_MAPS
from lb.policy.kernel import PolicyWriter
from lb.reconcile import Reconciler
from loader.build import BPFFS, BuildOptions, Datapath

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
        return BuildOptions(
            pin_dir=pin_dir,
            max_services=self.max_services,
            max_backends=self.max_backends,
            maglev_slots=self.maglev_slots,
            ct_size=self.ct_size,
            pol_endpoints=self.pol_endpoints,
            pol_ipcache=self.pol_ipcache,
            pol_rules=self.pol_rules,
            pol_portsets=self.pol_portsets,
            defines=dict(defines or {}),
        )


SMALL = Sizes(max_services=4096, max_backends=16384, maglev_slots=1 << 20, ct_size=65536)


def reconciler_for(dp: Datapath) -> Reconciler:
    o = dp.opts
    maps = {name: dp.map(name) for name in ("lb_services", "lb_backends", "lb_maglev",
                                            "lb_rev_nat", "lb_config", "lb_vips",
                                            "lb_svc_cidrs", "lb_source_ranges")}
    return Reconciler(maps, max_services=o.max_services, max_backends=o.max_backends,
                      maglev_slots=o.maglev_slots)


def policy_writer_for(dp: Datapath) -> PolicyWriter:
    o = dp.opts
    # The compiler refuses what these maps could not hold.
    limits = Limits(endpoints=o.pol_endpoints, ipcache=o.pol_ipcache, rules=o.pol_rules,
                    portsets=o.pol_portsets, policies=o.pol_portsets)
    return PolicyWriter({name: dp.map(name) for name in (*POLICY_MAPS, "lb_pol_drops")},
                        limits)


def local_pod_ips(cluster: Cluster, node: Node) -> set[str]:
    """Addresses of this node's pods: where a packet's next hook is the
    receiving pod's own (its ingress policy)."""
    return {ip for pod in cluster.pods.values() if not pod.host_network
            and (node.name is None or pod.node_name == node.name) for ip in pod.ips}
