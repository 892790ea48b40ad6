"""NetworkPolicy for people, one renderer for both sources of it:

- `rows(maps)`: what the pinned policy maps of a running instance say, read
  back from the kernel (any process can; the agent need not be asked). This
  is `lbctl maps policy`. The maps carry numbers, not names: a pod is its
  address, a peer is an identity with the ipcache prefixes that have it
  (pods as /32), a policy is its id (the index of its drop counter in
  lb_pol_drops). Only pods some policy isolates have an entry.
- `describe(compiled)`: the same rows from a compile, with names: every
  local pod, a peer's pods by name, a policy by namespace/name.

One row per pod, direction and (peer, credited policy); an isolated
direction without a rule, or one not isolated, is one row with peer and
ports "-"."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lb.counters import count
from lb.encoding import ip_text
from lb.policy.common import DIRECTION_NAMES, EGRESS, INGRESS
from lb.policy.compiler import CompiledPolicy
from lb.policy.contents import (
    IDENTITY_ANY,
    ISOLATED,
    MAP_DROPS,
    PEER_HOST,
    PolicyMaps,
    prefix_text,
)
from lb.policy.kernel import read
from lb.policy.lookup import policy_name
from loader.maps import BpfMap

MAX_MEMBERS = 4  # members shown per identity before "+N more"


@dataclass(frozen=True)
class Labels:
    """How a row names what the maps hold as numbers."""

    pods: Iterable[int]  # the pods to show, by address
    pod: Callable[[int], str]
    peer: Callable[[int], str]  # an identity other than "any"
    policy: Callable[[int], Any]
    drops: Callable[[int], int | None]


def _shown(names: list[str]) -> str:
    more = len(names) - MAX_MEMBERS
    return ", ".join(names[:MAX_MEMBERS]) + (f" +{more} more" if more > 0 else "")


def render(pm: PolicyMaps, labels: Labels) -> list[dict[str, Any]]:
    """pod, direction, isolated, drop_policy (blamed for a drop) and its
    drops, then one rule per row: peer ("any", or #identity with its
    members: looked up first, "any" is the fallback), ports, policy."""

    def peer_text(ident: int) -> str:
        return "any" if ident == IDENTITY_ANY else f"#{ident} {labels.peer(ident)}"

    out: list[dict[str, Any]] = []
    for addr in labels.pods:
        ep = pm.endpoints.get(addr)
        for direction in (INGRESS, EGRESS):
            isolated = ep is not None and bool(ep.flags & ISOLATED[direction])
            blamed = ep.policy(direction) if ep is not None and isolated else 0
            base = {"pod": labels.pod(addr), "direction": DIRECTION_NAMES[direction],
                    "isolated": isolated,
                    "drop_policy": labels.policy(blamed) if blamed else None,
                    "drops": labels.drops(blamed) if blamed else None}
            rules = (pm.rule_rows(addr, direction, peer_text, labels.policy)
                     if isolated else [])
            out += ([{**base, **r} for r in rules]
                    or [{**base, "peer": "-", "ports": "-", "policy": None}])
    return out


def _members(pm: PolicyMaps, name: Callable[[int, int, int], str]) -> dict[int, str]:
    """Identity -> its members, each as `name(net, plen, flags)` gives it."""
    members: dict[int, list[str]] = defaultdict(list)
    for (net, plen), peer in sorted(pm.ipcache.items()):
        members[peer.identity].append(name(net, plen, peer.flags))
    return {ident: _shown(names) for ident, names in members.items()}


def rows(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    """The rows of the policy maps of a running instance (numbers)."""
    pm = read(maps)
    peers = _members(pm, lambda net, plen, flags: prefix_text((net, plen))
                     + (" (node)" if flags & PEER_HOST else ""))
    drops = maps.get(MAP_DROPS)
    return render(pm, Labels(
        pods=sorted(pm.endpoints), pod=ip_text,
        peer=lambda ident: peers.get(ident, "(no prefix)"),
        policy=lambda pid: pid,
        drops=lambda pid: count(drops, pid).packets if drops is not None else None))


def describe(c: CompiledPolicy) -> list[dict[str, Any]]:
    """The rows of a compile (names): every local pod, by name."""
    peers = _members(c.maps, lambda net, plen, _: (c.pods.get(net) if plen == 32 else None)
                     or prefix_text((net, plen)))

    def peer(ident: int) -> str:
        cls = c.identity_classes.get(ident)
        return peers.get(ident, "") + (f" ({cls})" if cls is not None else "")

    return render(c.maps, Labels(
        pods=[addr for addr, _ in sorted(c.local_pods.items(), key=lambda kv: kv[1])],
        pod=lambda addr: c.local_pods[addr],
        peer=peer,
        policy=lambda pid: policy_name(c.maps, pid),
        drops=lambda pid: None))
