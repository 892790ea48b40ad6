"""Which endpoints a packet may reach, and REJECT versus DROP when there is
none, for every combination of traffic policies, endpoint conditions,
locality, publishNotReadyAddresses and missing or empty slices. The
expected side is kube-proxy's own rules, transcribed: CategorizeEndpoints
(pkg/proxy/topology.go, v1.34) and the filter verdicts of syncProxyRules
(pkg/proxy/nftables/proxier.go, v1.34). The table is checked on the
desired state and through the tracer (the userspace twin of the programs:
no root needed; the differential test holds the twin to the kernel)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import pytest

from lb.datapath.instance import program, throwaway
from lb.inspect.trace import Probe, Tracer
from lb.model import Node
from lb.service import desired
from lb.sources.manifests import build_cluster

NODE = Node(name="here", ips=("192.0.2.1",))
CLIENT_POD = "10.244.9.9"
OUTSIDE = "198.51.100.7"


@dataclass(frozen=True)
class Ep:
    ip: str
    local: bool
    ready: bool
    serving: bool
    terminating: bool


def _ep(n: int, local: bool, ready: bool, serving: bool, terminating: bool) -> Ep:
    return Ep(f"10.244.{1 if local else 2}.{n}", local, ready, serving, terminating)


# None: no slice at all; []: an empty slice.
SCENARIOS: dict[str, list[Ep] | None] = {
    "no-slice": None,
    "empty-slice": [],
    "remote-ready": [_ep(1, False, True, True, False)],
    "local-ready": [_ep(2, True, True, True, False)],
    "remote-serving-terminating": [_ep(3, False, False, True, True)],
    "local-serving-terminating": [_ep(4, True, False, True, True)],
    "remote-terminating-not-serving": [_ep(5, False, False, False, True)],
    "local-not-ready": [_ep(6, True, False, False, False)],
    "local-and-remote-ready": [_ep(7, True, True, True, False), _ep(8, False, True, True, False)],
    "local-terminating-remote-ready": [_ep(9, True, False, True, True),
                                       _ep(10, False, True, True, False)],
    "remote-ready-local-not-ready": [_ep(11, False, True, True, False),
                                     _ep(12, True, False, False, False)],
    "local-ready-remote-terminating": [_ep(13, True, True, True, False),
                                       _ep(14, False, False, True, True)],
}


def kube_proxy(eps: list[Ep] | None, itp_local: bool, etp_local: bool, pnr: bool
               ) -> dict[str, tuple[str, frozenset[str]]]:
    """kube-proxy's verdict per traffic kind: ("DNAT", endpoints), ("REJECT",
    {}) or ("DROP", {}). publishNotReadyAddresses is what the EndpointSlice
    controller makes of it: every endpoint ready."""
    eps = eps or []

    def ready(e: Ep) -> bool:
        return e.ready or pnr

    def serving_terminating(e: Ep) -> bool:
        return e.serving and e.terminating

    # CategorizeEndpoints.
    cluster = [e for e in eps if ready(e)] or [e for e in eps if serving_terminating(e)]
    has_endpoints = any(ready(e) or serving_terminating(e) for e in eps)
    local = ([e for e in eps if e.local and ready(e)]
             or [e for e in eps if e.local and serving_terminating(e)])

    def verdict(policy_local: bool) -> tuple[str, frozenset[str]]:
        # syncProxyRules: no endpoints at all rejects; a Local policy with
        # none on this node drops.
        if not has_endpoints:
            return "REJECT", frozenset()
        chosen = local if policy_local else cluster
        return ("DNAT", frozenset(e.ip for e in chosen)) if chosen else ("DROP", frozenset())

    return {
        "clusterip": verdict(itp_local),
        "nodeport-from-outside": verdict(etp_local),
        # Pod traffic to an external destination is short-circuited to the
        # cluster endpoints (the EXT chain's "short-circuit pod traffic").
        "nodeport-from-pod": verdict(False),
    }


CASES = list(itertools.product(SCENARIOS, (False, True), (False, True), (False, True)))


def _objects() -> tuple[list[tuple[dict[str, Any], str]], dict[int, tuple[str, int, int]]]:
    docs: list[tuple[dict[str, Any], str]] = []
    where: dict[int, tuple[str, int, int]] = {}
    for i, (scenario, itp, etp, pnr) in enumerate(CASES):
        name, vip, node_port = f"s{i}", f"10.96.{i // 200}.{i % 200 + 1}", 30000 + i
        where[i] = (vip, 80, node_port)
        docs.append(({"apiVersion": "v1", "kind": "Service",
                      "metadata": {"name": name, "namespace": "default"},
                      "spec": {"type": "NodePort", "clusterIP": vip,
                               "internalTrafficPolicy": "Local" if itp else "Cluster",
                               "externalTrafficPolicy": "Local" if etp else "Cluster",
                               "publishNotReadyAddresses": pnr,
                               "ports": [{"name": "http", "port": 80, "targetPort": 8080,
                                          "nodePort": node_port}]}}, "t"))
        eps = SCENARIOS[scenario]
        if eps is None:
            continue
        docs.append(({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                      "metadata": {"name": f"{name}-1", "namespace": "default",
                                   "labels": {"kubernetes.io/service-name": name}},
                      "addressType": "IPv4",
                      "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                      "endpoints": [{"addresses": [e.ip],
                                     "nodeName": NODE.name if e.local else "elsewhere",
                                     "conditions": {"ready": e.ready, "serving": e.serving,
                                                    "terminating": e.terminating}}
                                    for e in eps]}, "t"))
    return docs, where


def _desired_verdict(entry: desired.FrontendEntry) -> tuple[str, frozenset[str]]:
    from loader.layout import const

    if entry.backends:
        return "DNAT", frozenset(b.ip for b in entry.backends)
    return ("DROP" if entry.flags & const("LB_SVC_LOCAL_ONLY") else "REJECT"), frozenset()


def test_the_table_covers_every_combination() -> None:
    assert len(CASES) == len(SCENARIOS) * 8 == 96
    kinds = {v[0] for s, i, e, p in CASES for v in kube_proxy(SCENARIOS[s], i, e, p).values()}
    assert kinds == {"DNAT", "REJECT", "DROP"}


def test_desired_state_chooses_what_kube_proxy_chooses() -> None:
    docs, where = _objects()
    res = build_cluster(docs)
    assert res.errors == ()
    state = desired.compute(res.cluster, NODE)
    wrong = []
    for i, (scenario, itp, etp, pnr) in enumerate(CASES):
        vip, port, node_port = where[i]
        want = kube_proxy(SCENARIOS[scenario], itp, etp, pnr)
        got = {
            "clusterip": _desired_verdict(state.entries[desired.Frontend(
                vip, port, 6, desired.SCOPE_INTERNAL)]),
            "nodeport-from-outside": _desired_verdict(state.entries[desired.Frontend(
                NODE.ips[0], node_port, 6, desired.SCOPE_EXTERNAL)]),
            "nodeport-from-pod": _desired_verdict(state.entries[desired.Frontend(
                NODE.ips[0], node_port, 6, desired.SCOPE_INTERNAL)]),
        }
        if got != want:
            wrong.append((scenario, f"itp_local={itp}", f"etp_local={etp}", f"pnr={pnr}",
                          got, want))
    assert wrong == []


TRACE_LINES = {"REJECT": "REJECT no-endpoints", "DROP": "DROP no-local"}


@pytest.fixture(scope="module")
def tracer() -> Any:
    docs, _ = _objects()
    cluster = build_cluster(docs).cluster
    with throwaway("userspace") as dp:
        got = program(dp, cluster, NODE)
        assert got.refused == []
        yield Tracer(dp, got.local_pods, got.policy_names)


@pytest.mark.parametrize(("scenario", "itp", "etp", "pnr"), CASES)
def test_a_packet_gets_what_kube_proxy_gives_it(tracer: Tracer, scenario: str, itp: bool,
                                                etp: bool, pnr: bool) -> None:
    i = CASES.index((scenario, itp, etp, pnr))
    vip, port, node_port = f"10.96.{i // 200}.{i % 200 + 1}", 80, 30000 + i
    want = kube_proxy(SCENARIOS[scenario], itp, etp, pnr)
    probes = {
        "clusterip": Probe(CLIENT_POD, 40000 + i, vip, port, "tcp", "pod"),
        "nodeport-from-outside": Probe(OUTSIDE, 40000 + i, NODE.ips[0], node_port, "tcp",
                                       "external"),
        "nodeport-from-pod": Probe(CLIENT_POD, 50000 + i, NODE.ips[0], node_port, "tcp", "pod"),
    }
    for kind, probe in probes.items():
        verdict, endpoints = want[kind]
        line = tracer.run(probe).line()
        if verdict == "DNAT":
            assert line.split()[0] == "DNAT", (kind, line)
            assert line.split()[1].rsplit(":", 1)[0] in endpoints, (kind, line, endpoints)
        else:
            assert line == TRACE_LINES[verdict], (kind, line)
