"""The test control plane itself: auth, EndpointSlices from ready Pods, restarts."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster.controlplane import ControlPlane, ControlPlaneError
from tests.cluster.objects import (
    Port,
    api_client,
    create_namespace,
    endpoint_slices,
    make_ready_pod,
    make_service,
    ready_addresses,
    wait_for,
)

pytestmark = pytest.mark.cluster

ENDPOINTS_TIMEOUT = 15.0
RECONNECT_TIMEOUT = 90.0


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with api_client(control_plane.server, control_plane.token, control_plane.ca_file) as a:
        yield a


@pytest.fixture
def namespace(api: client.ApiClient) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    core = client.CoreV1Api(api)
    create_namespace(core, name)
    yield name
    core.delete_namespace(name)


def test_python_client_lists_namespaces_with_token(
    control_plane: ControlPlane, api: client.ApiClient
) -> None:
    names = {ns.metadata.name for ns in client.CoreV1Api(api).list_namespace().items if ns.metadata}
    assert {"default", "kube-system", "kube-public"} <= names


def test_wrong_token_is_rejected(control_plane: ControlPlane) -> None:
    bad = api_client(control_plane.server, "not-the-token", control_plane.ca_file)
    with bad, pytest.raises(ApiException) as info:
        client.CoreV1Api(bad).list_namespace()
    assert info.value.status == 401


def test_kubectl_uses_the_kubeconfig(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("version", "-o", "json").stdout
    assert json.loads(out)["serverVersion"]["gitVersion"].startswith("v1.")
    svc = json.loads(control_plane.kubectl("get", "service", "kubernetes", "-o", "json").stdout)
    assert svc["spec"]["clusterIP"] == "10.96.0.1"


def test_ready_pods_become_endpoint_slice(api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    make_service(core, "web", namespace, {"app": "web"}, [("http", 80, 8080)])
    make_ready_pod(
        core, "web-a", namespace, {"app": "web"}, "10.244.1.10", "node-a", [Port(8080, "http")]
    )
    make_ready_pod(
        core, "web-b", namespace, {"app": "web"}, "10.244.2.10", "node-b", [Port(8080, "http")]
    )
    # Selected but not ready: listed, with ready=false.
    make_ready_pod(
        core,
        "web-c",
        namespace,
        {"app": "web"},
        "10.244.3.10",
        "node-a",
        [Port(8080, "http")],
        ready=False,
    )
    # Ready but not selected.
    make_ready_pod(core, "other", namespace, {"app": "other"}, "10.244.4.10", "node-a")

    wait_for(
        "EndpointSlice with both ready Pods",
        lambda: ready_addresses(discovery, namespace, "web") == {"10.244.1.10", "10.244.2.10"},
        timeout=ENDPOINTS_TIMEOUT,
    )
    slices = endpoint_slices(discovery, namespace, "web")
    endpoints = [ep for s in slices for ep in s.endpoints or []]
    by_ip = {ep.addresses[0]: ep for ep in endpoints}
    assert set(by_ip) == {"10.244.1.10", "10.244.2.10", "10.244.3.10"}
    assert by_ip["10.244.3.10"].conditions is not None
    assert by_ip["10.244.3.10"].conditions.ready is False
    assert by_ip["10.244.1.10"].node_name == "node-a"
    assert by_ip["10.244.2.10"].target_ref is not None
    assert by_ip["10.244.2.10"].target_ref.name == "web-b"
    ports = {(p.name, p.port, p.protocol) for s in slices for p in s.ports or []}
    assert ports == {("http", 8080, "TCP")}

    core.delete_namespaced_pod("web-a", namespace)
    wait_for(
        "EndpointSlice without the deleted Pod",
        lambda: ready_addresses(discovery, namespace, "web") == {"10.244.2.10"},
        timeout=ENDPOINTS_TIMEOUT,
    )


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_service_survives_apiserver_restart(
    control_plane: ControlPlane, api: client.ApiClient, namespace: str, kill: bool
) -> None:
    core = client.CoreV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    before = make_service(core, "db", namespace, {"app": "db"}, [("pg", 5432, 5432)])
    assert before.metadata is not None and before.spec is not None

    control_plane.stop_apiserver(kill=kill)
    try:
        down = control_plane.kubectl("get", "ns", check=False, timeout=30)
        assert down.returncode != 0
    finally:
        control_plane.start_apiserver()

    after = core.read_namespaced_service("db", namespace)
    assert after.metadata is not None and after.spec is not None
    assert after.metadata.uid == before.metadata.uid
    assert after.spec.cluster_ip == before.spec.cluster_ip

    # The controller manager reconnects: a Pod added now still gets listed.
    # Its informers retry a failed watch with client-go's backoff, which
    # doubles up to 30 s between attempts, so allow a few of those.
    make_ready_pod(core, "db-0", namespace, {"app": "db"}, "10.244.5.10", "node-a", [5432])
    wait_for(
        "EndpointSlice after the restart",
        lambda: ready_addresses(discovery, namespace, "db") == {"10.244.5.10"},
        timeout=RECONNECT_TIMEOUT,
    )


def test_startup_failure_reports_log_and_cleans_up(control_plane: ControlPlane) -> None:
    cp = ControlPlane(controllers=["no-such-controller"], startup_timeout=30)
    with pytest.raises(ControlPlaneError) as info, cp:
        pass
    message = str(info.value)
    assert "kube-controller-manager" in message
    assert "no-such-controller" in message
    assert cp.created_dir is not None and not cp.created_dir.exists()
    assert len(cp.started_pids) == 3
    for pid in cp.started_pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
