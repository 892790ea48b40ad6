"""The seed's Canal pairing on the same two real nodes: flannel for the pod
network (flanneld leases each node its subnet and routes between them,
host-gw), this agent for Services and NetworkPolicy. The whole smoke
selection passes there too (`make conformance SELECTION=smoke CNI=flannel`,
in CONFORMANCE.md); on every landing a few of its tests that cross both
nodes are enough to prove the pairing."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conformance import SMOKE, run_e2e, skip_regex
from tests.cluster.test_real_nodes import SMOKE_TIMEOUT, UP_TIMEOUT, cluster, failures
from tests.conftest import require_root

# Pod to pod across the nodes (flannel's routes), a ClusterIP and a NodePort
# served by the agent, and a policy enforced by it.
FOCUS = "|".join((
    r"\[sig-network\] Networking Granular Checks: Pods should function for intra-pod "
    r"communication: http",
    r"\[sig-network\] Services should serve a basic endpoint from pods",
    r"\[sig-network\] Services should be able to create a functioning NodePort service",
    r"\[sig-network\] Netpol NetworkPolicy between server and client should support a "
    r"'default-deny-ingress' policy",
))


@pytest.fixture(scope="module")
def flannel_cluster() -> Iterator[None]:
    require_root()
    cluster("down", timeout=300)
    try:
        cluster("up", "--proxy", "xdplb", "--cni", "flannel", timeout=UP_TIMEOUT)
        yield
    finally:
        cluster("down", timeout=300)


def node_routes(node: str) -> str:
    return subprocess.run(["ip", "-n", node, "route", "show"], check=True,
                          capture_output=True, text=True).stdout


@pytest.mark.timeout(UP_TIMEOUT + SMOKE_TIMEOUT)
def test_sig_network_on_flannel(flannel_cluster: None, tmp_path: Path) -> None:
    # The routes between the pod subnets are flanneld's (cluster.sh adds
    # none with --cni flannel).
    assert "10.244.2.0/24 via 198.18.0.12 dev eth0" in node_routes("xk-n1")
    assert "10.244.1.0/24 via 198.18.0.11 dev eth0" in node_routes("xk-n2")
    results = run_e2e(tmp_path / "xdplb-flannel", FOCUS, skip_regex(SMOKE),
                      timeout=SMOKE_TIMEOUT)
    ran = [r for r in results if r.status != "skipped"]
    assert len(ran) == 4, [r.name for r in results]
    assert not failures(results), failures(results)
