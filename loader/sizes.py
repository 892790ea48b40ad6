"""Map capacities: the one definition. Each size names the C define it
becomes (bpf/lib/maps.h declares every map with one, or with a fixed size
from bpf/lb_maps.h); the build's -D flags, the check of pinned maps, the
userspace twin's maps, `lbctl run`'s size flags and the policy compiler's
limits all follow from here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _size(default: int, define: str, what: str, flag: str | None = None) -> Any:
    return field(default=default, metadata={"define": define, "what": what, "flag": flag})


@dataclass(frozen=True)
class Sizes:
    """The defaults suit a node with tens of thousands of services; tools
    that load throwaway instances use smaller ones."""

    max_services: int = _size(65536, "LB_MAX_SERVICES",
                              "service frontends (address, port, protocol, scope)",
                              "max-services")
    max_backends: int = _size(65536, "LB_MAX_BACKENDS",
                              "backends (one per endpoint and service port)", "max-backends")
    maglev_slots: int = _size(1 << 22, "LB_MAGLEV_SLOTS",
                              "Maglev slots of all services together", "maglev-slots")
    ct_size: int = _size(262144, "LB_CT_SIZE", "connection-tracking entries (LRU)",
                         "conntrack-size")
    affinity_size: int = _size(65536, "LB_AFFINITY_SIZE",
                               "ClientIP affinity and socket reverse-NAT entries (LRU)")
    pol_endpoints: int = _size(4096, "LB_POL_MAX_ENDPOINTS",
                               "local pods that NetworkPolicy isolates", "policy-max-pods")
    pol_ipcache: int = _size(262144, "LB_POL_IPCACHE_SIZE", "policy ipcache prefixes")
    pol_rules: int = _size(1 << 20, "LB_POL_RULES_SIZE", "policy rules")
    # Also the policy ids: lb_pol_drops has one counter per port-set slot.
    pol_portsets: int = _size(65536, "LB_POL_PORTSETS", "policy port-set slots")
    source_ranges: int = _size(16384, "LB_MAX_SOURCE_RANGES",
                               "loadBalancerSourceRanges of all services together")

    @property
    def filter_words(self) -> int:
        """Words of the pre-filters (bpf/lib/filter.h): 16 bits or more for
        each member there can be (two frontends and a ClusterIP per service,
        a backend each), so that a packet that is no service traffic finds
        its bit set one time in 16 or less; a power of two."""
        bits = 16 * (3 * self.max_services + self.max_backends)
        return max(1024, 1 << (bits // 64 - 1).bit_length())

    def defines(self) -> dict[str, int]:
        """The -D defines of the build: define -> size."""
        return {**{f.metadata["define"]: getattr(self, f.name) for f in fields(self)},
                "LB_FILTER_WORDS": self.filter_words}


@dataclass(frozen=True)
class SizeFlag:
    flag: str  # without the leading dashes
    field: str
    what: str


# The sizes an operator may raise, as `lbctl run` flags (Cilium's
# --bpf-lb-map-max, --bpf-ct-global-*-max). Pinned maps keep their size: a
# new size needs `lbctl down` (the agent refuses mismatched pins and says so).
SIZE_FLAGS = tuple(SizeFlag(f.metadata["flag"], f.name, f.metadata["what"])
                   for f in fields(Sizes) if f.metadata["flag"])
