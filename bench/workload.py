"""The synthetic services every benchmark installs, and their model form.

One description (`SvcSpec`) feeds both sides of every comparison: the model objects the
control plane computes this project's maps from, and the kube-proxy rule generators in
`bench.kuberules`. Addresses stay inside ranges the lab never routes: filler ClusterIPs in
10.100.0.0/14 (inside the 10.96.0.0/12 service CIDR), filler endpoints in 100.64.0.0/10.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from lb.model import Cluster, Endpoint, EndpointPort, EndpointSlice, Node, Service, ServicePort
from lb.service import desired

SERVICE_CIDR = "10.96.0.0/12"
CLUSTER_CIDR = "10.244.0.0/16"
NAMESPACE = "bench"
_FILLER_VIPS = ipaddress.IPv4Network("10.100.0.0/14")
_FILLER_ENDPOINTS = ipaddress.IPv4Network("100.64.0.0/10")


@dataclass(frozen=True)
class SvcSpec:
    """One single-port service with its endpoints (all ready)."""

    name: str
    cluster_ip: str
    port: int
    target_port: int
    endpoints: tuple[str, ...]
    port_name: str = "http"
    protocol: str = "TCP"
    node_port: int | None = None
    external_ips: tuple[str, ...] = ()
    # externalTrafficPolicy: Local. Only the packet-cost probes use it; the rule
    # generators model the default (Cluster) policy.
    etp_local: bool = False
    # Node the endpoints run on: "" means another node.
    endpoint_node: str = ""
    namespace: str = NAMESPACE

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def port_key(self) -> str:
        """kube-proxy's ServicePortName string: namespace/name:port."""
        return f"{self.namespace}/{self.name}:{self.port_name}"


def filler_vip(i: int) -> str:
    return str(_FILLER_VIPS.network_address + 1 + i)


def filler_endpoint(i: int) -> str:
    return str(_FILLER_ENDPOINTS.network_address + 1 + i)


def fillers(count: int, endpoints: int, start: int = 0) -> list[SvcSpec]:
    """`count` ClusterIP services with `endpoints` endpoints each (fake addresses)."""
    return [
        SvcSpec(name=f"fill-{i:06d}", cluster_ip=filler_vip(i), port=80, target_port=8080,
                endpoints=tuple(filler_endpoint(i * endpoints + j) for j in range(endpoints)))
        for i in range(start, start + count)
    ]


def with_endpoint_replaced(spec: SvcSpec, index: int, generation: int) -> SvcSpec:
    """The same service with endpoint `index` replaced by a fresh address (a pod rolled)."""
    fresh = str(ipaddress.IPv4Address("100.127.0.0") + generation)
    eps = list(spec.endpoints)
    eps[index] = fresh
    return replace(spec, endpoints=tuple(eps))


# -- API objects ----------------------------------------------------------------------------

MANAGED_BY = "bench.xdplb.io"


def service_object(spec: SvcSpec) -> dict[str, Any]:
    """The Service as the API server takes it: no selector, so its EndpointSlice is
    whatever this benchmark writes (no controller competes)."""
    port: dict[str, Any] = {"name": spec.port_name, "protocol": spec.protocol,
                            "port": spec.port, "targetPort": spec.target_port}
    if spec.node_port:
        port["nodePort"] = spec.node_port
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": spec.name, "namespace": spec.namespace},
            "spec": {"type": "NodePort" if spec.node_port else "ClusterIP",
                     "clusterIP": spec.cluster_ip, "ports": [port],
                     "externalIPs": list(spec.external_ips)}}


def slice_endpoints(spec: SvcSpec) -> list[dict[str, Any]]:
    return [{"addresses": [ip], "conditions": {"ready": True},
             "nodeName": spec.endpoint_node or "elsewhere"} for ip in spec.endpoints]


def slice_object(spec: SvcSpec) -> dict[str, Any]:
    """Its EndpointSlice, named as slice_of names it."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{spec.name}-1", "namespace": spec.namespace,
                         "labels": {"kubernetes.io/service-name": spec.name,
                                    "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
            "addressType": "IPv4",
            "ports": [{"name": spec.port_name, "port": spec.target_port,
                       "protocol": spec.protocol}],
            "endpoints": slice_endpoints(spec)}


# -- model ----------------------------------------------------------------------------------

def service_of(spec: SvcSpec) -> Service:
    svc_type = "NodePort" if spec.node_port else "ClusterIP"
    return Service(
        namespace=spec.namespace, name=spec.name, type=svc_type,
        cluster_ips=(spec.cluster_ip,),
        ports=(ServicePort(spec.port_name, spec.protocol, spec.port, spec.target_port,
                           spec.node_port),),
        external_ips=spec.external_ips, external_traffic_local=spec.etp_local)


def slice_of(spec: SvcSpec) -> EndpointSlice:
    return EndpointSlice(
        namespace=spec.namespace, name=f"{spec.name}-1", service_name=spec.name,
        ports=(EndpointPort(spec.port_name, spec.target_port, spec.protocol),),
        endpoints=tuple(Endpoint(ip, node_name=spec.endpoint_node or "elsewhere")
                        for ip in spec.endpoints))


def cluster_of(specs: Iterable[SvcSpec]) -> Cluster:
    services: dict[str, Service] = {}
    slices: dict[str, EndpointSlice] = {}
    for spec in specs:
        svc, es = service_of(spec), slice_of(spec)
        services[svc.key] = svc
        slices[es.key] = es
    return Cluster(services=services, slices=slices)


def node_model(name: str, ips: Sequence[str]) -> Node:
    return Node(name=name, ips=tuple(ips))


def desired_of(specs: Iterable[SvcSpec], node: Node) -> desired.DesiredState:
    return desired.compute(cluster_of(specs), node)
