"""Kubernetes objects for tests against a control plane with no kubelet.

Nothing runs Pods here, so a test plays the kubelet: it creates a Pod already
bound to a Node (spec.nodeName) and writes the status a kubelet would (phase
Running, podIP, a true Ready condition) through the status subresource. The
EndpointSlice controller then lists the Pod's address for every Service that
selects it. That controller skips Pods whose Node does not exist, so the
helpers create the Node object too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

T = TypeVar("T")

# Never pulled: no kubelet exists. The .invalid name makes that plain.
PLACEHOLDER_IMAGE = "registry.invalid/xdplb/placeholder:1"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


@dataclass(frozen=True)
class Port:
    """A container port with an optional name."""

    port: int
    name: str | None = None
    protocol: str = "TCP"

    def to_model(self) -> client.V1ContainerPort:
        return client.V1ContainerPort(
            container_port=self.port, name=self.name, protocol=self.protocol
        )


def api_client(server: str, token: str, ca_file: Path | None = None) -> client.ApiClient:
    """An ApiClient that authenticates with a bearer token.

    With ca_file the server's certificate is verified against it; without,
    verification is off.
    """
    cfg = client.Configuration(
        host=server,
        api_key={"authorization": token},
        api_key_prefix={"authorization": "Bearer"},
        ssl_ca_cert=str(ca_file) if ca_file else None,
        verify_ssl=ca_file is not None,
    )
    return client.ApiClient(cfg)


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 30.0,
    interval: float = 0.2,
) -> T:
    """Call probe until it returns something other than None or False."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _status(e: ApiException) -> int:
    return int(e.status) if e.status is not None else 0


def create_namespace(core: client.CoreV1Api, name: str) -> None:
    """Create a namespace (if missing) and wait for its default ServiceAccount.

    Pod admission refuses Pods until the ServiceAccount controller has made the
    namespace's "default" ServiceAccount.
    """
    try:
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    except ApiException as e:
        if _status(e) != 409:
            raise
    wait_for_default_service_account(core, name)


def wait_for_default_service_account(
    core: client.CoreV1Api, namespace: str, timeout: float = 30.0
) -> None:
    def probe() -> bool | None:
        try:
            core.read_namespaced_service_account("default", namespace)
        except ApiException as e:
            if _status(e) == 404:
                return None
            raise
        return True

    wait_for(f"ServiceAccount {namespace}/default", probe, timeout)


def ensure_node(core: client.CoreV1Api, name: str, internal_ip: str | None = None) -> None:
    """Create a Node object (no kubelet behind it) unless it exists."""
    try:
        core.read_node(name)
        return
    except ApiException as e:
        if _status(e) != 404:
            raise
    meta = client.V1ObjectMeta(name=name, labels={"kubernetes.io/hostname": name})
    try:
        core.create_node(client.V1Node(metadata=meta))
    except ApiException as e:
        if _status(e) != 409:
            raise
        return
    if internal_ip:
        addresses = [
            {"type": "InternalIP", "address": internal_ip},
            {"type": "Hostname", "address": name},
        ]
        core.patch_node_status(name, {"status": {"addresses": addresses}})


def make_ready_pod(
    core: client.CoreV1Api,
    name: str,
    namespace: str,
    labels: Mapping[str, str],
    ip: str,
    node_name: str,
    container_ports: Iterable[Port | int] = (),
    *,
    host_ip: str | None = None,
    ready: bool = True,
) -> client.V1Pod:
    """Create a Pod bound to node_name and give it the status of a running Pod.

    The Pod gets podIP ip, phase Running and a Ready condition (true unless
    ready=False); the Node is created if missing. Returns the Pod as the API
    server holds it after the status update.
    """
    ensure_node(core, node_name, host_ip)
    wait_for_default_service_account(core, namespace)
    ports = [(p if isinstance(p, Port) else Port(p)).to_model() for p in container_ports]
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=dict(labels)),
        spec=client.V1PodSpec(
            node_name=node_name,
            containers=[
                client.V1Container(name="app", image=PLACEHOLDER_IMAGE, ports=ports or None)
            ],
            automount_service_account_token=False,
            termination_grace_period_seconds=0,
        ),
    )
    core.create_namespaced_pod(namespace, pod)
    return set_pod_status(core, name, namespace, ip, ready=ready, host_ip=host_ip)


def set_pod_status(
    core: client.CoreV1Api,
    name: str,
    namespace: str,
    ip: str,
    *,
    ready: bool = True,
    host_ip: str | None = None,
) -> client.V1Pod:
    """Write the status a kubelet would write for a running Pod."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    flag = "True" if ready else "False"
    conditions = [
        {"type": kind, "status": status, "lastTransitionTime": now}
        for kind, status in (
            ("PodScheduled", "True"),
            ("Initialized", "True"),
            ("ContainersReady", flag),
            ("Ready", flag),
        )
    ]
    status: dict[str, Any] = {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now,
        "conditions": conditions,
    }
    if host_ip:
        status["hostIP"] = host_ip
        status["hostIPs"] = [{"ip": host_ip}]
    return core.patch_namespaced_pod_status(name, namespace, {"status": status})


def make_service(
    core: client.CoreV1Api,
    name: str,
    namespace: str,
    selector: Mapping[str, str],
    ports: Iterable[tuple[str, int, int]],
    *,
    protocol: str = "TCP",
) -> client.V1Service:
    """Create a ClusterIP Service; ports are (name, port, targetPort)."""
    svc = client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(
            selector=dict(selector),
            ports=[
                client.V1ServicePort(name=n, port=p, target_port=t, protocol=protocol)
                for n, p, t in ports
            ],
        ),
    )
    return core.create_namespaced_service(namespace, svc)


def endpoint_slices(
    discovery: client.DiscoveryV1Api, namespace: str, service: str
) -> list[client.V1EndpointSlice]:
    """The EndpointSlices the controllers made for a Service."""
    result = discovery.list_namespaced_endpoint_slice(
        namespace, label_selector=f"{SERVICE_NAME_LABEL}={service}"
    )
    return list(result.items)


def ready_addresses(discovery: client.DiscoveryV1Api, namespace: str, service: str) -> set[str]:
    """Addresses of the Service's endpoints whose ready condition is true."""
    out: set[str] = set()
    for eps in endpoint_slices(discovery, namespace, service):
        for ep in eps.endpoints or []:
            if ep.conditions is not None and ep.conditions.ready:
                out.update(ep.addresses)
    return out
