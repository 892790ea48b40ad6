"""UDP datagrams larger than the MTU through services, both ways: every
fragment of a request follows its first to the backend, every fragment of
the reply is reverse-translated (bpf/lib/frag.h), so 8 KB datagrams arrive
whole through a ClusterIP from a pod and through a masqueraded NodePort from
outside."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lab import objects
from lab.agent import LabAgent, agents_on
from lab.topology import Topology, TopologySpec
from tests.conftest import require_root

VIP = "10.96.0.10"
ECHO = objects.Port("echo", 53, 5353, "UDP", 30053)
SIZE = 8192

# Echoes every datagram back whole.
SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("READY", flush=True)
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

# Sends datagrams of SIZE bytes, each with its own content, and prints
# how many came back whole.
CLIENT = """
import os, socket, sys
addr, port, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
whole = 0
for i in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    payload = os.urandom(size)
    s.sendto(payload, (addr, port))
    try:
        data, _ = s.recvfrom(65535)
        whole += data == payload
    except socket.timeout:
        pass
    s.close()
print(whole)
"""


@dataclass
class Lab:
    topo: Topology
    agents: list[LabAgent]


def dnat_fragments(agent: LabAgent) -> int:
    """Packets the node translated (first and later fragments among them)."""
    return agent.stat("DNAT_NEW", "DNAT_ESTABLISHED", "REVNAT")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    manifest = tmp_path_factory.mktemp("frag") / "svc.yaml"
    with Topology.build(TopologySpec.two_nodes(pods_per_node=1)) as topo:
        _, b0 = topo.pods
        server = topo.spawn(b0.ns, [sys.executable, "-c", SERVER, str(ECHO.target)],
                            stdout=-1)
        assert server.stdout is not None and server.stdout.readline().startswith(b"READY")
        objects.write(manifest, [
            objects.service("echo", VIP, [ECHO], svc_type="NodePort"),
            objects.endpoint_slice("echo", [ECHO], [(b0.ip, b0.node.name)])])
        with agents_on(topo, [manifest]) as agents:
            yield Lab(topo, agents)


@pytest.mark.parametrize("client,target", [("pod", VIP), ("outside", "192.0.2.1")],
                         ids=["clusterip-from-a-pod", "nodeport-from-outside"])
def test_8k_udp_datagrams_arrive_whole_both_ways(lab: Lab, client: str, target: str) -> None:
    a0, _ = lab.topo.pods
    ns = a0.ns if client == "pod" else lab.topo.external.ns
    port = ECHO.port if target == VIP else ECHO.node_port
    before = dnat_fragments(lab.agents[0])
    out = lab.topo.exec(ns, [sys.executable, "-c", CLIENT, target, str(port), str(SIZE), "20"],
                        timeout=60)
    assert out.stdout.strip() == "20"
    # Six fragments each way per datagram at a 1,500-byte MTU, all translated on node A.
    assert dnat_fragments(lab.agents[0]) - before >= 20 * 2 * 6
