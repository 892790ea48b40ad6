"""What the policy maps hold, as Python values: the map-content types the
compiler produces, the encoder writes, lookup and the views read; and the
difference between two such contents, in the order it is safe to apply.
Names and numbers come from bpf/lb_maps.h."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

from lb.model import PROTO_NAMES
from lb.policy.common import EGRESS, INGRESS, PROTO_ANY
from loader.layout import const

MAP_ENDPOINTS = "lb_pol_endpoints"
MAP_IPCACHE = "lb_pol_ipcache"
MAP_RULES = "lb_pol_rules"
MAP_PORTSETS = "lb_pol_portsets"
# percpu_array __u32 policy id -> struct lb_stat: drops blamed on each policy.
MAP_DROPS = "lb_pol_drops"

PORTS_PER_SET = const("LB_POL_PORTS_PER_SET")
MAX_CHAIN = const("LB_POL_MAX_CHAIN")
T = TypeVar("T")
IDENTITY_ANY = const("LB_POL_IDENTITY_ANY")
PEER_HOST = const("LB_POL_PEER_HOST")
ISOLATED = {INGRESS: const("LB_POL_ISOLATED_INGRESS"), EGRESS: const("LB_POL_ISOLATED_EGRESS")}

Prefix = tuple[int, int]  # (network address as an int, prefix length)
RuleKey = tuple[int, int, int]  # (local pod address, identity, direction)


def walk_chain(slot: int, lookup: Callable[[int], T | None], next_of: Callable[[T], int]
               ) -> Iterator[tuple[int, T]]:
    """The slots of a port set chain from `slot`, each with its value, as the
    datapath follows them (lb_pol_ports_allow): slot 0 or a missing slot
    ends it, and at most MAX_CHAIN slots are read."""
    for _ in range(MAX_CHAIN):
        value = lookup(slot) if slot else None
        if value is None:
            return
        yield slot, value
        slot = next_of(value)



def mask(plen: int) -> int:
    return (0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF


def prefix_text(p: Prefix) -> str:
    return f"{ipaddress.IPv4Address(p[0])}/{p[1]}"


@dataclass(frozen=True)
class EndpointEntry:
    flags: int  # ISOLATED bits
    ingress_policy: int = 0  # policy ids blamed for a drop
    egress_policy: int = 0

    def policy(self, direction: int) -> int:
        return self.ingress_policy if direction == INGRESS else self.egress_policy


@dataclass(frozen=True)
class PeerEntry:
    identity: int
    flags: int = 0  # PEER_HOST


@dataclass(frozen=True, order=True)
class PortRange:
    proto: int  # PROTO_ANY: any protocol, and lo..hi is 0..65535
    lo: int
    hi: int
    policy: int

    def __str__(self) -> str:
        if self.proto == PROTO_ANY:
            return "any"
        name = PROTO_NAMES.get(self.proto, str(self.proto))
        if (self.lo, self.hi) == (0, 65535):
            return f"{name} all"
        return f"{name} {self.lo}" if self.lo == self.hi else f"{name} {self.lo}-{self.hi}"


@dataclass(frozen=True)
class PortSet:
    ranges: tuple[PortRange, ...]  # at most PORTS_PER_SET
    next: int = 0


@dataclass(frozen=True)
class PolicyMaps:
    """Exactly what the maps hold (see bpf/lb_maps.h), as Python values;
    what `lookup` reads and `encode` writes. Addresses are ints. Treat as
    immutable (the ipcache's prefix lengths and the rules by endpoint are
    cached)."""

    endpoints: dict[int, EndpointEntry] = field(default_factory=dict)
    ipcache: dict[Prefix, PeerEntry] = field(default_factory=dict)
    rules: dict[RuleKey, int] = field(default_factory=dict)
    portsets: dict[int, PortSet] = field(default_factory=dict)
    # Not a datapath map: policy id -> "namespace/name", for people.
    policies: dict[int, str] = field(default_factory=dict)

    @cached_property
    def ipcache_lengths(self) -> tuple[int, ...]:
        """Prefix lengths present, longest first (the trie's search order)."""
        return tuple(sorted({plen for _, plen in self.ipcache}, reverse=True))

    def chain(self, slot: int) -> list[PortRange]:
        """The ranges of the port set starting at `slot`."""
        return [r for _, ps in walk_chain(slot, self.portsets.get, lambda ps: ps.next)
                for r in ps.ranges]

    @cached_property
    def _rules_by_endpoint(self) -> dict[tuple[int, int], list[tuple[int, int]]]:
        out: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for (local, ident, direction), slot in self.rules.items():
            out.setdefault((local, direction), []).append((ident, slot))
        return {k: sorted(v) for k, v in out.items()}

    def rules_of(self, addr: int, direction: int) -> list[tuple[int, int]]:
        """(identity, first port-set slot) of one local pod and direction, by
        identity."""
        return self._rules_by_endpoint.get((addr, direction), [])

    def rule_rows(self, addr: int, direction: int, peer_text: Callable[[int], str],
                  policy_text: Callable[[int], Any]) -> list[dict[str, Any]]:
        """One {peer, ports, policy} per identity and credited policy: the
        rules of a local pod's direction for people (`lbctl maps policy`)."""
        rows = []
        for ident, slot in self.rules_of(addr, direction):
            per_policy: dict[int, list[str]] = {}
            for r in self.chain(slot):
                per_policy.setdefault(r.policy, []).append(str(r))
            rows += [{"peer": peer_text(ident), "ports": ", ".join(ports),
                      "policy": policy_text(pid)} for pid, ports in sorted(per_policy.items())]
        return rows


# --- differences -------------------------------------------------------------


@dataclass(frozen=True)
class MapChanges:
    put: dict[Any, Any] = field(default_factory=dict)
    delete: tuple[Any, ...] = ()


@dataclass(frozen=True)
class PolicyDiff:
    """What turns the maps of one compile into those of the next. Apply in
    `steps()` order: new port sets, then rules, ipcache and endpoints that
    point to them, then removals in reverse. Since a number that changes
    meaning is never reused within one compile, every packet meanwhile sees
    the old or the new decision for its lookup. Removing a port-set slot
    means writing zeros (it is an array)."""

    portsets: MapChanges
    rules: MapChanges
    ipcache: MapChanges
    endpoints: MapChanges
    policies: dict[int, str] = field(default_factory=dict)  # the new names, whole

    def steps(self) -> Iterator[tuple[str, str, Any, Any]]:
        """(map name, "put" | "delete", key, value or None), in a safe order."""
        order = ((MAP_PORTSETS, self.portsets), (MAP_RULES, self.rules),
                 (MAP_IPCACHE, self.ipcache), (MAP_ENDPOINTS, self.endpoints))
        for name, ch in order:
            for k, v in ch.put.items():
                yield name, "put", k, v
        for name, ch in reversed(order):
            for k in ch.delete:
                yield name, "delete", k, None

    def __len__(self) -> int:
        return sum(len(c.put) + len(c.delete)
                   for c in (self.portsets, self.rules, self.ipcache, self.endpoints))


def _changes(old: dict[Any, Any], new: dict[Any, Any]) -> MapChanges:
    return MapChanges(
        put={k: v for k, v in new.items() if old.get(k) != v},
        delete=tuple(k for k in old if k not in new),
    )


def diff(old: PolicyMaps, new: PolicyMaps, rules: MapChanges | None = None) -> PolicyDiff:
    """`rules`: the rules' changes when the compile of `new` knows them
    (against `old`), so that 100,000 rules are not compared for a few."""
    return PolicyDiff(
        portsets=_changes(old.portsets, new.portsets),
        rules=rules if rules is not None else _changes(old.rules, new.rules),
        ipcache=_changes(old.ipcache, new.ipcache),
        endpoints=_changes(old.endpoints, new.endpoints),
        policies=dict(new.policies),
    )


def apply(maps: PolicyMaps, change: PolicyDiff) -> PolicyMaps:
    """`maps` with `change` applied (what the kernel maps hold afterwards)."""
    out: dict[str, dict[Any, Any]] = {
        "portsets": dict(maps.portsets), "rules": dict(maps.rules),
        "ipcache": dict(maps.ipcache), "endpoints": dict(maps.endpoints),
    }
    for name in out:
        ch: MapChanges = getattr(change, name)
        for k in ch.delete:
            out[name].pop(k, None)
        out[name].update(ch.put)
    return PolicyMaps(endpoints=out["endpoints"], ipcache=out["ipcache"], rules=out["rules"],
                      portsets=out["portsets"], policies=dict(change.policies))
