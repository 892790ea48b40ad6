"""What a load balancer must not lose: flows to removed endpoints move on,
a SYN flood does not lock the table."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.clients import FAILED, curl_many
from lab.topology import Pod, Topology, TopologySpec
from tests.conftest import require_root

VIP = "10.96.0.10"
HTTP = objects.Port("http", 80, 8080, "TCP", 30080)
DNS = objects.Port("dns", 53, 5353, "UDP")
ECHO = objects.Port("echo", 7, 7007, "TCP")


@dataclass
class Node1:
    topo: Topology
    manifest: Path
    agent: LabAgent

    def program(self, pods: list[Pod]) -> None:
        mark = len(self.agent.lines)
        objects.write(self.manifest, [
            objects.service("web", VIP, [HTTP, DNS, ECHO], svc_type="NodePort"),
            objects.endpoint_slice("web", [HTTP, DNS, ECHO], [(p.ip, "node") for p in pods])])
        self.agent.wait_for("synced", timeout=10, after=mark)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Node1]:
    require_root()
    with Topology.build(TopologySpec.single(pods=3)) as topo:
        for pod in topo.pods[1:]:
            topo.start_http(pod, 8080)
            topo.start_udp(pod, 5353)
            topo.start_tcp_echo(pod, 7007, greet=True)
        manifest = tmp_path / "web.yaml"
        objects.write(manifest, [])
        with LabAgent(topo, topo.node, [manifest]) as agent:
            node = Node1(topo, manifest, agent)
            node.program(topo.pods[1:])
            yield node


UDP_CLIENT = r"""
import os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(1)
s.connect((sys.argv[1], 53))   # one socket: one 5-tuple for the whole test
go = sys.argv[2]
def ask():
    s.send(b"x")
    return s.recv(100).split()[0].decode()
print(ask(), flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
print(ask(), flush=True)
"""


def test_udp_flow_moves_on_at_once_when_its_endpoint_is_removed(lab: Node1) -> None:
    client, b0, b1 = lab.topo.pods
    go = Path(f"/tmp/lb-udp-go-{lab.agent.instance}")
    proc = lab.topo.spawn(client, [sys.executable, "-c", UDP_CLIENT, VIP, str(go)],
                          stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline().decode().strip()
        assert first in (b0.name, b1.name)
        remaining = b1 if first == b0.name else b0
        lab.program([remaining])
        go.touch()
        # The very next datagram of the same flow reaches the other endpoint.
        assert proc.stdout.readline().decode().strip() == remaining.name
        assert proc.wait(timeout=5) == 0
    finally:
        go.unlink(missing_ok=True)


def test_udp_flow_follows_its_endpoint_replaced_through_an_empty_service(lab: Node1) -> None:
    # A DaemonSet pod replaced on the node (the upstream Conntrack test of
    # internalTrafficPolicy Local): the old endpoint goes, the service is
    # empty for a while, a new one comes. Its backend id must not be the
    # freed one, or the flow's forward entry would take the new address
    # while its reply entry still names the old one, and no reply would be
    # translated back.
    client, b0, b1 = lab.topo.pods
    lab.program([b0])
    go = Path(f"/tmp/lb-udp-go-{lab.agent.instance}")
    proc = lab.topo.spawn(client, [sys.executable, "-c", UDP_CLIENT, VIP, str(go)],
                          stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().decode().strip() == b0.name
        lab.program([])
        lab.program([b1])
        go.touch()
        assert proc.stdout.readline().decode().strip() == b1.name, \
            "the same flow, answered by the new endpoint as the service"
        assert proc.wait(timeout=5) == 0
    finally:
        go.unlink(missing_ok=True)


TCP_CLIENT = r"""
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 7), timeout=5)
f = s.makefile("rb")
print(f.readline().decode().split()[0], flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
t = time.monotonic()
try:
    s.sendall(b"hello\n")
    data = f.readline()
    print("data" if data else "closed", round(time.monotonic() - t, 2), flush=True)
except ConnectionResetError:
    print("reset", round(time.monotonic() - t, 2), flush=True)
"""


def test_tcp_flow_to_a_removed_endpoint_is_reset_not_left_hanging(lab: Node1) -> None:
    client, b0, b1 = lab.topo.pods
    go = Path(f"/tmp/lb-tcp-go-{lab.agent.instance}")
    proc = lab.topo.spawn(client, [sys.executable, "-c", TCP_CLIENT, VIP, str(go)],
                          stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline().decode().strip()
        lab.program([b1 if first == b0.name else b0])
        go.touch()
        verdict, took = proc.stdout.readline().decode().split()
        assert verdict in ("reset", "closed") and float(took) < 2.0, (verdict, took)
    finally:
        go.unlink(missing_ok=True)


def test_syn_flood_does_not_lock_out_new_connections(lab: Node1) -> None:
    ext = lab.topo.external
    node_ip = lab.topo.node_ip
    # Bounded in time: 3 s of SYNs from random sources into the NodePort.
    flood = lab.topo.exec(ext, ["timeout", "3", "hping3", "-q", "-S", "--flood", "--rand-source",
                                "-p", "30080", node_ip], check=False, timeout=20)
    assert flood.returncode in (0, 124), flood.stderr
    stats = subprocess.run([sys.executable, "-m", "lb.cli", "maps", "stats", "-o", "json",
                            "--instance", lab.agent.instance], capture_output=True, text=True,
                           check=True)
    new = sum(r["packets"] for r in json.loads(stats.stdout) if r["reason"] == "new")
    assert new > 1000, "the flood reached the datapath"
    start = time.monotonic()
    spread = curl_many(lab.topo, ext, f"http://{node_ip}:30080/", 20, timeout=3)
    assert FAILED not in spread and sum(spread.values()) == 20
    assert time.monotonic() - start < 10
