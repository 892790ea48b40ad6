"""Host-network clients reach ClusterIPs through the connect-time socket
hooks, attached to a cgroup this test creates; they act only inside the
node's network namespace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import objects
from lab.topology import Topology, TopologySpec
from lb.datapath import socklb
from lb.datapath.instance import SMALL, reconciler_for
from lb.model import Node
from lb.service import desired
from lb.sources.manifests import build_cluster
from loader.build import BuildOptions, Datapath, remove_pins
from tests.conftest import new_pin_dir, require_root

VIP = "10.96.0.10"
HTTP = objects.Port("http", 80, 8080)
DNS = objects.Port("dns", 53, 5353, "UDP")

CLIENT = r"""
import socket, sys
vip = sys.argv[1]
names = []
for _ in range(20):
    s = socket.create_connection((vip, 80), timeout=2)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    names.append(data.split(b"\r\n\r\n", 1)[1].split()[0].decode())
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.sendto(b"x", (vip, 53))
reply, peer = u.recvfrom(100)
print(" ".join(sorted(set(names))), reply.split()[0].decode(), f"{peer[0]}:{peer[1]}")
"""


def in_cgroup(cgroup: Path, argv: list[str]) -> list[str]:
    # The shell joins the cgroup, then becomes the client: same pid.
    return ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *argv]


@pytest.fixture
def cgroup() -> Iterator[Path]:
    require_root()
    path = socklb.cgroup2_root() / f"lbtest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


def test_host_network_client_reaches_clusterip_through_socket_hooks(cgroup: Path) -> None:
    pin_dir = new_pin_dir("socklb")
    try:
        with Topology.build(TopologySpec.single(pods=2)) as topo, \
                Datapath(BuildOptions(pin_dir, SMALL)) as dp:
            for pod in topo.pods:
                topo.start_http(pod, 8080)
                topo.start_udp(pod, 5353)
            docs = [objects.service("web", VIP, [HTTP, DNS]),
                    objects.endpoint_slice("web", [HTTP, DNS],
                                           [(p.ip, "node") for p in topo.pods])]
            node = Node(name="node", ips=(topo.node_ip,),
                        netns_cookie=socklb.netns_cookie(topo.node.ns))
            cluster = build_cluster((d, "t") for d in docs).cluster
            assert not reconciler_for(dp).sync(desired.compute(cluster, node)).errors
            socklb.attach(dp, cgroup)
            try:
                argv = ["ip", "netns", "exec", topo.node.ns, sys.executable, "-c", CLIENT, VIP]
                out = subprocess.run(in_cgroup(cgroup, argv), capture_output=True, text=True,
                                     timeout=60)
                assert out.returncode == 0, out.stderr
                tcp_names, udp_name, peer = out.stdout.split()[:-2], *out.stdout.split()[-2:]
                assert set(tcp_names) == {p.name for p in topo.pods}
                assert udp_name in {p.name for p in topo.pods}
                assert peer == f"{VIP}:53", "recvmsg shows the service, not the backend"
                # The same cgroup in another namespace: not translated.
                probe = (f"import socket\ntry:\n socket.create_connection(('{VIP}',80),"
                         "timeout=1)\n print('connected')\nexcept OSError: print('untouched')")
                argv = ["ip", "netns", "exec", topo.external.ns, sys.executable, "-c", probe]
                out = subprocess.run(in_cgroup(cgroup, argv), capture_output=True, text=True,
                                     timeout=30)
                assert out.stdout.strip() == "untouched"
            finally:
                socklb.detach(dp, cgroup)
    finally:
        remove_pins(pin_dir)


def hooks_on(cgroup: Path) -> dict[int, str]:
    """The socket hooks attached to `cgroup`: program id -> name."""
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)],
                           capture_output=True, text=True, check=True).stdout
    return {e["id"]: e["name"] for e in json.loads(shown or "[]")
            if e.get("name", "").startswith("sock_")}


def test_agent_attaches_socket_hooks_and_down_removes_them(cgroup: Path, tmp_path: Path) -> None:
    from lab.agent import LabAgent

    with Topology.build(TopologySpec.single(pods=2)) as topo:
        for pod in topo.pods:
            topo.start_http(pod, 8080)
            topo.start_udp(pod, 5353)
        manifest = tmp_path / "web.yaml"
        objects.write(manifest, [objects.service("web", VIP, [HTTP, DNS]),
                                 objects.endpoint_slice("web", [HTTP, DNS],
                                                        [(p.ip, "node") for p in topo.pods])])
        agent = LabAgent(topo, topo.node, [manifest], extra=("--cgroup", str(cgroup))).start()
        try:
            agent.wait_for("socket hooks")
            # A restarted agent replaces the hooks its predecessor left
            # attached (they outlive it), instead of stacking a second set.
            agent.stop()
            assert len(hooks_on(cgroup)) == 3
            agent = LabAgent(topo, topo.node, [manifest], extra=("--cgroup", str(cgroup)),
                             instance=agent.instance).start()
            agent.wait_for("socket hooks")
            attached = hooks_on(cgroup)
            assert sorted(attached.values()) == ["sock_connect4", "sock_recvmsg4",
                                                 "sock_sendmsg4"], attached
            argv = ["ip", "netns", "exec", topo.node.ns, sys.executable, "-c", CLIENT, VIP]
            out = subprocess.run(in_cgroup(cgroup, argv), capture_output=True, text=True,
                                 timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout.split()[-1] == f"{VIP}:53"
        finally:
            # Another instance's programs of the same names are loaded too (a
            # second node on the machine): down removes what it attached.
            other = new_pin_dir("socklb-other")
            try:
                with Datapath(BuildOptions(other, SMALL)):
                    agent.down()
            finally:
                remove_pins(other)
        shown = subprocess.run(["bpftool", "cgroup", "show", str(cgroup)], capture_output=True,
                               text=True, check=True).stdout
        assert "sock_" not in shown, shown


CONNECTED_UDP = r"""
import errno, os, socket, sys, time
vip, go = sys.argv[1], sys.argv[2]

def ask(u):
    u.send(b"x")
    return u.recv(100).split()[0].decode()

u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(2)
u.connect((vip, 53))
print("first", ask(u), flush=True)
while not os.path.exists(go):
    time.sleep(0.05)
try:
    print("second", ask(u), flush=True)
except OSError as e:
    # Destroyed: disconnected, with ECONNABORTED pending. A send finds no
    # peer (EDESTADDRREQ); a recv gets the pending error.
    gone = e.errno in (errno.ECONNABORTED, errno.EDESTADDRREQ)
    print("aborted" if gone else f"error {e}", flush=True)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.settimeout(2)
    u.connect((vip, 53))
    print("second", ask(u), flush=True)
"""


def test_a_connected_udp_client_moves_on_when_its_backend_goes(cgroup: Path,
                                                               tmp_path: Path) -> None:
    """The backend a connected UDP socket was given at connect time leaves
    the service (its pod still answers): the agent destroys the socket, the
    client's next call fails, it connects again and reaches the backend left.
    Without that it would go on talking to the removed pod."""
    from lab.agent import LabAgent

    with Topology.build(TopologySpec.single(pods=2)) as topo:
        for pod in topo.pods:
            topo.start_udp(pod, 5353)
        manifest = tmp_path / "dns.yaml"

        def program(pods: list[Any]) -> None:
            objects.write(manifest, [objects.service("dns", VIP, [DNS]),
                                     objects.endpoint_slice("dns", [DNS],
                                                            [(p.ip, "node") for p in pods])])

        program(topo.pods)
        go = tmp_path / "go"
        with LabAgent(topo, topo.node, [manifest], extra=("--cgroup", str(cgroup))) as agent:
            agent.wait_for("socket hooks")
            argv = ["ip", "netns", "exec", topo.node.ns, sys.executable, "-c", CONNECTED_UDP,
                    VIP, str(go)]
            client = subprocess.Popen(in_cgroup(cgroup, argv), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
            try:
                assert client.stdout is not None
                first = client.stdout.readline().split()
                assert first[0] == "first", (first, client.stderr)
                gone = next(p for p in topo.pods if p.name == first[1])
                mark = len(agent.lines)
                program([p for p in topo.pods if p is not gone])
                agent.wait_for("closed 1 connected UDP sockets of gone backends", after=mark)
                go.touch()
                out, err = client.communicate(timeout=30)
                assert out.split() == ["aborted", "second",
                                       next(p.name for p in topo.pods if p is not gone)], err
            finally:
                client.kill()
                client.wait()
