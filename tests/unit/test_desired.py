"""kube-proxy's endpoint semantics in the pure desired-state function."""

from __future__ import annotations

from typing import Any

from lb.model import Cluster, Node
from lb.service import desired
from lb.service.desired import SCOPE_EXTERNAL, SCOPE_INTERNAL, Frontend
from lb.sources.manifests import build_cluster
from loader.layout import const

NODE = Node(name="node-a", ips=("192.0.2.1",))


def svc(name: str = "web", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"clusterIP": "10.96.0.10",
                            "ports": [{"name": "http", "port": 80, "targetPort": "web",
                                       "nodePort": 30080}]}
    base.update(spec)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"}, "spec": base}


def ep(ip: str, node: str = "node-a", ready: bool = True, serving: bool | None = None,
       terminating: bool = False) -> dict[str, Any]:
    cond: dict[str, Any] = {"ready": ready, "terminating": terminating}
    if serving is not None:
        cond["serving"] = serving
    return {"addresses": [ip], "conditions": cond, "nodeName": node}


def eps(*endpoints: dict[str, Any], name: str = "web", port: int = 8080) -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": list(endpoints)}


def compute(*docs: dict[str, Any], node: Node = NODE) -> desired.DesiredState:
    res = build_cluster((d, "t") for d in docs)
    assert not res.errors, res.errors
    return desired.compute(res.cluster, node)


def ips(state: desired.DesiredState, f: Frontend) -> set[str]:
    return {b.ip for b in state.entries[f].backends}


CIP = Frontend("10.96.0.10", 80, 6, SCOPE_INTERNAL)
NP_EXT = Frontend("192.0.2.1", 30080, 6, SCOPE_EXTERNAL)
NP_INT = Frontend("192.0.2.1", 30080, 6, SCOPE_INTERNAL)


def test_named_target_port_resolved_through_the_slice() -> None:
    state = compute(svc(), eps(ep("10.244.1.10"), port=8081))
    (b,) = state.entries[CIP].backends
    assert (b.ip, b.port) == ("10.244.1.10", 8081)


def test_clusterip_is_internal_only_and_nodeport_needs_the_type() -> None:
    state = compute(svc(), eps(ep("10.244.1.10")))
    assert set(state.entries) == {CIP}
    state = compute(svc(type="NodePort"), eps(ep("10.244.1.10")))
    assert set(state.entries) == {CIP, NP_EXT, NP_INT}
    assert state.entries[NP_EXT].flags & const("LB_SVC_MASQUERADE")
    assert not state.entries[NP_INT].flags & const("LB_SVC_MASQUERADE")


def test_ready_first_then_serving_terminating_never_not_serving() -> None:
    state = compute(svc(), eps(ep("10.244.1.10"), ep("10.244.1.11", ready=False,
                                                      serving=True, terminating=True)))
    assert ips(state, CIP) == {"10.244.1.10"}
    state = compute(svc(), eps(ep("10.244.1.11", ready=False, serving=True, terminating=True),
                               ep("10.244.1.12", ready=False, serving=False,
                                  terminating=True)))
    assert ips(state, CIP) == {"10.244.1.11"}
    state = compute(svc(), eps(ep("10.244.1.12", ready=False, serving=False)))
    assert ips(state, CIP) == set()


def test_publish_not_ready_addresses() -> None:
    state = compute(svc(publishNotReadyAddresses=True), eps(ep("10.244.1.12", ready=False)))
    assert ips(state, CIP) == {"10.244.1.12"}


def test_external_traffic_policy_local() -> None:
    docs = (svc(type="NodePort", externalTrafficPolicy="Local"),
            eps(ep("10.244.1.10"), ep("10.244.2.10", node="node-b")))
    state = compute(*docs)
    assert ips(state, NP_EXT) == {"10.244.1.10"}
    assert not state.entries[NP_EXT].flags & const("LB_SVC_MASQUERADE")
    assert ips(state, NP_INT) == {"10.244.1.10", "10.244.2.10"}, "pods get every endpoint"
    assert ips(state, CIP) == {"10.244.1.10", "10.244.2.10"}
    state = compute(*docs, node=Node("node-c", ("192.0.2.1",)))
    assert ips(state, NP_EXT) == set()
    assert state.entries[NP_EXT].flags & const("LB_SVC_LOCAL_ONLY")


def test_internal_traffic_policy_local() -> None:
    state = compute(svc(internalTrafficPolicy="Local"),
                    eps(ep("10.244.1.10"), ep("10.244.2.10", node="node-b")))
    assert ips(state, CIP) == {"10.244.1.10"}
    assert state.entries[CIP].flags & const("LB_SVC_LOCAL_ONLY")


def test_services_not_for_us_are_not_programmed() -> None:
    headless = svc(clusterIP="None")
    external = svc(type="ExternalName", externalName="example.com")
    other = svc()
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other"}
    # A ClusterIP service labelled headless: kube-proxy leaves it alone too
    # (the upstream test "should implement service.kubernetes.io/headless").
    labelled = svc()
    labelled["metadata"]["labels"] = {"service.kubernetes.io/headless": ""}
    for s in (headless, external, other, labelled):
        assert compute(s, eps(ep("10.244.1.10"))).entries == {}
    assert compute(svc(), eps(ep("10.244.1.10"))).entries != {}


def test_load_balancer_and_external_ips_get_both_scopes() -> None:
    s = svc(type="LoadBalancer", externalIPs=["198.51.100.50"],
            loadBalancerSourceRanges=["198.51.100.0/24"])
    s["status"] = {"loadBalancer": {"ingress": [{"ip": "203.0.113.10"}]}}
    state = compute(s, eps(ep("10.244.1.10")))
    lb_ext = state.entries[Frontend("203.0.113.10", 80, 6, SCOPE_EXTERNAL)]
    assert lb_ext.flags & const("LB_SVC_LOAD_BALANCER")
    assert lb_ext.flags & const("LB_SVC_SOURCE_RANGES")
    assert Frontend("198.51.100.50", 80, 6, SCOPE_INTERNAL) in state.entries


def test_session_affinity_carries_its_timeout() -> None:
    state = compute(svc(sessionAffinity="ClientIP"), eps(ep("10.244.1.10")))
    e = state.entries[CIP]
    assert e.flags & const("LB_SVC_AFFINITY") and e.affinity_timeout == 10800


def test_same_frontend_claimed_twice_keeps_the_first() -> None:
    """Object by object, as the API source reads them (a set of files is
    refused the second claim before this)."""
    parts = [build_cluster([(d, "t")]).cluster for d in (
        svc("a"), svc("b"), eps(ep("10.244.1.10"), name="a"), eps(ep("10.244.1.11"), name="b"))]
    cluster = Cluster(services={k: v for c in parts for k, v in c.services.items()},
                      slices={k: v for c in parts for k, v in c.slices.items()})
    state = desired.compute(cluster, NODE)
    assert state.entries[CIP].service == "default/a"


def test_legacy_endpoints_are_read_when_no_slice_exists() -> None:
    legacy = {"apiVersion": "v1", "kind": "Endpoints",
              "metadata": {"name": "web", "namespace": "default"},
              "subsets": [{"addresses": [{"ip": "10.244.1.20"}],
                           "notReadyAddresses": [{"ip": "10.244.1.21"}],
                           "ports": [{"name": "http", "port": 8080}]}]}
    state = compute(svc(), legacy)
    assert ips(state, CIP) == {"10.244.1.20"}


# --- endpoints as kube-proxy's EndpointSliceCache reads them ------------------------
# (pkg/proxy/endpointslicecache.go, v1.34, addEndpoints)


def test_an_absent_serving_means_serving() -> None:
    """`serving := Conditions.Serving == nil || *Conditions.Serving`: an
    endpoint that is terminating, not ready and silent about serving is the
    fallback when no endpoint is ready (not what `serving` defaulting to
    `ready` would make of it)."""
    state = compute(svc(), eps(ep("10.244.1.10", ready=False, terminating=True)))
    assert ips(state, CIP) == {"10.244.1.10"}
    gone = compute(svc(), eps(ep("10.244.1.10", ready=False, serving=False, terminating=True)))
    assert ips(gone, CIP) == set()


def test_only_the_first_address_of_an_endpoint_is_used() -> None:
    """`endpoint.Addresses[0]`: the others are the same endpoint's, not more
    backends."""
    two = {**ep("10.244.1.10"), "addresses": ["10.244.1.10", "10.244.1.11"]}
    assert ips(compute(svc(), eps(two)), CIP) == {"10.244.1.10"}


def test_an_endpoint_in_two_slices_is_one_backend_and_its_local_copy_wins() -> None:
    """Deduplicated by address and port; `!exists || isLocal`: a local copy
    replaces a remote one."""
    remote = eps(ep("10.244.1.10", node="node-b"))
    local = {**eps(ep("10.244.1.10", node=NODE.name or "")),
             "metadata": {"name": "web-2", "namespace": "default",
                          "labels": {"kubernetes.io/service-name": "web"}}}
    state = compute(svc(externalTrafficPolicy="Local", type="NodePort"), remote, local)
    [backend] = state.entries[CIP].backends
    assert backend.ip == "10.244.1.10" and backend.local


def test_a_proxy_mode_load_balancer_ip_is_not_captured() -> None:
    """KEP-1860 ipMode: a VIP-mode (or unmarked) ingress IP is the service's;
    a Proxy-mode one is the load balancer's, reached through it by pods and
    the node alike (kube-proxy's IsVIPMode)."""
    lb = svc(type="LoadBalancer")
    lb["status"] = {"loadBalancer": {"ingress": [
        {"ip": "203.0.113.10", "ipMode": "VIP"}, {"ip": "203.0.113.11", "ipMode": "Proxy"},
        {"ip": "203.0.113.12"}]}}
    state = compute(lb, eps(ep("10.244.1.10")))
    captured = {f.ip for f in state.entries if f.ip.startswith("203.0.113.")}
    assert captured == {"203.0.113.10", "203.0.113.12"}
    lb["status"]["loadBalancer"]["ingress"][0]["ipMode"] = "Magic"
    res = build_cluster([(lb, "t")])
    assert res.errors[0].field == "status.loadBalancer.ingress[0].ipMode"
