"""The agent on a live lab node: real programs attached in namespaces, real
TCP and UDP through them, in both pod wirings (ptp routes and a bridge)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.clients import FAILED, curl, curl_many, udp_many, udp_request
from lab.topology import Pod, Topology, TopologySpec
from tests.conftest import require_root

VIP = "10.96.0.10"
LB_IP = "203.0.113.10"
NODE_PORT = 30080
HTTP = objects.Port("http", 80, 8080, "TCP", NODE_PORT)
DNS = objects.Port("dns", 53, 5353, "UDP")
ECHO = objects.Port("echo", 7, 7007, "TCP")


class Lab:
    def __init__(self, topo: Topology, manifest: Path, agent: LabAgent) -> None:
        self.topo = topo
        self.manifest = manifest
        self.agent = agent
        self.client, *self.backends = topo.pods

    def program(self, backends: list[Pod]) -> None:
        eps = [(p.ip, p.node.name) for p in backends]
        objects.write(self.manifest, [
            objects.service("web", VIP, [HTTP, DNS, ECHO], svc_type="LoadBalancer",
                            lb_ips=[LB_IP]),
            objects.endpoint_slice("web", [HTTP, DNS, ECHO], eps),
        ])


@pytest.fixture(params=["ptp", "bridge"])
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Lab]:
    require_root()
    with Topology.build(TopologySpec.single(pods=4, wiring=request.param)) as topo:
        _client, *backends = topo.pods
        for pod in backends:
            topo.start_http(pod, 8080)
            topo.start_udp(pod, 5353)
            topo.start_tcp_echo(pod, 7007, greet=True)
        manifest = tmp_path / "web.yaml"
        lab = Lab(topo, manifest, None)  # type: ignore[arg-type]
        lab.program(backends[:2])
        with LabAgent(topo, topo.node, [manifest]) as agent:
            lab.agent = agent
            yield lab


def names(lab: Lab, pods: list[Pod]) -> set[str]:
    return {p.name for p in pods}


def test_clusterip_from_a_pod_reaches_both_backends_with_the_pod_source(lab: Lab) -> None:
    spread = curl_many(lab.topo, lab.client, f"http://{VIP}/", 100, timeout=2)
    assert FAILED not in spread and sum(spread.values()) == 100
    assert set(spread) == names(lab, lab.backends[:2])
    # Each backend saw the client pod's own address.
    body = curl(lab.topo, lab.client, f"http://{VIP}/")
    assert body.split()[1] == lab.client.ip


def test_nodeport_and_load_balancer_ip_from_outside_through_xdp(lab: Lab) -> None:
    ext = lab.topo.external
    for url in (f"http://{lab.topo.node_ip}:{NODE_PORT}/", f"http://{LB_IP}/"):
        spread = curl_many(lab.topo, ext, url, 100, timeout=2)
        assert FAILED not in spread and sum(spread.values()) == 100, (url, spread)
        assert set(spread) == names(lab, lab.backends[:2])
    # The translation was done by the programs: their counters moved.
    assert lab.agent.stat("DNAT_NEW") >= 200


def test_udp_through_the_clusterip(lab: Lab) -> None:
    reply = udp_request(lab.topo, lab.client, VIP, 53)
    name, src = reply.split()
    assert name in names(lab, lab.backends[:2]) and src == lab.client.ip
    spread = udp_many(lab.topo, lab.client, VIP, 53, 50)
    assert FAILED not in spread and set(spread) == names(lab, lab.backends[:2])


def test_endpoint_added_gets_traffic_within_2s_and_removed_gets_none(lab: Lab) -> None:
    b0, b1, b2 = lab.backends
    lab.program([b0, b1, b2])
    deadline = time.monotonic() + 2.0
    while True:
        spread = curl_many(lab.topo, lab.client, f"http://{VIP}/", 30, timeout=2)
        if b2.name in spread or time.monotonic() > deadline:
            break
    assert b2.name in spread, f"new endpoint got no traffic within 2 s: {spread}"
    mark = len(lab.agent.lines)
    lab.program([b1, b2])
    # The sync that removes it: three backends go (its http, dns and echo).
    lab.agent.wait_for("3 removed", timeout=5, after=mark)
    spread = curl_many(lab.topo, lab.client, f"http://{VIP}/", 100, timeout=2)
    assert FAILED not in spread and b0.name not in spread and set(spread) == {b1.name, b2.name}


def test_long_lived_connection_survives_endpoint_changes(lab: Lab) -> None:
    b0, b1, b2 = lab.backends
    # A client in the pod opens one connection to the ClusterIP, reads the
    # backend's greeting, waits for a go file, then talks over it again.
    go = Path(f"/tmp/lb-e2e-go-{lab.agent.instance}")
    script = (
        "import os,socket,time\n"
        f"s=socket.create_connection(('{VIP}',7),timeout=5)\n"
        "f=s.makefile('rb')\n"
        "print(f.readline().decode().strip(),flush=True)\n"
        f"while not os.path.exists('{go}'): time.sleep(0.05)\n"
        "s.sendall(b'still-here\\n')\n"
        "print(f.readline().decode().strip(),flush=True)\n"
    )
    proc = lab.topo.spawn(lab.client, [sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        greeting = proc.stdout.readline().decode().split()
        assert greeting and greeting[0] in (b0.name, b1.name), greeting
        # Replace the endpoints, keeping only the one the connection uses.
        keep = [p for p in (b0, b1) if p.name == greeting[0]]
        mark = len(lab.agent.lines)
        lab.program([*keep, b2])
        lab.agent.wait_for("synced", timeout=5, after=mark)
        go.touch()
        assert proc.stdout.readline().decode().strip() == "still-here"
        assert proc.wait(timeout=10) == 0
    finally:
        go.unlink(missing_ok=True)


def test_agent_attaches_to_pods_that_appear_later(lab: Lab) -> None:
    pod = lab.topo.add_pod()
    lab.agent.wait_for(f"pod device {pod.host_veth}", timeout=5)
    spread = curl_many(lab.topo, pod, f"http://{VIP}/", 20, timeout=2)
    assert FAILED not in spread and set(spread) <= names(lab, lab.backends[:2])


def test_agent_attaches_to_every_pod_of_a_burst(lab: Lab) -> None:
    """Pods come and go in bursts on a real node (the e2e suites make and
    delete dozens a minute); each survivor's veth gets both programs,
    whatever order the link events come in or how many are coalesced."""
    pods = [lab.topo.add_pod() for _ in range(12)]
    for pod in pods[::3]:
        lab.topo.remove_pod(pod)
    survivors = [p for p in pods if p not in pods[::3]]
    deadline = time.monotonic() + 10
    missing = survivors
    while missing and time.monotonic() < deadline:
        time.sleep(0.5)
        missing = [p for p in survivors if not _has_programs(lab, p.host_veth)]
    assert not missing, [p.host_veth for p in missing]
    spread = curl_many(lab.topo, survivors[-1], f"http://{VIP}/", 10, timeout=2)
    assert FAILED not in spread


def _has_programs(lab: Lab, dev: str) -> bool:
    node = lab.topo.nodes[0].ns
    shown = [subprocess.run(["tc", "-n", node, "filter", "show", "dev", dev, hook],
                            capture_output=True, text=True, check=False).stdout
             for hook in ("ingress", "egress")]
    return "tc_lb_from_pod" in shown[0] and "tc_lb_to_pod" in shown[1]
