"""The agent watching a real API server (`lbctl run --kubernetes`) on a lab
node: objects applied with kubectl, and Pods made ready so that the
EndpointSlice controller lists them, reach the maps; an API server outage
leaves the maps alone; an expired watch (410) recovers by listing again;
/metrics, /healthz and /readyz answer with real values.

The agent runs in the root namespace (the API server is on 127.0.0.1) and
attaches its programs inside the node namespace given with --netns."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from lab.agent import LabAgent
from lab.clients import FAILED, curl_many
from lab.topology import Pod, Topology, TopologySpec
from lb.datapath.instance import pin_dir_of
from lb.inspect import mapview
from lb.sources.kube import ApiError, ApiHttp, KubeSource, describe, load_config
from loader.maps import BpfMap
from tests.cluster.controlplane import ControlPlane, free_ports
from tests.cluster.objects import (
    Port,
    api_client,
    create_namespace,
    ensure_node,
    make_ready_pod,
    set_pod_status,
)
from tests.conftest import REPO, require_root

pytestmark = pytest.mark.cluster

T = TypeVar("T")

TOMCAT = REPO / "deploy" / "examples" / "tomcat.yaml"
TOMCAT_IP = "10.97.222.179"
WEB_IP = "10.96.50.10"
WEB_PORT = 80
# The agent's reconnect backoff is capped at 30 s; after an outage the
# first retry can come that late.
RECOVERY_TIMEOUT = 45.0


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 15.0,
               interval: float = 0.05) -> tuple[T, float]:
    """The first truthy probe() and when it came (monotonic)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value, time.monotonic()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


@dataclass
class KubeLab:
    cp: ControlPlane
    topo: Topology
    agent: LabAgent
    api: client.ApiClient
    metrics_url: str
    namespace: str

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def client_pod(self) -> Pod:
        return self.topo.pods[0]

    @property
    def backend_pods(self) -> list[Pod]:
        return self.topo.pods[1:]

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 15.0,
             interval: float = 0.05) -> tuple[T, float]:
        """wait_until, with the agent's last log lines when it times out."""
        try:
            return wait_until(what, probe, timeout, interval)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; the agent's log ends with:\n"
                               + "\n".join(self.agent.lines[-30:])) from None

    def maps(self, view: str) -> list[dict[str, Any]]:
        out = subprocess.run([sys.executable, "-m", "lb.cli", "maps", view, "-o", "json",
                              "--instance", self.agent.instance],
                             capture_output=True, text=True, check=True, timeout=30)
        rows: list[dict[str, Any]] = json.loads(out.stdout)
        return rows

    def frontend_ips(self) -> set[str]:
        return {r["frontend"].rsplit(":", 1)[0] for r in self.maps("services")}

    def backends_of(self, frontend: str) -> set[str] | None:
        """Backend addresses of a ClusterIP frontend (None: not in the maps)."""
        groups = {r["group_id"] for r in self.maps("services")
                  if r["frontend"] == frontend and r["scope"] == "internal"}
        if not groups:
            return None
        return {b["address"] for b in self.maps("backends") if b["group_id"] in groups}

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.metrics_url + path, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def scrape(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Sample name -> labels -> value."""
        status, text = self.http("/metrics")
        assert status == 200
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out


def metric(samples: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str,
           **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for k, v in samples.get(name, {}).items()
               if set(labels.items()) <= set(k))


@pytest.fixture(scope="module")
def lab(control_plane: ControlPlane) -> Iterator[KubeLab]:
    require_root()
    port = free_ports(1)[0]
    with api_client(control_plane.server, control_plane.token, control_plane.ca_file) as api, \
            Topology.build(TopologySpec.single(pods=4)) as topo:
        for pod in topo.pods[1:]:
            topo.start_http(pod, 8080)
        namespace = f"kt-{uuid.uuid4().hex[:8]}"
        create_namespace(client.CoreV1Api(api), namespace)
        extra = ("--kubernetes", "--kubeconfig", str(control_plane.kubeconfig),
                 "--metrics-addr", f"127.0.0.1:{port}", "--service-cidr", "10.96.0.0/12")
        try:
            with LabAgent(topo, topo.node, [], extra=extra) as agent:
                lab = KubeLab(control_plane, topo, agent, api, f"http://127.0.0.1:{port}",
                              namespace)
                # The first sync follows the first complete list of every kind.
                lab.wait("the first sync", lambda: lab.http("/readyz")[0] == 200, 60)
                yield lab
        finally:
            control_plane.kubectl("delete", "namespace", namespace, "--wait=false",
                                  check=False)
            control_plane.kubectl("delete", "-f", str(TOMCAT), "--ignore-not-found",
                                  check=False)


def test_apply_programs_the_clusterip_within_a_second(lab: KubeLab) -> None:
    assert TOMCAT_IP not in lab.frontend_ips()
    mark = len(lab.agent.lines)
    with BpfMap.open_pinned(pin_dir_of(lab.agent.instance), "lb_services") as services:
        start = time.monotonic()
        lab.cp.kubectl("apply", "-f", str(TOMCAT))
        applied = time.monotonic()
        # The pinned map itself, read here every 10 ms: when the agent wrote it.
        _, written = lab.wait("the tomcat ClusterIP in the map", lambda: any(
            r["frontend"].startswith(f"{TOMCAT_IP}:")
            for r in mapview.services({"lb_services": services})), timeout=10, interval=0.01)
    # And as an operator sees it: `lbctl maps services -o json` polled every 50 ms.
    _, shown = lab.wait("the tomcat ClusterIP in `lbctl maps`",
                          lambda: TOMCAT_IP in lab.frontend_ips(), timeout=10)
    print(f"\nkubectl apply took {applied - start:.3f} s; the ClusterIP was in the map "
          f"{written - applied:.3f} s after it returned ({written - start:.3f} s after it "
          f"began); `lbctl maps` showed it {shown - start:.3f} s after the apply began")
    print("\n".join(ln for ln in lab.agent.lines[mark:] if "synced" in ln))
    assert written - applied < 1.0
    assert shown - start < 3.0  # each `lbctl maps` run is a Python start-up
    # Every address of the service: ClusterIP, NodePort on the node IP, LB IP.
    frontends = {r["frontend"] for r in lab.maps("services")}
    assert {f"{TOMCAT_IP}:8080", f"{lab.topo.node_ip}:30080"} <= frontends


def _web_service(lab: KubeLab) -> None:
    svc = client.V1Service(
        metadata=client.V1ObjectMeta(name="web"),
        spec=client.V1ServiceSpec(
            cluster_ip=WEB_IP, selector={"app": "web"},
            ports=[client.V1ServicePort(name="http", port=WEB_PORT, target_port=8080)]))
    lab.core.create_namespaced_service(lab.namespace, svc)


def _pod(lab: KubeLab, name: str, pod: Pod) -> None:
    make_ready_pod(lab.core, name, lab.namespace, {"app": "web"}, pod.ip, pod.node.name,
                   [Port(8080, "http")], host_ip=pod.node.ip)


def test_endpoints_follow_pods(lab: KubeLab) -> None:
    frontend = f"{WEB_IP}:{WEB_PORT}"
    b0, b1, b2 = lab.backend_pods
    _web_service(lab)
    lab.wait("the web ClusterIP", lambda: lab.backends_of(frontend) is not None)
    assert lab.backends_of(frontend) == set()

    for i, pod in enumerate((b0, b1)):
        _pod(lab, f"web-{i}", pod)
    want = {f"{b0.ip}:8080", f"{b1.ip}:8080"}
    lab.wait("two endpoints", lambda: lab.backends_of(frontend) == want)
    spread = curl_many(lab.topo, lab.client_pod, f"http://{WEB_IP}/", 40, timeout=3)
    assert FAILED not in spread and set(spread) == {b0.name, b1.name}

    start = time.monotonic()
    _pod(lab, "web-2", b2)
    want.add(f"{b2.ip}:8080")
    _, seen = lab.wait("the third endpoint", lambda: lab.backends_of(frontend) == want)
    print(f"\nscale up: pod ready -> backend in the maps in {seen - start:.3f} s")
    spread = curl_many(lab.topo, lab.client_pod, f"http://{WEB_IP}/", 60, timeout=3)
    assert FAILED not in spread and set(spread) == {b0.name, b1.name, b2.name}

    start = time.monotonic()
    lab.core.delete_namespaced_pod("web-0", lab.namespace, grace_period_seconds=0)
    want.discard(f"{b0.ip}:8080")
    _, seen = lab.wait("web-0 gone", lambda: lab.backends_of(frontend) == want)
    print(f"scale down: pod deleted -> backend out of the maps in {seen - start:.3f} s")
    # A pod that stops being ready is taken out too.
    set_pod_status(lab.core, "web-1", lab.namespace, b1.ip, ready=False, host_ip=b1.node.ip)
    want.discard(f"{b1.ip}:8080")
    lab.wait("web-1 not ready", lambda: lab.backends_of(frontend) == want)
    spread = curl_many(lab.topo, lab.client_pod, f"http://{WEB_IP}/", 30, timeout=3)
    assert spread == {b2.name: 30}


def _service(lab: KubeLab, name: str, cluster_ip: str) -> None:
    """A service without a selector: its endpoints are whatever slices say."""
    lab.core.create_namespaced_service(lab.namespace, client.V1Service(
        metadata=client.V1ObjectMeta(name=name),
        spec=client.V1ServiceSpec(cluster_ip=cluster_ip,
                                  ports=[client.V1ServicePort(port=80, target_port=8080)])))


def _manual_slice(lab: KubeLab, service: str, pods: list[Pod]) -> None:
    lab.cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": f"{service}-manual", "namespace": lab.namespace,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [p.ip], "conditions": {"ready": True}} for p in pods]}))


def test_deleting_the_service_removes_it(lab: KubeLab) -> None:
    _service(lab, "gone", "10.96.50.20")
    lab.wait("the service", lambda: "10.96.50.20" in lab.frontend_ips())
    lab.core.delete_namespaced_service("gone", lab.namespace)
    lab.wait("the service removed", lambda: "10.96.50.20" not in lab.frontend_ips())


def _maps_state(lab: KubeLab) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return lab.maps("services"), lab.maps("backends")


def restart_api_server(cp: ControlPlane) -> float:
    """Start the API server again (returns when it was ready), and give the
    controller manager a fresh start too: after outages its informers back
    off for up to a minute, which would slow down every later test sharing
    this control plane."""
    cp.start_apiserver()
    ready = time.monotonic()
    cp.stop_controller_manager()
    cp.start_controller_manager()
    return ready


def test_api_server_outage_keeps_the_maps_and_catches_up(lab: KubeLab) -> None:
    before = _maps_state(lab)
    assert before[0], "the earlier tests left services in the maps"
    lab.cp.stop_apiserver(kill=True)
    try:
        for _ in range(4):
            time.sleep(2)
            assert _maps_state(lab) == before
        # Alive (the loop turns) and still ready (the maps hold the last state).
        assert lab.http("/healthz")[0] == 200
        assert lab.http("/readyz")[0] == 200
    finally:
        back = restart_api_server(lab.cp)
    assert _maps_state(lab) == before
    # Changes made once it is back reach the maps: a service and its
    # EndpointSlice, written straight to the API (the EndpointSlice
    # controller has a reconnect backoff of its own, up to a minute here).
    b0 = lab.backend_pods[0]
    _service(lab, "after-outage", "10.96.50.30")
    _manual_slice(lab, "after-outage", [b0])
    _, seen = lab.wait("the service created after the outage",
                         lambda: lab.backends_of("10.96.50.30:80") == {f"{b0.ip}:8080"},
                         timeout=RECOVERY_TIMEOUT)
    print(f"\nafter the outage: a new service and endpoint in the maps {seen - back:.1f} s "
          "after the API server was back")


def _etcd(lab: KubeLab, call: str, body: dict[str, Any]) -> dict[str, Any]:
    """etcd's JSON gateway (no etcdctl is built)."""
    req = urllib.request.Request(f"{lab.cp.etcd_url}/v3/{call}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def test_expired_watch_is_relisted(lab: KubeLab) -> None:
    """A real 410: while the API server is down, etcd moves on and compacts
    its history, so the watches resume from a resourceVersion the restarted
    server no longer has."""
    expired = metric(lab.scrape(), "xdplb_kube_relists_total", reason="expired")
    mark = len(lab.agent.lines)
    lab.cp.stop_apiserver()
    try:
        b64 = base64.b64encode
        put = _etcd(lab, "kv/put", {"key": b64(b"/xdplb-test/bump").decode(),
                                    "value": b64(uuid.uuid4().bytes).decode()})
        revision = int(put["header"]["revision"])
        _etcd(lab, "kv/compaction", {"revision": revision, "physical": True})
    finally:
        back = restart_api_server(lab.cp)
    line = lab.agent.wait_for("listing again", timeout=RECOVERY_TIMEOUT, after=mark)
    assert "410" in line
    _, seen = lab.wait(
        "relists after 410",
        lambda: metric(lab.scrape(), "xdplb_kube_relists_total", reason="expired") > expired,
        timeout=RECOVERY_TIMEOUT)
    print(f"\n410 after compaction: {line.split(' ', 3)[-1]}\nrelisted "
          f"{seen - back:.1f} s after the API server was back")
    # And watching goes on: a service and a hand-made EndpointSlice (no
    # controller in between) created now are applied.
    _service(lab, "after-410", "10.96.50.40")
    b1 = lab.backend_pods[1]
    _manual_slice(lab, "after-410", [b1])
    lab.wait("the service and endpoint created after the 410",
               lambda: lab.backends_of("10.96.50.40:80") == {f"{b1.ip}:8080"},
               timeout=RECOVERY_TIMEOUT)


def test_metrics_health_and_readiness(lab: KubeLab) -> None:
    # An object the API accepts but the agent refuses: a slice no service owns.
    lab.cp.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "orphan", "namespace": lab.namespace},
        "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.9.9"]}]}))
    # Traffic, with one connection held open so that conntrack has entries.
    holder = lab.topo.spawn(lab.client_pod, [
        sys.executable, "-c",
        f"import socket,time; s=socket.create_connection(('{WEB_IP}',{WEB_PORT})); "
        "time.sleep(60)"])
    try:
        spread = curl_many(lab.topo, lab.client_pod, f"http://{WEB_IP}/", 20, timeout=3)
        assert FAILED not in spread
        samples, _ = lab.wait(
            "the refused object counted",
            lambda: (s := lab.scrape()) and metric(s, "xdplb_objects_refused_total") >= 1
            and s, timeout=10)
    finally:
        lab.topo.kill(holder)
    status, text = lab.http("/metrics")
    print("\n" + "\n".join(ln for ln in text.splitlines() if ln.startswith("xdplb_")
                            and "_created" not in ln
                            and not ln.startswith("xdplb_sync_duration_seconds_bucket")))
    positive = {
        "xdplb_packets_total": {"verdict": "DNAT", "reason": "new"},
        "xdplb_bytes_total": {"verdict": "DNAT", "reason": "new"},
        "xdplb_services_programmed": {},
        "xdplb_frontends_programmed": {},
        "xdplb_backends_programmed": {},
        "xdplb_conntrack_entries": {},
        "xdplb_conntrack_capacity": {},
        "xdplb_sync_duration_seconds_count": {},
        "xdplb_sync_last_timestamp_seconds": {},
        "xdplb_objects_refused_total": {},
        "xdplb_objects_invalid": {},
        "xdplb_network_programming_duration_seconds_count": {},
        "xdplb_kube_relists_total": {"resource": "EndpointSlice", "reason": "initial"},
        "xdplb_kube_watch_events_total": {"resource": "EndpointSlice"},
        "xdplb_kube_objects": {"resource": "Service"},
        "xdplb_kube_request_errors_total": {},  # the outage tests above made some
    }
    for name, labels in positive.items():
        assert metric(samples, name, **labels) > 0, (name, labels, samples.get(name))
    for name in ("xdplb_sync_errors_total", "xdplb_conntrack_count_truncated"):
        assert name in samples, name
    assert metric(samples, "xdplb_network_programming_duration_seconds_sum") < \
        10 * metric(samples, "xdplb_network_programming_duration_seconds_count")
    # Nothing secret: neither the token nor where the kubeconfig is.
    assert lab.cp.token not in text and str(lab.cp.kubeconfig) not in text
    assert str(Path(lab.cp.dir)) not in text

    status, body = lab.http("/healthz")
    doc = json.loads(body)
    assert status == 200 and doc["datapathLoaded"] is True
    assert doc["lastUpdated"] and doc["currentTime"]
    status, body = lab.http("/readyz")
    assert status == 200 and json.loads(body)["lastUpdated"]
    assert lab.http("/nothing")[0] == 404


def _maps_of(agent: LabAgent) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "lb.cli", "maps", "services", "-o", "json",
                          "--instance", agent.instance], capture_output=True, text=True,
                         check=False, timeout=30)
    if out.returncode != 0:
        return []
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def test_node_ip_from_the_node_object_and_fail_static_at_start(
        lab: KubeLab, tmp_path: Path) -> None:
    """On a second lab node named like the first (so the same Node object):
    without --node-ip the agent takes the Node's InternalIP, so the NodePort
    is programmed there. Restarted over its pinned maps with an API server
    it cannot reach, the agent syncs nothing: the maps keep their state."""
    # The seed's Tomcat service (NodePort 30080) and the lab node's Node
    # object, whichever tests ran before.
    lab.cp.kubectl("apply", "-f", str(TOMCAT))
    ensure_node(lab.core, lab.topo.node.name, lab.topo.node_ip)
    with Topology.build(TopologySpec.single(pods=1)) as topo:
        first = LabAgent(topo, topo.node, [], extra=(
            "--kubernetes", "--kubeconfig", str(lab.cp.kubeconfig)))
        i = first.argv.index("--node-ip")
        del first.argv[i:i + 2]
        try:
            with first:
                rows, _ = wait_until("the NodePort on the Node's InternalIP", lambda: [
                    r for r in _maps_of(first) if r["frontend"] == f"{topo.node_ip}:30080"])
                assert rows
                before = _maps_of(first)
                first.stop()  # SIGTERM: programs and pins stay

                cfg = json.loads(lab.cp.kubeconfig.read_text())
                cfg["clusters"][0]["cluster"]["server"] = \
                    f"https://127.0.0.1:{free_ports(1)[0]}"
                bad = tmp_path / "kubeconfig"
                bad.write_text(json.dumps(cfg))
                bad.chmod(0o600)
                second = LabAgent(topo, topo.node, [], instance=first.instance, extra=(
                    "--kubernetes", "--kubeconfig", str(bad)))
                second.start()
                try:
                    line = second.wait_for("retrying in", timeout=30)
                    assert "refused" in line.lower(), line
                    time.sleep(2)
                    assert not any("synced" in ln for ln in second.lines)
                    assert _maps_of(second) == before
                    # It waits for the lists (FIRST_LIST_WAIT), then attaches anyway.
                    second.wait_for("has not answered every list", timeout=30)
                    second.wait_for("ready", timeout=30)
                    assert not any("synced" in ln for ln in second.lines)
                    assert _maps_of(second) == before
                finally:
                    second.stop()
        finally:
            first.down()


def test_in_cluster_config_with_the_daemonset_rbac(
        control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The DaemonSet's service account, with the rights deploy/rbac.yaml
    grants, through the in-cluster loader (token and CA files, service
    host and port from the environment): every kind lists, none refused."""
    from kubernetes.config import incluster_config

    control_plane.kubectl("apply", "-f", str(REPO / "deploy" / "rbac.yaml"))
    token = control_plane.kubectl("create", "token", "xdplb", "-n", "kube-system").stdout
    (tmp_path / "token").write_text(token.strip())
    (tmp_path / "ca.crt").write_bytes(control_plane.ca_file.read_bytes())
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(control_plane.apiserver_port))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    source = KubeSource.connect(None, "node", 300.0).start()
    try:
        assert source.wait_listed(30), source.stats()
        cluster = source.poll()
        assert cluster is not None and "default/kubernetes" in cluster.services
        assert "kube-system" in cluster.namespaces
        assert all(c.errors == 0 for c in source.stats().values()), source.stats()
    finally:
        source.stop()


def test_the_api_servers_answers_through_the_plain_client(control_plane: ControlPlane) -> None:
    """The source's GETs (the client's pool and credentials, none of its
    generated classes): a page of a list with its continue token, a 404 for
    a kind not served, a 401 for a wrong token, each named by its status."""
    cfg = load_config(str(control_plane.kubeconfig))
    api = ApiHttp(client.ApiClient(cfg))
    try:
        resp = api.get("/api/v1/namespaces", {"limit": 1}, (5.0, 5.0))
        page = json.loads(resp.data)
        resp.release_conn()
        assert len(page["items"]) == 1 and page["metadata"]["continue"]
        with pytest.raises(ApiError) as missing:
            api.get("/apis/networking.k8s.io/v1/nosuchkinds", {}, (5.0, 5.0))
        assert missing.value.status == 404
    finally:
        api.close()
    wrong = ApiHttp(api_client(cfg.host, "not-a-token", control_plane.ca_file))
    try:
        with pytest.raises(ApiError) as refused:
            wrong.get("/api/v1/services", {}, (5.0, 5.0))
        assert (refused.value.status, describe(refused.value)) == (401, "HTTP 401 Unauthorized")
    finally:
        wrong.close()


def test_bad_flags_are_refused() -> None:
    for argv, text in (
        (["run", "--kubernetes", "-f", "x.yaml"], "alternatives"),
        (["run"], "--kubernetes"),
        (["run", "--kubernetes", "--metrics-addr", "nowhere"], "--metrics-addr"),
        (["run", "-f", "x.yaml", "--kubeconfig", str(TOMCAT)], "--kubeconfig"),
    ):
        res = subprocess.run([sys.executable, "-m", "lb.cli", *argv], capture_output=True,
                             text=True, check=False, timeout=30)
        assert res.returncode == 2 and text in res.stderr, (argv, res.stderr)
