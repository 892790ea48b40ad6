"""`make demo`: the Kubernetes networking tutorial's Tomcat example, served by
the eBPF datapath inside network namespaces on this machine."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from lab.agent import LabAgent, object_cache_kept_as_found
from lab.clients import FAILED, curl_many
from lab.ingress import NGINX_PORT, host_network_nginx
from lab.topology import NodeSpec, Topology, TopologySpec
from lb.datapath import socklb
from lb.datapath.instance import pin_dir_of
from loader import layout
from loader.maps import BpfMap

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "examples" / "tomcat.yaml"
CLUSTER_IP = "10.97.222.179"
NODE_IP = "192.0.2.1"
NODE_PORT = 30080
INGRESS_HOST = "k8s.test.com"  # deploy/examples/ingress.yaml
REQUESTS = 100


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def bars(spread: Counter[str]) -> None:
    total = sum(spread.values()) or 1
    for name, n in sorted(spread.items()):
        print(f"    {name:<14} {'#' * round(40 * n / total):<40} {n}")


@contextlib.contextmanager
def demo_cgroup() -> Iterator[Path]:
    """A cgroup for the socket hooks and the node's host-network processes."""
    path = socklb.cgroup2_root() / f"lbdemo-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(50):  # its processes may take a moment to be gone
            with contextlib.suppress(OSError):
                path.rmdir()
                break
            time.sleep(0.1)


def translated(instance: str) -> int:
    """New flows the tc and XDP programs have translated: the last packets of
    earlier connections (closing ACKs, retransmits) are no new flow."""
    with BpfMap.open_pinned(pin_dir_of(instance), "lb_stats") as m:
        return sum(c.packets for c in m.lookup(layout.const("LB_STAT_DNAT_NEW")) or ())


def settled(instance: str) -> int:
    """translated(), once the earlier requests' connections have gone quiet:
    unchanged over 0.2 s, or after 3 s."""
    now = translated(instance)
    for _ in range(15):
        time.sleep(0.2)
        now, before = translated(instance), now
        if now == before:
            break
    return now


def through_nginx(topo: Topology, agent: LabAgent, cgroup: Path) -> Counter[str]:
    say(f"nginx (Debian's) on the node's host network, port {NGINX_PORT}: the Ingress "
        f"controller of deploy/examples/ingress.yaml, proxying / to the ClusterIP "
        f"{CLUSTER_IP}:8080. A host-network process has no veth of its own, so the cgroup "
        "socket hook connect4 gives each of nginx's connect() calls a tomcat pod's address; "
        f"{REQUESTS} requests from outside to {NODE_IP}:{NGINX_PORT}:")
    with host_network_nginx(topo, topo.node, cgroup, f"{CLUSTER_IP}:8080", INGRESS_HOST):
        before = settled(agent.instance)
        spread = curl_many(topo, topo.external, f"http://{NODE_IP}:{NGINX_PORT}/", REQUESTS)
        bars(spread)
        print(f"    new flows the tc and XDP programs translated meanwhile: "
              f"{translated(agent.instance) - before} (the socket hook did the work)")
    return spread


def main() -> int:
    start = time.monotonic()
    say("Building a node (a network namespace) with a client pod and the two tomcat-app "
        "pods of deploy/examples/tomcat.yaml, plus an 'external' namespace outside the node.")
    spec = TopologySpec(nodes=(NodeSpec("kubernetes-node-01", NODE_IP, "10.244.1.0/24", 0),))
    with Topology.build(spec) as topo:
        client = topo.add_pod(name="client", ip="10.244.1.5")
        pods = [topo.add_pod(name=f"tomcat-app-{i}", ip=ip)
                for i, ip in enumerate(("10.244.1.10", "10.244.1.11"), 1)]
        for pod in pods:
            topo.start_http(pod, 8080)
        print(topo.summary())

        say("Starting the agent (`lbctl run`): it compiles the BPF programs, fills the maps "
            "from the manifest, attaches XDP to the node's device, tc to each pod's veth and "
            "the socket hooks to the node's cgroup.")
        with object_cache_kept_as_found(), demo_cgroup() as cgroup, \
                LabAgent(topo, topo.node, [MANIFEST], instance="lbdemo",
                         extra=("--cgroup", str(cgroup))) as agent:
            for line in agent.lines:
                print("    " + line.split(" ", 3)[-1])

            say(f"{REQUESTS} requests from the client pod to the ClusterIP "
                f"{CLUSTER_IP}:8080 (tc program on the client's veth, DNAT to a pod):")
            spread = curl_many(topo, client, f"http://{CLUSTER_IP}:8080/", REQUESTS)
            bars(spread)

            say(f"{REQUESTS} requests from outside to the NodePort {NODE_IP}:{NODE_PORT} "
                "(XDP program on the node's device):")
            outside = curl_many(topo, topo.external, f"http://{NODE_IP}:{NODE_PORT}/", REQUESTS)
            bars(outside)

            ingress = through_nginx(topo, agent, cgroup)

            say("What the datapath holds, read from the pinned maps by a second process "
                "(`lbctl maps services`):")
            subprocess.run([sys.executable, "-m", "lb.cli", "maps", "services", "--instance",
                            agent.instance], check=True)
            subprocess.run([sys.executable, "-m", "lb.cli", "maps", "stats", "--instance",
                            agent.instance], check=True)
        say("Cleaning up: nginx and the agent stopped, programs, pins, the kept programs "
            "and the cgroup removed, namespaces deleted.")
    ok = all(FAILED not in s and len(s) == 2 for s in (spread, outside, ingress))
    print(f"\ndemo {'finished' if ok else 'FAILED'} in {time.monotonic() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
