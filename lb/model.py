"""The cluster objects the control plane acts on, reduced to what a node's
datapath needs. Built from YAML files or from the Kubernetes API; both
sources produce these frozen dataclasses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

# Service types that are programmed; ExternalName is a DNS alias only.
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
PROTOCOLS = ("TCP", "UDP", "SCTP")
# IANA protocol numbers, as the packets and the maps carry them.
PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "SCTP": 132}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
# kube-proxy's default for sessionAffinityConfig.clientIP.timeoutSeconds.
DEFAULT_AFFINITY_TIMEOUT = 10800
# A service carrying either label is not proxied: it belongs to another proxy,
# or is to be treated as headless. kube-proxy watches Services without them
# (cmd/kube-proxy/app/server.go, noProxyName and noHeadlessEndpoints).
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
HEADLESS_LABEL = "service.kubernetes.io/headless"
UNPROXIED_LABELS = (SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL)


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str
    port: int
    target_port: int | str
    node_port: int | None = None


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    type: str = "ClusterIP"
    cluster_ips: tuple[str, ...] = ()
    headless: bool = False
    ports: tuple[ServicePort, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    load_balancer_source_ranges: tuple[str, ...] = ()
    session_affinity: bool = False
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    external_traffic_local: bool = False
    internal_traffic_local: bool = False
    health_check_node_port: int | None = None
    publish_not_ready: bool = False
    selector: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class EndpointPort:
    name: str
    port: int
    protocol: str


@dataclass(frozen=True)
class Endpoint:
    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    # EndpointSlice hints (hints.forZones, hints.forNodes): where the
    # EndpointSlice controller wants the endpoint used.
    zone_hints: frozenset[str] = frozenset()
    node_hints: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EndpointSlice:
    namespace: str
    name: str
    service_name: str
    ports: tuple[EndpointPort, ...] = ()
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def service_key(self) -> str:
        return f"{self.namespace}/{self.service_name}"


@dataclass(frozen=True)
class Changes:
    """What a snapshot changed against an earlier one of the same source
    (kube-proxy's change trackers: pkg/proxy/servicechangetracker.go,
    endpointschangetracker.go): the keys of the services whose Service or
    whose EndpointSlices were added, changed or removed."""

    since: object  # the earlier snapshot's `revision`
    services: frozenset[str]


@dataclass(frozen=True)
class Cluster:
    """Everything read from a source, keyed by namespace/name: a snapshot,
    never changed once built (sources build a new one per change)."""

    services: dict[str, Service] = field(default_factory=dict)
    slices: dict[str, EndpointSlice] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    namespaces: dict[str, Namespace] = field(default_factory=dict)
    policies: dict[str, NetworkPolicy] = field(default_factory=dict)
    # ServiceCIDR name -> its CIDRs (networking.k8s.io/v1).
    service_cidrs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Said by sources that track changes; None: compare to find them.
    changes: Changes | None = field(default=None, compare=False)
    # The slices by service key, from a source that keeps them so; None:
    # indexed here on first use.
    slice_index: Mapping[str, Sequence[EndpointSlice]] | None = field(default=None,
                                                                       compare=False)
    # This snapshot's identity for a later one's `changes` (never copied by
    # dataclasses.replace: every snapshot gets its own).
    revision: object = field(default_factory=object, init=False, compare=False, repr=False)

    def all_service_cidrs(self) -> tuple[str, ...]:
        """The IPv4 CIDRs of every ServiceCIDR, sorted, each once."""
        return tuple(sorted({c for cidrs in self.service_cidrs.values() for c in cidrs
                             if ":" not in c}))

    @cached_property
    def _slices_by_service(self) -> Mapping[str, Sequence[EndpointSlice]]:
        # Built once per snapshot: scanning every slice per service would
        # make the desired state quadratic in the number of services.
        if self.slice_index is not None:
            return self.slice_index
        index: dict[str, list[EndpointSlice]] = {}
        for s in self.slices.values():
            index.setdefault(s.service_key, []).append(s)
        return index

    def slices_of(self, service_key: str) -> list[EndpointSlice]:
        return list(self._slices_by_service.get(service_key, ()))


@dataclass(frozen=True)
class Node:
    """This node, as the datapath must know it."""

    name: str | None = None
    ips: tuple[str, ...] = ()
    # Where NodePorts answer; None: on `ips` (kube-proxy's "primary").
    node_port_ips: tuple[str, ...] | None = None
    # The Node's topology.kubernetes.io/zone label, for zone hints.
    zone: str | None = None
    # Where ClusterIPs come from: an address there that no service holds is
    # dropped. Empty: not known, nothing dropped.
    service_cidrs: tuple[str, ...] = ()
    # Source of a pod that reaches itself through a service; link-local, so
    # it never collides with a real address (Cilium uses the same one).
    hairpin_ip: str = "169.254.42.1"
    # The node's network namespace (SO_NETNS_COOKIE): socket hooks attached
    # to a cgroup act only on sockets there. 0: the hooks translate nothing.
    netns_cookie: int = 0
    # The smallest MTU of the node's devices: XDP looks up the route's MTU
    # of a translated packet longer than this (bpf/lib/pmtu.h). 0: unknown,
    # no lookups.
    min_mtu: int = 0
    # False while the Node is being deleted or is marked for deletion by the
    # cluster autoscaler: kube-proxy's healthz then fails, so that load
    # balancers drain the node (pkg/proxy/healthcheck/proxy_health.go).
    eligible: bool = True


# --- NetworkPolicy and the objects it selects -----------------------------------

# Set by the API server on every namespace (1.21+): selectors may name a
# namespace through it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
POLICY_INGRESS = "Ingress"
POLICY_EGRESS = "Egress"
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
# Pods in these phases hold no address any more (it may be reused).
TERMINAL_POD_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class ContainerPort:
    name: str  # "" when unnamed
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True)
class Pod:
    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    node_name: str | None = None
    ips: tuple[str, ...] = ()  # IPv4 addresses from status.podIPs
    host_network: bool = False
    ports: tuple[ContainerPort, ...] = ()
    phase: str = "Running"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str | None:
        return self.ips[0] if self.ips else None

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: tuple[tuple[str, str], ...] = ()  # includes NAMESPACE_NAME_LABEL


@dataclass(frozen=True)
class SelectorRequirement:
    key: str
    operator: str  # one of SELECTOR_OPERATORS
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabelSelector:
    """metav1.LabelSelector: every matchLabels pair and every expression
    must hold. The empty selector matches everything."""

    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        for k, v in self.match_labels:
            if labels.get(k) != v:
                return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In":
                ok = present and labels[req.key] in req.values
            elif req.operator == "NotIn":
                ok = not present or labels[req.key] not in req.values
            elif req.operator == "Exists":
                ok = present
            else:  # DoesNotExist
                ok = not present
            if not ok:
                return False
        return True

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in self.match_labels]
        for r in self.match_expressions:
            if r.operator in ("In", "NotIn"):
                parts.append(f"{r.key} {r.operator.lower()} ({','.join(r.values)})")
            else:
                parts.append(r.key if r.operator == "Exists" else f"!{r.key}")
        return ",".join(parts) or "{}"


@dataclass(frozen=True)
class IPBlock:
    cidr: str  # normalised; an IPv6 block never matches the IPv4 datapath
    excepts: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicyPeer:
    """One entry of `from`/`to`. Either ip_block alone, or one or both
    selectors (both: pods matching pod_selector in namespaces matching
    namespace_selector; pod_selector alone: in the policy's namespace)."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyPort:
    """port None: every port of the protocol; a str: a container port name;
    end_port: the last port of the range starting at port (an int)."""

    protocol: str = "TCP"
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class PolicyRule:
    """An ingress or egress rule. No peers: every peer; no ports: every port
    and protocol."""

    peers: tuple[PolicyPeer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()
    policy_types: tuple[str, ...] = (POLICY_INGRESS,)  # as defaulted by the API
    # Why the object could not be read: it then isolates what it selects
    # (failing closed) with no rule, until it is fixed.
    broken: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, policy_type: str) -> tuple[PolicyRule, ...]:
        """The rules of one direction; none when the policy does not apply
        to it (rules of a direction missing from policyTypes are ignored)."""
        if policy_type not in self.policy_types:
            return ()
        return self.ingress if policy_type == POLICY_INGRESS else self.egress
