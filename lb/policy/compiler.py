"""NetworkPolicy compiled into the maps of bpf/lb_maps.h for one node: a pure
function of the cluster model and the node, so every rule is unit-tested
without a kernel.

Why this shape. The datapath decides once per connection, after DNAT, and
must not cost more than a few map lookups:

    endpoint   hash  local pod address -> isolated? + the policy to blame
    ipcache    LPM   remote address -> identity
    rules      hash  (local pod, identity, direction) -> first port-set slot
    portsets   array slot -> up to 8 (proto, port range, policy), chained

A peer is not expanded into one /32 rule per matching pod and local pod (a
"from every namespace" rule on a 10,000-pod cluster would be 10,000 entries
per local pod, rewritten whenever any pod anywhere comes or goes). Remote
addresses are sorted into identities instead: an identity is a class of
addresses that every policy relevant to this node treats alike, i.e. the same
selector peers match it, the same ipBlocks contain it (excepts applied) and
it has the same named ports. A pod coming, going or changing labels is one
ipcache write unless it makes a new class; rules are per (local pod,
identity) and identical port sets are stored once.

ipBlocks go into the same LPM trie: every cidr and every except is a prefix,
and the identity of a prefix is computed from every block that contains it
and does not except it, so the longest match alone gives the right answer,
also when one peer excepts a range another peer (or a pod selector) allows.
A prefix whose class equals that of the prefix above it is left out.

Rules with an empty from/to apply to every identity: they are stored under
identity 0 (the class of an address no peer matches, and the fallback the
datapath looks up when the peer's own identity has no entry) and folded
into every identity's entry of that local pod.

Port sets hold disjoint ranges, each credited to the first policy in
(namespace, name) order that allows it, so the first matching range gives
both the verdict and the policy to count. A rule without ports is one range
of any protocol. Named ports are resolved against the destination pod: the
local pod for ingress, the identity's pods for egress (pods with different
numbers for a name are different identities).

Numbers are stable: compiling with `previous` keeps the identity, policy id
and port-set slot of everything that did not change, and gives new things
numbers `previous` does not use, so the diff can be applied entry by entry
without a packet ever reading a number that means something else (see
`diff`)."""

from __future__ import annotations

import functools
import heapq
import ipaddress
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from lb.encoding import ip_int
from lb.model import (
    Cluster,
    IPBlock,
    LabelSelector,
    NetworkPolicy,
    Node,
    Pod,
    PolicyPeer,
)
from lb.policy.common import (
    DIRECTION_NAMES,
    EGRESS,
    INGRESS,
    POLICY_TYPES,
    PROTO_ANY,
    namespace_labels,
    pods_by_ip,
    proto_number,
)
from lb.policy.contents import (
    IDENTITY_ANY,
    ISOLATED,
    MAX_CHAIN,
    PEER_HOST,
    PORTS_PER_SET,
    EndpointEntry,
    MapChanges,
    PeerEntry,
    PolicyDiff,
    PolicyMaps,
    PortRange,
    PortSet,
    Prefix,
    RuleKey,
    diff,
    mask,
)
from lb.refusal import Refusal
from loader.sizes import Sizes

DEFAULT_SIZES = Sizes()

# A selector peer as written, with the namespace it means when it has no
# namespaceSelector: (namespace or None, namespaceSelector, podSelector).
PeerKey = tuple[str | None, LabelSelector | None, LabelSelector | None]
NamedPort = tuple[str, str, int]  # (name, protocol, number)


@dataclass(frozen=True)
class PeerClass:
    """What makes remote addresses alike for this node's policies."""

    selectors: frozenset[PeerKey] = frozenset()
    blocks: frozenset[IPBlock] = frozenset()
    named_ports: frozenset[NamedPort] = frozenset()

    def __str__(self) -> str:
        parts = [_peer_key_text(k) for k in sorted(self.selectors, key=str)]
        parts += [_block_text(b) for b in sorted(self.blocks, key=lambda b: (b.cidr, b.excepts))]
        return " & ".join(parts) or "no peer"


EMPTY_CLASS = PeerClass()

# What one local pod's rules in one direction are computed from besides the
# context of the whole compile: (direction, isolating ranks, its named ports
# when they matter).
PodRulesKey = tuple[int, tuple[int, ...], tuple[Any, ...]]
# Its port-set slots: for identity 0 (None: none) and per identity.
PodRules = tuple[int | None, dict[int, int]]


@dataclass(frozen=True)
class RuleMemo:
    """What one compile worked out, kept for the next. Under the same
    policies isolating the same local pods, what their rules name is the
    same; with the same identities too, their rules with peers resolved are
    the same, so a local pod whose key is unchanged has unchanged rules and
    only the others are compiled and diffed. A pod coming to a namespace
    under 1,000 policies then costs its own rules, not everyone's; a pod
    that makes a new identity, or a policy change, costs a whole compile."""

    policies: object  # the cluster's policies (compared by identity first)
    relevant: list[int]  # ranks of the policies that isolate a local pod
    named: _Named
    prepared: dict[tuple[int, int], list[_Rule]]
    pids: dict[int, int]
    by_key: dict[PodRulesKey, PodRules]
    pod_keys: dict[tuple[int, int], PodRulesKey]  # (local pod, direction)
    slot_users: dict[int, int]  # first port-set slot -> rules pointing to it


@dataclass(frozen=True)
class CompiledPolicy:
    """The maps plus what numbering them took and what people want to
    read back."""

    maps: PolicyMaps
    node_name: str | None = None
    local_pods: dict[int, str] = field(default_factory=dict)  # address -> ns/name
    pods: dict[int, str] = field(default_factory=dict)  # every policy pod's address
    identities: dict[PeerClass, int] = field(default_factory=dict)
    portset_slots: dict[tuple[PortRange, ...], tuple[int, ...]] = field(default_factory=dict)
    policy_ids: dict[str, int] = field(default_factory=dict)
    errors: tuple[Refusal, ...] = ()
    # For the next compile, and what its rules changed from `previous`'s
    # (None: not known, diff them whole). Derived data, not compared.
    rule_memo: RuleMemo | None = field(default=None, compare=False, repr=False)
    rules_delta: MapChanges | None = field(default=None, compare=False, repr=False)

    @cached_property
    def identity_classes(self) -> dict[int, PeerClass]:
        return {i: c for c, i in self.identities.items()}


# --- helpers -------------------------------------------------------------------


def _prefix(cidr: str) -> Prefix | None:
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version != 4:
        return None  # IPv6 blocks never match the IPv4 datapath
    return int(net.network_address), net.prefixlen


def _canonical(sel: LabelSelector | None) -> LabelSelector | None:
    if sel is None:
        return None
    exprs = tuple(sorted(sel.match_expressions, key=lambda r: (r.key, r.operator, r.values)))
    return LabelSelector(tuple(sorted(sel.match_labels)), exprs)


def _peer_key(pol: NetworkPolicy, peer: PolicyPeer) -> PeerKey:
    ns = pol.namespace if peer.namespace_selector is None else None
    return ns, _canonical(peer.namespace_selector), _canonical(peer.pod_selector)


def _peer_key_text(key: PeerKey) -> str:
    ns, nss, ps = key
    where = f"ns {ns}" if ns is not None else f"ns [{nss}]"
    return f"{where} pods [{ps}]" if ps is not None else f"{where} pods [all]"


def _block_text(b: IPBlock) -> str:
    return b.cidr + (f" except {','.join(b.excepts)}" if b.excepts else "")


class _Ids:
    """Numbers for keys: a key keeps its number from the previous compile;
    a new key gets the lowest number neither compile uses."""

    def __init__(self, previous: dict[Any, int], reserved: Iterable[int] = (0,)) -> None:
        self.previous = previous
        self.taken = set(previous.values()) | set(reserved)
        self.assigned: dict[Any, int] = {}
        self._next = 1

    def get(self, key: Any) -> int:
        ident = self.assigned.get(key)
        if ident is None:
            ident = self.previous.get(key)
            if ident is None:
                while self._next in self.taken:
                    self._next += 1
                ident = self._next
                self.taken.add(ident)
            self.assigned[key] = ident
        return ident

    def fresh(self) -> int:
        while self._next in self.taken:
            self._next += 1
        self.taken.add(self._next)
        return self._next


class _Selectors:
    """Selector evaluation over groups of pods with equal namespace and
    labels, through inverted indexes (set operations instead of one label
    match per pod and selector)."""

    def __init__(self, cluster: Cluster, pods: dict[int, Pod], local: set[int]) -> None:
        self.cluster = cluster
        groups: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self.members: list[list[int]] = []  # group -> pod addresses
        self.local: list[list[int]] = []  # group -> local pod addresses
        self.by_label: dict[tuple[str, str], set[int]] = defaultdict(set)
        self.by_key: dict[str, set[int]] = defaultdict(set)
        self.by_ns: dict[str, set[int]] = defaultdict(set)
        for ip, pod in pods.items():
            gkey = (pod.namespace, pod.labels)
            gid = groups.get(gkey)
            if gid is None:
                gid = groups[gkey] = len(self.members)
                self.members.append([])
                self.local.append([])
                self.by_ns[pod.namespace].add(gid)
                for k, v in pod.labels:
                    self.by_label[(k, v)].add(gid)
                    self.by_key[k].add(gid)
            self.members[gid].append(ip)
            if ip in local:
                self.local[gid].append(ip)
        self._ns_labels = {ns: namespace_labels(cluster, ns)
                           for ns in set(cluster.namespaces) | set(self.by_ns)}
        self._peer_cache: dict[PeerKey, set[int]] = {}

    def select(self, sel: LabelSelector, universe: set[int]) -> set[int]:
        out = set(universe)
        for kv in sel.match_labels:
            out &= self.by_label.get(kv, set())
        for req in sel.match_expressions:
            if req.operator in ("In", "NotIn"):
                hit: set[int] = set()
                for v in req.values:
                    hit |= self.by_label.get((req.key, v), set())
                if req.operator == "In":
                    out &= hit
                else:
                    out -= hit
            elif req.operator == "Exists":
                out &= self.by_key.get(req.key, set())
            else:
                out -= self.by_key.get(req.key, set())
        return out

    def in_namespaces(self, sel: LabelSelector) -> set[int]:
        out: set[int] = set()
        for ns, labels in self._ns_labels.items():
            if sel.matches(labels):
                out |= self.by_ns.get(ns, set())
        return out

    def peer(self, key: PeerKey) -> set[int]:
        found = self._peer_cache.get(key)
        if found is None:
            ns, nss, ps = key
            universe = (self.by_ns.get(ns, set()) if ns is not None
                        else self.in_namespaces(nss or LabelSelector()))
            found = universe if ps is None else self.select(ps, universe)
            self._peer_cache[key] = found
        return found


class _Blocks:
    """ipBlocks indexed by prefix length: which contain an address or a
    prefix, excepts applied."""

    def __init__(self, blocks: Iterable[IPBlock]) -> None:
        self.cidrs: dict[int, dict[int, list[IPBlock]]] = defaultdict(lambda: defaultdict(list))
        self.excepts: dict[int, dict[int, list[IPBlock]]] = defaultdict(lambda: defaultdict(list))
        self.prefixes: set[Prefix] = set()
        for b in blocks:
            p = _prefix(b.cidr)
            if p is None:
                continue
            self.cidrs[p[1]][p[0]].append(b)
            self.prefixes.add(p)
            for e in b.excepts:
                q = _prefix(e)
                assert q is not None
                self.excepts[q[1]][q[0]].append(b)
                self.prefixes.add(q)
        self.cidr_lens = sorted(self.cidrs)
        self.except_lens = sorted(self.excepts)

    def containing(self, net: int, plen: int) -> frozenset[IPBlock]:
        found: set[IPBlock] = set()
        for length in self.cidr_lens:
            if length > plen:
                break
            found.update(self.cidrs[length].get(net & mask(length), ()))
        if found:
            for length in self.except_lens:
                if length > plen:
                    break
                found.difference_update(self.excepts[length].get(net & mask(length), ()))
        return frozenset(found)


@dataclass(frozen=True)
class _Rule:
    """A rule of one policy and direction, its peers resolved to identities."""

    targets: frozenset[int] | None  # None: every peer
    numeric: tuple[tuple[int, int, int], ...]  # (proto, lo, hi)
    named: tuple[tuple[str, str], ...]  # (name, protocol)


Tagged = tuple[int, int, int, int, int]  # (rank, proto, lo, hi, policy id)


def normalize(tagged: Iterable[Tagged]) -> tuple[PortRange, ...]:
    """Disjoint ranges, each credited to the first-ranked policy covering
    it: the specific protocols first, sorted, then the any-protocol range
    (if any), so that the first match gives the best-ranked policy. Ranges
    ranked after the any-protocol one add nothing and are dropped."""
    items = set(tagged)
    anys = [(rank, pid) for rank, proto, _, _, pid in items if proto == PROTO_ANY]
    any_best = min(anys) if anys else None
    by_proto: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)
    for rank, proto, lo, hi, pid in items:
        if proto != PROTO_ANY and (any_best is None or rank < any_best[0]):
            by_proto[proto].append((lo, hi, rank, pid))
    out: list[PortRange] = []
    for proto in sorted(by_proto):
        ivs = sorted(by_proto[proto])
        # Sweep the elementary intervals between boundaries, keeping the
        # intervals that cover the current one in a heap by rank.
        points = sorted({lo for lo, _, _, _ in ivs} | {hi + 1 for _, hi, _, _ in ivs})
        active: list[tuple[int, int, int]] = []  # (rank, hi, pid)
        i = 0
        for x, nxt in itertools.pairwise(points):
            while i < len(ivs) and ivs[i][0] <= x:
                lo, hi, rank, pid = ivs[i]
                heapq.heappush(active, (rank, hi, pid))
                i += 1
            while active and active[0][1] < x:
                heapq.heappop(active)
            if not active:
                continue
            pid = active[0][2]
            last = out[-1] if out else None
            if last and last.proto == proto and last.policy == pid and last.hi + 1 == x:
                out[-1] = PortRange(proto, last.lo, nxt - 1, pid)
            else:
                out.append(PortRange(proto, x, nxt - 1, pid))
    if any_best is not None:
        out.append(PortRange(PROTO_ANY, 0, 65535, any_best[1]))
    return tuple(out)


# --- the compiler ------------------------------------------------------------------


@dataclass
class _Named:
    """What the relevant rules name: selector peers, ipBlocks, and the port
    names egress rules look up in the pods their peers match (a pod's
    numbers for names no rule asks of it must not split its class)."""

    peer_keys: set[PeerKey] = field(default_factory=set)
    blocks: set[IPBlock] = field(default_factory=set)
    names_of_any: set[tuple[str, str]] = field(default_factory=set)
    names_of: dict[PeerKey | IPBlock, set[tuple[str, str]]] = field(
        default_factory=lambda: defaultdict(set))


@dataclass
class _Identities:
    """The ipcache, and each identity by what makes it: the selectors and
    blocks its class is in, the named ports its pods have."""

    ipcache: dict[Prefix, PeerEntry]
    identities: dict[PeerClass, int]
    by_selector: dict[PeerKey, set[int]] = field(default_factory=lambda: defaultdict(set))
    by_block: dict[IPBlock, set[int]] = field(default_factory=lambda: defaultdict(set))
    by_name: dict[tuple[str, str], dict[int, set[int]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(set)))


def _isolating(ranked: list[NetworkPolicy], sel: _Selectors) -> dict[tuple[int, int], list[int]]:
    """Which policies (by rank) isolate which local pod and direction,
    best-ranked first."""
    isolating: dict[tuple[int, int], list[int]] = defaultdict(list)
    for rank, pol in enumerate(ranked):
        groups = sel.select(pol.pod_selector, sel.by_ns.get(pol.namespace, set()))
        members = [ip for g in groups for ip in sel.local[g]]
        if not members:
            continue
        for direction, ptype in POLICY_TYPES.items():
            if ptype in pol.policy_types:
                for ip in members:
                    isolating[(ip, direction)].append(rank)
    return isolating


def _named(ranked: list[NetworkPolicy], relevant: list[int]) -> _Named:
    out = _Named()
    for rank in relevant:
        pol = ranked[rank]
        for direction, ptype in POLICY_TYPES.items():
            for rule in pol.rules(ptype):
                asked = ({(p.port, p.protocol) for p in rule.ports if isinstance(p.port, str)}
                         if direction == EGRESS else set())
                if asked and not rule.peers:
                    out.names_of_any |= asked
                for peer in rule.peers:
                    if peer.ip_block is not None:
                        out.blocks.add(peer.ip_block)
                        out.names_of[peer.ip_block] |= asked
                    else:
                        pkey = _peer_key(pol, peer)
                        out.peer_keys.add(pkey)
                        out.names_of[pkey] |= asked
    return out


def _address_classes(pods: dict[int, Pod], node: Node, sel: _Selectors,
                     named: _Named) -> dict[Prefix, tuple[PeerClass, int]]:
    """The class (and PEER_HOST flag) of every address that has an entry:
    each ipBlock prefix, each pod, the node's own addresses."""
    pod_selectors: dict[int, list[PeerKey]] = defaultdict(list)
    for key in named.peer_keys:
        for g in sel.peer(key):
            for ip in sel.members[g]:
                pod_selectors[ip].append(key)
    bidx = _Blocks(named.blocks)
    entries: dict[Prefix, tuple[PeerClass, int]] = {
        p: (PeerClass(blocks=bidx.containing(*p)), 0) for p in bidx.prefixes
    }
    for ip, pod in pods.items():
        keys = frozenset(pod_selectors.get(ip, ()))
        pod_blocks = bidx.containing(ip, 32)
        ports: frozenset[NamedPort] = frozenset()
        if pod.ports:
            wanted = set(named.names_of_any)
            for k in keys:
                wanted |= named.names_of.get(k, set())
            for b in pod_blocks:
                wanted |= named.names_of.get(b, set())
            ports = frozenset((c.name, c.protocol, c.port) for c in pod.ports
                              if (c.name, c.protocol) in wanted)
        entries[(ip, 32)] = (PeerClass(keys, pod_blocks, ports), 0)
    for host in (*node.ips, node.hairpin_ip):
        try:
            hip = ip_int(host)
        except ValueError:
            continue  # an IPv6 node address
        cls, _ = entries.get((hip, 32), (PeerClass(blocks=bidx.containing(hip, 32)), 0))
        entries[(hip, 32)] = (cls, PEER_HOST)
    return entries


def _minimal(entries: dict[Prefix, tuple[PeerClass, int]]
             ) -> dict[Prefix, tuple[PeerClass, int]]:
    """A prefix kept only where it changes the answer of the prefix above it."""
    lengths = sorted({plen for _, plen in entries}, reverse=True)
    kept: dict[Prefix, tuple[PeerClass, int]] = {}
    for (net, plen), value in entries.items():
        above: tuple[PeerClass, int] = (EMPTY_CLASS, 0)
        for length in lengths:
            if length < plen:
                hit = entries.get((net & mask(length), length))
                if hit is not None:
                    above = hit
                    break
        if value != above:
            kept[(net, plen)] = value
    return kept


def _identities(prev: CompiledPolicy, kept: dict[Prefix, tuple[PeerClass, int]]
                ) -> _Identities:
    identity_ids = _Ids(prev.identities)
    identity_ids.assigned[EMPTY_CLASS] = IDENTITY_ANY
    ipcache = {p: PeerEntry(identity_ids.get(cls), flags) for p, (cls, flags) in kept.items()}
    out = _Identities(ipcache, dict(identity_ids.assigned))
    for cls, ident in out.identities.items():
        for key in cls.selectors:
            out.by_selector[key].add(ident)
        for b in cls.blocks:
            out.by_block[b].add(ident)
        for name, proto, number in cls.named_ports:
            out.by_name[(name, proto)][ident].add(number)
    return out


def _prepared(ranked: list[NetworkPolicy], relevant: list[int], ids: _Identities
              ) -> dict[tuple[int, int], list[_Rule]]:
    """Each relevant policy's rules, peers resolved to identities."""
    prepared: dict[tuple[int, int], list[_Rule]] = {}
    for rank in relevant:
        pol = ranked[rank]
        for direction, ptype in POLICY_TYPES.items():
            rules = []
            for rule in pol.rules(ptype):
                targets: frozenset[int] | None = None
                if rule.peers:
                    found: set[int] = set()
                    for peer in rule.peers:
                        if peer.ip_block is not None:
                            found |= ids.by_block.get(peer.ip_block, set())
                        else:
                            found |= ids.by_selector.get(_peer_key(pol, peer), set())
                    targets = frozenset(found)
                numeric: list[tuple[int, int, int]] = []
                names: list[tuple[str, str]] = []
                for p in rule.ports:
                    proto = proto_number(p.protocol)
                    if p.port is None:
                        numeric.append((proto, 0, 65535))
                    elif isinstance(p.port, int):
                        numeric.append((proto, p.port, p.end_port or p.port))
                    else:
                        names.append((p.port, p.protocol))
                if not rule.ports:
                    numeric.append((PROTO_ANY, 0, 65535))
                rules.append(_Rule(targets, tuple(numeric), tuple(names)))
            prepared[(rank, direction)] = rules
    return prepared


class _PortSets:
    """Port-set slots: each distinct set of ranges stored once, as a chain of
    PORTS_PER_SET-range slots, keeping the slots it had in `prev`."""

    def __init__(self, prev: CompiledPolicy, errors: list[Refusal]) -> None:
        self.prev = prev
        self.slots = _Ids({}, reserved=(0, *prev.maps.portsets))
        self.portsets: dict[int, PortSet] = {}
        self.chains: dict[tuple[PortRange, ...], tuple[int, ...]] = {}
        self.errors = errors

    def intern(self, ranges: tuple[PortRange, ...], where: str) -> int:
        """The first slot of a port set, stored once however many rules use it."""
        chain = self.chains.get(ranges)
        if chain is None:
            limit = PORTS_PER_SET * MAX_CHAIN
            if len(ranges) > limit:
                # Fail closed: the ranges past the limit are not allowed.
                self.errors.append(Refusal(where, f"{len(ranges)} port ranges, only {limit} kept"))
                ranges_kept = ranges[:limit]
            else:
                ranges_kept = ranges
            chunks = [ranges_kept[i:i + PORTS_PER_SET]
                      for i in range(0, len(ranges_kept), PORTS_PER_SET)]
            chain = self.prev.portset_slots.get(ranges) or tuple(self.slots.fresh() for _ in chunks)
            for i, chunk in enumerate(chunks):
                nxt = chain[i + 1] if i + 1 < len(chain) else 0
                self.portsets[chain[i]] = PortSet(chunk, nxt)
            self.chains[ranges] = chain
        return chain[0]


@dataclass
class _LocalRules:
    rules: dict[RuleKey, int]
    endpoints: dict[int, EndpointEntry]
    by_key: dict[PodRulesKey, PodRules]
    pod_keys: dict[tuple[int, int], PodRulesKey]
    slot_users: dict[int, int]
    delta: MapChanges | None  # against the previous compile's rules, when reused


def _local_rules(local: set[int], pods: dict[int, Pod],
                 isolating: dict[tuple[int, int], list[int]], relevant: list[int],
                 pids: dict[int, int],
                 prepared: dict[tuple[int, int], list[_Rule]], ids: _Identities,
                 sets: _PortSets, prev: CompiledPolicy, old: RuleMemo | None) -> _LocalRules:
    """The rules and endpoint entries of each local pod and direction,
    compiled once per distinct key (direction, policies, ports) they depend
    on; `old`, when the rules' context is unchanged (see RuleMemo), gives
    the previous compile's, which only the pods with another key redo."""
    ingress_named = {rank for rank in relevant
                     if any(r.named for r in prepared[(rank, INGRESS)])}
    endpoints: dict[int, EndpointEntry] = {}
    by_key: dict[PodRulesKey, PodRules] = {}
    pod_keys: dict[tuple[int, int], PodRulesKey] = {}
    # Pods and identities share a few port sets: 1,000 policies over 1,000
    # pods ask for about 100,000 sets of about 1,000 kinds.
    normalized: dict[tuple[Tagged, ...], tuple[PortRange, ...]] = {}

    def norm(tagged: list[Tagged]) -> tuple[PortRange, ...]:
        key = tuple(tagged)
        got = normalized.get(key)
        if got is None:
            got = normalized[key] = normalize(key)
        return got

    for ip in sorted(local):
        pod = pods[ip]
        flags, blame = 0, {INGRESS: 0, EGRESS: 0}
        for direction in (INGRESS, EGRESS):
            ranks = isolating.get((ip, direction))
            if not ranks:
                continue
            flags |= ISOLATED[direction]
            blame[direction] = pids[ranks[0]]
            ports_key = (pod.ports if direction == INGRESS
                         and any(r in ingress_named for r in ranks) else ())
            ckey = pod_keys[(ip, direction)] = (direction, tuple(ranks), ports_key)
            if ckey in by_key:
                continue
            got = old.by_key.get(ckey) if old is not None else None
            if got is None:
                where = f"{pod.key} {DIRECTION_NAMES[direction]}"
                got = _pod_rules(direction, ranks, pids, prepared, pod, ids.by_name,
                                 functools.partial(sets.intern, where=where), norm)
            by_key[ckey] = got
        if flags:
            endpoints[ip] = EndpointEntry(flags, blame[INGRESS], blame[EGRESS])
    if old is None:
        rules: dict[RuleKey, int] = {}
        for (ip, direction), ckey in pod_keys.items():
            _put_rules(rules, ip, direction, by_key[ckey])
        return _LocalRules(rules, endpoints, by_key, pod_keys, Counter(rules.values()), None)
    rules, users, delta = _changed_rules(prev, old, by_key, pod_keys)
    _carry_port_sets(prev, sets, users)
    return _LocalRules(rules, endpoints, by_key, pod_keys, users, delta)


def _put_rules(rules: dict[RuleKey, int], ip: int, direction: int, got: PodRules) -> None:
    any_slot, per_identity = got
    if any_slot is not None:
        rules[(ip, IDENTITY_ANY, direction)] = any_slot
    for ident, slot in per_identity.items():
        rules[(ip, ident, direction)] = slot


def _changed_rules(prev: CompiledPolicy, old: RuleMemo, by_key: dict[PodRulesKey, PodRules],
                   pod_keys: dict[tuple[int, int], PodRulesKey]
                   ) -> tuple[dict[RuleKey, int], dict[int, int], MapChanges]:
    """The previous compile's rules with those of the pods whose key changed
    (or that came or went) rewritten; how many rules then point to each
    port set; and what that changed."""
    before = prev.maps.rules
    rules = dict(before)
    users = dict(old.slot_users)
    moved = [pd for pd, ckey in pod_keys.items() if old.pod_keys.get(pd) != ckey]
    moved += [pd for pd in old.pod_keys if pd not in pod_keys]
    gone: dict[RuleKey, int] = {}
    for pd in moved:
        was = old.pod_keys.get(pd)
        if was is not None:
            _put_rules(gone, *pd, old.by_key[was])
    for k, slot in gone.items():
        del rules[k]
        users[slot] -= 1
    fresh: dict[RuleKey, int] = {}
    for pd in moved:
        ckey = pod_keys.get(pd)
        if ckey is not None:
            _put_rules(fresh, *pd, by_key[ckey])
    for slot in fresh.values():
        users[slot] = users.get(slot, 0) + 1
    rules.update(fresh)
    return rules, {s: n for s, n in users.items() if n}, MapChanges(
        put={k: v for k, v in fresh.items() if before.get(k) != v},
        delete=tuple(k for k in gone if k not in fresh))


def _carry_port_sets(prev: CompiledPolicy, sets: _PortSets, users: dict[int, int]) -> None:
    """Port sets that reused rules point to were not interned again: they
    keep their slots, as interning them would have kept them."""
    for ranges, chain in prev.portset_slots.items():
        if chain[0] in users and ranges not in sets.chains:
            sets.chains[ranges] = chain
            for slot in chain:
                sets.portsets[slot] = prev.maps.portsets[slot]


def _over_limits(maps: PolicyMaps, pids: dict[int, int], sizes: Sizes) -> list[Refusal]:
    """What does not fit the maps of an instance of `sizes`: refused, so that
    the writer fails closed. Policy ids share the port-set slots' bound:
    lb_pol_drops has one counter per slot, slot and id 0 unused."""
    errors = []
    subject = "NetworkPolicy for this node"
    for name, what, count, limit in (
            ("lb_pol_endpoints", "isolated pods", len(maps.endpoints), sizes.pol_endpoints),
            ("lb_pol_ipcache", "ipcache entries", len(maps.ipcache), sizes.pol_ipcache),
            ("lb_pol_rules", "rules", len(maps.rules), sizes.pol_rules)):
        if count > limit:
            errors.append(Refusal(subject, f"{count} {what}, the map holds {limit}", name))
    if maps.portsets and max(maps.portsets) >= sizes.pol_portsets:
        errors.append(Refusal(subject, f"port-set slot {max(maps.portsets)} beyond the "
                              f"{sizes.pol_portsets} slots", "lb_pol_portsets"))
    if pids and max(pids.values()) >= sizes.pol_portsets:
        errors.append(Refusal(subject, f"policy id {max(pids.values())} beyond the "
                              f"{sizes.pol_portsets} ids", "lb_pol_drops"))
    return errors


def inputs(cluster: Cluster, node: Node) -> tuple[object, ...]:
    """Everything compile_policy reads: equal inputs compile to equal maps. A
    change-tracking source keeps each map of the cluster the very same object
    while nothing in it changes, so comparing costs nothing then."""
    return (cluster.pods, cluster.namespaces, cluster.policies, node.name, node.ips,
            node.hairpin_ip)


def same_inputs(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return all(x is y or x == y for x, y in zip(a, b, strict=True))


def compile_policy(cluster: Cluster, node: Node, previous: CompiledPolicy | None = None,
                   sizes: Sizes = DEFAULT_SIZES) -> CompiledPolicy:
    """This node's policy maps. Local pods are the pods whose nodeName is
    node.name (every pod when node.name is None: a one-node view); their
    ingress and egress are enforced here. node.ips and node.hairpin_ip are
    the sources this node's pods always accept (the API exempts the pod's
    node; the hairpin source is a pod reaching itself). Numbers (identities,
    port-set slots, policy ids) are kept from `previous` where they still
    mean the same."""
    prev = previous or CompiledPolicy(PolicyMaps())
    pods = pods_by_ip(cluster.pods.values())
    local = {ip for ip, pod in pods.items() if node.name is None or pod.node_name == node.name}
    ranked = sorted(cluster.policies.values(), key=lambda p: (p.namespace, p.name))
    sel = _Selectors(cluster, pods, local)
    isolating = _isolating(ranked, sel)
    relevant = sorted({r for ranks in isolating.values() for r in ranks})
    was = prev.rule_memo
    if was is not None and (prev.errors or was.relevant != relevant
                            or not same_inputs((was.policies,), (cluster.policies,))):
        was = None
    named = was.named if was is not None else _named(ranked, relevant)
    ids = _identities(prev, _minimal(_address_classes(pods, node, sel, named)))
    policy_ids = _Ids(prev.policy_ids)
    pids = {rank: policy_ids.get(ranked[rank].key) for rank in relevant}
    if was is not None and (ids.identities != prev.identities or pids != was.pids):
        was = None
    prepared = was.prepared if was is not None else _prepared(ranked, relevant, ids)
    errors: list[Refusal] = []
    sets = _PortSets(prev, errors)
    local_rules = _local_rules(local, pods, isolating, relevant, pids, prepared, ids, sets,
                               prev, was)
    maps = PolicyMaps(
        endpoints=local_rules.endpoints,
        ipcache=ids.ipcache,
        rules=local_rules.rules,
        portsets=sets.portsets,
        policies={pid: ranked[rank].key for rank, pid in pids.items()},
    )
    errors += _over_limits(maps, pids, sizes)
    return CompiledPolicy(
        maps=maps,
        node_name=node.name,
        local_pods={ip: pods[ip].key for ip in local},
        pods={ip: pod.key for ip, pod in pods.items()},
        identities=ids.identities,
        portset_slots=sets.chains,
        policy_ids={ranked[rank].key: pid for rank, pid in pids.items()},
        errors=tuple(errors),
        rule_memo=RuleMemo(cluster.policies, relevant, named, prepared, pids,
                           local_rules.by_key, local_rules.pod_keys, local_rules.slot_users),
        rules_delta=local_rules.delta,
    )


def compile_incremental(previous: CompiledPolicy, cluster: Cluster, node: Node,
                        sizes: Sizes = DEFAULT_SIZES) -> tuple[CompiledPolicy, PolicyDiff]:
    """The next compile, numbered after `previous`, and the changes that
    turn the maps of `previous` into it (apply them in `steps()` order)."""
    new = compile_policy(cluster, node, previous, sizes)
    return new, diff(previous.maps, new.maps, new.rules_delta)


def _pod_rules(direction: int, ranks: list[int], pids: dict[int, int],
               prepared: dict[tuple[int, int], list[_Rule]], pod: Pod,
               by_name: dict[tuple[str, str], dict[int, set[int]]],
               intern: Callable[[tuple[PortRange, ...]], int],
               norm: Callable[[list[Tagged]], tuple[PortRange, ...]]
               ) -> tuple[int | None, dict[int, int]]:
    """The port-set slots of one local pod's direction: for identity 0 (the
    rules for every peer; None when there are none) and for each identity
    whose ports differ from those. `norm` is normalize, or a memo of it."""
    any_tagged: list[Tagged] = []
    per_identity: dict[int, list[Tagged]] = defaultdict(list)
    for rank in ranks:
        pid = pids[rank]
        for rule in prepared[(rank, direction)]:
            tagged = [(rank, proto, lo, hi, pid) for proto, lo, hi in rule.numeric]
            if direction == INGRESS:
                # Named ports of the destination: this pod.
                tagged += [(rank, proto_number(c.protocol), c.port, c.port, pid)
                           for name, proto in rule.named for c in pod.ports
                           if c.name == name and c.protocol == proto]
            if rule.targets is None:
                any_tagged += tagged
            else:
                for ident in rule.targets:
                    per_identity[ident] += tagged
            if direction == EGRESS:
                # Named ports of the destination: the remote pods.
                for name, proto in rule.named:
                    for ident, numbers in by_name.get((name, proto), {}).items():
                        if rule.targets is None or ident in rule.targets:
                            per_identity[ident] += [(rank, proto_number(proto), n, n, pid)
                                                    for n in numbers]
    base = norm(any_tagged)
    any_slot = intern(base) if base else None
    out: dict[int, int] = {}
    for ident, tagged in per_identity.items():
        if not tagged:
            continue
        ranges = norm(tagged + any_tagged)
        if ranges != base:
            out[ident] = intern(ranges)
    return any_slot, out


# --- applying a change --------------------------------------------------------------
