"""The namespace lab itself: wiring, reachability, source IPs, cleanup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from lab.clients import curl, curl_many, udp_many, udp_request
from lab.topology import (
    WIRINGS,
    LabError,
    NodeSpec,
    Topology,
    TopologySpec,
    Wiring,
    list_namespaces,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

@pytest.fixture(params=WIRINGS)
def wiring(request: pytest.FixtureRequest) -> Wiring:
    value: Wiring = request.param
    return value


def _gone(namespaces: list[str]) -> None:
    assert namespaces
    assert not set(namespaces) & set(list_namespaces())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _json(topo: Topology, ns: str, argv: list[str]) -> Any:
    return json.loads(topo.exec(ns, ["ip", "-j", *argv]).stdout)


def test_pod_to_pod_http_sees_client_pod_ip(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.single(pods=3, wiring=wiring)) as topo:
        client, server, other = topo.pods
        topo.start_http(server, 80)
        topo.start_http(other, 8080, 8081, name="other")
        assert curl(topo, client, f"http://{server.ip}/") == f"{server.name} {client.ip}\n"
        assert curl(topo, server, f"http://{other.ip}:8081/") == f"other {server.ip}\n"
        headers = curl(topo, client, f"http://{server.ip}/", extra=("-D", "-"))
        assert f"X-Backend: {server.name}" in headers
        assert f"X-Client: {client.ip}:" in headers

        start = time.monotonic()
        counts = curl_many(topo, client, f"http://{server.ip}/", 100)
        elapsed = time.monotonic() - start
        assert counts == Counter({server.name: 100})
        assert elapsed < 5, f"100 requests took {elapsed:.2f}s"
        namespaces = topo.namespaces
    _gone(namespaces)


def test_pod_wiring(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.single(pods=2, wiring=wiring)) as topo:
        node = topo.node
        for pod in topo.pods:
            assert pod.node is node
            neigh = _json(topo, pod.ns, ["neigh", "show", "dev", "eth0", pod.gateway])
            assert neigh[0]["lladdr"] == pod.gateway_mac
            assert "PERMANENT" in neigh[0]["state"]
            routes = _json(topo, pod.ns, ["route", "show", "default"])
            assert routes[0]["gateway"] == pod.gateway
            link = _json(topo, node.ns, ["link", "show", "dev", pod.host_veth])[0]
            assert link["address"] == pod.host_mac
            if wiring == "bridge":
                assert link["master"] == "cni0"
                assert pod.gateway == "10.244.1.1"
                assert pod.gateway_mac == node.bridge_mac
            else:
                assert pod.gateway == "169.254.1.1"
                assert pod.gateway_mac == pod.host_mac
                route = _json(topo, node.ns, ["route", "show", f"{pod.ip}/32"])
                assert route[0]["dev"] == pod.host_veth
        # rp_filter off everywhere in the node, forwarding on.
        sysctl = topo.exec(node, ["sysctl", "-a", "--pattern", r"rp_filter|ip_forward$"]).stdout
        values = dict(line.split(" = ") for line in sysctl.splitlines())
        assert values["net.ipv4.ip_forward"] == "1"
        rp = {k: v for k, v in values.items() if k.endswith(".rp_filter")}
        for dev in ["all", "default", "eth0", *(p.host_veth for p in topo.pods)]:
            assert rp[f"net.ipv4.conf.{dev}.rp_filter"] == "0"
        assert set(rp.values()) == {"0"}
        # Frames into the node's device carry full checksums.
        features = topo.exec(topo.external, ["ethtool", "-k", "eth0"]).stdout
        assert "tx-checksumming: off" in features


def test_external_reaches_node_and_lb_range(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.single(pods=1, wiring=wiring)) as topo:
        ext = topo.external
        topo.start_http(topo.node, 8080)
        assert curl(topo, ext, f"http://{topo.node_ip}:8080/") == f"node {ext.ip}\n"
        route = _json(topo, ext.ns, ["route", "get", "203.0.113.7"])
        assert route[0]["gateway"] == topo.node_ip
        back = _json(topo, topo.node.ns, ["route", "get", ext.ip])
        assert back[0]["dev"] == "eth0"


def test_configurable_node_ip() -> None:
    with Topology.build(TopologySpec.single(pods=1, node_ip="192.0.2.50")) as topo:
        assert topo.node_ip == "192.0.2.50"
        topo.start_http(topo.node, 80)
        assert curl(topo, topo.external, "http://192.0.2.50/") == f"node {topo.external.ip}\n"


def test_udp_pod_to_pod(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.single(pods=2, wiring=wiring)) as topo:
        client, server = topo.pods
        topo.start_udp(server, 5353)
        assert udp_request(topo, client, server.ip, 5353) == f"{server.name} {client.ip}\n"
        assert udp_many(topo, client, server.ip, 5353, 20) == Counter({server.name: 20})
        with pytest.raises(LabError):
            udp_request(topo, client, server.ip, 5354, timeout=0.3)


def test_tcp_echo_long_lived(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.single(pods=2, wiring=wiring)) as topo:
        client, server = topo.pods
        topo.start_tcp_echo(server, 7000, greet=True)
        script = (
            "import socket,sys,time\n"
            "s=socket.create_connection((sys.argv[1],7000),timeout=5)\n"
            "f=s.makefile('rwb')\n"
            "print(f.readline().decode().strip())\n"
            "for i in range(3):\n"
            "    f.write(b'msg%d\\n'%i); f.flush(); print(f.readline().decode().strip())\n"
            "    time.sleep(0.1)\n")
        out = topo.exec(client, [sys.executable, "-c", script, server.ip]).stdout
        assert out.splitlines() == [f"{server.name} {client.ip}", "msg0", "msg1", "msg2"]


def test_two_nodes(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.two_nodes(pods_per_node=2, wiring=wiring)) as topo:
        node_a, node_b = topo.nodes
        assert topo.node is node_a
        assert node_a.ifaces == ["eth0", "eth1"] and node_b.ifaces == ["eth0"]
        on_a = [p for p in topo.pods if p.node is node_a]
        on_b = [p for p in topo.pods if p.node is node_b]
        assert len(on_a) == len(on_b) == 2
        assert all(p.ip.startswith("10.244.1.") for p in on_a)
        assert all(p.ip.startswith("10.244.2.") for p in on_b)
        topo.start_http(on_b[0], 80)
        topo.start_http(on_a[1], 80)
        # Across the inter-node link, both ways, with the client's own pod IP.
        assert curl(topo, on_a[0], f"http://{on_b[0].ip}/") == f"{on_b[0].name} {on_a[0].ip}\n"
        assert curl(topo, on_b[1], f"http://{on_a[1].ip}/") == f"{on_a[1].name} {on_b[1].ip}\n"
        # The outside client reaches node B through node A.
        topo.start_http(node_b, 8080)
        assert curl(topo, topo.external, "http://192.0.2.2:8080/") == \
            f"node-b {topo.external.ip}\n"
        namespaces = topo.namespaces
    _gone(namespaces)


def test_add_and_remove_pod(wiring: Wiring) -> None:
    with Topology.build(TopologySpec.single(pods=1, wiring=wiring)) as topo:
        (client,) = topo.pods
        pod = topo.add_pod(name="late")
        assert pod.ns in topo.namespaces and pod in topo.pods
        server = topo.start_http(pod, 80)
        assert curl(topo, client, f"http://{pod.ip}/") == f"late {client.ip}\n"
        topo.remove_pod(pod)
        assert not _alive(server.pid)
        assert pod not in topo.pods and pod not in topo.node.pods
        _gone([pod.ns])
        links = [link["ifname"] for link in _json(topo, topo.node.ns, ["link", "show"])]
        assert pod.host_veth not in links
        for taken in (client.name, "node", "external"):
            with pytest.raises(ValueError):
                topo.add_pod(name=taken)
        again = topo.add_pod()
        assert again.ip != pod.ip
        topo.start_http(again, 80)
        assert curl(topo, client, f"http://{again.ip}/") == f"{again.name} {client.ip}\n"


def test_cleanup_on_exception_kills_processes() -> None:
    pids: list[int] = []
    namespaces: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), \
            Topology.build(TopologySpec.single(pods=1)) as topo:
        namespaces = topo.namespaces
        pids.append(topo.start_http(topo.pods[0], 80, workers=2).pid)
        pids.append(topo.spawn(topo.node, ["sleep", "300"]).pid)
        raise RuntimeError("boom")
    _gone(namespaces)
    assert not any(_alive(pid) for pid in pids)


def test_cleanup_when_build_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    real_add_pod = Topology.add_pod
    created: list[str] = []

    def failing_add_pod(self: Topology, *args: Any, **kw: Any) -> Any:
        created.extend(self.namespaces)
        if len(self.pods) == 1:
            raise LabError("injected failure")
        return real_add_pod(self, *args, **kw)

    monkeypatch.setattr(Topology, "add_pod", failing_add_pod)
    with pytest.raises(LabError, match="injected"):
        Topology.build(TopologySpec.two_nodes())
    _gone(created)


@pytest.mark.parametrize("make", [
    lambda: TopologySpec.single(wiring="nope"),  # type: ignore[arg-type]
    lambda: TopologySpec.single(node_ip="10.244.1.5"),
    lambda: TopologySpec.single(node_ip="198.51.100.10"),
    lambda: TopologySpec(nodes=(NodeSpec("a"), NodeSpec("a", ip="192.0.2.2"))),
    lambda: TopologySpec(nodes=(NodeSpec("a"), NodeSpec("b", pod_cidr="10.244.1.128/25"))),
    lambda: TopologySpec(nodes=(NodeSpec("Bad_Name"),)),
    lambda: TopologySpec(nodes=(NodeSpec("external"),)),
])
def test_invalid_spec_rejected(make: Callable[[], TopologySpec]) -> None:
    with pytest.raises(ValueError):
        make()


def test_root_namespace_untouched() -> None:
    def snapshot() -> list[str]:
        return [subprocess.run(["ip", *argv], capture_output=True, text=True, check=True).stdout
                for argv in (["-br", "link"], ["-4", "-br", "addr"], ["route"], ["neigh"])]

    before = snapshot()
    with Topology.build(TopologySpec.two_nodes(wiring="bridge")) as topo:
        topo.add_pod()
        during = snapshot()
    assert during == before
