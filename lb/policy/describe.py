"""The compiled policy for people (`lbctl maps policy`): one row per local
pod and direction, with the rules as peer / ports / policy."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lb.encoding import ip_text
from lb.policy.common import DIRECTION_NAMES, EGRESS, INGRESS
from lb.policy.compiler import CompiledPolicy
from lb.policy.contents import IDENTITY_ANY, ISOLATED, prefix_text
from lb.policy.lookup import policy_name

MAX_NAMES = 6  # peers listed per identity before "+N more"


def _identity_members(c: CompiledPolicy) -> dict[int, list[str]]:
    """Who has each identity: its ipcache prefixes, pods by name."""
    out: dict[int, list[str]] = defaultdict(list)
    for (net, plen), peer in sorted(c.maps.ipcache.items()):
        name = c.pods.get(net) if plen == 32 else None
        out[peer.identity].append(name or prefix_text((net, plen)))
    return out


def _peer_text(c: CompiledPolicy, members: dict[int, list[str]], ident: int) -> str:
    if ident == IDENTITY_ANY:
        return "any"
    names = members.get(ident, [])
    shown = ", ".join(names[:MAX_NAMES])
    if len(names) > MAX_NAMES:
        shown += f" +{len(names) - MAX_NAMES} more"
    cls = c.identity_classes.get(ident)
    return f"#{ident} {shown}" + (f" ({cls})" if cls is not None else "")


def describe(c: CompiledPolicy) -> list[dict[str, Any]]:
    """Rows: pod, ip, direction, isolated, drop_policy (blamed for drops),
    rules: [{peer, ports, policy}] (identity 0 is "any": the rules for a
    peer without an entry of its own)."""
    members = _identity_members(c)
    rows: list[dict[str, Any]] = []
    for addr, name in sorted(c.local_pods.items(), key=lambda kv: kv[1]):
        ep = c.maps.endpoints.get(addr)
        for direction in (INGRESS, EGRESS):
            isolated = ep is not None and bool(ep.flags & ISOLATED[direction])
            rows.append({
                "pod": name,
                "ip": ip_text(addr),
                "direction": DIRECTION_NAMES[direction],
                "isolated": isolated,
                "drop_policy": (policy_name(c.maps, ep.policy(direction))
                                if ep is not None and isolated else None),
                "rules": c.maps.rule_rows(addr, direction,
                                          lambda ident: _peer_text(c, members, ident),
                                          lambda pid: policy_name(c.maps, pid)),
            })
    return rows
