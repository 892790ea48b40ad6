"""What this node's datapath must hold: a pure function of the cluster model
and the node, with kube-proxy's endpoint semantics. No kernel involved, so
every rule here is unit-tested on its own.

Endpoint choice follows kube-proxy (pkg/proxy/topology.go): ready endpoints;
when none is ready, the serving-and-terminating ones; never not-serving ones.
A Local traffic policy narrows that to endpoints on this node."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import NamedTuple

from lb.model import (
    PROTO_NAMES,
    PROTO_NUMBERS,
    UNPROXIED_LABELS,
    Cluster,
    Endpoint,
    EndpointSlice,
    Node,
    Service,
    ServicePort,
)
from loader.layout import const

log = logging.getLogger(__name__)

# The protocols the datapath translates.
SERVED_PROTOCOLS = ("TCP", "UDP", "SCTP")
SCOPE_EXTERNAL = const("LB_SCOPE_EXTERNAL")
SCOPE_INTERNAL = const("LB_SCOPE_INTERNAL")


# Frontends and backends are NamedTuples, not dataclasses: a sync from empty
# at 10k services makes and hashes hundreds of thousands of them, and a
# tuple's hash, order and construction run in C.
class Frontend(NamedTuple):
    """A services-map key: where clients send, and which clients (scope)."""

    ip: str
    port: int
    proto: int
    scope: int

    def __str__(self) -> str:
        scope = "internal" if self.scope == SCOPE_INTERNAL else "external"
        return f"{self.ip}:{self.port}/{PROTO_NAMES.get(self.proto, self.proto)} ({scope})"


class Backend(NamedTuple):
    ip: str
    port: int
    proto: int
    local: bool = False
    terminating: bool = False

    @property
    def name(self) -> str:
        """Stable identity for Maglev: the same on every node."""
        return f"{self.ip}:{self.port}/{PROTO_NAMES.get(self.proto, self.proto)}"


@dataclass(frozen=True)
class FrontendEntry:
    frontend: Frontend
    service: str
    port_name: str
    flags: int
    affinity_timeout: int
    backends: tuple[Backend, ...]
    source_ranges: tuple[str, ...] = ()
    # Serving but terminating endpoints no new flow may choose: their
    # established connections go on (as kube-proxy's conntrack lets them).
    draining: tuple[Backend, ...] = ()

    @cached_property
    def group(self) -> str:
        """Frontends of one service port share backend ids (and affinity)."""
        return f"{self.service}:{self.port_name}/{PROTO_NAMES[self.frontend.proto]}"


@dataclass(frozen=True)
class DesiredState:
    """A node's datapath contents. One computed through a Memo is a view of
    the memo's entries, valid until its next compute, and says which
    frontends changed since the state computed before it."""

    entries: Mapping[Frontend, FrontendEntry]
    service_cidrs: tuple[str, ...] = ()
    node_ip: str | None = None
    hairpin_ip: str | None = None
    netns_cookie: int = 0
    # The node's own addresses: a packet from outside with one as its
    # source is a martian (bpf/lib/translate.h, lb_martian).
    node_ips: tuple[str, ...] = ()
    min_mtu: int = 0
    # This state's identity, and its changes against the state `since`
    # (frontends whose entry was added, changed or removed); None: unknown.
    token: object = field(default_factory=object, compare=False, repr=False)
    since: object | None = field(default=None, compare=False, repr=False)
    changed: frozenset[Frontend] | None = field(default=None, compare=False, repr=False)

    def backends(self) -> set[tuple[str, Backend]]:
        return {(e.group, b) for e in self.entries.values() for b in e.backends}


def programmed(svc: Service) -> bool:
    """kube-proxy's filter: headless, ExternalName, services labelled
    headless and services of another proxy get nothing."""
    if svc.type == "ExternalName" or svc.headless:
        return False
    return not any(k in UNPROXIED_LABELS for k, _ in svc.labels)


def _candidates(cluster: Cluster, svc: Service, port: ServicePort, node: Node
                ) -> list[tuple[Endpoint, int]]:
    """Every endpoint of the service port with its resolved target port, one
    per address and port. Where slices overlap, the first copy (by slice
    name) counts unless a later one is on this node: kube-proxy's
    `!exists || isLocal` (pkg/proxy/endpointslicecache.go, v1.34)."""
    found: dict[tuple[str, int], tuple[Endpoint, int]] = {}
    for es in sorted(cluster.slices_of(svc.key), key=lambda s: s.name):
        match = [p for p in es.ports if p.name == port.name and p.protocol == port.protocol]
        if not match:
            continue
        target = match[0].port
        for ep in es.endpoints:
            key = (ep.ip, target)
            if key not in found or (node.name is not None and ep.node_name == node.name):
                found[key] = (ep, target)
    return list(found.values())


def _usable(eps: list[tuple[Endpoint, int]], publish_not_ready: bool,
            topology: Callable[[Endpoint], bool] | None = None) -> list[tuple[Endpoint, int]]:
    """kube-proxy's CategorizeEndpoints: the ready endpoints (those the
    topology allows, for cluster endpoints), else the serving and
    terminating ones."""
    ready = [(e, p) for e, p in eps if (e.ready or publish_not_ready)
             and (topology is None or topology(e))]
    if ready:
        return ready
    return [(e, p) for e, p in eps if e.serving and e.terminating]


PREFER_SAME_NODE, PREFER_SAME_ZONE = "PreferSameNode", "PreferSameZone"


def topology_mode(eps: list[Endpoint], node: Node, publish_not_ready: bool) -> str:
    """topologyModeFromHints (pkg/proxy/topology.go, v1.34): hints count only
    when every ready endpoint has one, and one is for this node (or zone).
    The EndpointSlice controller writes them from trafficDistribution
    (PreferSameNode: node hints; PreferClose, PreferSameZone: zone hints)."""
    ready = [e for e in eps if e.ready or publish_not_ready]
    if not ready:
        return ""
    if all(e.node_hints for e in ready) and any(node.name in e.node_hints for e in ready):
        return PREFER_SAME_NODE
    if all(e.zone_hints for e in ready) and any(node.zone in e.zone_hints for e in ready):
        return PREFER_SAME_ZONE
    return ""


def _available(mode: str, node: Node) -> Callable[[Endpoint], bool] | None:
    """availableForTopology: which ready endpoints the mode allows."""
    if mode == PREFER_SAME_NODE:
        return lambda e: node.name in e.node_hints
    if mode == PREFER_SAME_ZONE:
        return lambda e: node.zone in e.zone_hints
    return None


def _backends(eps: list[tuple[Endpoint, int]], proto: int, node: Node) -> tuple[Backend, ...]:
    return tuple(
        sorted(
            Backend(
                ip=e.ip,
                port=port,
                proto=proto,
                local=node.name is not None and e.node_name == node.name,
                terminating=e.terminating,
            )
            for e, port in eps
        )
    )


def _service_entries(cluster: Cluster, svc: Service, node: Node) -> list[FrontendEntry]:
    entries: list[FrontendEntry] = []
    for port in svc.ports:
        proto = PROTO_NUMBERS[port.protocol] if port.protocol in SERVED_PROTOCOLS else None
        if proto is None:
            log.info("%s: port %s/%s: protocol not handled by the datapath", svc.key,
                     port.port, port.protocol)
            continue
        eps = _candidates(cluster, svc, port, node)
        if port.protocol == "SCTP" and not _sctp_servable(svc, port, eps):
            continue
        mode = topology_mode([e for e, _ in eps], node, svc.publish_not_ready)
        all_usable = _usable(eps, svc.publish_not_ready, _available(mode, node))
        local_eps = [(e, p) for e, p in eps if node.name and e.node_name == node.name]
        local_usable = _usable(local_eps, svc.publish_not_ready)
        cluster_set = _backends(all_usable, proto, node)
        local_set = _backends(local_usable, proto, node)
        serving = _backends([(e, p) for e, p in eps if e.serving and e.terminating], proto, node)

        affinity = const("LB_SVC_AFFINITY") if svc.session_affinity else 0

        def entry(ip: str, port_no: int, scope: int, kind: int, local: bool,
                  backends: tuple[Backend, ...], port: ServicePort = port,
                  proto: int = proto, affinity: int = affinity,
                  serving: tuple[Backend, ...] = serving) -> FrontendEntry:
            flags = affinity | kind | (const("LB_SVC_LOCAL_ONLY") if local else 0)
            ranges = svc.load_balancer_source_ranges
            return FrontendEntry(
                frontend=Frontend(ip, port_no, proto, scope),
                service=svc.key,
                port_name=port.name,
                flags=flags,
                affinity_timeout=svc.affinity_timeout if svc.session_affinity else 0,
                backends=backends,
                source_ranges=ranges if flags & const("LB_SVC_SOURCE_RANGES") else (),
                draining=tuple(b for b in serving if b not in backends),
            )

        itp, etp = svc.internal_traffic_local, svc.external_traffic_local
        # kube-proxy's syncProxyRules (pkg/proxy/nftables/proxier.go, v1.34): a
        # service with no usable endpoint anywhere rejects, on every address;
        # one with some, but none that a Local policy allows here, drops. The
        # flag that makes an empty backend set drop is set only then.
        has_endpoints = bool(cluster_set)
        for ip in svc.cluster_ips:
            entries.append(entry(ip, port.port, SCOPE_INTERNAL, const("LB_SVC_CLUSTER_IP"),
                                 itp and has_endpoints, local_set if itp else cluster_set))
        outside: list[tuple[str, int, int]] = []
        if port.node_port and svc.type in ("NodePort", "LoadBalancer"):
            answering = node.ips if node.node_port_ips is None else node.node_port_ips
            outside += [(ip, port.node_port, const("LB_SVC_NODE_PORT")) for ip in answering]
        outside += [(ip, port.port, const("LB_SVC_EXTERNAL_IP")) for ip in svc.external_ips]
        if svc.type == "LoadBalancer":
            ranges = const("LB_SVC_SOURCE_RANGES") if svc.load_balancer_source_ranges else 0
            outside += [(ip, port.port, const("LB_SVC_LOAD_BALANCER") | ranges)
                        for ip in svc.load_balancer_ips]
        masq = 0 if etp else const("LB_SVC_MASQUERADE")
        if port.protocol == "SCTP" and outside:
            # Cilium's limits for SCTP: no NodePort, no masquerade; the
            # external addresses still serve pods (same port, no rewrite).
            log.info("%s: port %s/SCTP: served to pods only (SCTP from outside would need "
                     "a NodePort or masquerade, which rewrite ports)", svc.key, port.port)
            outside = [(ip, port_no, kind) for ip, port_no, kind in outside
                       if not kind & const("LB_SVC_NODE_PORT")]
            for ip, port_no, kind in outside:
                entries.append(entry(ip, port_no, SCOPE_INTERNAL, kind, False, cluster_set))
            continue
        for ip, port_no, kind in outside:
            # External clients see the external policy; pods reaching the
            # same address get every endpoint, as kube-proxy short-circuits
            # pod traffic to external destinations to its cluster chain.
            entries.append(entry(ip, port_no, SCOPE_EXTERNAL, kind | masq, etp and has_endpoints,
                                 local_set if etp else cluster_set))
            entries.append(entry(ip, port_no, SCOPE_INTERNAL, kind, False, cluster_set))
    return entries


def _sctp_servable(svc: Service, port: ServicePort, eps: list[tuple[Endpoint, int]]) -> bool:
    """An SCTP packet's CRC32c covers its ports, and rewriting one would mean
    recomputing it over the whole packet: as Cilium does, an SCTP port is
    served only where targetPort equals port (its addresses can change: the
    CRC covers no IP header)."""
    other = sorted({target for _, target in eps if target != port.port})
    if other:
        log.error("%s: port %s/SCTP: targetPort %s differs from the port; an SCTP port "
                  "is served only where they are equal; not programmed", svc.key, port.port,
                  ",".join(map(str, other)))
    return not other


def _same(a: object, b: object) -> bool:
    # Sources keep the objects that did not change, so identity decides
    # almost always; a file source re-reads everything and needs ==.
    return a is b or a == b


def _same_slices(a: Sequence[EndpointSlice], b: Sequence[EndpointSlice]) -> bool:
    return len(a) == len(b) and all(x is y or x == y for x, y in zip(a, b, strict=True))


@dataclass
class _Computed:
    """One service's entries and the objects they were computed from."""

    service: Service
    slices: tuple[EndpointSlice, ...]
    entries: dict[Frontend, FrontendEntry]


@dataclass
class Memo:
    """The desired state kept between computes, so that `compute` works only
    on the services whose inputs changed, as kube-proxy's change trackers
    hand its sync the services and endpoints that changed
    (pkg/proxy/servicechangetracker.go, endpointschangetracker.go). A
    service's entries are a pure function of its Service, its
    EndpointSlices and the node, so a kept one equals a recompute; the
    agent's periodic full recompute checks that it does.

    Which services to look at: the snapshot's `changes` when they are
    against the snapshot computed last, else every service (each compared
    with what it was computed from, by identity first)."""

    node: Node | None = None
    by_service: dict[str, _Computed] = field(default_factory=dict)
    # Frontend -> the services whose entries claim it; the first by key owns it.
    claims: dict[Frontend, set[str]] = field(default_factory=dict)
    entries: dict[Frontend, FrontendEntry] = field(default_factory=dict)
    cluster: object | None = None  # revision of the snapshot computed last
    token: object | None = None  # of the state computed last
    computed: int = 0  # services computed afresh by the last compute
    reused: int = 0

    def reset(self) -> None:
        self.by_service.clear()
        self.claims.clear()
        self.entries.clear()
        self.node = self.cluster = self.token = None

    def update(self, cluster: Cluster, node: Node) -> frozenset[Frontend]:
        """Bring the entries up to `cluster` and `node`; the frontends whose
        entry changed."""
        self.computed = self.reused = 0
        if self.node is None or not _same(self.node, node):
            self.reset()  # every entry depends on the node
            self.node = node
        changes = cluster.changes
        if changes is not None and self.cluster is not None and changes.since is self.cluster:
            keys: Iterable[str] = changes.services
        else:
            keys = cluster.services.keys() | self.by_service.keys()
        self.cluster = cluster.revision
        touched: set[Frontend] = set()
        for key in keys:
            touched |= self._service(cluster, key, node)
        return frozenset(f for f in touched if self._settle(f))

    def _service(self, cluster: Cluster, key: str, node: Node) -> set[Frontend]:
        """Recompute service `key` if its inputs changed; the frontends its
        old or new entries name (none when it is unchanged)."""
        svc = cluster.services.get(key)
        hit = self.by_service.get(key)
        if svc is None or not programmed(svc):
            if hit is None:
                return set()
            del self.by_service[key]
            new: dict[Frontend, FrontendEntry] = {}
        else:
            slices = tuple(cluster.slices_of(key))
            if hit is not None and _same(hit.service, svc) and _same_slices(hit.slices, slices):
                self.reused += 1
                return set()
            new = {e.frontend: e for e in _service_entries(cluster, svc, node)}
            self.by_service[key] = _Computed(svc, slices, new)
            self.computed += 1
        old = hit.entries if hit is not None else {}
        for f in old.keys() - new.keys():
            owners = self.claims[f]
            owners.discard(key)
            if not owners:
                del self.claims[f]
        for f in new.keys() - old.keys():
            self.claims.setdefault(f, set()).add(key)
        return old.keys() | new.keys()

    def _settle(self, f: Frontend) -> bool:
        """Give `f` to the first service claiming it; whether its entry changed."""
        owners = self.claims.get(f)
        before = self.entries.get(f)
        if not owners:
            self.entries.pop(f, None)
            return before is not None
        owner = min(owners)
        for other in sorted(owners - {owner}):
            log.error("%s: frontend %s already belongs to %s; skipped", other, f, owner)
        e = self.by_service[owner].entries[f]
        self.entries[f] = e
        return before is not e


def drift(a: DesiredState, b: DesiredState) -> int:
    """How many frontends' entries differ between two states, plus one when
    anything else does: 0 when they are equal."""
    n = sum(1 for f in a.entries.keys() | b.entries.keys()
            if a.entries.get(f) != b.entries.get(f))
    return n + (replace(a, entries={}) != replace(b, entries={}))


def compute(cluster: Cluster, node: Node, memo: Memo | None = None) -> DesiredState:
    """The datapath contents for `node`. When two services claim the same
    frontend, the one whose namespace/name sorts first keeps it and the
    other is logged. With `memo`, only the services whose inputs changed
    since its last compute are computed again; the state returned is a
    view of the memo's entries and names the frontends that changed."""
    fresh = memo is None
    memo = Memo() if memo is None else memo
    since = memo.token
    try:
        changed = memo.update(cluster, node)
    except BaseException:
        memo.reset()  # half updated: the next compute starts over
        raise
    if memo.token is None:  # started over (a new node): no delta to tell
        since = None
    # --service-cidr and the cluster's ServiceCIDR objects, as kube-proxy
    # follows them (OnServiceCIDRsChanged, pkg/proxy/nftables/proxier.go).
    cidrs = tuple(sorted({*node.service_cidrs, *cluster.all_service_cidrs()}))
    own = sorted({ip for ip in (*node.ips, *(node.node_port_ips or ())) if ":" not in ip},
                 key=lambda ip: (ip not in node.ips, ip))
    state = DesiredState(
        memo.entries if fresh else MappingProxyType(memo.entries), service_cidrs=cidrs,
        node_ip=node.ips[0] if node.ips else None, hairpin_ip=node.hairpin_ip,
        netns_cookie=node.netns_cookie, node_ips=tuple(own), min_mtu=node.min_mtu,
        since=None if fresh else since, changed=None if fresh else changed)
    memo.token = state.token
    return state
