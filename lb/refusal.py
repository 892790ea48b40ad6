"""What a sync could not program, and which map had no room for it.

A refused object is logged, counted per map and left out; whatever the maps
held before stays programmed (Cilium likewise keeps a service's previous
entry when its backend ids run out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# The maps whose capacity can refuse an object (lb_services also stands for
# the service-port ids, lb_pol_drops for the policy ids); every one is
# exported (at 0) so a dashboard can alert on any of them.
BOUNDED_MAPS = ("lb_services", "lb_backends", "lb_maglev", "lb_vips", "lb_source_ranges",
                "lb_pol_endpoints", "lb_pol_ipcache", "lb_pol_rules", "lb_pol_portsets",
                "lb_pol_drops")


@dataclass(frozen=True)
class Refusal:
    subject: str  # what was refused, as an operator names it
    reason: str
    map_name: str = ""  # the full map, or "" when room was not the cause

    def __str__(self) -> str:
        room = f" (no room in {self.map_name})" if self.map_name else ""
        return f"{self.subject}: {self.reason}{room}"


def bounded(lines: Sequence[str], limit: int = 10, width: int = 300) -> list[str]:
    """At most `limit` lines of at most `width` characters, then how many
    more there were: a service with thousands of ports is refused in a
    screenful, not a megabyte."""
    out = [ln if len(ln) <= width else ln[:width - 3] + "..." for ln in lines[:limit]]
    if len(lines) > limit:
        out.append(f"... and {len(lines) - limit} more")
    return out
