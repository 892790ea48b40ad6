"""`lbctl maps policy`: what the pinned policy maps of a running instance
say, read back from the kernel (any process can; the agent need not be
asked). One row per local pod, direction and rule: the pods listed are
those some policy isolates (the others have no entry, everything passes);
an isolated direction without a rule row drops everything.

The maps carry numbers, not names: a peer is an identity with the ipcache
prefixes that have it (pods as /32), a policy is its id (the index of its
drop counter in lb_pol_drops). `lb/policy/describe.py` gives the same rows
(PolicyMaps.rule_rows) with names, from a compile."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from lb.counters import count
from lb.encoding import ip_text
from lb.policy.common import DIRECTION_NAMES, EGRESS, INGRESS
from lb.policy.contents import (
    IDENTITY_ANY,
    ISOLATED,
    MAP_DROPS,
    PEER_HOST,
    PolicyMaps,
    prefix_text,
)
from lb.policy.kernel import read
from loader.maps import BpfMap

MAX_PREFIXES = 4  # prefixes shown per identity before "+N more"


def _drops(maps: Mapping[str, BpfMap], policy: int) -> int | None:
    m = maps.get(MAP_DROPS)
    if m is None or not policy:
        return None
    return count(m, policy).packets


def _peers(pm: PolicyMaps) -> dict[int, str]:
    """Identity -> the prefixes that have it."""
    members: dict[int, list[str]] = defaultdict(list)
    for prefix, peer in sorted(pm.ipcache.items()):
        text = prefix_text(prefix) + (" (node)" if peer.flags & PEER_HOST else "")
        members[peer.identity].append(text)
    out = {}
    for ident, names in members.items():
        shown = ", ".join(names[:MAX_PREFIXES])
        if len(names) > MAX_PREFIXES:
            shown += f" +{len(names) - MAX_PREFIXES} more"
        out[ident] = shown
    return out


def rows(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    """pod (address), direction, isolated, drop_policy (the id blamed for a
    drop) and its drops, then one rule per row: peer ("any", or #identity
    with its prefixes: looked up first, "any" is the fallback), ports and
    the policy credited. A direction that is not isolated, or isolated
    without any rule, is one row with peer and ports "-"."""
    pm = read(maps)
    peers = _peers(pm)

    def peer_text(ident: int) -> str:
        return "any" if ident == IDENTITY_ANY else f"#{ident} {peers.get(ident, '(no prefix)')}"

    out: list[dict[str, Any]] = []
    for addr, ep in sorted(pm.endpoints.items()):
        for direction in (INGRESS, EGRESS):
            isolated = bool(ep.flags & ISOLATED[direction])
            blamed = ep.policy(direction) if isolated else 0
            base = {"pod": ip_text(addr), "direction": DIRECTION_NAMES[direction],
                    "isolated": isolated, "drop_policy": blamed or None,
                    "drops": _drops(maps, blamed)}
            rules = pm.rule_rows(addr, direction, peer_text, lambda pid: pid) if isolated else []
            out += ([{**base, **r} for r in rules]
                    or [{**base, "peer": "-", "ports": "-", "policy": None}])
    return out
