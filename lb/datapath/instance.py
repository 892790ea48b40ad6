"""One datapath instance: its pin directory, the writers that keep its maps
in step, and throwaway instances (lbctl trace, tests, the demo, the
benchmarks) in the kernel or in userspace, programmed the one same way."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from lb.datapath.attach import OBJECT_CACHE
from lb.datapath.interface import PacketDatapath
from lb.model import Cluster, Node
from lb.policy.kernel import MAP_FILTER as POLICY_FILTER
from lb.policy.kernel import MAPS as POLICY_MAPS
from lb.policy.kernel import PolicyWriter
from lb.service import desired, maglev
from lb.service.reconcile import Reconciler
from loader.build import BPFFS, BuildOptions, Datapath, remove_pins
from loader.sizes import Sizes as Sizes

DEFAULT_INSTANCE = "lb"
Kind = Literal["kernel", "userspace"]
KINDS: tuple[Kind, ...] = ("kernel", "userspace")


def pin_dir_of(instance: str) -> Path:
    return BPFFS / instance


# Throwaway instances (lbctl trace, tests, the demo).
SMALL = Sizes(max_services=4096, max_backends=16384, maglev_slots=1 << 20, ct_size=65536)

RECONCILER_MAPS = ("lb_services", "lb_backends", "lb_maglev", "lb_rev_nat", "lb_config",
                   "lb_vips", "lb_svc_cidrs", "lb_source_ranges", "lb_filter")
POLICY_WRITER_MAPS = (*POLICY_MAPS, POLICY_FILTER, "lb_pol_drops")


def reconciler_for(dp: PacketDatapath, min_table_size: int = maglev.TABLE_SIZES[0]
                   ) -> Reconciler:
    """The reconciler of an instance's service maps (kernel or userspace)."""
    s = dp.sizes
    return Reconciler({name: dp.map(name) for name in RECONCILER_MAPS},
                      max_services=s.max_services, max_backends=s.max_backends,
                      maglev_slots=s.maglev_slots, filter_words=s.filter_words,
                      min_table_size=min_table_size)


def policy_writer_for(dp: PacketDatapath) -> PolicyWriter:
    """The policy writer of an instance; with the drop counters, so a reused
    policy id starts its count at zero. The compiler refuses what the maps
    could not hold."""
    return PolicyWriter({name: dp.map(name) for name in POLICY_WRITER_MAPS}, dp.sizes)


def local_pod_ips(cluster: Cluster, node: Node) -> set[str]:
    """Addresses of this node's pods: where a packet's next hook is the
    receiving pod's own (its ingress policy)."""
    return {ip for pod in cluster.pods.values() if not pod.host_network
            and (node.name is None or pod.node_name == node.name) for ip in pod.ips}


def sizes_for(state: desired.DesiredState, floor: Sizes = SMALL) -> Sizes:
    """Room for `state` in a throwaway instance: what the reconciler will
    take of each map, or `floor`, whichever is more."""
    entries = list(state.entries.values())
    need = {
        # Ids run 1..limit-1; frontends and service ports each take one.
        "max_services": max(len(entries), len({e.group for e in entries})) + 1,
        "max_backends": len({(e.group, b) for e in entries for b in (*e.backends, *e.draining)})
        + 1,
        "maglev_slots": sum(maglev.table_size(len(e.backends)) for e in entries),
        "source_ranges": sum(len(e.source_ranges) for e in entries),
    }
    return replace(floor, **{k: max(v, getattr(floor, k)) for k, v in need.items()})


@dataclass
class Programmed:
    """What a throwaway instance was given: the node's pods (whose own hook a
    packet bound to them crosses), the policy behind each policy id, and
    what the maps refused (as a node would refuse it)."""

    local_pods: set[str] = field(default_factory=set)
    policy_names: dict[int, str] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)


def program(dp: PacketDatapath, cluster: Cluster, node: Node,
            state: desired.DesiredState | None = None) -> Programmed:
    """Write the node's whole state for `cluster` (services and policy) into
    an empty instance; what does not fit is refused, as on a node, and said
    in `refused`."""
    res = reconciler_for(dp).sync(state or desired.compute(cluster, node))
    policy = policy_writer_for(dp)
    refused = res.errors + [str(r) for r in policy.sync(cluster, node)]
    return Programmed(local_pod_ips(cluster, node), dict(policy.current.policies), refused)


THROWAWAY_PREFIX = "lbtrace-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans() -> list[Path]:
    """Remove the throwaway instances whose process is gone (killed before it
    could remove its pins); returns their pin directories."""
    gone = []
    for d in BPFFS.glob(f"{THROWAWAY_PREFIX}*"):
        pid = d.name[len(THROWAWAY_PREFIX):].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            remove_pins(d)
            gone.append(d)
    return gone


@contextmanager
def throwaway(kind: Kind = "kernel", sizes: Sizes = SMALL) -> Iterator[PacketDatapath]:
    """An empty instance: the compiled programs (kept in OBJECT_CACHE, as
    the agent keeps them) in a pin directory of their own, removed
    afterwards (kernel), or the Python model (userspace, which needs neither
    root nor BPF)."""
    if kind == "userspace":
        # The twin is for tests and `lbctl trace`: not loaded by the agent.
        from lb.datapath.userspace.programs import UserspaceDatapath

        yield UserspaceDatapath.new(sizes)
        return
    remove_orphans()
    pin_dir = BPFFS / f"{THROWAWAY_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with Datapath(BuildOptions(pin_dir, sizes, objects=OBJECT_CACHE)) as dp:
            yield dp
    finally:
        remove_pins(pin_dir)
