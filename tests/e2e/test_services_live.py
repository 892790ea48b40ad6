"""Service behaviours with real connections: two nodes, masquerade,
traffic policies, REJECT as "connection refused", hairpin, health checks."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import objects
from lab.agent import LabAgent, agents_on
from lab.clients import FAILED, curl, curl_many, udp_request
from lab.topology import Topology, TopologySpec
from tests.conftest import require_root

VIP = "10.96.0.10"
LB_IP = "203.0.113.10"
HTTP = objects.Port("http", 80, 8080, "TCP", 30080)
DNS = objects.Port("dns", 53, 5353, "UDP")
HEALTH_PORT = 32000


@dataclass
class TwoNodes:
    topo: Topology
    manifest: Path
    agents: list[LabAgent]

    def program(self, docs: list[dict[str, Any]]) -> None:
        marks = [len(a.lines) for a in self.agents]
        objects.write(self.manifest, docs)
        for a, m in zip(self.agents, marks, strict=True):
            a.wait_for("synced", timeout=10, after=m)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    require_root()
    manifest = tmp_path_factory.mktemp("svc") / "svc.yaml"
    objects.write(manifest, [])
    with Topology.build(TopologySpec.two_nodes(pods_per_node=2)) as topo:
        for pod in topo.pods:
            topo.start_http(pod, 8080)
            topo.start_udp(pod, 5353)
        with agents_on(topo, [manifest], extra=("--service-cidr", "10.96.0.0/12"),
                       synced=False) as agents:
            yield TwoNodes(topo, manifest, agents)


def web(two: TwoNodes, pods: list[Any], ports: tuple[objects.Port, ...] = (HTTP,),
        **spec: Any) -> list[dict[str, Any]]:
    return [objects.service("web", VIP, list(ports), svc_type="LoadBalancer", lb_ips=[LB_IP],
                            **spec),
            objects.endpoint_slice("web", list(ports), [(p.ip, p.node.name) for p in pods])]


def test_nodeport_on_node_a_served_by_a_pod_on_node_b_is_masqueraded(two: TwoNodes) -> None:
    a0, _a1, b0, _b1 = two.topo.pods
    two.program(web(two, [b0]))
    body = curl(two.topo, two.topo.external, f"http://{a0.node.ip}:30080/", timeout=3)
    name, source = body.split()
    assert name == b0.name
    assert source == a0.node.ip, "the backend sees node A's address (masquerade)"
    spread = curl_many(two.topo, two.topo.external, f"http://{a0.node.ip}:30080/", 50,
                       timeout=3)
    assert spread == {b0.name: 50}


def test_a_node_socket_on_the_port_of_a_masqueraded_flow_gets_its_replies(
        two: TwoNodes) -> None:
    """A NodePort flow is masqueraded to the client's own port, and the node's
    ephemeral ports are drawn from the same range: once that flow has closed,
    the node's own connection to the same backend from that port must get its
    replies, not have them reverse-translated to the old client."""
    a0, _a1, b0, _b1 = two.topo.pods
    two.program(web(two, [b0]))
    port = ("--local-port", "47011")
    body = curl(two.topo, two.topo.external, f"http://{a0.node.ip}:30080/", timeout=3,
                extra=port)
    assert body.split() == [b0.name, a0.node.ip], "masqueraded to node A"
    time.sleep(0.5)  # the backend's FIN reaches node A's XDP: the flow has closed
    body = curl(two.topo, a0.node, f"http://{b0.ip}:8080/", timeout=3, extra=port)
    assert body.split() == [b0.name, a0.node.ip]


def test_nodeport_served_by_a_host_network_endpoint_of_the_same_node(two: TwoNodes) -> None:
    """A hostNetwork endpoint on the very node a NodePort client reaches
    (upstream's "should function for service endpoints using hostNetwork"):
    the node's own stack serves it, with the client's source, and the reply
    leaves the node device reverse-translated. Through the other node it is
    an ordinary remote endpoint, masqueraded."""
    node_a, node_b = two.topo.nodes
    ext = two.topo.external
    servers = [two.topo.start_http(node_b, 8080, name="host-b"),
               two.topo.start_udp(node_b, 5353, name="host-b")]
    try:
        dns = objects.Port("dns", 53, 5353, "UDP", 30053)
        svc = web(two, [], (HTTP, dns))[0]
        two.program([svc, objects.endpoint_slice("web", [HTTP, dns], [(node_b.ip, node_b.name)])])
        body = curl(two.topo, ext, f"http://{node_b.ip}:30080/", timeout=3)
        assert body.split() == ["host-b", ext.ip]
        assert udp_request(two.topo, ext, node_b.ip, 30053, "q").split() == ["host-b", ext.ip]
        body = curl(two.topo, ext, f"http://{node_a.ip}:30080/", timeout=3)
        assert body.split() == ["host-b", node_a.ip]
        a0 = two.topo.pods[0]
        assert curl(two.topo, a0, f"http://{VIP}/", timeout=3).split() == ["host-b", a0.ip]
    finally:
        for proc in servers:
            two.topo.kill(proc)


def test_external_traffic_policy_local_preserves_source_and_drops_without_local(
        two: TwoNodes) -> None:
    a0, _a1, b0, b1 = two.topo.pods
    node_a, node_b = two.topo.nodes
    two.program(web(two, [b0, b1], externalTrafficPolicy="Local",
                    healthCheckNodePort=HEALTH_PORT))
    ext = two.topo.external
    body = curl(two.topo, ext, f"http://{node_b.ip}:30080/", timeout=3)
    assert body.split()[1] == ext.ip, "source preserved with a Local policy"
    spread = curl_many(two.topo, ext, f"http://{node_a.ip}:30080/", 5, timeout=1,
                       allow_errors=True)
    assert spread == {FAILED: 5}, "node A has no local endpoint: dropped"
    # Pods on node A still reach every endpoint through the same address.
    spread = curl_many(two.topo, a0, f"http://{node_a.ip}:30080/", 40, timeout=3)
    assert set(spread) == {b0.name, b1.name}
    # The health-check NodePort says which node can serve.
    for node, code, count in ((node_a, 503, 0), (node_b, 200, 2)):
        res = two.topo.exec(ext, ["curl", "-s", "--noproxy", "*", "-o", "/dev/stdout", "-w",
                                  "\n%{http_code}", f"http://{node.ip}:{HEALTH_PORT}/healthz"])
        body_text, status = res.stdout.rsplit("\n", 1)
        assert int(status) == code
        doc = json.loads(body_text)
        assert doc == {"service": {"namespace": "default", "name": "web"},
                       "localEndpoints": count, "serviceProxyHealthy": True}


def test_internal_traffic_policy_local(two: TwoNodes) -> None:
    a0, a1, b0, b1 = two.topo.pods
    two.program(web(two, [a1, b0, b1], internalTrafficPolicy="Local"))
    assert set(curl_many(two.topo, a0, f"http://{VIP}/", 30, timeout=3)) == {a1.name}
    two.program(web(two, [b0, b1], internalTrafficPolicy="Local"))
    spread = curl_many(two.topo, a0, f"http://{VIP}/", 3, timeout=1, allow_errors=True)
    assert spread == {FAILED: 3}


def test_no_endpoints_is_connection_refused_at_once(two: TwoNodes) -> None:
    a0 = two.topo.pods[0]
    two.program(web(two, [], (HTTP, DNS)))
    tcp = ("import socket,time;t=time.monotonic()\n"
           f"try:\n socket.create_connection(('{VIP}',80),timeout=5); print('open')\n"
           "except ConnectionRefusedError: print('refused', round(time.monotonic()-t, 3))\n"
           "except TimeoutError: print('timeout')")
    verdict, took = two.topo.exec(a0, [sys.executable, "-c", tcp]).stdout.split()
    assert verdict == "refused" and float(took) < 1.0
    udp = ("import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(3);"
           f"s.connect(('{VIP}',53));s.send(b'x')\n"
           "try:\n s.recv(100); print('answer')\n"
           "except ConnectionRefusedError: print('refused')\n"
           "except TimeoutError: print('timeout')")
    out = two.topo.exec(a0, [sys.executable, "-c", udp]).stdout.strip()
    assert out == "refused"
    # A port the ClusterIP does not have is refused too.
    two.program(web(two, [two.topo.pods[2]]))
    res = two.topo.exec(a0, ["curl", "-sS", "--noproxy", "*", "--max-time", "5",
                             f"http://{VIP}:81/"], check=False)
    assert res.returncode == 7


def test_hairpin_pod_reaches_itself_through_its_service(two: TwoNodes) -> None:
    a0, a1, _, _ = two.topo.pods
    two.program(web(two, [a0, a1]))
    spread = curl_many(two.topo, a0, f"http://{VIP}/", 40, timeout=3)
    assert FAILED not in spread and a0.name in spread, spread
