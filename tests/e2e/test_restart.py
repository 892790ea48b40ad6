"""Restarts lose nothing: with wrk running through a ClusterIP and a
long-lived connection open, the agent is stopped and started again over
the same pinned maps (the programs stay attached in between), and separately
during a rolling replacement of the endpoints."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab import objects
from lab.agent import LabAgent
from lab.topology import Pod, Topology, TopologySpec
from tests.conftest import require_root

VIP = "10.96.0.10"
HTTP = objects.Port("http", 80, 8080)
ECHO = objects.Port("echo", 7, 7007)

LONG_CLIENT = r"""
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], 7), timeout=5)
f = s.makefile("rb")
f.readline()
print("open", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
s.sendall(b"after\n")
print(f.readline().decode().strip(), flush=True)
"""


def write(manifest: Path, pods: list[Pod], terminating: tuple[str, ...] = ()) -> None:
    objects.write(manifest, [
        objects.service("web", VIP, [HTTP, ECHO]),
        objects.endpoint_slice("web", [HTTP, ECHO], [(p.ip, p.node.name) for p in pods],
                               terminating=terminating)])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Topology, Path, dict[str, subprocess.Popen[bytes]]]]:
    require_root()
    with Topology.build(TopologySpec.single(pods=5)) as topo:
        http = {}
        for pod in topo.pods[1:]:
            http[pod.name] = topo.start_http(pod, 8080, workers=2)
            topo.start_tcp_echo(pod, 7007, greet=True)
        manifest = tmp_path / "web.yaml"
        write(manifest, topo.pods[1:3])
        yield topo, manifest, http


def wrk(topo: Topology, client: Pod, seconds: int) -> subprocess.Popen[bytes]:
    return topo.spawn(client, ["wrk", "-t1", "-c8", f"-d{seconds}s", "--timeout", "2s",
                               f"http://{VIP}/"], stdout=subprocess.PIPE)


def wrk_result(proc: subprocess.Popen[bytes]) -> tuple[int, int, str]:
    """(requests, failures: socket errors of any kind and non-2xx answers,
    wrk's report)."""
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.wait(timeout=30)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    failures = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                      out):
        failures += sum(int(x) for x in m.groups())
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        failures += int(m.group(1))
    return requests, failures, out


Lab = tuple[Topology, Path, dict[str, subprocess.Popen[bytes]]]


@pytest.mark.parametrize("upgrade", [(), ("--conntrack-tcp-timeout-syn", "30")],
                         ids=["restart", "changed-program"])
def test_agent_restart_under_load_loses_nothing(lab: Lab, upgrade: tuple[str, ...]) -> None:
    """The second agent loads the same program, or (an upgrade) a changed
    one, over the same pinned maps; the layout version is checked."""
    topo, manifest, _ = lab
    client = topo.pods[0]
    agent = LabAgent(topo, topo.node, [manifest]).start()
    go = Path(f"/tmp/lb-restart-go-{agent.instance}")
    try:
        long = topo.spawn(client, [sys.executable, "-c", LONG_CLIENT, VIP, str(go)],
                          stdout=subprocess.PIPE)
        assert long.stdout is not None and long.stdout.readline().strip() == b"open"
        load = wrk(topo, client, 8)
        time.sleep(2)
        assert agent.stop() == 0
        time.sleep(1)  # no agent at all: the programs keep forwarding
        agent = LabAgent(topo, topo.node, [manifest], instance=agent.instance,
                         extra=upgrade).start()
        assert any("held" in line and "held 0 " not in line for line in agent.lines), \
            "the new agent adopted the pinned maps"
        requests, failures, report = wrk_result(load)
        assert requests > 100 and failures == 0, report
        go.touch()
        assert long.stdout.readline().decode().strip() == "after", "the long connection lives"
    finally:
        go.unlink(missing_ok=True)
        agent.down()


def test_rolling_update_under_load_loses_nothing(lab: Lab) -> None:
    topo, manifest, http = lab
    client, b1, b2, b3, b4 = topo.pods
    with LabAgent(topo, topo.node, [manifest]) as agent:
        load = wrk(topo, client, 8)
        time.sleep(1)
        # Replace b1, b2 by b3, b4 one at a time, as a Deployment does: the
        # new pod ready, the old one terminating (no new connections reach
        # it; it is told to stop and closes its keep-alive connections as it
        # answers them), then gone.
        current = [b1, b2]
        for old, new in ((b1, b3), (b2, b4)):
            mark = len(agent.lines)
            write(manifest, [*current, new], terminating=(old.ip,))
            agent.wait_for("synced", after=mark)
            os.killpg(http[old.name].pid, signal.SIGTERM)  # the server and its workers
            http[old.name].wait(timeout=10)
            current = [p for p in current if p is not old] + [new]
            mark = len(agent.lines)
            write(manifest, current)
            agent.wait_for("synced", after=mark)
            time.sleep(1)
        requests, failures, report = wrk_result(load)
        assert requests > 100 and failures == 0, report
