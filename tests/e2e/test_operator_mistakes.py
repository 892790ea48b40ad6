"""Mistakes an operator makes with the agent, on a live lab node: each is
refused with one line naming the remedy, and the datapath keeps serving."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.clients import curl
from lab.topology import Topology, TopologySpec
from lb.agent.links import LinkWatcher
from lb.datapath.instance import pin_dir_of
from loader.build import BPFFS, BpffsMissing, require_bpffs
from tests.conftest import REPO, require_root

VIP = "10.96.0.10"
HTTP = objects.Port("http", 80, 8080, "TCP")


def lbctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Topology, LabAgent]]:
    require_root()
    with Topology.build(TopologySpec.single(pods=2)) as topo:
        client, backend = topo.pods
        topo.start_http(backend, 8080)
        manifest = tmp_path / "web.yaml"
        objects.write(manifest, [objects.service("web", VIP, [HTTP]),
                                 objects.endpoint_slice("web", [HTTP],
                                                        [(backend.ip, topo.node.name)])])
        with LabAgent(topo, topo.node, [manifest]) as agent:
            assert curl(topo, client, f"http://{VIP}/").split()[0] == backend.name
            yield topo, agent


def test_a_second_agent_on_one_instance_refuses_naming_the_first(
        served: tuple[Topology, LabAgent]) -> None:
    _topo, agent = served
    assert agent.proc is not None
    second = subprocess.run(agent.argv, capture_output=True, text=True, timeout=120,
                            check=False)
    assert second.returncode == 1, second.stderr
    assert f"instance {agent.instance} is in use by pid {agent.proc.pid}" in second.stderr
    assert "Traceback" not in second.stderr


def test_down_under_a_running_agent_refuses_and_the_service_stays(
        served: tuple[Topology, LabAgent]) -> None:
    topo, agent = served
    out = lbctl("down", "--instance", agent.instance)
    assert out.returncode == 1 and "stop it first" in out.stderr, out.stderr
    assert pin_dir_of(agent.instance).is_dir()
    client, backend = topo.pods
    assert curl(topo, client, f"http://{VIP}/").split()[0] == backend.name


def test_down_of_an_instance_that_is_not_there_says_so() -> None:
    require_root()
    name = f"lbtest-none-{uuid.uuid4().hex[:8]}"
    out = lbctl("down", "--instance", name)
    assert out.returncode == 0, out.stderr
    assert f"no instance {name}: nothing to remove" in out.stderr


def test_run_without_node_devices_is_refused() -> None:
    out = lbctl("run", "-f", str(REPO / "deploy" / "examples" / "tomcat.yaml"))
    assert out.returncode == 2
    assert "--iface: give the node-facing devices" in out.stderr


def test_a_veth_holding_the_node_address_is_never_a_pod_device() -> None:
    """The lab node's uplink is a veth, as a kind node's is: with the node's
    address known it is left out of the pod devices; without, it is not
    (what the agent did before it knew)."""
    require_root()
    with Topology.build(TopologySpec.single(pods=2)) as topo:
        seen: list[set[str]] = []
        LinkWatcher({"lo"}, seen.append, topo.node.ns, frozenset({topo.node.ip})).existing()
        LinkWatcher({"lo"}, seen.append, topo.node.ns).existing()
        pods = {p.host_veth for p in topo.pods}
        assert seen[0] == pods
        assert seen[1] == pods | {topo.node.iface}


def _refused_start(topo: Topology, tmp_path: Path, *extra: str, drop_iface: bool = False
                   ) -> subprocess.CompletedProcess[str]:
    manifest = tmp_path / "web.yaml"
    objects.write(manifest, [objects.service("web", VIP, [HTTP])])
    agent = LabAgent(topo, topo.node, [manifest], extra=extra)
    argv = list(agent.argv)
    if drop_iface:
        i = argv.index("--iface")
        del argv[i:i + 2]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        agent.down()


def test_a_busy_metrics_port_is_one_line_naming_the_remedy(tmp_path: Path) -> None:
    require_root()
    with Topology.build(TopologySpec.single(pods=1)) as topo, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _refused_start(topo, tmp_path, "--metrics-addr", f"127.0.0.1:{port}")
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"lbctl: run: --metrics-addr 127.0.0.1:{port}: Address already in use: choose a " \
           "free address" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_missing_node_device_is_one_line(tmp_path: Path) -> None:
    require_root()
    with Topology.build(TopologySpec.single(pods=1)) as topo:
        out = _refused_start(topo, tmp_path, "--iface", "nope0")
    assert out.returncode == 1, out.stderr[-2000:]
    assert f"--iface nope0: no such device in namespace {topo.node.ns}" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_bpffs_names_the_mount_to_make(tmp_path: Path) -> None:
    with pytest.raises(BpffsMissing, match=f"mount -t bpf bpf {tmp_path}"):
        require_bpffs(tmp_path)
    require_bpffs(BPFFS)  # this machine's: mounted by the setup
