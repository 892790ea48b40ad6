"""Keep the datapath's policy maps equal to the compiled policy: each sync
writes only the difference, in the compiler's safe order (what a rule
points to exists before the rule; removals last)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lb.model import Cluster, Node
from lb.policy.compiler import CompiledPolicy, PolicyMaps, compile_policy, diff
from lb.policy.encode import (
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_PORTSETS,
    MAP_RULES,
    decode,
    encode_key,
    encode_value,
)
from loader import layout
from loader.maps import BpfMap

log = logging.getLogger(__name__)

MAPS = (MAP_ENDPOINTS, MAP_IPCACHE, MAP_RULES, MAP_PORTSETS)


def _buffer(value: bytes) -> Any:
    """A value's bytes as the map writes them: BpfMap.update takes a struct,
    an int or a C buffer, not Python bytes."""
    return layout.ffi.from_buffer(bytearray(value))


class PolicyWriter:
    def __init__(self, maps: Mapping[str, BpfMap]) -> None:
        self.maps = maps
        self.current = PolicyMaps()
        self.compiled: CompiledPolicy | None = None

    def recover(self) -> int:
        """Adopt what the pinned maps hold, so the first sync after a restart
        removes what no longer applies instead of leaving it behind."""
        entries = {name: dict(self.maps[name].raw_items()) for name in MAPS}
        self.current = decode(entries)
        return len(self.current.endpoints)

    def sync(self, cluster: Cluster, node: Node) -> list[str]:
        """Compile and apply; a compile that does not fit the maps is refused
        whole and the maps keep the last good policy."""
        new = compile_policy(cluster, node, previous=self.compiled)
        if new.errors:
            for e in new.errors:
                log.error("policy not applied: %s", e)
            return list(new.errors)
        zero_set = bytes(layout.sizeof("struct lb_pol_portset"))
        for name, op, key, value in diff(self.current, new.maps).steps():
            k = encode_key(name, key)
            if op == "put":
                self.maps[name].update(k, _buffer(encode_value(name, value)))
            elif name == MAP_PORTSETS:
                self.maps[name].update(k, _buffer(zero_set))
            else:
                self.maps[name].delete(k)
        self.current = new.maps
        self.compiled = new
        return []

    def policy_name(self, ident: int) -> str:
        return self.current.policies.get(ident, f"policy-{ident}")
