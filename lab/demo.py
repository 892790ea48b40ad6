"""`make demo`: the Kubernetes networking tutorial's Tomcat example, served by
the eBPF datapath inside network namespaces on this machine."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from lab.agent import LabAgent
from lab.clients import FAILED, curl_many
from lab.topology import NodeSpec, Topology, TopologySpec

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "examples" / "tomcat.yaml"
CLUSTER_IP = "10.97.222.179"
NODE_IP = "192.0.2.1"
NODE_PORT = 30080
REQUESTS = 100


def say(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def bars(spread: Counter[str]) -> None:
    total = sum(spread.values()) or 1
    for name, n in sorted(spread.items()):
        print(f"    {name:<14} {'#' * round(40 * n / total):<40} {n}")


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
            "from the manifest, attaches XDP to the node's device and tc to each pod's veth.")
        with LabAgent(topo, topo.node, [MANIFEST], instance="lbdemo") as agent:
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

            say("What the datapath holds, read from the pinned maps by a second process "
                "(`lbctl maps services`):")
            subprocess.run([sys.executable, "-m", "lb.cli", "maps", "services", "--instance",
                            agent.instance], check=True)
            subprocess.run([sys.executable, "-m", "lb.cli", "maps", "stats", "--instance",
                            agent.instance], check=True)
        say("Cleaning up: agent stopped, programs and pins removed, namespaces deleted.")
    ok = FAILED not in spread and FAILED not in outside and len(spread) == len(outside) == 2
    print(f"\ndemo {'finished' if ok else 'FAILED'} in {time.monotonic() - start:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
