"""What a health-check NodePort answers, from the objects alone."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lb.agent.healthcheck import HealthCheck, HealthCheckTracker, answer, health_checks
from lb.service import desired
from lb.sources.kube import ParsedObjects
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


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.booleans(),
                          st.sampled_from(["node-a", "node-b"])), min_size=1, max_size=15))
def test_the_tracker_answers_as_a_walk_over_everything(
        steps: list[tuple[int, int, bool, str]]) -> None:
    """Snapshots as the API source makes them (each naming what changed)
    through the agent's memo: the tracker, which looks only at the services
    a snapshot names, answers what a walk over every Service and entry does;
    so it does for a state the memo did not compute."""
    parsed, memo, tracker = ParsedObjects(), desired.Memo(), HealthCheckTracker()
    for version, (i, op, flag, node) in enumerate(steps, 1):
        name = f"web{i}"
        change: dict[tuple[str, str], dict[str, object] | None]
        if op == 0:
            doc = svc(name, type="LoadBalancer", externalTrafficPolicy="Local",
                      healthCheckNodePort=HC_PORT + i, clusterIP=f"10.96.0.{10 + i}")
            change = {("Service", f"default/{name}"): doc}
        elif op == 1:
            doc = svc(name, clusterIP=f"10.96.0.{10 + i}")
            change = {("Service", f"default/{name}"): doc}
        elif op == 2:
            doc = eps(ep(f"10.244.1.{10 + i}", node=node, ready=flag),
                      ep(f"10.244.2.{10 + i}", node="node-a"), name=name)
            change = {("EndpointSlice", f"default/{name}-1"): doc}
        else:
            kind, key = (("Service", f"default/{name}") if op == 3
                         else ("EndpointSlice", f"default/{name}-1"))
            change = {(kind, key): None}
        for d in change.values():
            if d is not None:
                d["metadata"]["resourceVersion"] = str(version)  # type: ignore[index]
        cluster, errors = parsed.apply(change)
        assert not errors, errors
        state = desired.compute(cluster, NODE, memo)
        assert tracker.update(cluster, state, memo) == health_checks(cluster, state)
        full = desired.compute(cluster, NODE)
        assert tracker.update(cluster, full, memo) == health_checks(cluster, full)
