"""What a health-check NodePort answers, from the objects alone."""

from __future__ import annotations

from lb.agent.healthcheck import HealthCheck, answer, health_checks
from lb.service import desired
from lb.sources.manifests import build_cluster
from tests.unit.test_desired import NODE, ep, eps, svc

HC_PORT = 32000


def checks(*endpoints: dict[str, object]) -> dict[int, HealthCheck]:
    docs = (svc(type="LoadBalancer", externalTrafficPolicy="Local",
                healthCheckNodePort=HC_PORT), eps(*endpoints))
    res = build_cluster((d, "t") for d in docs)
    assert not res.errors, res.errors
    return health_checks(res.cluster, desired.compute(res.cluster, NODE))


def test_counts_the_ready_endpoints_on_this_node() -> None:
    hc = checks(ep("10.244.1.10"), ep("10.244.1.11"), ep("10.244.2.10", node="node-b"))
    assert hc == {HC_PORT: HealthCheck("default", "web", 2)}
    assert answer(hc[HC_PORT])[0] == 200


def test_only_terminating_endpoints_fail_the_check() -> None:
    # They still serve the node's traffic (the fallback), but the load
    # balancer must stop sending new flows here: kube-proxy counts ready
    # endpoints only (pkg/proxy/endpointschangetracker.go,
    # getLocalReadyEndpointIPs).
    terminating = ep("10.244.1.10", ready=False, serving=True, terminating=True)
    state_hc = checks(terminating)
    assert state_hc == {HC_PORT: HealthCheck("default", "web", 0)}
    code, body = answer(state_hc[HC_PORT])
    assert code == 503 and b'"localEndpoints": 0' in body


def test_no_local_endpoint_fails_the_check() -> None:
    hc = checks(ep("10.244.2.10", node="node-b"))
    assert answer(hc[HC_PORT])[0] == 503
