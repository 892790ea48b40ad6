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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from http.server import BaseHTTPRequestHandler
from typing import Any

from lb.agent.httpserver import HTTPServer, http_server
from lb.datapath.netns import call_in
from lb.model import Cluster, Service
from lb.service.desired import SCOPE_EXTERNAL, DesiredState, FrontendEntry, Memo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthCheck:
    namespace: str
    name: str
    local_endpoints: int


def checked(svc: Service) -> bool:
    """Whether `svc` has a health-check NodePort to answer."""
    return bool(svc.type == "LoadBalancer" and svc.external_traffic_local
                and svc.health_check_node_port)


def health_checks(cluster: Cluster, state: DesiredState) -> dict[int, HealthCheck]:
    """Port -> what it must answer, for every service that has one.

    Only ready endpoints count, by address: terminating ones still serve
    the node's traffic, but the check fails so that the load balancer stops
    sending new flows here (kube-proxy, pkg/proxy/endpointschangetracker.go,
    getLocalReadyEndpointIPs)."""
    services = [svc for svc in cluster.services.values() if checked(svc)]
    if not services:  # most clusters: no pass over every entry on every sync
        return {}
    return _answers(services, _by_service(state))


def _by_service(state: DesiredState) -> Callable[[str], Iterable[FrontendEntry]]:
    """Each service's entries, from one pass over all of them."""
    grouped: dict[str, list[FrontendEntry]] = {}
    for e in state.entries.values():
        grouped.setdefault(e.service, []).append(e)
    return lambda key: grouped.get(key, ())


def _answers(services: Iterable[Service],
             entries_of: Callable[[str], Iterable[FrontendEntry]]) -> dict[int, HealthCheck]:
    out = {}
    # By key: of two services on one port (from files), the same one answers.
    for svc in sorted(services, key=lambda s: s.key):
        local = {b.ip for e in entries_of(svc.key) if e.frontend.scope == SCOPE_EXTERNAL
                 for b in e.backends if b.local and not b.terminating}
        out[svc.health_check_node_port or 0] = HealthCheck(svc.namespace, svc.name, len(local))
    return out


class HealthCheckTracker:
    """health_checks from sync to sync at the cost of what changed: the
    services with a health-check port are kept, updated from the services a
    snapshot names as changed (a walk over 100,000 Services costs more than
    a one-endpoint sync), and each counts its endpoints from its own entries
    as the desired state's memo holds them, not from every entry there is."""

    def __init__(self) -> None:
        self._services: dict[str, Service] = {}
        self._seen: object | None = None  # revision of the snapshot seen last

    def update(self, cluster: Cluster, state: DesiredState,
               memo: Memo | None = None) -> dict[int, HealthCheck]:
        changes = cluster.changes
        if changes is not None and self._seen is not None and changes.since is self._seen:
            keys: Iterable[str] = changes.services
        else:
            self._services.clear()
            keys = cluster.services.keys()
        self._seen = cluster.revision
        for key in keys:
            svc = cluster.services.get(key)
            if svc is not None and checked(svc):
                self._services[key] = svc
            else:
                self._services.pop(key, None)
        if not self._services:
            return {}
        if memo is None or memo.token is not state.token:
            # A state the memo did not compute (the periodic check's full one).
            return _answers(self._services.values(), _by_service(state))

        def entries_of(key: str) -> list[FrontendEntry]:
            hit = memo.by_service.get(key)
            # A frontend two services claim is the first one's (desired.Memo).
            return [e for f, e in hit.entries.items() if state.entries.get(f) is e] \
                if hit is not None else []

        return _answers(self._services.values(), entries_of)


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
