"""The compiled policy as the raw bytes of the maps' keys and values, with
the structs of bpf/lb_maps.h (through loader.layout), and back.

Addresses are written in network order; identities, slots and policy ids
in host order; port ranges in host order (they are compared, not matched)."""

from __future__ import annotations

import socket
import sys
from typing import Any

from lb.encoding import ip_be, lpm4_key
from lb.policy.contents import (
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_PORTSETS,
    MAP_RULES,
    PORTS_PER_SET,
    EndpointEntry,
    PeerEntry,
    PolicyMaps,
    PortRange,
    PortSet,
    Prefix,
    RuleKey,
)
from loader import layout


def _u32(value: int) -> bytes:
    """A __u32 as the machine stores it."""
    return value.to_bytes(4, sys.byteorder)


def _int(data: bytes) -> int:
    return int.from_bytes(data, sys.byteorder)




def encode_key(map_name: str, key: Any) -> bytes:
    if map_name == MAP_ENDPOINTS:
        return _u32(ip_be(key))
    if map_name == MAP_IPCACHE:
        net, plen = key
        return layout.to_bytes(lpm4_key(net, plen))
    if map_name == MAP_RULES:
        ep, ident, direction = key
        return layout.to_bytes(layout.new("struct lb_pol_rule_key", ep_addr=ip_be(ep),
                                          identity=ident, dir=direction))
    if map_name == MAP_PORTSETS:
        return _u32(key)
    raise KeyError(map_name)


def encode_value(map_name: str, value: Any) -> bytes:
    if map_name == MAP_ENDPOINTS:
        return layout.to_bytes(layout.new("struct lb_pol_endpoint", flags=value.flags,
                                          ingress_policy=value.ingress_policy,
                                          egress_policy=value.egress_policy))
    if map_name == MAP_IPCACHE:
        return layout.to_bytes(layout.new("struct lb_pol_peer", identity=value.identity,
                                          flags=value.flags))
    if map_name == MAP_RULES:
        return _u32(value)
    if map_name == MAP_PORTSETS:
        ps = layout.new("struct lb_pol_portset", count=len(value.ranges), next=value.next)
        for i, r in enumerate(value.ranges):
            slot = ps.ranges[i]
            slot.port_lo, slot.port_hi, slot.proto, slot.policy = r.lo, r.hi, r.proto, r.policy
        return layout.to_bytes(ps)
    raise KeyError(map_name)


def encode(maps: PolicyMaps) -> dict[str, dict[bytes, bytes]]:
    """Every entry of every policy map, as bytes."""
    tables: dict[str, dict[Any, Any]] = {
        MAP_ENDPOINTS: maps.endpoints, MAP_IPCACHE: maps.ipcache,
        MAP_RULES: maps.rules, MAP_PORTSETS: maps.portsets,
    }
    return {name: {encode_key(name, k): encode_value(name, v) for k, v in table.items()}
            for name, table in tables.items()}


def decode(entries: dict[str, dict[bytes, bytes]],
           policies: dict[int, str] | None = None) -> PolicyMaps:
    """Map contents read back (from the kernel, or from `encode`). Port-set
    slots that are all zeros (removed) are skipped."""
    endpoints: dict[int, EndpointEntry] = {}
    for k, v in entries.get(MAP_ENDPOINTS, {}).items():
        e = layout.from_bytes("struct lb_pol_endpoint", v)
        endpoints[socket.ntohl(_int(k))] = EndpointEntry(e.flags, e.ingress_policy,
                                                         e.egress_policy)
    ipcache: dict[Prefix, PeerEntry] = {}
    for k, v in entries.get(MAP_IPCACHE, {}).items():
        key = layout.from_bytes("struct lb_lpm4_key", k)
        peer = layout.from_bytes("struct lb_pol_peer", v)
        ipcache[(socket.ntohl(key.addr), key.prefixlen)] = PeerEntry(peer.identity, peer.flags)
    rules: dict[RuleKey, int] = {}
    for k, v in entries.get(MAP_RULES, {}).items():
        key = layout.from_bytes("struct lb_pol_rule_key", k)
        rules[(socket.ntohl(key.ep_addr), key.identity, key.dir)] = _int(v)
    portsets: dict[int, PortSet] = {}
    for k, v in entries.get(MAP_PORTSETS, {}).items():
        if not any(v):
            continue
        ps = layout.from_bytes("struct lb_pol_portset", v)
        count = min(ps.count, PORTS_PER_SET)
        ranges = tuple(PortRange(r.proto, r.port_lo, r.port_hi, r.policy)
                       for r in (ps.ranges[i] for i in range(count)))
        portsets[_int(k)] = PortSet(ranges, ps.next)
    return PolicyMaps(endpoints=endpoints, ipcache=ipcache, rules=rules, portsets=portsets,
                      policies=dict(policies or {}))
