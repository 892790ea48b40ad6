"""Topology-aware routing as kube-proxy has it: EndpointSlice hints
(forZones, forNodes; written by the EndpointSlice controller from
trafficDistribution) decide which ready endpoints a node's cluster traffic
uses, and when they are ignored. The expected side transcribes
topologyModeFromHints and availableForTopology (pkg/proxy/topology.go,
v1.34); every combination below is checked."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest

from lb.model import Node
from lb.service import desired
from lb.sources.manifests import build_cluster

CIP = desired.Frontend("10.96.0.10", 80, 6, desired.SCOPE_INTERNAL)


@dataclass(frozen=True)
class Ep:
    ip: str
    ready: bool = True
    zones: tuple[str, ...] = ()
    nodes: tuple[str, ...] = ()
    terminating: bool = False


def kube_proxy(eps: list[Ep], node: str, zone: str | None) -> set[str]:
    """clusterEndpoints of CategorizeEndpoints, with the hints."""
    ready = [e for e in eps if e.ready]
    mode = ""
    if ready:
        if all(e.nodes for e in ready) and any(node in e.nodes for e in ready):
            mode = "PreferSameNode"
        elif all(e.zones for e in ready) and any(zone in e.zones for e in ready):
            mode = "PreferSameZone"

    def available(e: Ep) -> bool:
        if mode == "PreferSameNode":
            return node in e.nodes
        if mode == "PreferSameZone":
            return zone in e.zones
        return True

    chosen = [e for e in ready if available(e)]
    if not chosen:
        chosen = [e for e in eps if not e.ready and e.terminating]  # serving and terminating
    return {e.ip for e in chosen}


A, B, C = "10.244.1.1", "10.244.2.1", "10.244.3.1"
SETS: dict[str, list[Ep]] = {
    "no-hints": [Ep(A), Ep(B)],
    "zone-hints-for-us": [Ep(A, zones=("z1",)), Ep(B, zones=("z2",))],
    "zone-hints-none-for-us": [Ep(A, zones=("z2",)), Ep(B, zones=("z3",))],
    "zone-hints-partly": [Ep(A, zones=("z1",)), Ep(B)],
    "zone-hints-two-zones": [Ep(A, zones=("z1", "z2")), Ep(B, zones=("z2",))],
    "node-hints-for-us": [Ep(A, zones=("z1",), nodes=("n1",)),
                          Ep(B, zones=("z1",), nodes=("n2",))],
    "node-hints-none-for-us-zone-for-us": [Ep(A, zones=("z1",), nodes=("n2",)),
                                           Ep(B, zones=("z2",), nodes=("n3",))],
    "node-hints-partly": [Ep(A, zones=("z2",), nodes=("n1",)), Ep(B, zones=("z1",))],
    "hint-less-endpoint-not-ready": [Ep(A, zones=("z1",)), Ep(B, ready=False),
                                     Ep(C, zones=("z2",))],
    "only-terminating-with-hints": [Ep(A, ready=False, terminating=True, zones=("z1",)),
                                    Ep(B, ready=False, terminating=True, zones=("z2",))],
}
NODES = [("n1", "z1"), ("n1", None), ("n9", "z2"), ("n9", "z9")]
CASES = list(itertools.product(SETS, NODES))


def _objects(eps: list[Ep], itp_local: bool = False) -> list[tuple[dict[str, Any], str]]:
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "web", "namespace": "default"},
           "spec": {"clusterIP": CIP.ip, "ports": [{"name": "http", "port": 80}],
                    "internalTrafficPolicy": "Local" if itp_local else "Cluster"}}
    endpoints = []
    for e in eps:
        hints: dict[str, Any] = {}
        if e.zones:
            hints["forZones"] = [{"name": z} for z in e.zones]
        if e.nodes:
            hints["forNodes"] = [{"name": n} for n in e.nodes]
        endpoints.append({"addresses": [e.ip], "nodeName": "n1" if e.ip == A else "n2",
                          "conditions": {"ready": e.ready, "serving": e.ready or e.terminating,
                                         "terminating": e.terminating},
                          **({"hints": hints} if hints else {})})
    es = {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
          "metadata": {"name": "web-1", "namespace": "default",
                       "labels": {"kubernetes.io/service-name": "web"}},
          "addressType": "IPv4", "ports": [{"name": "http", "port": 80}],
          "endpoints": endpoints}
    return [(svc, "t"), (es, "t")]


@pytest.mark.parametrize(("hints", "node"), CASES, ids=[f"{h}-{n[0]}-{n[1]}" for h, n in CASES])
def test_cluster_traffic_uses_the_endpoints_kube_proxy_uses(hints: str,
                                                            node: tuple[str, str | None]
                                                            ) -> None:
    res = build_cluster(_objects(SETS[hints]))
    assert res.errors == ()
    state = desired.compute(res.cluster, Node(name=node[0], ips=("192.0.2.1",), zone=node[1]))
    got = {b.ip for b in state.entries[CIP].backends}
    assert got == kube_proxy(SETS[hints], *node)


def test_the_table_exercises_each_mode() -> None:
    def chosen(h: str, n: tuple[str, str | None]) -> set[str]:
        return kube_proxy(SETS[h], *n)

    assert chosen("node-hints-for-us", ("n1", "z1")) == {A}  # same node
    assert chosen("zone-hints-for-us", ("n1", "z1")) == {A}  # same zone
    assert chosen("zone-hints-none-for-us", ("n1", "z1")) == {A, B}  # ignored
    assert chosen("zone-hints-for-us", ("n1", None)) == {A, B}  # node without zone label


def test_local_traffic_policy_ignores_the_hints() -> None:
    res = build_cluster(_objects(SETS["zone-hints-for-us"], itp_local=True))
    state = desired.compute(res.cluster, Node(name="n2", ips=("192.0.2.1",), zone="z1"))
    assert {b.ip for b in state.entries[CIP].backends} == {B}, "n2's own, hint or not"


def test_bad_hints_skip_the_endpoint_naming_the_field() -> None:
    docs = _objects([Ep(A, zones=("z1",)), Ep(B)])
    docs[1][0]["endpoints"][0]["hints"] = {"forZones": [{"name": 3}]}
    res = build_cluster(docs)
    assert [e.field for e in res.errors] == ["endpoints[0].hints.forZones[0].name"]
    assert [e.ip for e in res.cluster.slices["default/web-1"].endpoints] == [B]
