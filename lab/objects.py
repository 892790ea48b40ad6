"""Kubernetes objects for lab services, written as the YAML the agent reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


@dataclass(frozen=True)
class Port:
    name: str
    port: int
    target: int
    protocol: str = "TCP"
    node_port: int | None = None


def service(name: str, cluster_ip: str, ports: Sequence[Port], *, svc_type: str = "ClusterIP",
            lb_ips: Sequence[str] = (), namespace: str = "default",
            **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"type": svc_type, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "ports": [{"name": p.name, "port": p.port, "targetPort": p.target,
                            "protocol": p.protocol,
                            **({"nodePort": p.node_port} if p.node_port else {})}
                           for p in ports], **spec},
    }
    if lb_ips:
        body["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in lb_ips]}}
    return body


def endpoint_slice(service_name: str, ports: Sequence[Port],
                   endpoints: Sequence[tuple[str, str]], *, namespace: str = "default",
                   terminating: Sequence[str] = ()) -> dict[str, Any]:
    """`endpoints` are (ip, node name) pairs; those in `terminating` are
    serving but no longer ready."""
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service_name}-lab", "namespace": namespace,
                     "labels": {"kubernetes.io/service-name": service_name}},
        "addressType": "IPv4",
        "ports": [{"name": p.name, "port": p.target, "protocol": p.protocol} for p in ports],
        "endpoints": [{"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ip not in terminating, "serving": True,
                                      "terminating": ip in terminating}}
                      for ip, node in endpoints],
    }


def write(path: Path, docs: Sequence[dict[str, Any]]) -> None:
    """Replace the file in one step, so a watcher never reads half of it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    tmp.replace(path)
