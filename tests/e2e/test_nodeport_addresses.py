"""--nodeport-addresses on a live lab node: which of the node's addresses
answer NodePorts, as kube-proxy's flag of that name decides."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.clients import curl
from lab.topology import LabError, Topology, TopologySpec
from lb.agent.nodeports import parse_cidrs
from tests.conftest import require_root

VIP = "10.96.0.10"
NODE_PORT = 30080
HTTP = objects.Port("http", 80, 8080, "TCP", NODE_PORT)
SECOND = "192.0.2.99"  # a second address of the node, on its node device


def test_the_flag_reads_as_kube_proxys() -> None:
    assert parse_cidrs(["primary"]) is None and parse_cidrs([]) is None
    assert parse_cidrs(["192.0.2.0/24,10.0.0.0/8", "fd00::/64"]) == ("192.0.2.0/24",
                                                                      "10.0.0.0/8")
    for bad, why in ((["primary,10.0.0.0/8"], "stands alone"), (["10.0.0.300/8"], "not a CIDR")):
        with pytest.raises(ValueError, match=why):
            parse_cidrs(bad)


def _served(topo: Topology, addr: str) -> bool:
    try:
        return bool(curl(topo, topo.external, f"http://{addr}:{NODE_PORT}/", timeout=2))
    except LabError:
        return False


@pytest.mark.parametrize("flag", [None, "192.0.2.0/24"])
def test_node_ports_answer_on_the_addresses_the_flag_names(tmp_path: Path,
                                                           flag: str | None) -> None:
    """primary (the default): the --node-ip address only. A CIDR: every node
    address in it, one added while the agent runs too."""
    require_root()
    with Topology.build(TopologySpec.single(pods=2)) as topo:
        backend = topo.pods[1]
        topo.start_http(backend, 8080)
        manifest = tmp_path / "web.yaml"
        objects.write(manifest, [objects.service("web", VIP, [HTTP], svc_type="NodePort"),
                                 objects.endpoint_slice("web", [HTTP],
                                                        [(backend.ip, topo.node.name)])])
        extra = ("--nodeport-addresses", flag) if flag else ()
        with LabAgent(topo, topo.node, [manifest], extra=extra):
            assert _served(topo, topo.node_ip)
            topo.exec(topo.node, ["ip", "addr", "add", f"{SECOND}/32", "dev",
                                  topo.node.iface])
            deadline = time.monotonic() + 10
            while flag and not _served(topo, SECOND) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _served(topo, SECOND) is bool(flag)
            assert _served(topo, topo.node_ip) is True
