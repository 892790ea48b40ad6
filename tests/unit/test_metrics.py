"""lb.agent.metrics without a datapath: the HTTP endpoints, health rules and the
metrics the agent sets after a sync."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lb.agent.metrics import Metrics, MetricsServer, parse_addr, proxy_health_routes
from lb.refusal import Refusal
from lb.service.desired import FrontendEntry
from lb.service.reconcile import SyncResult
from lb.sources.kube import node_eligible
from lb.sources.manifests import ManifestError, build_cluster


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def served() -> Iterator[tuple[Metrics, str]]:
    m = Metrics(stuck_after=0.2)
    server = MetricsServer(m, "127.0.0.1:0")
    try:
        yield m, f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


def samples(text: str) -> dict[str, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def test_health_and_readiness(served: tuple[Metrics, str]) -> None:
    m, url = served
    code, body = get(url + "/healthz")
    assert code == 503 and json.loads(body)["datapathLoaded"] is False
    assert get(url + "/readyz")[0] == 503
    m.health.datapath_loaded = True  # what datapath_loaded() sets, without maps
    m.tick()
    code, body = get(url + "/healthz")
    doc = json.loads(body)
    assert code == 200 and doc["lastUpdated"] is None and doc["currentTime"].endswith("Z")
    time.sleep(0.3)
    assert get(url + "/healthz")[0] == 503, "the loop stopped turning"
    m.tick()
    empty: Any = SimpleNamespace(applied={}, backends={}, service_users={})
    m.synced(0.002, SyncResult(added=2), empty)
    assert get(url + "/healthz")[0] == 200
    code, body = get(url + "/readyz")
    assert code == 200 and json.loads(body)["lastUpdated"].endswith("Z")
    assert get(url + "/other")[0] == 404


def test_proxy_mode_is_named_as_kube_proxy_names_its_own(served: tuple[Metrics, str]) -> None:
    _, url = served
    assert get(url + "/proxyMode") == (200, "xdplb")


def test_kube_proxy_node_health_port() -> None:
    m = Metrics(stuck_after=0.2)
    server = MetricsServer(m, "127.0.0.1:0", proxy_health_routes(m))
    url = f"http://127.0.0.1:{server.port}"
    try:
        assert get(url + "/healthz")[0] == 503, "nothing loaded yet"
        m.health.datapath_loaded = True
        m.tick()
        for path in ("/healthz", "/livez"):
            code, body = get(url + path)
            doc = json.loads(body)
            assert code == 200 and doc["healthy"] is True
            assert doc["lastUpdated"].endswith("Z"), "healthy: updated now, as kube-proxy says"
        assert json.loads(get(url + "/healthz")[1])["nodeEligible"] is True
        assert "nodeEligible" not in json.loads(get(url + "/livez")[1])
        # A node being deleted: load balancers must drain it, the agent lives on.
        m.health.node_eligible = False
        code, body = get(url + "/healthz")
        assert code == 503 and json.loads(body)["nodeEligible"] is False
        assert get(url + "/livez")[0] == 200
        assert get(url + "/metrics")[0] == 404, "only kube-proxy's health paths here"
    finally:
        server.close()


def test_node_eligibility_follows_kube_proxy() -> None:
    node: dict[str, Any] = {"metadata": {"name": "n1"}, "spec": {}}
    assert node_eligible(node)
    assert not node_eligible(None), "an unknown Node is not eligible"
    assert not node_eligible({**node, "metadata": {"name": "n1",
                                                   "deletionTimestamp": "2026-12-01T00:00:00Z"}})
    tainted = {**node, "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler",
                                            "effect": "NoSchedule"}]}}
    assert not node_eligible(tainted)
    other = {**node, "spec": {"taints": [{"key": "node.kubernetes.io/unschedulable"}]}}
    assert node_eligible(other)


def test_sync_metrics(served: tuple[Metrics, str]) -> None:
    m, url = served
    f1, f2 = object(), object()
    # Two frontends of one service (the reconciler counts them per service).
    rec: Any = SimpleNamespace(applied={f1: 1, f2: 2}, backends={1: 1, 2: 2, 3: 3},
                               service_users={"ns/a": 2})
    full = [Refusal("ns/b: frontend", "no room", "lb_backends"),
            Refusal("ns/c: frontend", "no room", "lb_backends"),
            Refusal("ns/d: ClusterIP", "bad", "")]
    m.synced(0.003, SyncResult(added=2, refusals=full), rec)
    m.sync_failed(0.5)
    m.programmed([time.time() - 0.2, time.time() + 5])  # a clock ahead counts as 0
    m.refused([ManifestError("f", "spec", "bad"), ManifestError("g", "spec", "bad")])
    m.refused([ManifestError("f", "spec", "bad")])  # the same one again: not counted
    code, text = get(url + "/metrics")
    assert code == 200
    s = samples(text)
    assert s["xdplb_sync_duration_seconds_count"] == 2
    assert s["xdplb_sync_errors_total,type=frontend"] == 3
    assert s["xdplb_map_refusals,map=lb_backends"] == 2
    assert s["xdplb_map_refusals,map=lb_pol_rules"] == 0, "every bounded map is exported"
    assert s["xdplb_sync_errors_total,type=exception"] == 1
    assert s["xdplb_services_programmed"] == 1
    assert s["xdplb_frontends_programmed"] == 2
    assert s["xdplb_backends_programmed"] == 3
    assert s["xdplb_frontend_changes_total,op=added"] == 2
    assert s["xdplb_network_programming_duration_seconds_count"] == 2
    assert 0.2 <= s["xdplb_network_programming_duration_seconds_sum"] < 1
    assert s["xdplb_objects_refused_total"] == 2
    assert s["xdplb_objects_invalid"] == 1
    assert s["xdplb_sync_last_timestamp_seconds"] > 0
    m.synced(0.001, SyncResult(), rec)  # the room was found: back to 0
    assert samples(get(url + "/metrics")[1])["xdplb_map_refusals,map=lb_backends"] == 0


def test_source_collector(served: tuple[Metrics, str]) -> None:
    m, url = served

    class Source:
        def stats(self) -> dict[str, Any]:
            return {"Service": SimpleNamespace(relists={"initial": 1, "expired": 2},
                                               errors=3, events=4)}

        def sizes(self) -> dict[str, int]:
            return {"Service": 5}

    m.watch_source(Source())
    s = samples(get(url + "/metrics")[1])
    assert s["xdplb_kube_relists_total,reason=expired,resource=Service"] == 2
    assert s["xdplb_kube_request_errors_total,resource=Service"] == 3
    assert s["xdplb_kube_watch_events_total,resource=Service"] == 4
    assert s["xdplb_kube_objects,resource=Service"] == 5


def test_parse_addr() -> None:
    assert parse_addr("0.0.0.0:10249") == ("0.0.0.0", 10249)
    assert parse_addr(":10249") == ("0.0.0.0", 10249)
    assert parse_addr("[::1]:9") == ("::1", 9)
    for bad in ("10249", "host:", "host:http", "h:70000"):
        with pytest.raises(ValueError):
            parse_addr(bad)


def test_frontend_entry_is_what_services_count_reads() -> None:
    # services_programmed reads .service of each entry: keep that contract.
    assert "service" in FrontendEntry.__dataclass_fields__


def test_a_policy_that_fails_closed_is_counted(served: tuple[Metrics, str]) -> None:
    m, url = served
    broken = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "typo", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {"app": 1}}}}
    fine = {**broken, "metadata": {"name": "fine", "namespace": "x"},
            "spec": {"podSelector": {}}}
    res = build_cluster([(broken, "t"), (fine, "t")])
    m.policies_read(res.cluster)
    assert samples(get(url + "/metrics")[1])["xdplb_policies_failed_closed"] == 1
    m.policies_read(build_cluster([(fine, "t")]).cluster)
    assert samples(get(url + "/metrics")[1])["xdplb_policies_failed_closed"] == 0
