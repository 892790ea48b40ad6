"""NetworkPolicy with real connections: the upstream e2e matrix live. One
lab node with the nine pods of tests/unit/test_policy.py (namespaces x, y,
z; pods a, b, c; the same addresses), each serving HTTP on TCP 80 and 81
and a UDP echo on 80 and 81, and the agent reading one manifest: the
namespaces, the pods and the policy under test. For each matrix of the
unit tests (its policies and its expected cells) the manifest is
rewritten, the agent's sync awaited, and every source pod probes all nine
destinations at once over new connections (fresh source ports, so each is
judged by the policy now in force, as after a policy change in a cluster).
A probe that got its reply proves reachability; when an expected one did
not, the matrix is probed once more with more time (a busy machine), and a
cell is reachable if either probe got through.

A pod reaching itself goes through its own loopback, never its veth: the
diagonal is reachable, as the unit tests expect."""

from __future__ import annotations

import itertools
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.topology import NodeSpec, Pod, Topology, TopologySpec
from tests.conftest import require_root
from tests.packet.test_policy_kernel import MATRICES, Matrix, side_by_side
from tests.unit.test_policy import (
    MATRIX_IP,
    MATRIX_PODS,
    MATRIX_PORTS,
    namespace,
    parse_matrix,
    pod,
)

NODE = NodeSpec("node-1", "192.0.2.1", "10.244.0.0/24", pods=0)
TIMEOUT = 1.0  # per probe; a dropped SYN or datagram is "not reachable"
FIRST_SPORT = 20000
# Source ports per round: one per destination, never reused in a run.
PORTS_PER_ROUND = 16

# Every matrix of the unit tests: deny-all both ways, one pod, one namespace
# on one port, AND and OR peers, egress to one pod, ipBlocks with except
# (ingress and egress), named ports (ingress and egress, TCP and UDP),
# endPort ranges, policies adding up, ingress and egress both deciding.
SELECTED = MATRICES

# One process per source pod: a thread per destination, each on its own
# source port; prints one JSON list of reachable flags.
PROBE = r"""
import json, socket, sys, threading
proto, port, first, timeout, me = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), sys.argv[5]
dsts = sys.argv[6:]
reached = [False] * len(dsts)
def probe(i, dst):
    tcp = proto == "tcp"
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.bind((me, first + i))
        if tcp:
            s.connect((dst, port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            reached[i] = s.recv(4096).startswith(b"HTTP/1.1 200")
        else:
            s.sendto(b"probe", (dst, port))
            reached[i] = bool(s.recvfrom(4096)[0])
    except OSError:
        pass
    finally:
        s.close()
threads = [threading.Thread(target=probe, args=(i, d)) for i, d in enumerate(dsts)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(reached))
"""


def lab_name(key: str) -> str:
    return key.replace("/", "")


def cluster_docs(policies: tuple[dict[str, Any], ...] = ()) -> list[dict[str, Any]]:
    docs = [namespace(n) for n in "xyz"]
    for key in MATRIX_PODS:
        ns, name = key.split("/")
        docs.append(pod(ns, name, MATRIX_IP[key], NODE.name, ports=MATRIX_PORTS))
    return [*docs, *policies]


@dataclass
class PolicyLab:
    topo: Topology
    manifest: Path
    agent: LabAgent
    pods: dict[str, Pod]
    rounds: Iterator[int]

    def program(self, policies: tuple[dict[str, Any], ...]) -> None:
        mark = len(self.agent.lines)
        objects.write(self.manifest, cluster_docs(policies))
        line = self.agent.wait_for("synced", timeout=10, after=mark)
        assert line.endswith(" 0 refused"), line

    def measure(self, proto: str, port: int,
                timeout: float = TIMEOUT) -> dict[tuple[str, str], bool]:
        first = FIRST_SPORT + next(self.rounds) * PORTS_PER_ROUND
        dsts = [MATRIX_IP[k] for k in MATRIX_PODS]

        def row(src: str) -> list[bool]:
            res = self.topo.exec(self.pods[src], [
                sys.executable, "-c", PROBE, proto.lower(), str(port), str(first),
                str(timeout), MATRIX_IP[src], *dsts], timeout=30)
            out: list[bool] = json.loads(res.stdout)
            return out

        with ThreadPoolExecutor(len(MATRIX_PODS)) as pool:
            rows = dict(zip(MATRIX_PODS, pool.map(row, MATRIX_PODS), strict=True))
        return {(s, d): rows[s][j] for s in MATRIX_PODS for j, d in enumerate(MATRIX_PODS)}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyLab]:
    require_root()
    manifest = tmp_path_factory.mktemp("policy") / "cluster.yaml"
    objects.write(manifest, cluster_docs())
    with Topology.build(TopologySpec(nodes=(NODE,))) as topo:
        pods = {key: topo.add_pod(name=lab_name(key), ip=MATRIX_IP[key])
                for key in MATRIX_PODS}
        for p in pods.values():
            topo.start_http(p, 80, 81)
            topo.start_udp(p, 80, 81)
        with LabAgent(topo, topo.node, [manifest]) as agent:
            yield PolicyLab(topo, manifest, agent, pods, itertools.count())


def test_without_policy_every_pod_reaches_every_pod(lab: PolicyLab) -> None:
    lab.program(())
    for proto, port in (("TCP", 80), ("UDP", 81)):
        measured = lab.measure(proto, port)
        assert all(measured.values()), side_by_side(dict.fromkeys(measured, True), measured)


@pytest.mark.parametrize("m", SELECTED, ids=lambda m: m.id)
def test_matrix_live(lab: PolicyLab, m: Matrix) -> None:
    lab.program(m.policies)
    start = time.monotonic()
    measured = lab.measure(m.proto, m.port)
    expected = parse_matrix(m.text)
    if any(expected[k] and not measured[k] for k in expected):
        # A reply that came is proof; one that did not may have been slow (a
        # busy machine): probe again, with new connections and more time.
        again = lab.measure(m.proto, m.port, timeout=3 * TIMEOUT)
        measured = {k: measured[k] or again[k] for k in measured}
    took = time.monotonic() - start
    wrong = [f"{s} -> {d}: expected {'.' if expected[(s, d)] else 'X'}"
             for (s, d) in expected if expected[(s, d)] != measured[(s, d)]]
    assert not wrong, (f"{m.id} ({m.test}), {m.proto}/{m.port}, measured in {took:.1f}s:\n"
                       f"{side_by_side(expected, measured)}\n" + "\n".join(wrong))
