"""Path-MTU discovery through services: a link of smaller MTU between the
client's node and the backend's. The client's node cannot forward the
client's full-size segments and answers "fragmentation needed", quoting the
translated packet (client -> backend); unless that quote is translated back
(client -> service, bpf/lib/icmp.h), the client's stack finds no socket for
it, never lowers its segment size, and the upload stalls.

From outside, the NodePort flow is masqueraded: the kernel's answer would go
to the node's own address and the client would never hear of it. XDP looks
up the route's MTU itself and answers the client (bpf/lib/pmtu.h)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent, agents_on
from lab.topology import Topology, TopologySpec
from tests.conftest import require_root

VIP = "10.96.0.10"
HTTP = objects.Port("http", 80, 8080, "TCP", 30080)
SMALL_MTU = 1400
UPLOAD = 400_000


@dataclass
class Lab:
    topo: Topology
    agents: list[LabAgent]
    upload: Path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root()
    tmp = tmp_path_factory.mktemp("pmtu")
    manifest, upload = tmp / "svc.yaml", tmp / "upload.bin"
    upload.write_bytes(b"u" * UPLOAD)
    with Topology.build(TopologySpec.two_nodes(pods_per_node=1)) as topo:
        a, b = topo.nodes
        # The link between node A (eth1 towards B) and node B (eth0).
        topo.exec(a.ns, ["ip", "link", "set", "eth1", "mtu", str(SMALL_MTU)])
        topo.exec(b.ns, ["ip", "link", "set", "eth0", "mtu", str(SMALL_MTU)])
        _, b0 = topo.pods
        topo.start_http(b0, 8080)
        objects.write(manifest, [
            objects.service("web", VIP, [HTTP], svc_type="NodePort"),
            objects.endpoint_slice("web", [HTTP], [(b0.ip, b0.node.name)])])
        with agents_on(topo, [manifest]) as agents:
            yield Lab(topo, agents, upload)


@pytest.mark.parametrize("target", [f"{VIP}:80", "192.0.2.1:30080"],
                         ids=["clusterip", "nodeport"])
def test_an_upload_larger_than_the_path_mtu_completes(lab: Lab, target: str) -> None:
    a0, b0 = lab.topo.pods
    before = lab.agents[0].stat("ICMP_ERROR_NAT")
    out = lab.topo.exec(a0.ns, ["curl", "-sS", "-m", "20", "--data-binary",
                                f"@{lab.upload}", f"http://{target}/"], check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == b0.name
    # The node's "fragmentation needed" reached the client translated.
    assert lab.agents[0].stat("ICMP_ERROR_NAT") > before


def test_an_upload_from_outside_through_a_masqueraded_node_port_completes(lab: Lab) -> None:
    _, b0 = lab.topo.pods
    ext = lab.topo.external
    before = lab.agents[0].stat("REJECT_FRAG_NEEDED")
    out = lab.topo.exec(ext.ns, ["curl", "-sS", "-m", "20", "--data-binary",
                                 f"@{lab.upload}", "http://192.0.2.1:30080/"], check=False)
    assert out.returncode == 0, out.stderr
    # Masqueraded: the backend saw the node, not the client.
    assert out.stdout.split() == [b0.name, "192.0.2.1"]
    assert lab.agents[0].stat("REJECT_FRAG_NEEDED") > before
    # The client learnt the path's MTU from the node's answer.
    route = lab.topo.exec(ext.ns, ["ip", "route", "get", "192.0.2.1"]).stdout
    assert f"mtu {SMALL_MTU}" in route, route
