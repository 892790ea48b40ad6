"""What a sync could not program, and which map had no room for it.

A refused object is logged, counted per map and left out; whatever the maps
held before stays programmed (Cilium likewise keeps a service's previous
entry when its backend ids run out)."""

from __future__ import annotations

from dataclasses import dataclass

# The maps whose capacity can refuse an object, each with what it holds;
# every one is exported (at 0) so a dashboard can alert on any of them.
BOUNDED_MAPS = {
    "lb_services": "service frontends and service-port ids",
    "lb_backends": "backend ids",
    "lb_maglev": "Maglev slots",
    "lb_vips": "ClusterIPs",
    "lb_source_ranges": "loadBalancerSourceRanges",
    "lb_pol_endpoints": "isolated local pods",
    "lb_pol_ipcache": "peer addresses and CIDRs",
    "lb_pol_rules": "policy rules",
    "lb_pol_portsets": "port-set slots",
    "lb_pol_drops": "policy ids",
}


@dataclass(frozen=True)
class Refusal:
    subject: str  # what was refused, as an operator names it
    reason: str
    map_name: str = ""  # the full map, or "" when room was not the cause

    def __str__(self) -> str:
        room = f" (no room in {self.map_name})" if self.map_name else ""
        return f"{self.subject}: {self.reason}{room}"
