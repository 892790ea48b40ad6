"""The reconciler against real maps: only differences are written, a
restarted agent adopts what the pins hold, limits refuse cleanly."""

from __future__ import annotations

from lb.datapath.instance import reconciler_for
from lb.inspect import packets
from lb.service.reconcile import Reconciler
from loader.build import BuildOptions, Datapath
from tests.packet.test_datapath import TC, VIP, program, run, web


def test_second_sync_of_the_same_state_changes_nothing(datapath: Datapath) -> None:
    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    res = rec.sync(rec_state(rec, datapath))
    assert not res.changed


def rec_state(rec: Reconciler, dp: Datapath):  # type: ignore[no-untyped-def]
    from lb.service import desired
    from lb.sources.manifests import build_cluster
    from tests.packet.test_datapath import NODE

    cluster = build_cluster((d, "t") for d in web(["10.244.1.10", "10.244.1.11"])).cluster
    return desired.compute(cluster, NODE)


def test_restarted_reconciler_adopts_pinned_state_and_flows_survive(datapath: Datapath) -> None:
    first = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    flows = {}
    for sport in range(30000, 30050):
        p = packets.parse(run(datapath, TC, packets.build("10.244.1.5", sport, VIP, 80)).data)
        assert p is not None
        flows[sport] = p.dst
    ids_before = dict(first.backends)
    svc_before = {f: (a.svc_id, a.off, a.size) for f, a in first.applied.items()}

    second = reconciler_for(datapath)
    assert second.recover() == len(first.applied)
    res = second.sync(rec_state(second, datapath))
    assert not res.changed, res
    assert second.backends == ids_before
    assert {f: (a.svc_id, a.off, a.size) for f, a in second.applied.items()} == svc_before
    for sport, dst in flows.items():
        p = packets.parse(run(datapath, TC, packets.build("10.244.1.5", sport, VIP, 80)).data)
        assert p is not None and p.dst == dst

    # A change after the restart lands on fresh ids, not on adopted ones.
    res = program(datapath, web(["10.244.1.10", "10.244.1.11", "10.244.1.12"]), second)
    assert len(second.backends) == 6  # 3 backends x (http, dns) service ports


def test_backend_change_switches_to_a_new_maglev_range(datapath: Datapath) -> None:
    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    before = {f: a.off for f, a in rec.applied.items()}
    program(datapath, web(["10.244.1.10", "10.244.1.12"]), rec)
    after = {f: a.off for f, a in rec.applied.items()}
    assert all(before[f] != after[f] for f in before)
    # The old ranges are reused only after one more sync.
    used_now = set(after.values())
    program(datapath, web(["10.244.1.10", "10.244.1.13"]), rec)
    assert {a.off for a in rec.applied.values()} & set(before.values())
    assert not ({a.off for a in rec.applied.values()} & used_now)


def test_full_services_map_refuses_extra_entries_and_keeps_the_rest() -> None:
    from lb.datapath.instance import Sizes
    from lb.service import desired
    from lb.sources.manifests import build_cluster
    from loader.build import remove_pins
    from tests.conftest import new_pin_dir, require_root
    from tests.packet.test_datapath import NODE, endpoint_slice, service

    require_root()
    pin_dir = new_pin_dir("limits")
    try:
        with Datapath(BuildOptions(pin_dir, Sizes(max_services=8, max_backends=64,
                                                  maglev_slots=1 << 14, ct_size=1024))) as dp:
            docs = []
            for i in range(12):
                docs.append(service(f"s{i}", f"10.96.1.{i + 1}", [{"name": "p", "port": 80}]))
                docs.append(endpoint_slice(f"s{i}", [f"10.244.3.{i + 1}"],
                                           [{"name": "p", "port": 80}]))
            cluster = build_cluster((d, "t") for d in docs).cluster
            rec = reconciler_for(dp)
            res = rec.sync(desired.compute(cluster, NODE))
            assert res.added == 7  # ids start at 1: 0 means none in every map
            assert len(res.errors) == 12 - 7
            assert all("not programmed" in e for e in res.errors)
            assert {r.map_name for r in res.refusals} == {"lb_services"}
            # Every programmed service still answers.
            for f in rec.applied:
                frame = packets.build("10.244.1.5", 1000, f.ip, 80)
                p = packets.parse(run(dp, TC, frame).data)
                assert p is not None and p.dst.startswith("10.244.3.")
    finally:
        remove_pins(pin_dir)
