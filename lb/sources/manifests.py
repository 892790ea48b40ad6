"""Read standard Kubernetes YAML (v1 Service, discovery.k8s.io/v1
EndpointSlice, legacy v1 Endpoints) into the model.

A malformed object is reported with the field that is wrong and skipped;
every other object of the file still counts. A file that is not YAML at all
is an error of its own."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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


@dataclass(frozen=True)
class LoadResult:
    cluster: Cluster
    errors: tuple[ManifestError, ...]


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


def _ipv4(value: Any, field: str, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except (ipaddress.AddressValueError, ValueError) as e:
        raise ManifestError(where, field, f"not an IPv4 address: {value!r}") from e


def _ip_any(value: Any, field: str, where: str) -> str | None:
    """An IPv4 address, None for a valid IPv6 one (not programmed yet)."""
    try:
        addr = ipaddress.ip_address(value)
    except (ValueError, TypeError) as e:
        raise ManifestError(where, field, f"not an IP address: {value!r}") from e
    return str(addr) if addr.version == 4 else None


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
    raw = _list(doc, "spec.clusterIPs", where) or ([cluster_ip] if cluster_ip else [])
    if cluster_ip == "None" or raw == ["None"]:
        return True, ()
    ips = (_ip_any(ip, f"spec.clusterIPs[{i}]", where) for i, ip in enumerate(raw))
    return False, tuple(ip for ip in ips if ip)


def _service_port(p: Any, field: str, where: str, seen: set[tuple[str, int]]) -> ServicePort:
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
        node_port = _int(node_port, f"{field}.nodePort", where, 1, 65535)
    pname = p.get("name", "") or ""
    if not isinstance(pname, str):
        raise ManifestError(where, f"{field}.name", f"expected a string, got {pname!r}")
    return ServicePort(pname, proto, port, target, node_port)


def _service_ports(doc: Mapping[str, Any], where: str) -> tuple[ServicePort, ...]:
    ports: list[ServicePort] = []
    seen: set[tuple[str, int]] = set()
    for i, raw in enumerate(_list(doc, "spec.ports", where)):
        ports.append(_service_port(raw, f"spec.ports[{i}]", where, seen))
    return tuple(ports)


def _outside_addresses(doc: Mapping[str, Any], where: str
                       ) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(externalIPs, LoadBalancer ingress IPs, loadBalancerSourceRanges)."""
    external_ips = tuple(
        ip
        for i, raw in enumerate(_list(doc, "spec.externalIPs", where))
        if (ip := _ip_any(raw, f"spec.externalIPs[{i}]", where))
    )
    lb_ips = []
    for i, ing in enumerate(_list(doc, "status.loadBalancer.ingress", where)):
        if isinstance(ing, Mapping) and ing.get("ip"):
            ip = _ip_any(ing["ip"], f"status.loadBalancer.ingress[{i}].ip", where)
            if ip:
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


def parse_service(doc: Mapping[str, Any], where: str) -> Service:
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    stype = _get(doc, "spec.type", where, "ClusterIP")
    if stype not in SERVICE_TYPES:
        raise ManifestError(where, "spec.type", f"unknown service type {stype!r}")
    headless, cluster_ips = _cluster_ips(doc, where)
    ports = _service_ports(doc, where)
    external_ips, lb_ips, ranges = _outside_addresses(doc, where)
    affinity, timeout = _affinity(doc, where)
    etp_local, itp_local = _traffic_local(doc, where)
    hc = _get(doc, "spec.healthCheckNodePort", where)
    if hc is not None:
        hc = _int(hc, "spec.healthCheckNodePort", where, 1, 65535)
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
        publish_not_ready=bool(_get(doc, "spec.publishNotReadyAddresses", where, False)),
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


def parse_endpoint_slice(doc: Mapping[str, Any], where: str) -> EndpointSlice | None:
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
    endpoints: list[Endpoint] = []
    for i, ep in enumerate(_list(doc, "endpoints", where)):
        field = f"endpoints[{i}]"
        if not isinstance(ep, Mapping):
            raise ManifestError(where, field, "expected an object")
        cond = ep.get("conditions") or {}
        if not isinstance(cond, Mapping):
            raise ManifestError(where, f"{field}.conditions", "expected an object")
        # The API's rules: a missing `ready` means ready; `serving`
        # defaults to `ready`; `terminating` to false.
        ready = cond.get("ready")
        ready = True if ready is None else bool(ready)
        serving = cond.get("serving")
        serving = ready if serving is None else bool(serving)
        node = ep.get("nodeName")
        addrs = ep.get("addresses")
        if not isinstance(addrs, list) or not addrs:
            raise ManifestError(where, f"{field}.addresses", "expected a non-empty list")
        endpoints.extend(
            Endpoint(
                ip=_ipv4(a, f"{field}.addresses[{j}]", where),
                ready=ready,
                serving=serving,
                terminating=bool(cond.get("terminating", False)),
                node_name=str(node) if node else None,
            )
            for j, a in enumerate(addrs)
        )
    return EndpointSlice(
        namespace=namespace,
        name=name,
        service_name=str(service),
        ports=_endpoint_ports(doc, "ports", where),
        endpoints=tuple(endpoints),
    )


def parse_endpoints(doc: Mapping[str, Any], where: str) -> list[EndpointSlice]:
    """Legacy v1 Endpoints as the slices that mirror them (one per subset),
    the way the EndpointSliceMirroring controller does."""
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
                if not isinstance(a, Mapping):
                    raise ManifestError(where, afield, "expected an object")
                node = a.get("nodeName")
                eps.append(
                    Endpoint(
                        ip=_ipv4(a.get("ip"), f"{afield}.ip", where),
                        ready=ready,
                        serving=ready,
                        node_name=str(node) if node else None,
                    )
                )
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


def build_cluster(docs: Iterable[tuple[Mapping[str, Any], str]]) -> LoadResult:
    """The model of a set of objects; bad objects are logged and skipped."""
    services: dict[str, Service] = {}
    slices: dict[str, EndpointSlice] = {}
    legacy: dict[str, list[EndpointSlice]] = {}
    errors: list[ManifestError] = []
    policy_objects = _PolicyObjects()
    for doc, source in docs:
        where = _where(doc, source)
        kind, api = doc.get("kind"), doc.get("apiVersion")
        try:
            if kind == "Service" and api == "v1":
                svc = parse_service(doc, where)
                services[svc.key] = svc
            elif kind == "EndpointSlice" and api == "discovery.k8s.io/v1":
                es = parse_endpoint_slice(doc, where)
                if es:
                    slices[es.key] = es
            elif kind == "Endpoints" and api == "v1":
                for es in parse_endpoints(doc, where):
                    legacy.setdefault(es.service_key, []).append(es)
            elif policy_objects.accepts(kind, api):
                policy_objects.add(doc, where)
        except ManifestError as e:
            log.error("skipping object: %s", e)
            errors.append(e)
    # kube-proxy reads slices only; Endpoints count where no slice exists
    # for the service (the mirroring controller would have made them).
    have_slices = {s.service_key for s in slices.values()}
    for key, mirrored in legacy.items():
        if key not in have_slices:
            slices.update({s.key: s for s in mirrored})
    cluster = Cluster(services=services, slices=slices, pods=policy_objects.pods,
                      namespaces=policy_objects.namespaces, policies=policy_objects.policies)
    return LoadResult(cluster, tuple(errors))


def read_documents(paths: Iterable[Path]) -> list[tuple[Mapping[str, Any], str]]:
    """Every object of the files, with where it came from. Lists
    (kind: List) are flattened. A file that does not parse raises."""
    docs: list[tuple[Mapping[str, Any], str]] = []
    for path in paths:
        try:
            loaded = list(yaml.safe_load_all(path.read_text()))
        except OSError as e:
            raise ManifestError(str(path), "file", e.strerror or str(e)) from e
        except yaml.YAMLError as e:
            raise ManifestError(str(path), "yaml", str(e).replace("\n", " ")) from e
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


def load(paths: Iterable[Path]) -> LoadResult:
    return build_cluster(read_documents(paths))


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
            pol = parse_network_policy(doc, where)
            self.policies[pol.key] = pol
