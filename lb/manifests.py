"""Read standard Kubernetes YAML (v1 Service, discovery.k8s.io/v1
EndpointSlice, legacy v1 Endpoints) into the model.

A malformed object is reported with the field that is wrong and skipped;
every other object of the file still counts. A file that is not YAML at all
is an error of its own."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lb.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    PROTOCOLS,
    SERVICE_TYPES,
    Cluster,
    Endpoint,
    EndpointPort,
    EndpointSlice,
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


def parse_service(doc: Mapping[str, Any], where: str) -> Service:
    name = _str(doc, "metadata.name", where)
    namespace = _str(doc, "metadata.namespace", where, "default")
    stype = _get(doc, "spec.type", where, "ClusterIP")
    if stype not in SERVICE_TYPES:
        raise ManifestError(where, "spec.type", f"unknown service type {stype!r}")
    cluster_ip = _get(doc, "spec.clusterIP", where)
    cluster_ips_raw = _list(doc, "spec.clusterIPs", where) or (
        [cluster_ip] if cluster_ip else []
    )
    headless = cluster_ip == "None" or cluster_ips_raw == ["None"]
    cluster_ips: list[str] = []
    if not headless:
        for i, ip in enumerate(cluster_ips_raw):
            v4 = _ip_any(ip, f"spec.clusterIPs[{i}]", where)
            if v4:
                cluster_ips.append(v4)
    ports = []
    seen: set[tuple[str, int]] = set()
    for i, p in enumerate(_list(doc, "spec.ports", where)):
        field = f"spec.ports[{i}]"
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
        ports.append(ServicePort(pname, proto, port, target, node_port))
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
    affinity = _get(doc, "spec.sessionAffinity", where, "None")
    if affinity not in ("None", "ClientIP"):
        raise ManifestError(where, "spec.sessionAffinity", f"unknown value {affinity!r}")
    timeout = _get(
        doc, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", where, DEFAULT_AFFINITY_TIMEOUT
    )
    timeout = _int(
        timeout, "spec.sessionAffinityConfig.clientIP.timeoutSeconds", where, 1, 86400
    )
    etp = _get(doc, "spec.externalTrafficPolicy", where, "Cluster")
    itp = _get(doc, "spec.internalTrafficPolicy", where, "Cluster")
    for field, value in (("externalTrafficPolicy", etp), ("internalTrafficPolicy", itp)):
        if value not in ("Cluster", "Local"):
            raise ManifestError(where, f"spec.{field}", f"unknown value {value!r}")
    hc = _get(doc, "spec.healthCheckNodePort", where)
    if hc is not None:
        hc = _int(hc, "spec.healthCheckNodePort", where, 1, 65535)
    return Service(
        namespace=namespace,
        name=name,
        type=str(stype),
        cluster_ips=tuple(cluster_ips),
        headless=headless,
        ports=tuple(ports),
        external_ips=external_ips,
        load_balancer_ips=tuple(lb_ips),
        load_balancer_source_ranges=tuple(ranges),
        session_affinity=affinity == "ClientIP",
        affinity_timeout=timeout,
        external_traffic_local=etp == "Local",
        internal_traffic_local=itp == "Local",
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
        except ManifestError as e:
            log.error("skipping object: %s", e)
            errors.append(e)
    # kube-proxy reads slices only; Endpoints count where no slice exists
    # for the service (the mirroring controller would have made them).
    have_slices = {s.service_key for s in slices.values()}
    for key, mirrored in legacy.items():
        if key not in have_slices:
            slices.update({s.key: s for s in mirrored})
    return LoadResult(Cluster(services=services, slices=slices), tuple(errors))


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
