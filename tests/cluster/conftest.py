"""Fixtures for tests against a real Kubernetes control plane."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster.controlplane import ControlPlane, binaries_ready

# A cold build of the binaries (tools/k8s-build.sh) takes about ten minutes on
# two cores; the test that first needs the control plane pays for it.
COLD_BUILD_TIMEOUT = 3600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    first = next(
        (item for item in items if "control_plane" in getattr(item, "fixturenames", ())), None
    )
    if first is not None and not binaries_ready():
        # Prepended, so it wins over the configured per-test timeout.
        first.add_marker(pytest.mark.timeout(COLD_BUILD_TIMEOUT), append=False)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and kube-controller-manager on loopback."""
    with ControlPlane(build_timeout=COLD_BUILD_TIMEOUT) as cp:
        yield cp
