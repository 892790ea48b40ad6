"""The real path: two real nodes (containerd, kubelet, the bridge CNI) with the
agent deployed by the DaemonSet of deploy/ and kube-proxy absent, judged by
Kubernetes' own e2e tests. Then the negative control: with no proxy at all,
the upstream NodePort test fails, so these tests do exercise the data plane."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.conformance import CLUSTER, NODEPORT_TEST, SMOKE, Result, run_e2e, skip_regex
from tests.conftest import require_root

# A cold machine builds Kubernetes (about 12 minutes on two cores) and the
# images (about 4) before the nodes come up.
UP_TIMEOUT = 3000
# The Services conformance tests take about 3 minutes, the Netpol ones 2 each.
SMOKE_TIMEOUT = 1500


def cluster(*args: str, timeout: float) -> None:
    proc = subprocess.run(["bash", str(CLUSTER), *args], timeout=timeout, check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"cluster.sh {' '.join(args)} failed:\n{proc.stderr[-4000:]}"


@pytest.fixture(scope="module")
def real_cluster() -> Iterator[None]:
    require_root()
    # A cluster left by a killed run is removed first.
    cluster("down", timeout=300)
    try:
        cluster("up", "--proxy", "xdplb", timeout=UP_TIMEOUT)
        yield
    finally:
        cluster("down", timeout=300)


def failures(results: list[Result]) -> str:
    return "\n".join(f"{r.name}: {r.message[:600]}" for r in results if r.status == "failed")


@pytest.mark.timeout(UP_TIMEOUT + SMOKE_TIMEOUT)
def test_sig_network_smoke_with_the_agent_as_daemonset(real_cluster: None,
                                                       tmp_path: Path) -> None:
    results = run_e2e(tmp_path / "xdplb", SMOKE.focus, skip_regex(SMOKE), timeout=SMOKE_TIMEOUT)
    ran = [r for r in results if r.status != "skipped"]
    services = [r for r in ran if r.name.startswith("[sig-network] Services")]
    netpol = [r for r in ran if r.name.startswith("[sig-network] Netpol")]
    # 17 Services conformance tests in v1.34, and the Netpol ones chosen.
    assert len(services) >= 17, [r.name for r in results]
    assert len(netpol) >= 3, [r.name for r in results]
    assert not failures(results), failures(results)


@pytest.mark.timeout(900)
def test_without_a_proxy_the_nodeport_test_fails(real_cluster: None, tmp_path: Path) -> None:
    cluster("proxy", "none", timeout=300)
    results = run_e2e(tmp_path / "none", NODEPORT_TEST, timeout=600)
    # The test itself ran and failed (not the suite's set-up).
    assert [(r.name.startswith("[sig-network] Services should be able to create a "
                               "functioning NodePort service"), r.status)
            for r in results] == [(True, "failed")], results
    assert "not reachable" in results[0].message, results[0].message[:2000]
