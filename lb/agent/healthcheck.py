"""Health-check NodePorts: for a LoadBalancer service with
externalTrafficPolicy Local, an HTTP server on its healthCheckNodePort tells
the cloud load balancer whether this node has a local endpoint, so it only
sends traffic to nodes that can serve it without a second hop.

The answer has kube-proxy's shape: 200 with
{"service": {"namespace", "name"}, "localEndpoints": N, "serviceProxyHealthy": true}
when N > 0, 503 otherwise."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler
from typing import Any

from lb.agent.httpserver import HTTPServer, http_server
from lb.datapath.netns import call_in
from lb.model import Cluster
from lb.service.desired import SCOPE_EXTERNAL, DesiredState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthCheck:
    namespace: str
    name: str
    local_endpoints: int


def health_checks(cluster: Cluster, state: DesiredState) -> dict[int, HealthCheck]:
    """Port -> what it must answer, for every service that has one.

    Only ready endpoints count, by address: terminating ones still serve
    the node's traffic, but the check fails so that the load balancer stops
    sending new flows here (kube-proxy, pkg/proxy/endpointschangetracker.go,
    getLocalReadyEndpointIPs)."""
    checked = [svc for svc in cluster.services.values()
               if svc.type == "LoadBalancer" and svc.external_traffic_local
               and svc.health_check_node_port]
    if not checked:  # most clusters: no pass over every entry on every sync
        return {}
    local: dict[str, set[str]] = {}
    for e in state.entries.values():
        if e.frontend.scope == SCOPE_EXTERNAL:
            local.setdefault(e.service, set()).update(
                b.ip for b in e.backends if b.local and not b.terminating)
    return {port: HealthCheck(svc.namespace, svc.name, len(local.get(svc.key, ())))
            for svc in checked if (port := svc.health_check_node_port)}


def answer(hc: HealthCheck) -> tuple[int, bytes]:
    body = {"service": {"namespace": hc.namespace, "name": hc.name},
            "localEndpoints": hc.local_endpoints, "serviceProxyHealthy": True}
    return (200 if hc.local_endpoints > 0 else 503), json.dumps(body).encode()


class HealthServers:
    """One listener per health-check port, kept in step with each sync."""

    def __init__(self, bind: str = "0.0.0.0", netns: str | None = None) -> None:
        self.bind = bind
        self.netns = netns  # where the node's addresses are: listen there
        self._servers: dict[int, HTTPServer] = {}
        self._checks: dict[int, HealthCheck] = {}
        self._lock = threading.Lock()

    def _handler(self, port: int) -> type[BaseHTTPRequestHandler]:
        servers = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with servers._lock:
                    hc = servers._checks.get(port)
                if hc is None:
                    self.send_error(404)
                    return
                code, body = answer(hc)
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Load-Balancing-Endpoint-Weight", str(hc.local_endpoints))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass  # probes every few seconds would flood the agent's log

        return Handler

    def update(self, checks: Mapping[int, HealthCheck]) -> None:
        with self._lock:
            self._checks = dict(checks)
        for port in sorted(set(self._servers) - set(checks)):
            self._servers.pop(port).shutdown()
        for port in sorted(set(checks) - set(self._servers)):
            try:
                srv = call_in(self.netns, partial(http_server, self.bind, port,
                                                  self._handler(port)))
            except OSError as e:
                log.error("health-check port %d: cannot listen: %s", port, e)
                continue
            threading.Thread(target=srv.serve_forever, name=f"healthz-{port}",
                             daemon=True).start()
            self._servers[port] = srv
            log.info("serving health checks on port %d", port)

    def close(self) -> None:
        self.update({})
