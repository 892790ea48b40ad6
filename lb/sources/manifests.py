"""Read standard Kubernetes YAML (v1 Service, discovery.k8s.io/v1
EndpointSlice, legacy v1 Endpoints) into the model.

A malformed object is reported with the field that is wrong and skipped;
every other object of the file still counts. A file that is not YAML at all
is an error of its own."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lb.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    NAMESPACE_NAME_LABEL,
    POLICY_EGRESS,
    POLICY_INGRESS,
    PROTOCOLS,
    SELECTOR_OPERATORS,
    SERVICE_TYPES,
    Cluster,
    ContainerPort,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
    SelectorRequirement,
    Service,
    ServicePort,
)

log = logging.getLogger(__name__)


class ManifestError(ValueError):
    """An object or file that cannot be used; `field` names what is wrong."""

    def __init__(self, where: str, field: str, problem: str) -> None:
        super().__init__(f"{where}: {field}: {problem}")
        self.where = where
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class LoadResult:
    cluster: Cluster
    errors: tuple[ManifestError, ...]  # what was skipped: an object, or one endpoint
    warnings: tuple[ManifestError, ...] = ()  # what was kept but looks wrong


# kube-apiserver's --service-node-port-range default.
DEFAULT_NODE_PORT_RANGE = (30000, 32767)


@dataclass(frozen=True)
class Rules:
    """What the API server would have checked before storing an object.
    Files have no API server in front of them; objects from one were
    checked there already (node_port_range None: not checked again)."""

    node_port_range: tuple[int, int] | None = DEFAULT_NODE_PORT_RANGE
    # Addresses that no Service or endpoint may use, beyond the API's own
    # rules (multicast, broadcast: the datapath cannot serve them).
    strict_addresses: bool = True
    # A ClusterIP or node port held by one service only, as the API server's
    # allocators keep them; objects from one are not checked again.
    unique: bool = True


FILE_RULES = Rules()
API_RULES = Rules(node_port_range=None, unique=False)


# --- field readers: each names the field it complains about -----------------


def _get(obj: Mapping[str, Any], path: str, where: str, default: Any = None) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if cur is None:
            return default
        if not isinstance(cur, Mapping):
            raise ManifestError(where, path, f"expected an object at {part!r}")
        cur = cur.get(part)
    return default if cur is None else cur


def _str(obj: Mapping[str, Any], path: str, where: str, default: str | None = None) -> str:
    value = _get(obj, path, where, default)
    if not isinstance(value, str) or (not value and default is None):
        raise ManifestError(where, path, f"expected a non-empty string, got {value!r}")
    return value


def _int(value: Any, field: str, where: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ManifestError(where, field, f"expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ManifestError(where, field, f"{value} is out of range {lo}-{hi}")
    return value


def _list(obj: Mapping[str, Any], path: str, where: str) -> list[Any]:
    value = _get(obj, path, where, [])
    if not isinstance(value, list):
        raise ManifestError(where, path, f"expected a list, got {type(value).__name__}")
    return value


def _address(value: Any, field: str, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    # A YAML integer is no address, though ipaddress would take 167772161.
    if not isinstance(value, str):
        raise ManifestError(where, field, f"expected an IP address string, got {value!r}")
    try:
        return ipaddress.ip_address(value)
    except ValueError as e:
        raise ManifestError(where, field, f"not an IP address: {value!r}") from e


def _ipv4(value: Any, field: str, where: str) -> str:
    addr = _address(value, field, where)
    if addr.version != 4:
        raise ManifestError(where, field, f"not an IPv4 address: {value!r}")
    return str(addr)


def _ip_any(value: Any, field: str, where: str) -> str | None:
    """An IPv4 address, None for a valid IPv6 one (not programmed yet)."""
    addr = _address(value, field, where)
    return str(addr) if addr.version == 4 else None


def _special(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why no Service address or endpoint may be `addr`: the API server's
    ValidateEndpointIP (pkg/apis/core/validation/validation.go, v1.34:
    unspecified, loopback, link-local, link-local multicast), which it also
    applies to externalIPs, and beyond it any multicast and the broadcast
    address, which a load balancer cannot serve."""
    if addr.is_unspecified:
        return "may not be unspecified"
    if addr.is_loopback:
        return "may not be in the loopback range (127.0.0.0/8, ::1/128)"
    if addr.is_link_local:
        return "may not be in the link-local range (169.254.0.0/16, fe80::/10)"
    if addr.is_multicast:
        return "may not be multicast (224.0.0.0/4, ff00::/8)"
    if addr == ipaddress.IPv4Address("255.255.255.255"):
        return "may not be the broadcast address"
    return None


def _plain_ipv4(value: Any) -> bool:
    """Whether `value` is an IPv4 address in canonical dotted form that no
    rule of _special refuses: the common case, decided without building an
    ipaddress object (six times the cost, and a snapshot parses one per
    endpoint). Anything else takes the full path, which words the error."""
    if not isinstance(value, str):
        return False
    try:
        packed = socket.inet_pton(socket.AF_INET, value)
    except OSError:
        return False
    first = packed[0]
    # Canonical text only: some libcs' inet_pton take leading zeros.
    return (socket.inet_ntoa(packed) == value and 0 < first < 224 and first != 127
            and not (first == 169 and packed[1] == 254))


def _usable_ip(value: Any, field: str, where: str) -> str | None:
    """An address a Service or endpoint may have: IPv4, or None for a valid
    IPv6 one (not programmed yet)."""
    if _plain_ipv4(value):
        return str(value)
    addr = _address(value, field, where)
    why = _special(addr)
    if why:
        raise ManifestError(where, field, f"{addr}: {why}")
    return str(addr) if addr.version == 4 else None


def _bool(value: Any, field: str, where: str, default: bool) -> bool:
    # bool("false") is True: a string is refused, as the API server does.
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ManifestError(where, field, f"expected true or false, got {value!r}")
    return value


def _protocol(value: Any, field: str, where: str) -> str:
    proto = "TCP" if value is None else value
    if proto not in PROTOCOLS:
        raise ManifestError(where, field, f"unknown protocol {value!r}")
    return str(proto)


def _labels(obj: Mapping[str, Any], path: str, where: str) -> tuple[tuple[str, str], ...]:
    value = _get(obj, path, where, {})
    if not isinstance(value, Mapping):
        raise ManifestError(where, path, "expected a map of strings")
    return tuple(sorted((str(k), str(v)) for k, v in value.items()))


# --- objects -------------------------------------------------------------------


def _where(doc: Mapping[str, Any], source: str) -> str:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    return f"{source}: {doc.get('kind')} {meta.get('namespace', 'default')}/{meta.get('name')}"


def _cluster_ips(doc: Mapping[str, Any], where: str) -> tuple[bool, tuple[str, ...]]:
    """(headless, the IPv4 ClusterIPs)."""
    cluster_ip = _get(doc, "spec.clusterIP", where)
    listed = _list(doc, "spec.clusterIPs", where)
    # The API server's rule (ValidateService, pkg/apis/core/validation): if
    # clusterIP is set, clusterIPs[0] must match.
    if cluster_ip and listed and listed[0] != cluster_ip:
        raise ManifestError(where, "spec.clusterIPs[0]",
                            f"{listed[0]!r} must match spec.clusterIP {cluster_ip!r}")
    raw = listed or ([cluster_ip] if cluster_ip else [])
    if cluster_ip == "None" or raw == ["None"]:
        return True, ()
    field = "spec.clusterIPs" if listed else "spec.clusterIP"
    ips = (_usable_ip(ip, f"{field}[{i}]" if listed else field, where)
           for i, ip in enumerate(raw))
    return False, tuple(ip for ip in ips if ip)


def _node_port(value: Any, field: str, where: str, rules: Rules) -> int:
    lo, hi = rules.node_port_range or (1, 65535)
    if rules.node_port_range is None:
        return _int(value, field, where, lo, hi)
    number = _int(value, field, where, 1, 65535)
    if not lo <= number <= hi:
        raise ManifestError(where, field, f"{number} is outside the node-port range {lo}-{hi} "
                            "(--service-node-port-range)")
    return number


def _service_port(p: Any, field: str, where: str, seen: set[tuple[str, int]],
                  rules: Rules) -> ServicePort:
    """One of spec.ports; `seen`: the (protocol, port) pairs before it."""
    if not isinstance(p, Mapping):
        raise ManifestError(where, field, "expected an object")
    port = _int(p.get("port"), f"{field}.port", where, 1, 65535)
    proto = _protocol(p.get("protocol"), f"{field}.protocol", where)
    if (proto, port) in seen:
        raise ManifestError(where, f"{field}.port", f"duplicate {proto} port {port}")
    seen.add((proto, port))
    target = p.get("targetPort", port)
    if isinstance(target, str):
        if not target:
            raise ManifestError(where, f"{field}.targetPort", "empty port name")
    else:
        target = _int(target, f"{field}.targetPort", where, 1, 65535)
    node_port = p.get("nodePort")
    if node_port is not None:
        node_port = _node_port(node_port, f"{field}.nodePort", where, rules)
    pname = p.get("name", "") or ""
    if not isinstance(pname, str):
        raise ManifestError(where, f"{field}.name", f"expected a string, got {pname!r}")
    return ServicePort(pname, proto, port, target, node_port)


def _service_ports(doc: Mapping[str, Any], where: str, rules: Rules
                   ) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    raw_ports = _list(doc, "spec.ports", where)
    names: set[str] = set()
    for i, raw in enumerate(raw_ports):
        port = _service_port(raw, f"spec.ports[{i}]", where, seen, rules)
        # ValidateService: with more than one port each is named, uniquely
        # (an EndpointSlice port is matched to its service port by name).
        if len(raw_ports) > 1 and not port.name:
            raise ManifestError(where, f"spec.ports[{i}].name",
                                "required when the service has more than one port")
        if port.name in names:
            raise ManifestError(where, f"spec.ports[{i}].name", f"duplicate name {port.name!r}")
        names.add(port.name)
        ports.append(port)
    return tuple(ports)


def _outside_addresses(doc: Mapping[str, Any], where: str
                       ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(externalIPs, LoadBalancer ingress IPs, loadBalancerSourceRanges)."""
    external_ips = tuple(
        ip
        for i, raw in enumerate(_list(doc, "spec.externalIPs", where))
        if (ip := _usable_ip(raw, f"spec.externalIPs[{i}]", where))
    )
    lb_ips = []
    for i, ing in enumerate(_list(doc, "status.loadBalancer.ingress", where)):
        if isinstance(ing, Mapping) and ing.get("ip"):
            ip = _usable_ip(ing["ip"], f"status.loadBalancer.ingress[{i}].ip", where)
            mode = ing.get("ipMode")
            if mode not in (None, "VIP", "Proxy"):
                raise ManifestError(where, f"status.loadBalancer.ingress[{i}].ipMode",
                                    f"unknown value {mode!r} (VIP or Proxy)")
            # kube-proxy captures VIP-mode addresses only (IsVIPMode,
            # pkg/proxy/util/utils.go, v1.34): traffic to a Proxy-mode one,
            # pods' and the node's too, goes to the load balancer itself.
            if ip and mode != "Proxy":
                lb_ips.append(ip)
    ranges = []
    for i, cidr in enumerate(_list(doc, "spec.loadBalancerSourceRanges", where)):
        try:
            ranges.append(str(ipaddress.ip_network(str(cidr).strip(), strict=False)))
        except ValueError as e:
            field = f"spec.loadBalancerSourceRanges[{i}]"
            raise ManifestError(where, field, f"not a CIDR: {cidr!r}") from e
    return external_ips, tuple(lb_ips), tuple(ranges)


def _affinity(doc: Mapping[str, Any], where: str) -> tuple[bool, int]:
    """(ClientIP session affinity, its timeout in seconds)."""
    affinity = _get(doc, "spec.sessionAffinity", where, "None")
    if affinity not in ("None", "ClientIP"):
        raise ManifestError(where, "spec.sessionAffinity", f"unknown value {affinity!r}")
    timeout = _get(
        doc, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", where, DEFAULT_AFFINITY_TIMEOUT
    )
    timeout = _int(
        timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", where, 1, 86400
    )
    return affinity == "ClientIP", timeout


def _traffic_local(doc: Mapping[str, Any], where: str) -> tuple[bool, bool]:
    """(externalTrafficPolicy is Local, internalTrafficPolicy is Local)."""
    etp = _get(doc, "spec.externalTrafficPolicy", where, "Cluster")
    itp = _get(doc, "spec.internalTrafficPolicy", where, "Cluster")
    for field, value in (("externalTrafficPolicy", etp), ("internalTrafficPolicy", itp)):
        if value not in ("Cluster", "Local"):
            raise ManifestError(where, f"spec.{field}", f"unknown value {value!r}")
    return etp == "Local", itp == "Local"


def parse_service(doc: Mapping[str, Any], where: str, rules: Rules = FILE_RULES) -> Service:
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    stype = _get(doc, "spec.type", where, "ClusterIP")
    if stype not in SERVICE_TYPES:
        raise ManifestError(where, "spec.type", f"unknown service type {stype!r}")
    headless, cluster_ips = _cluster_ips(doc, where)
    ports = _service_ports(doc, where, rules)
    external_ips, lb_ips, ranges = _outside_addresses(doc, where)
    affinity, timeout = _affinity(doc, where)
    etp_local, itp_local = _traffic_local(doc, where)
    hc = _get(doc, "spec.healthCheckNodePort", where)
    if hc is not None:
        hc = _node_port(hc, "spec.healthCheckNodePort", where, rules)
    return Service(
        namespace=namespace,
        name=name,
        type=str(stype),
        cluster_ips=cluster_ips,
        headless=headless,
        ports=ports,
        external_ips=external_ips,
        load_balancer_ips=lb_ips,
        load_balancer_source_ranges=ranges,
        session_affinity=affinity,
        affinity_timeout=timeout,
        external_traffic_local=etp_local,
        internal_traffic_local=itp_local,
        health_check_node_port=hc,
        publish_not_ready=_bool(_get(doc, "spec.publishNotReadyAddresses", where),
                                "spec.publishNotReadyAddresses", where, False),
        selector=_labels(doc, "spec.selector", where),
        labels=_labels(doc, "metadata.labels", where),
    )


def _endpoint_ports(doc: Mapping[str, Any], path: str, where: str) -> tuple[EndpointPort, ...]:
    ports = []
    for i, p in enumerate(_list(doc, path, where)):
        field = f"{path}[{i}]"
        if not isinstance(p, Mapping):
            raise ManifestError(where, field, "expected an object")
        ports.append(
            EndpointPort(
                name=str(p.get("name") or ""),
                port=_int(p.get("port"), f"{field}.port", where, 1, 65535),
                protocol=_protocol(p.get("protocol"), f"{field}.protocol", where),
            )
        )
    return tuple(ports)


def _hints(value: Any, field: str, where: str) -> tuple[frozenset[str], frozenset[str]]:
    """(hints.forZones names, hints.forNodes names)."""
    if value is None:
        return frozenset(), frozenset()
    if not isinstance(value, Mapping):
        raise ManifestError(where, field, "expected an object")
    out = []
    for key in ("forZones", "forNodes"):
        raw = value.get(key) or []
        if not isinstance(raw, list):
            raise ManifestError(where, f"{field}.{key}", "expected a list")
        names = set()
        for i, h in enumerate(raw):
            name = h.get("name") if isinstance(h, Mapping) else None
            if not isinstance(name, str) or not name:
                raise ManifestError(where, f"{field}.{key}[{i}].name",
                                    f"expected a non-empty string, got {name!r}")
            names.add(name)
        out.append(frozenset(names))
    return out[0], out[1]


def _slice_endpoint(ep: Any, field: str, where: str) -> list[Endpoint]:
    """One entry of endpoints[]: an Endpoint per address."""
    if not isinstance(ep, Mapping):
        raise ManifestError(where, field, "expected an object")
    cond = ep.get("conditions") or {}
    if not isinstance(cond, Mapping):
        raise ManifestError(where, f"{field}.conditions", "expected an object")
    # As kube-proxy reads them (pkg/proxy/endpointslicecache.go, v1.34,
    # addEndpoints): a missing `ready` or `serving` means true, a missing
    # `terminating` false.
    ready = _bool(cond.get("ready"), f"{field}.conditions.ready", where, True)
    serving = _bool(cond.get("serving"), f"{field}.conditions.serving", where, True)
    terminating = _bool(cond.get("terminating"), f"{field}.conditions.terminating", where, False)
    node = ep.get("nodeName")
    if node is not None and not isinstance(node, str):
        raise ManifestError(where, f"{field}.nodeName", f"expected a string, got {node!r}")
    addrs = ep.get("addresses")
    if not isinstance(addrs, list) or not addrs:
        raise ManifestError(where, f"{field}.addresses", "expected a non-empty list")
    zones, nodes = _hints(ep.get("hints"), f"{field}.hints", where)
    ips = []
    for j, a in enumerate(addrs):
        ip = _usable_ip(a, f"{field}.addresses[{j}]", where)
        if ip is None:
            raise ManifestError(where, f"{field}.addresses[{j}]",
                                f"not an IPv4 address in an IPv4 slice: {a!r}")
        ips.append(ip)
    # The addresses are one endpoint's: kube-proxy takes Addresses[0].
    return [Endpoint(ip=ips[0], ready=ready, serving=serving, terminating=terminating,
                     node_name=node or None, zone_hints=zones, node_hints=nodes)]


def parse_endpoint_slice(doc: Mapping[str, Any], where: str,
                         skipped: list[ManifestError] | None = None) -> EndpointSlice | None:
    """The slice; an endpoint that does not parse is left out of it (and
    added to `skipped`), the rest of the slice still counts."""
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    service = _get(doc, "metadata.labels", where, {}).get("kubernetes.io/service-name")
    if not service:
        raise ManifestError(
            where, "metadata.labels.kubernetes.io/service-name", "missing: no service owns it"
        )
    family = _get(doc, "addressType", where, "IPv4")
    if family not in ("IPv4", "IPv6", "FQDN"):
        raise ManifestError(where, "addressType", f"unknown value {family!r}")
    if family != "IPv4":
        return None
    ports = _endpoint_ports(doc, "ports", where)
    endpoints: list[Endpoint] = []
    for i, ep in enumerate(_list(doc, "endpoints", where)):
        try:
            endpoints.extend(_slice_endpoint(ep, f"endpoints[{i}]", where))
        except ManifestError as e:
            if skipped is None:
                raise
            skipped.append(e)
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=str(service),
        ports=ports,
        endpoints=tuple(endpoints),
    )


def parse_service_cidr(doc: Mapping[str, Any], where: str) -> tuple[str, tuple[str, ...]]:
    """(name, spec.cidrs): one or two CIDRs, one per family (the API's rule)."""
    name = _str(doc, "metadata.name", where)
    raw = _list(doc, "spec.cidrs", where)
    if not 1 <= len(raw) <= 2:
        raise ManifestError(where, "spec.cidrs", f"expected one or two CIDRs, got {len(raw)}")
    cidrs = []
    for i, c in enumerate(raw):
        try:
            cidrs.append(ipaddress.ip_network(str(c), strict=True))
        except ValueError as e:
            raise ManifestError(where, f"spec.cidrs[{i}]", f"not a CIDR: {c!r}") from e
    if len({n.version for n in cidrs}) != len(cidrs):
        raise ManifestError(where, "spec.cidrs", "at most one CIDR per family")
    return name, tuple(str(n) for n in cidrs)


def parse_endpoints(doc: Mapping[str, Any], where: str,
                    skipped: list[ManifestError] | None = None) -> list[EndpointSlice]:
    """Legacy v1 Endpoints as the slices that mirror them (one per subset),
    the way the EndpointSliceMirroring controller does. An address that
    does not parse is left out (and added to `skipped`)."""
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    slices = []
    for i, subset in enumerate(_list(doc, "subsets", where)):
        field = f"subsets[{i}]"
        if not isinstance(subset, Mapping):
            raise ManifestError(where, field, "expected an object")
        eps: list[Endpoint] = []
        for kind, ready in (("addresses", True), ("notReadyAddresses", False)):
            for j, a in enumerate(_list(subset, kind, where)):
                afield = f"{field}.{kind}[{j}]"
                try:
                    eps.append(_legacy_address(a, afield, where, ready))
                except ManifestError as e:
                    if skipped is None:
                        raise
                    skipped.append(e)
        slices.append(
            EndpointSlice(
                namespace=namespace,
                name=f"{name}-mirror-{i}",
                service_name=name,
                ports=_endpoint_ports(subset, "ports", where),
                endpoints=tuple(eps),
            )
        )
    return slices


def _legacy_address(a: Any, field: str, where: str, ready: bool) -> Endpoint:
    if not isinstance(a, Mapping):
        raise ManifestError(where, field, "expected an object")
    node = a.get("nodeName")
    ip = _usable_ip(a.get("ip"), f"{field}.ip", where)
    if ip is None:
        raise ManifestError(where, f"{field}.ip", f"not an IPv4 address: {a.get('ip')!r}")
    return Endpoint(ip=ip, ready=ready, serving=ready, node_name=str(node) if node else None)


# The kinds read, and the one API version of each that is served.
READ_KINDS = {
    "Service": "v1",
    "Endpoints": "v1",
    "EndpointSlice": "discovery.k8s.io/v1",
    "Pod": "v1",
    "Namespace": "v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "ServiceCIDR": "networking.k8s.io/v1",
}
CLUSTER_SCOPED = frozenset({"Namespace", "ServiceCIDR"})

# The fields of the kinds the datapath reads, as of v1.34; anything else
# is reported (the object is still used, as the API server's
# fieldValidation=Warn would store it).
_OBJECT = {"apiVersion", "kind", "metadata", "spec", "status"}
KNOWN_FIELDS: dict[str, dict[str, set[str]]] = {
    "Service": {
        "": _OBJECT,
        "spec": {"ports", "selector", "clusterIP", "clusterIPs", "type", "externalIPs",
                 "sessionAffinity", "loadBalancerIP", "loadBalancerSourceRanges",
                 "externalName", "externalTrafficPolicy", "healthCheckNodePort",
                 "publishNotReadyAddresses", "sessionAffinityConfig", "ipFamilies",
                 "ipFamilyPolicy", "allocateLoadBalancerNodePorts", "loadBalancerClass",
                 "internalTrafficPolicy", "trafficDistribution"},
        "spec.ports[]": {"name", "protocol", "appProtocol", "port", "targetPort", "nodePort"},
    },
    "EndpointSlice": {
        "": {"apiVersion", "kind", "metadata", "addressType", "endpoints", "ports"},
        "endpoints[]": {"addresses", "conditions", "hostname", "targetRef", "nodeName",
                        "zone", "hints", "deprecatedTopology"},
        "endpoints[].conditions": {"ready", "serving", "terminating"},
        "ports[]": {"name", "protocol", "appProtocol", "port"},
    },
}


def _at(doc: Any, path: str) -> list[Any]:
    """The values at a KNOWN_FIELDS path ("a.b[]" expands the list at a.b)."""
    values = [doc]
    for part in path.split(".") if path else []:
        key, many = part.removesuffix("[]"), part.endswith("[]")
        values = [v.get(key) for v in values if isinstance(v, Mapping)]
        if many:
            values = [x for v in values if isinstance(v, list) for x in v]
    return values


def unknown_fields(doc: Mapping[str, Any], where: str) -> list[ManifestError]:
    out = []
    for path, known in KNOWN_FIELDS.get(str(doc.get("kind")), {}).items():
        for value in _at(doc, path):
            if isinstance(value, Mapping):
                out += [ManifestError(where, f"{path}.{k}" if path else str(k),
                                      "unknown field (ignored)")
                        for k in value if k not in known]
    return out


def _object_id(doc: Mapping[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), Mapping) else {}
    assert isinstance(meta, Mapping)
    ns = "" if doc.get("kind") in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    return str(doc.get("kind")), f"{ns}/{meta.get('name')}"


class _Collected:
    """The objects of one load, as build_cluster reads them."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.services: dict[str, Service] = {}
        self.slices: dict[str, EndpointSlice] = {}
        self.legacy: dict[str, list[EndpointSlice]] = {}
        self.policy_objects = _PolicyObjects()
        self.service_cidrs: dict[str, tuple[str, ...]] = {}
        self.errors: list[ManifestError] = []
        self.warnings: list[ManifestError] = []
        self.seen: dict[tuple[str, str], str] = {}

    def admit(self, doc: Mapping[str, Any], where: str) -> bool:
        """Whether `doc` is an object to read: of a read kind in its served
        version, and not one read already."""
        kind, api = doc.get("kind"), doc.get("apiVersion")
        if kind not in READ_KINDS:
            return False  # Deployments and the like: not the datapath's business
        if api != READ_KINDS[kind]:
            raise ManifestError(where, "apiVersion",
                                f"{api!r} is not read: {kind} is {READ_KINDS[kind]}")
        oid = _object_id(doc)
        if oid in self.seen:
            raise ManifestError(where, "metadata.name",
                                f"defined twice: the first, in {self.seen[oid]}, is kept")
        self.seen[oid] = where.split(": ")[0]
        return True

    def add(self, doc: Mapping[str, Any], where: str) -> None:
        kind = doc.get("kind")
        self.warnings += unknown_fields(doc, where)
        if kind == "Service":
            svc = parse_service(doc, where, self.rules)
            self.services[svc.key] = svc
        elif kind == "EndpointSlice":
            es = parse_endpoint_slice(doc, where, self.errors)
            if es:
                self.slices[es.key] = es
        elif kind == "Endpoints":
            for es in parse_endpoints(doc, where, self.errors):
                self.legacy.setdefault(es.service_key, []).append(es)
        elif kind == "ServiceCIDR":
            name, cidrs = parse_service_cidr(doc, where)
            self.service_cidrs[name] = cidrs
        else:
            self.policy_objects.add(doc, where)

    def cluster(self) -> Cluster:
        # kube-proxy reads slices only; Endpoints count where no slice exists
        # for the service (the mirroring controller would have made them).
        have_slices = {s.service_key for s in self.slices.values()}
        for key, mirrored in self.legacy.items():
            if key not in have_slices:
                self.slices.update({s.key: s for s in mirrored})
        if self.rules.strict_addresses:
            self._drop_own_addresses()
        if self.rules.unique:
            self._drop_conflicts()
        po = self.policy_objects
        return Cluster(services=self.services, slices=self.slices, pods=po.pods,
                       namespaces=po.namespaces, policies=po.policies,
                       service_cidrs=self.service_cidrs)

    def _drop_conflicts(self) -> None:
        """What the API server's allocators keep unique, a set of files may
        not: a ClusterIP, or a node port of one protocol (health-check ports
        included), held by two services. The first keeps it; the later
        service is refused whole."""
        owners: dict[tuple[str, ...], str] = {}
        for key, svc in list(self.services.items()):
            claims: list[tuple[str, ...]] = [("ClusterIP", ip) for ip in svc.cluster_ips]
            # Node ports are allocated for the types that have them only.
            if svc.type in ("NodePort", "LoadBalancer"):
                claims += [("nodePort", p.protocol, str(p.node_port)) for p in svc.ports
                           if p.node_port]
            if svc.health_check_node_port:
                claims.append(("nodePort", "TCP", str(svc.health_check_node_port)))
            taken = next((c for c in claims if owners.get(c, key) != key), None)
            if taken is not None:
                del self.services[key]
                self.errors.append(ManifestError(
                    f"Service {key}", "spec", f"{taken[0]} {'/'.join(taken[1:][::-1])} is "
                    f"held by service {owners[taken]} already"))
                continue
            owners.update((c, key) for c in claims)

    def _drop_own_addresses(self) -> None:
        """An endpoint at one of its own service's addresses would send the
        service's traffic back to itself: it is left out."""
        for key, es in list(self.slices.items()):
            svc = self.services.get(es.service_key)
            if svc is None:
                continue
            own = {*svc.cluster_ips, *svc.external_ips, *svc.load_balancer_ips}
            bad = [ep for ep in es.endpoints if ep.ip in own]
            if bad:
                self.errors += [ManifestError(f"EndpointSlice {key}", "endpoints",
                                              f"{ep.ip} is an address of service "
                                              f"{svc.key} itself") for ep in bad]
                self.slices[key] = replace(es, endpoints=tuple(
                    ep for ep in es.endpoints if ep.ip not in own))


def build_cluster(docs: Iterable[tuple[Mapping[str, Any], str]],
                  rules: Rules = FILE_RULES) -> LoadResult:
    """The model of a set of objects; bad objects are logged and skipped,
    and so is an endpoint that does not parse, alone."""
    got = _Collected(rules)
    for doc, source in docs:
        where = _where(doc, source)
        try:
            if got.admit(doc, where):
                got.add(doc, where)
        except ManifestError as e:
            got.errors.append(e)
    # The caller logs (once per change of what it reads).
    return LoadResult(got.cluster(), tuple(got.errors), tuple(got.warnings))


def read_documents(paths: Iterable[Path]) -> list[tuple[Mapping[str, Any], str]]:
    """Every object of the files, with where it came from. Lists
    (kind: List) are flattened. A file that does not parse, or holds no
    document at all, raises."""
    docs: list[tuple[Mapping[str, Any], str]] = []
    for path in paths:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except OSError as e:
            raise ManifestError(str(path), "file", e.strerror or str(e)) from e
        except yaml.YAMLError as e:
            raise ManifestError(str(path), "yaml", str(e).replace("\n", " ")) from e
        if all(doc is None for doc in loaded):
            # Most likely a file being rewritten in place (`kubectl get >
            # file` truncates it first): no objects is not taken for "none".
            raise ManifestError(str(path), "file", "holds no objects (an empty set is "
                                "written as `kind: List` with `items: []`)")
        for i, doc in enumerate(loaded):
            if doc is None:
                continue
            if not isinstance(doc, Mapping):
                raise ManifestError(str(path), f"document[{i}]", "expected an object")
            items = doc.get("items") if doc.get("kind", "").endswith("List") else None
            if isinstance(items, list):
                docs.extend((item, str(path)) for item in items if isinstance(item, Mapping))
            else:
                docs.append((doc, str(path)))
    return docs


def load(paths: Iterable[Path], rules: Rules = FILE_RULES) -> LoadResult:
    return build_cluster(read_documents(paths), rules)


# --- Pods, Namespaces and NetworkPolicies ----------------------------------------

# IANA_SVC_NAME, what a named port must look like: at most 15 lowercase
# alphanumerics or '-', at least one letter, no '-' at either end or twice.
_PORT_NAME = re.compile(r"^(?=.*[a-z])(?!.*--)[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


def _string_pairs(value: Any, field: str, where: str) -> tuple[tuple[str, str], ...]:
    """Labels as the API takes them: string keys and string values only (a
    YAML `version: 1` is refused, as the API server refuses it)."""
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise ManifestError(where, field, "expected a map of strings")
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ManifestError(where, f"{field}.{k}", f"expected a string, got {v!r}")
    return tuple(sorted(value.items()))


def _string_map(obj: Mapping[str, Any], path: str, where: str) -> tuple[tuple[str, str], ...]:
    return _string_pairs(_get(obj, path, where), path, where)


def parse_selector(value: Any, field: str, where: str) -> LabelSelector:
    if not isinstance(value, Mapping):
        raise ManifestError(where, field, "expected a label selector object")
    labels = _string_pairs(value.get("matchLabels"), f"{field}.matchLabels", where)
    exprs = []
    raw = value.get("matchExpressions") or []
    if not isinstance(raw, list):
        raise ManifestError(where, f"{field}.matchExpressions", "expected a list")
    for i, e in enumerate(raw):
        efield = f"{field}.matchExpressions[{i}]"
        if not isinstance(e, Mapping):
            raise ManifestError(where, efield, "expected an object")
        key = e.get("key")
        if not isinstance(key, str) or not key:
            raise ManifestError(where, f"{efield}.key", f"expected a non-empty string, got {key!r}")
        op = e.get("operator")
        if op not in SELECTOR_OPERATORS:
            raise ManifestError(where, f"{efield}.operator", f"unknown operator {op!r}")
        values = e.get("values") or []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ManifestError(where, f"{efield}.values", "expected a list of strings")
        if op in ("In", "NotIn") and not values:
            raise ManifestError(where, f"{efield}.values", f"must be non-empty for {op}")
        if op in ("Exists", "DoesNotExist") and values:
            raise ManifestError(where, f"{efield}.values", f"must be empty for {op}")
        exprs.append(SelectorRequirement(key, str(op), tuple(sorted(set(values)))))
    return LabelSelector(labels, tuple(exprs))


def parse_pod(doc: Mapping[str, Any], where: str) -> Pod:
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    node = _get(doc, "spec.nodeName", where)
    if node is not None and not isinstance(node, str):
        raise ManifestError(where, "spec.nodeName", f"expected a string, got {node!r}")
    host_network = _get(doc, "spec.hostNetwork", where, False)
    if not isinstance(host_network, bool):
        raise ManifestError(where, "spec.hostNetwork", f"expected a boolean, got {host_network!r}")
    ports: list[ContainerPort] = []
    for i, c in enumerate(_list(doc, "spec.containers", where)):
        if not isinstance(c, Mapping):
            raise ManifestError(where, f"spec.containers[{i}]", "expected an object")
        for j, p in enumerate(_list(c, "ports", where)):
            field = f"spec.containers[{i}].ports[{j}]"
            if not isinstance(p, Mapping):
                raise ManifestError(where, field, "expected an object")
            pname = p.get("name") or ""
            if not isinstance(pname, str):
                raise ManifestError(where, f"{field}.name", f"expected a string, got {pname!r}")
            ports.append(ContainerPort(
                name=pname,
                port=_int(p.get("containerPort"), f"{field}.containerPort", where, 1, 65535),
                protocol=_protocol(p.get("protocol"), f"{field}.protocol", where),
            ))
    raw_ips = [
        (f"status.podIPs[{i}].ip", e.get("ip") if isinstance(e, Mapping) else e)
        for i, e in enumerate(_list(doc, "status.podIPs", where))
    ]
    if not raw_ips and _get(doc, "status.podIP", where):
        raw_ips = [("status.podIP", _get(doc, "status.podIP", where))]
    ips = tuple(ip for field, raw in raw_ips if (ip := _ip_any(raw, field, where)))
    phase = _get(doc, "status.phase", where, "Running" if ips else "Pending")
    if not isinstance(phase, str):
        raise ManifestError(where, "status.phase", f"expected a string, got {phase!r}")
    return Pod(namespace=namespace, name=name, labels=_string_map(doc, "metadata.labels", where),
               node_name=node or None, ips=ips, host_network=host_network, ports=tuple(ports),
               phase=phase)


def parse_namespace(doc: Mapping[str, Any], where: str) -> Namespace:
    name = _str(doc, "metadata.name", where)
    labels = dict(_string_map(doc, "metadata.labels", where))
    # The API server sets this label on every namespace and keeps it true.
    labels[NAMESPACE_NAME_LABEL] = name
    return Namespace(name=name, labels=tuple(sorted(labels.items())))


def _ip_block(value: Any, field: str, where: str) -> IPBlock:
    if not isinstance(value, Mapping):
        raise ManifestError(where, field, "expected an object")
    try:
        net = ipaddress.ip_network(str(value.get("cidr")).strip(), strict=False)
    except ValueError as e:
        raise ManifestError(where, f"{field}.cidr", f"not a CIDR: {value.get('cidr')!r}") from e
    excepts = []
    raw = value.get("except") or []
    if not isinstance(raw, list):
        raise ManifestError(where, f"{field}.except", "expected a list")
    for i, c in enumerate(raw):
        efield = f"{field}.except[{i}]"
        try:
            ex = ipaddress.ip_network(str(c).strip(), strict=False)
        except ValueError as e:
            raise ManifestError(where, efield, f"not a CIDR: {c!r}") from e
        # The API's validation: an except must be a strict subset of cidr.
        if (ex.version != net.version or ex.prefixlen <= net.prefixlen
                or not ex.subnet_of(net)):  # type: ignore[arg-type]
            raise ManifestError(where, efield, f"{ex} is not a strict subset of {net}")
        excepts.append(str(ex))
    return IPBlock(str(net), tuple(sorted(set(excepts))))


def _peer(value: Any, field: str, where: str) -> PolicyPeer:
    if not isinstance(value, Mapping):
        raise ManifestError(where, field, "expected an object")
    pods = value.get("podSelector")
    nss = value.get("namespaceSelector")
    block = value.get("ipBlock")
    if block is not None:
        if pods is not None or nss is not None:
            raise ManifestError(where, f"{field}.ipBlock",
                                "may not be combined with podSelector or namespaceSelector")
        return PolicyPeer(ip_block=_ip_block(block, f"{field}.ipBlock", where))
    if pods is None and nss is None:
        raise ManifestError(where, field, "must specify podSelector, namespaceSelector or ipBlock")
    return PolicyPeer(
        pod_selector=None if pods is None else parse_selector(pods, f"{field}.podSelector", where),
        namespace_selector=(None if nss is None
                            else parse_selector(nss, f"{field}.namespaceSelector", where)),
    )


def _policy_port(value: Any, field: str, where: str) -> PolicyPort:
    if not isinstance(value, Mapping):
        raise ManifestError(where, field, "expected an object")
    proto = _protocol(value.get("protocol"), f"{field}.protocol", where)
    port = value.get("port")
    end = value.get("endPort")
    if isinstance(port, str):
        if not _PORT_NAME.match(port):
            raise ManifestError(where, f"{field}.port", f"not a port name: {port!r}")
        if end is not None:
            raise ManifestError(where, f"{field}.endPort", "requires a numeric port")
        return PolicyPort(proto, port)
    if port is None:
        if end is not None:
            raise ManifestError(where, f"{field}.endPort", "requires a numeric port")
        return PolicyPort(proto)
    number = _int(port, f"{field}.port", where, 1, 65535)
    if end is not None:
        end = _int(end, f"{field}.endPort", where, number, 65535)
    return PolicyPort(proto, number, end)


def _policy_rules(doc: Mapping[str, Any], kind: str, peers_field: str,
                  where: str) -> tuple[PolicyRule, ...]:
    rules = []
    for i, r in enumerate(_list(doc, f"spec.{kind}", where)):
        field = f"spec.{kind}[{i}]"
        if not isinstance(r, Mapping):
            raise ManifestError(where, field, "expected an object")
        peers = tuple(_peer(p, f"{field}.{peers_field}[{j}]", where)
                      for j, p in enumerate(_list(r, peers_field, where)))
        ports = tuple(_policy_port(p, f"{field}.ports[{j}]", where)
                      for j, p in enumerate(_list(r, "ports", where)))
        rules.append(PolicyRule(peers, ports))
    return tuple(rules)


def parse_network_policy(doc: Mapping[str, Any], where: str) -> NetworkPolicy:
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    selector = _get(doc, "spec.podSelector", where, {})
    ingress = _policy_rules(doc, "ingress", "from", where)
    egress = _policy_rules(doc, "egress", "to", where)
    types = _list(doc, "spec.policyTypes", where)
    for i, t in enumerate(types):
        if t not in (POLICY_INGRESS, POLICY_EGRESS):
            raise ManifestError(where, f"spec.policyTypes[{i}]", f"unknown policy type {t!r}")
    if len(set(types)) != len(types):
        raise ManifestError(where, "spec.policyTypes", "duplicate policy type")
    if not types:
        # The API server's default: Ingress always; Egress when there is at
        # least one egress rule (an empty `egress: []` does not count).
        types = [POLICY_INGRESS] + ([POLICY_EGRESS] if egress else [])
    return NetworkPolicy(
        namespace=namespace,
        name=name,
        pod_selector=parse_selector(selector, "spec.podSelector", where),
        ingress=ingress,
        egress=egress,
        policy_types=tuple(t for t in (POLICY_INGRESS, POLICY_EGRESS) if t in types),
    )


def _failed_closed(doc: Mapping[str, Any], where: str, e: ManifestError
                   ) -> dict[str, NetworkPolicy]:
    """A NetworkPolicy that cannot be read still isolates: the pods it
    selects, or its whole namespace when the selector is what is broken,
    in the directions it names (both when those are broken too), with no
    rule, until it is fixed. Skipping it would allow what it was written
    to deny. Nothing, when even its name is unreadable."""
    try:
        name = _str(doc, "metadata.name", where)
        namespace = _str(doc, "metadata.namespace", where, "default")
    except ManifestError:
        return {}
    try:
        selector = parse_selector(_get(doc, "spec.podSelector", where, {}), "spec.podSelector",
                                  where)
    except ManifestError:
        selector = LabelSelector()
    try:
        raw = _get(doc, "spec.policyTypes", where)
    except ManifestError:
        raw = None
    types: tuple[str, ...] = (POLICY_INGRESS, POLICY_EGRESS)
    if isinstance(raw, list) and raw and all(t in types for t in raw):
        types = tuple(t for t in types if t in raw)
    pol = NetworkPolicy(namespace=namespace, name=name, pod_selector=selector,
                        policy_types=types, broken=str(e))
    return {pol.key: pol}


_POLICY_KINDS = frozenset(
    {("Pod", "v1"), ("Namespace", "v1"), ("NetworkPolicy", "networking.k8s.io/v1")}
)


class _PolicyObjects:
    """The objects NetworkPolicy needs, as build_cluster collects them."""

    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.namespaces: dict[str, Namespace] = {}
        self.policies: dict[str, NetworkPolicy] = {}

    def accepts(self, kind: Any, api: Any) -> bool:
        return (kind, api) in _POLICY_KINDS

    def add(self, doc: Mapping[str, Any], where: str) -> None:
        kind = doc.get("kind")
        if kind == "Pod":
            pod = parse_pod(doc, where)
            self.pods[pod.key] = pod
        elif kind == "Namespace":
            ns = parse_namespace(doc, where)
            self.namespaces[ns.name] = ns
        else:
            try:
                pol = parse_network_policy(doc, where)
            except ManifestError as e:
                closed = _failed_closed(doc, where, e)
                self.policies.update(closed)
                if not closed:
                    raise
                raise ManifestError(e.where, e.field, e.problem + "; until it is fixed, the "
                                    "policy isolates what it selects (fails closed)") from e
            self.policies[pol.key] = pol
