"""Soak: minutes of endpoint churn and agent restarts under load, nothing lost.

Two wrk clients run through a ClusterIP for the whole soak: one with
keep-alive connections, one opening a new connection per request. Meanwhile
the service's two endpoints are replaced one at a time over and over, as a
Deployment's rolling update does (the new pod ready, the old one terminating
and its server drained by SIGTERM, then gone, its server started afresh as
the next spare). In the first half the agent is restarted over its pinned
maps every few steps; the second half runs one agent throughout, its RSS
sampled at every step, so a leak shows as growth. Every request must
succeed.

Not collected by `make test` (its file name); `make soak` runs it.
LB_SOAK_SECONDS (default 300) sets its length, LB_SOAK_STEP (default 4) the
seconds between two replacements.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agent import LabAgent
from lab.topology import Pod, Topology, TopologySpec
from tests.conftest import require_root
from tests.e2e.test_restart import VIP, write, wrk_result

SECONDS = int(os.environ.get("LB_SOAK_SECONDS", "300"))
STEP = float(os.environ.get("LB_SOAK_STEP", "4"))
RESTART_EVERY = 5  # replacements between two agent restarts


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wrk(topo: Topology, client: Pod, seconds: int, *extra: str) -> subprocess.Popen[bytes]:
    return topo.spawn(client, ["wrk", "-t1", "-c8", f"-d{seconds}s", "--timeout", "2s",
                               *extra, f"http://{VIP}/"], stdout=subprocess.PIPE)


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_root()
    with Topology.build(TopologySpec.single(pods=5)) as t:
        yield t


@pytest.mark.timeout(SECONDS + 180)
def test_churn_and_restarts_under_load_lose_nothing(topo: Topology, tmp_path: Path) -> None:
    client, *pods = topo.pods
    http = {p.name: topo.start_http(p, 8080, workers=2) for p in pods}
    for p in pods:
        topo.start_tcp_echo(p, 7007, greet=True)
    manifest = tmp_path / "web.yaml"
    serving, spares = pods[:2], pods[2:]
    write(manifest, serving)
    agent = LabAgent(topo, topo.node, [manifest]).start()
    rss: list[int] = []  # the last agent's, at each step
    steps = restarts = 0
    try:
        keepalive = wrk(topo, client, SECONDS + 5)
        fresh = wrk(topo, client, SECONDS + 5, "-H", "Connection: close")
        deadline = time.monotonic() + SECONDS
        restarts_end = deadline - SECONDS / 2
        while time.monotonic() < deadline - 2 * STEP:
            old, new = serving[0], spares[0]
            mark = len(agent.lines)
            write(manifest, [*serving, new], terminating=(old.ip,))
            agent.wait_for("synced", after=mark)
            os.killpg(http[old.name].pid, signal.SIGTERM)  # it drains, then exits
            http[old.name].wait(timeout=15)
            serving = [*serving[1:], new]
            mark = len(agent.lines)
            write(manifest, serving)
            agent.wait_for("synced", after=mark)
            http[old.name] = topo.start_http(old, 8080, workers=2)
            spares = [*spares[1:], old]
            steps += 1
            if steps % RESTART_EVERY == 0 and time.monotonic() < restarts_end:
                assert agent.stop() == 0
                agent = LabAgent(topo, topo.node, [manifest], instance=agent.instance).start()
                restarts += 1
                rss.clear()
            assert agent.proc is not None
            rss.append(rss_kib(agent.proc.pid))
            time.sleep(STEP)
        kept = wrk_result(keepalive)
        opened = wrk_result(fresh)
    finally:
        agent.down()
    print(f"\nsoak {SECONDS} s: {steps} endpoint replacements, {restarts} agent restarts; "
          f"keep-alive {kept[0]} requests, {kept[1]} failed; new connection per request "
          f"{opened[0]} requests, {opened[1]} failed; the last agent's RSS over "
          f"{len(rss)} steps: {rss[0] / 1024:.1f} MiB first, {max(rss) / 1024:.1f} MiB "
          f"peak, {rss[-1] / 1024:.1f} MiB last")
    assert steps >= 2 and (restarts >= 1 or SECONDS < 60)
    assert kept[0] > 100 and kept[1] == 0, kept[2]
    assert opened[0] > 100 and opened[1] == 0, opened[2]
