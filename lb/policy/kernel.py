"""Keep the datapath's policy maps equal to the compiled policy: each sync
writes only the difference, in the compiler's safe order (what a rule
points to exists before the rule; removals last)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from lb.model import Cluster, Node
from lb.policy.compiler import CompiledPolicy, compile_policy, inputs, same_inputs
from lb.policy.contents import (
    MAP_DROPS,
    MAP_ENDPOINTS,
    MAP_IPCACHE,
    MAP_PORTSETS,
    MAP_RULES,
    PolicyMaps,
    diff,
    walk_chain,
)
from lb.policy.encode import decode, encode_key, encode_value
from lb.prefilter import POLICED, Member, Prefilter
from lb.refusal import Refusal, bounded
from loader import layout
from loader.maps import BpfMap, possible_cpus
from loader.sizes import Sizes

log = logging.getLogger(__name__)

MAPS = (MAP_ENDPOINTS, MAP_IPCACHE, MAP_RULES, MAP_PORTSETS)
# The pre-filter of lb_pol_endpoints (bpf/lib/filter.h): the writer needs it
# with them, or a pod it isolates would be skipped unseen.
MAP_FILTER = "lb_pol_filter"


def _buffer(value: bytes) -> Any:
    """A value's bytes as the map writes them: BpfMap.update takes a struct,
    an int or a C buffer, not Python bytes."""
    return layout.ffi.from_buffer(bytearray(value))


def _zero_stat() -> Any:
    """A percpu struct lb_stat of zeros, every CPU's slot 8-byte aligned."""
    size = (layout.sizeof("struct lb_stat") + 7) // 8 * 8
    return _buffer(bytes(size * possible_cpus()))


def read(maps: Mapping[str, BpfMap]) -> PolicyMaps:
    """What the policy maps hold. The port-set array has a slot for every
    set there could be, and walking all of them takes seconds: only the
    slots the rules reach are read (a slot nothing reaches is never looked
    at by the programs either)."""
    entries = {name: dict(maps[name].raw_items())
               for name in (MAP_ENDPOINTS, MAP_IPCACHE, MAP_RULES)}
    portsets: dict[bytes, bytes] = {}
    for raw in entries[MAP_RULES].values():
        start = int.from_bytes(raw, sys.byteorder)
        for slot, value in walk_chain(start, maps[MAP_PORTSETS].lookup, lambda v: int(v.next)):
            key = encode_key(MAP_PORTSETS, slot)
            if key in portsets:
                break  # the rest of this chain is read already
            portsets[key] = layout.to_bytes(layout.ffi.addressof(value))
    entries[MAP_PORTSETS] = portsets
    return decode(entries)


def _members(endpoints: Iterable[int]) -> set[Member]:
    return {(POLICED, ip, 0) for ip in endpoints}


class PolicyWriter:
    """`maps`: the four of MAPS and MAP_FILTER; with lb_pol_drops too, the
    drop counter of a policy id is zeroed when the id comes to stand for
    another policy (ids are reused), so a policy's count never starts with
    another's."""

    def __init__(self, maps: Mapping[str, BpfMap], sizes: Sizes | None = None) -> None:
        self.maps = maps
        self.sizes = sizes or Sizes()
        self.current = PolicyMaps()
        self.compiled: CompiledPolicy | None = None
        self.prefilter = Prefilter(maps[MAP_FILTER], self.sizes.filter_words)
        # What the maps were last made from, and what that compile refused:
        # a sync for a Service or EndpointSlice change leaves policy alone
        # (at 1,000 policies a compile takes half a second).
        self._inputs: tuple[object, ...] | None = None
        self._refused: list[Refusal] = []
        # Entries the last sync found reusing compiles had wrong (see sync),
        # and whether one was applied since the last check.
        self.drifted = 0
        self._unchecked = False

    def recover(self) -> int:
        """Adopt what the pinned maps hold, so the first sync after a restart
        removes what no longer applies instead of leaving it behind."""
        self.current = read(self.maps)
        self._inputs = None
        self.prefilter.recover(_members(self.current.endpoints))
        return len(self.current.endpoints)

    def sync(self, cluster: Cluster, node: Node, check: bool = False) -> list[Refusal]:
        """Compile and apply; a compile that does not fit the maps is refused
        whole and the maps keep the last good policy (half a policy could
        open what it means to close). Cilium likewise keeps an endpoint's
        last policy when its new one overflows the policy map. `check`: when
        a compile that reused earlier rules was applied since the last check,
        or is about to be, the policy is compiled again whole (numbered after
        the last compile, so equal maps are equal numbers) and compared; a
        difference is counted in `drifted`, logged, and the whole one
        applied."""
        self.drifted = 0
        given = inputs(cluster, node)
        same = self._inputs is not None and same_inputs(given, self._inputs)
        if same and not (check and self._unchecked and not self._refused):
            return list(self._refused)
        # A sync that raises half way is done again in full by the next.
        self._inputs = None
        new = (self.compiled if same and self.compiled is not None else
               compile_policy(cluster, node, previous=self.compiled, sizes=self.sizes))
        if check and self.compiled is not None and (self._unchecked
                                                    or new.rules_delta is not None):
            whole = compile_policy(cluster, node, replace(self.compiled, rule_memo=None),
                                   self.sizes)
            self.drifted = len(diff(whole.maps, new.maps)) + (whole.errors != new.errors)
            self._unchecked = False
            if self.drifted:
                log.error("policy: %d map entries computed incrementally differ from a full "
                          "recompute; programming the full one", self.drifted)
                new = whole
        elif new.rules_delta is not None:
            self._unchecked = True
        if new is self.compiled:  # checked, and right: the maps hold it already
            self._inputs = given
            return []
        if new.errors:
            for line in bounded([str(e) for e in new.errors]):
                log.error("refused %s; the maps keep the previous policy", line)
            self._inputs, self._refused = given, list(new.errors)
            return list(new.errors)
        drops = self.maps.get(MAP_DROPS)
        if drops is not None:
            # Before anything can blame the id on its new policy.
            for pid, name in new.maps.policies.items():
                if self.current.policies.get(pid) != name:
                    drops.update(pid, _zero_stat())
        # An endpoint passes the pre-filter before its entry exists, and
        # leaves it only once the entry is gone: never fails open.
        self.prefilter.admit(_members(new.maps.endpoints))
        zero_set = bytes(layout.sizeof("struct lb_pol_portset"))
        # The compile's own account of the rules it changed holds against
        # the maps of the compile it started from, which these are.
        known = new.rules_delta if (self.compiled is not None
                                    and self.current is self.compiled.maps) else None
        for name, op, key, value in diff(self.current, new.maps, known).steps():
            k = encode_key(name, key)
            if op == "put":
                self.maps[name].update(k, _buffer(encode_value(name, value)))
            elif name == MAP_PORTSETS:
                self.maps[name].update(k, _buffer(zero_set))
            else:
                self.maps[name].delete(k)
        self.current = new.maps
        self.compiled = new
        self.prefilter.settle(_members(new.maps.endpoints))
        self._inputs, self._refused = given, []
        return []

    def policy_name(self, ident: int) -> str:
        return self.current.policies.get(ident, f"policy-{ident}")
