"""The reconciler against real maps: only differences are written, a
restarted agent adopts what the pins hold, limits refuse cleanly."""

from __future__ import annotations

import array

from lb.datapath.instance import reconciler_for
from lb.inspect import packets
from lb.service import desired
from lb.service.reconcile import Reconciler
from lb.sources.manifests import build_cluster
from loader.build import BuildOptions, Datapath
from tests.packet.test_datapath import NODE, TC, VIP, program, run, web


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


def kernel_table(dp: Datapath, off: int, size: int) -> list[int]:
    return array.array("I", dp.map("lb_maglev").read_array(off, size)).tolist()


def test_frontends_of_one_service_port_share_one_table(datapath: Datapath) -> None:
    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    # http: ClusterIP, NodePort from outside and from pods; dns: ClusterIP.
    assert len(rec.applied) == 4
    tables = {(a.group_id, a.off, a.size) for a in rec.applied.values()}
    assert len(tables) == len(rec.tables) == 2
    assert sum(t.users for t in rec.tables.values()) == 4


def test_backend_swap_rewrites_only_changed_slots_in_place(datapath: Datapath) -> None:
    from lb.service import maglev

    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    before = {f: (a.off, a.size) for f, a in rec.applied.items()}
    old = {f: kernel_table(datapath, *r) for f, r in before.items()}
    result = build_cluster((d, "t") for d in web(["10.244.1.10", "10.244.1.12"])).cluster
    res = rec.sync(desired.compute(result, NODE))
    assert not res.errors and res.updated == 4
    # Same count, same size: every frontend keeps its range, rewritten in place.
    assert {f: (a.off, a.size) for f, a in rec.applied.items()} == before
    by_id = {bid: desired.Backend(ip, port, proto).name
             for (_, ip, port, proto), (bid, _) in rec.backends.items()}
    moved = {}
    for f, a in rec.applied.items():
        new = kernel_table(datapath, a.off, a.size)
        ids = list(a.backend_ids)
        assert new == maglev.populate([by_id[i] for i in ids], a.size, labels=ids)
        moved[a.off] = sum(x != y for x, y in zip(old[f], new, strict=True))
    # Two tables, each with half its slots on the backend that went: those
    # are written, and some Maglev churn besides, not the whole table.
    assert len(moved) == 2 and sum(moved.values()) == res.slots_written
    assert all(125 <= m < 200 for m in moved.values()), moved


def test_table_that_must_grow_moves_to_a_new_range(datapath: Datapath) -> None:
    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    before = {f: a.off for f, a in rec.applied.items()}
    # Three backends need more than 251 slots at 100 each.
    program(datapath, web(["10.244.1.10", "10.244.1.11", "10.244.1.12"]), rec)
    assert {a.size for a in rec.applied.values()} == {509}
    after = {f: a.off for f, a in rec.applied.items()}
    assert all(before[f] != after[f] for f in before)
    # Back to two: the size stays (hysteresis), slots change in place.
    program(datapath, web(["10.244.1.10", "10.244.1.11"]), rec)
    assert {f: a.off for f, a in rec.applied.items()} == after
    assert {a.size for a in rec.applied.values()} == {509}
    # The ranges given up are reused only after one more sync.
    program(datapath, web(["10.244.1.10", "10.244.1.11", "10.244.1.12", "10.244.1.13",
                           "10.244.1.14", "10.244.1.15"]), rec)
    assert {a.size for a in rec.applied.values()} == {1021}
    assert not {a.off for a in rec.applied.values()} & set(after.values())


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
