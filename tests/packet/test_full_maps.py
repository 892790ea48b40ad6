"""Full maps: the objects that do not fit are refused with a log line and
a per-map metric, and everything programmed before keeps working, through
the real programs (BPF_PROG_TEST_RUN) in instances built with tiny maps."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from lb.agent.metrics import Metrics
from lb.datapath.instance import Sizes, policy_writer_for, reconciler_for
from lb.inspect import packets
from lb.inspect.trace import Probe, Tracer
from lb.model import Cluster
from lb.policy.kernel import PolicyWriter
from lb.service import desired
from lb.service.reconcile import Reconciler, SyncResult
from lb.sources.manifests import build_cluster
from loader import layout, libbpf
from loader.build import BuildOptions, Datapath, remove_pins
from tests.conftest import new_pin_dir, require_root
from tests.packet.test_datapath import NODE, TC, TC_ACT_OK, endpoint_slice, service
from tests.unit.test_policy import MATRIX_IP, NODE1, POD_A, matrix_cluster, netpol

TINY = Sizes(max_services=64, max_backends=9, maglev_slots=1 << 14, ct_size=1024,
             pol_endpoints=2, pol_ipcache=64, pol_rules=64, pol_portsets=16)
VIPS = {"a": "10.96.5.1", "b": "10.96.5.2", "c": "10.96.5.3"}
PORTS = [{"name": "p", "port": 80}]


@pytest.fixture(scope="module")
def tiny() -> Iterator[Datapath]:
    require_root()
    pin_dir = new_pin_dir("full")
    try:
        with Datapath(BuildOptions(pin_dir, TINY)) as dp:
            yield dp
    finally:
        remove_pins(pin_dir)


def cluster_of(backends: dict[str, int]) -> Cluster:
    """Services a, b, c (those named) with n backends each: 10.244.10.1 on
    for a, 10.244.11.1 on for b, 10.244.12.1 on for c."""
    docs: list[dict[str, Any]] = []
    for name, n in sorted(backends.items()):
        subnet = 10 + sorted(VIPS).index(name)
        docs.append(service(name, VIPS[name], PORTS))
        docs.append(endpoint_slice(name, [f"10.244.{subnet}.{j + 1}" for j in range(n)],
                                   PORTS))
    result = build_cluster((d, "test") for d in docs)
    assert not result.errors
    return result.cluster


def forget_flows(dp: Datapath) -> None:
    """Empty the conntrack table: what follows is judged by the maps alone."""
    ct = dp.map("lb_ct")
    for k in list(ct.keys()):
        ct.delete(layout.ffi.new("struct lb_ct_key *", k))


def destinations(dp: Datapath, vip: str, flows: int = 64) -> set[str]:
    """Where new flows from a pod to vip:80 go (the destination as the
    program leaves it: unchanged when the address is no service)."""
    forget_flows(dp)
    seen = set()
    for sport in range(20000, 20000 + flows):
        run = libbpf.prog_test_run(dp.prog_fd(TC), packets.build("10.244.1.5", sport, vip, 80))
        p = packets.parse(run.data)
        assert run.retval == TC_ACT_OK and p is not None
        seen.add(p.dst)
    return seen


def gauge(m: Metrics, map_name: str) -> float | None:
    return m.registry.get_sample_value("xdplb_map_refusals", {"map": map_name})


def sync(rec: Reconciler, m: Metrics, cluster: Cluster) -> SyncResult:
    state = desired.compute(cluster, NODE)
    res = rec.sync(state)
    m.synced(0.001, res, rec)
    return res


def test_full_backend_map_refuses_what_does_not_fit_and_keeps_the_rest(tiny: Datapath) -> None:
    rec, m = reconciler_for(tiny), Metrics()
    # 8 backend ids (0 means none): a and b take them all.
    res = sync(rec, m, cluster_of({"a": 4, "b": 4}))
    assert not res.refusals and res.added == 2
    a_backends, b_backends = destinations(tiny, VIPS["a"]), destinations(tiny, VIPS["b"])
    assert len(a_backends) == 4 and len(b_backends) == 4

    # A new service finds no ids: refused whole, said (the caller logs the
    # refusals, once and bounded), counted; a and b untouched; its ClusterIP
    # is not programmed (no REJECT: it passes as is).
    res = sync(rec, m, cluster_of({"a": 4, "b": 4, "c": 2}))
    assert [r.map_name for r in res.refusals] == ["lb_backends"], res.refusals
    assert "default/c" in res.errors[0] and "not programmed" in res.errors[0]
    assert res.errors[0].endswith("(no room in lb_backends)"), res.errors
    assert gauge(m, "lb_backends") == 1 and gauge(m, "lb_services") == 0
    assert destinations(tiny, VIPS["a"]) == a_backends
    assert destinations(tiny, VIPS["b"]) == b_backends
    assert destinations(tiny, VIPS["c"], flows=4) == {VIPS["c"]}

    # b scales to 6 while the map is full: b keeps its four backends (not
    # fewer, not none) rather than being withdrawn.
    res = sync(rec, m, cluster_of({"a": 4, "b": 6, "c": 2}))
    assert sorted(r.subject.split(":")[0] for r in res.refusals) == ["default/b", "default/c"]
    assert any("keeps its previous entry" in e for e in res.errors), res.errors
    assert gauge(m, "lb_backends") == 2
    assert destinations(tiny, VIPS["b"]) == b_backends
    assert destinations(tiny, VIPS["a"]) == a_backends

    # a goes: its ids are free from the sync after next (no packet may
    # still read them), then b grows to 6 and c gets its 2.
    sync(rec, m, cluster_of({"b": 6, "c": 2}))
    res = sync(rec, m, cluster_of({"b": 6, "c": 2}))
    assert not res.refusals, res.errors
    assert gauge(m, "lb_backends") == 0
    assert len(destinations(tiny, VIPS["b"])) == 6
    assert len(destinations(tiny, VIPS["c"])) == 2
    assert destinations(tiny, VIPS["a"], flows=4) == {VIPS["a"]}
    sync(rec, m, Cluster())


def test_full_policy_maps_keep_the_last_good_policy(
        tiny: Datapath, caplog: pytest.LogCaptureFixture) -> None:
    writer, m = policy_writer_for(tiny), Metrics()
    xa, xb, xc = (MATRIX_IP[k] for k in ("x/a", "x/b", "x/c"))
    ya = MATRIX_IP["y/a"]
    only_b = netpol("x", "a-from-b", podSelector=POD_A, policyTypes=["Ingress"],
                    ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])

    def verdicts(cluster: Cluster, w: PolicyWriter) -> dict[tuple[str, str], str]:
        forget_flows(tiny)
        tracer = Tracer(tiny, {ip for p in cluster.pods.values() for ip in p.ips},
                        dict(w.current.policies))
        return {(s, d): tracer.run(Probe(s, 30000 + i, d, 80, "tcp", "pod")).line()
                for i, (s, d) in enumerate([(xb, xa), (xc, xa), (xa, ya), (xc, xb)])}

    good = matrix_cluster(only_b)
    assert writer.sync(good, NODE1) == []
    before = verdicts(good, writer)
    assert before[(xb, xa)] == "PASS not-service" and before[(xc, xa)] == "DROP policy x/a-from-b"
    assert before[(xa, ya)] == "PASS not-service" and before[(xc, xb)] == "PASS not-service"

    # Closing namespace y as well would isolate 3 more pods: 4 > 2 slots.
    caplog.set_level(logging.ERROR, logger="lb.policy.kernel")
    too_big = matrix_cluster(only_b, netpol("y", "deny-all", policyTypes=["Ingress"]))
    refusals = writer.sync(too_big, NODE1)
    assert [r.map_name for r in refusals] == ["lb_pol_endpoints"], refusals
    assert "4 isolated pods, the map holds 2" in str(refusals[0])
    assert "keep the previous policy" in caplog.text and "lb_pol_endpoints" in caplog.text
    m.synced(0.001, SyncResult(refusals=refusals), reconciler_for(tiny))
    assert gauge(m, "lb_pol_endpoints") == 1
    # The maps still hold the good policy, exactly.
    assert verdicts(too_big, writer) == before

    # Something that fits is applied at once.
    fits = matrix_cluster(only_b, netpol("x", "b-closed", policyTypes=["Ingress"],
                                         podSelector={"matchLabels": {"pod": "b"}}))
    assert writer.sync(fits, NODE1) == []
    assert verdicts(fits, writer)[(xc, xb)] == "DROP policy x/b-closed"
    assert writer.sync(Cluster(), NODE1) == []
