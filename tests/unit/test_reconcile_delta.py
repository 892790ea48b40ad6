"""The reconciler's delta sync: given only the frontends a change touched, it
leaves the maps exactly as a full pass over everything would, through
random changes, refusals and restarts. Over the userspace twin's maps (the
same Reconciler the kernel maps get)."""

from __future__ import annotations

import array
import copy
import random
import socket
from dataclasses import replace
from typing import Any

from lb.datapath.instance import RECONCILER_MAPS, Sizes
from lb.datapath.userspace.maps import DictMap, new_userspace_maps
from lb.encoding import ip_str, port_host
from lb.model import Changes
from lb.service import desired
from lb.service.reconcile import Reconciler
from tests.unit.test_desired import NODE, ep, eps, svc
from tests.unit.test_desired_memo import cluster_of, keeping, mutate

SERVICES = 24


def service_docs(i: int, rng: random.Random) -> list[dict[str, Any]]:
    name = f"s{i}"
    kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
    ports = [{"name": "http", "port": rng.choice([80, 81]), "targetPort": "web",
              **({"nodePort": 30000 + i} if kind != "ClusterIP" else {})}]
    if rng.random() < 0.3:
        ports.append({"name": "udp", "port": 53, "protocol": "UDP", "targetPort": "web",
                      **({"nodePort": 31000 + i} if kind != "ClusterIP" else {})})
    spec: dict[str, Any] = {"type": kind, "clusterIP": f"10.96.1.{i + 1}", "ports": ports}
    if rng.random() < 0.3:
        spec["externalTrafficPolicy"] = "Local"
    if rng.random() < 0.2:  # shared with a neighbour: a claimed frontend
        spec["externalIPs"] = [f"198.51.100.{i // 2 + 1}"]
    doc = svc(name, **spec)
    if kind == "LoadBalancer":
        doc["status"] = {"loadBalancer": {"ingress": [{"ip": f"203.0.113.{i + 1}"}]}}
        if rng.random() < 0.5:
            spec["loadBalancerSourceRanges"] = rng.sample(
                ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"], rng.randint(1, 2))
    endpoints = [ep(f"10.244.{i}.{j + 1}", node=rng.choice(["node-a", "node-b"]),
                    ready=rng.random() < 0.8, terminating=rng.random() < 0.1)
                 for j in range(rng.randint(0, 5))]
    return [doc, eps(*endpoints, name=name)]


def new_reconciler(maps: dict[str, DictMap], sizes: Sizes) -> Reconciler:
    return Reconciler({m: maps[m] for m in RECONCILER_MAPS}, max_services=sizes.max_services,
                      max_backends=sizes.max_backends, maglev_slots=sizes.maglev_slots,
                      filter_words=sizes.filter_words)


def contents(maps: dict[str, DictMap], words: int, slots: bool) -> dict[str, Any]:
    """What the maps hold, with every id replaced by what it stands for
    (`slots`: the Maglev tables' too, slot by slot)."""
    backends = {bid: b for bid, b in maps["lb_backends"].items() if b.addr}
    named = {bid: (ip_str(b.addr), port_host(b.port), b.proto, b.flags)
             for bid, b in backends.items()}

    rev = {sid: (ip_str(r.addr), port_host(r.port)) for sid, r in maps["lb_rev_nat"].items()
           if r.addr}
    groups: dict[int, set[str]] = {}
    services = {}
    for k, v in maps["lb_services"].items():
        f = (ip_str(k.addr), port_host(k.port), k.proto, k.scope)
        table = array.array("I", maps["lb_maglev"].read_array(v.maglev_off, v.maglev_size)
                            ) if v.maglev_size and slots else array.array("I")
        services[f] = (rev[v.svc_id], v.flags, v.affinity_timeout, v.backend_count,
                       v.maglev_size, tuple(named[s] for s in table))
        groups.setdefault(v.group_id, set()).add(f"{f}")
    group_names = {gid: ",".join(sorted(fs)) for gid, fs in groups.items()}
    return {
        "services": services,
        "backends": sorted((group_names.get(b.group_id, "unused"), *named[bid])
                           for bid, b in backends.items()),
        "rev_nat": sorted(rev.values()),
        "vips": sorted(ip_str(k) for k, _ in maps["lb_vips"].items()),
        "ranges": sorted((rev.get(socket.ntohl(k.svc_id), ("unused", 0)), ip_str(k.addr),
                          k.prefixlen) for k, _ in maps["lb_source_ranges"].items()),
        "filter": maps["lb_filter"].read_array(0, words),
    }


def check_same(inc: Reconciler, inc_maps: dict[str, DictMap], ref: Reconciler,
               ref_maps: dict[str, DictMap], step: int) -> None:
    words, slots = inc.prefilter.words, step % 10 == 9
    assert contents(inc_maps, words, slots) == contents(ref_maps, words, slots), step
    for name, kind in (("svc_ids", "svc"), ("group_ids", "group"), ("backend_ids", "backend")):
        # Ids given up wait a sync in quarantine (a restart's first sync gives some up).
        def live(r: Reconciler, name: str = name, kind: str = kind) -> int:
            return len(getattr(r, name)) - sum(q[0] == kind for q in r._quarantine)
        assert live(inc) == live(ref), (step, name)
    def slots(r: Reconciler) -> int:
        return r.slab.in_use - sum(q[2] for q in r._quarantine if q[0] == "slab")
    assert slots(inc) == slots(ref), step
    assert inc.prefilter.members == ref.prefilter.members, step
    assert set(inc.service_users) == {a.entry.service for a in inc.applied.values()
                                      if a.entry is not None}, step


def run(seed: int, sizes: Sizes, steps: int) -> int:
    rng = random.Random(seed)
    docs: dict[int, list[dict[str, Any]]] = {}
    inc_maps, ref_maps = new_userspace_maps(sizes), new_userspace_maps(sizes)
    inc, ref = new_reconciler(inc_maps, sizes), new_reconciler(ref_maps, sizes)
    memo = desired.Memo()
    last = cluster_of([])
    deltas = refused = 0
    for step in range(steps):
        for _ in range(rng.randint(1, 3)):
            mutate(docs, rng, service_docs, SERVICES)
        flat = [d for i in sorted(docs) for d in copy.deepcopy(docs[i])]
        fresh = cluster_of(flat)
        kept = keeping(last, fresh)
        # A tracking source says which services changed; now and then it
        # cannot (the memo then compares).
        if rng.random() < 0.8:
            touched = {k for k in kept.services.keys() | last.services.keys()
                       if kept.services.get(k) is not last.services.get(k)
                       or kept.slices_of(k) != last.slices_of(k)}
            kept = replace(kept, changes=Changes(last.revision, frozenset(touched)))
        state = desired.compute(kept, NODE, memo)
        if kept.changes is not None and step:  # told: only those looked at
            assert memo.computed + memo.reused <= len(kept.changes.services), step
        full = desired.compute(fresh, NODE)
        assert desired.drift(state, full) == 0, step
        deltas += state.since is not None
        if step % 53 == 52:  # the agent restarts over the pinned maps
            inc = new_reconciler(inc_maps, sizes)
            inc.recover()
        res_inc, res_ref = inc.sync(state), ref.sync(full)
        assert sorted(res_inc.errors) == sorted(res_ref.errors), step
        refused += bool(res_ref.errors)
        check_same(inc, inc_maps, ref, ref_maps, step)
        last = kept
    assert deltas > steps // 2, "the delta path was taken"
    return refused


def test_delta_syncs_leave_the_maps_as_full_syncs_do() -> None:
    sizes = Sizes(max_services=256, max_backends=1024, maglev_slots=1 << 16, ct_size=1024)
    assert run(3, sizes, 200) == 0


def test_refused_frontends_are_retried_by_delta_syncs_as_by_full_ones() -> None:
    # Room for about half the frontends and backends: refusals on most steps.
    sizes = Sizes(max_services=48, max_backends=96, maglev_slots=1 << 16, ct_size=1024)
    assert run(5, sizes, 200) > 40


def test_a_table_one_frontend_leaves_and_another_takes_in_one_sync_stays_whole() -> None:
    """A NodePort service with internalTrafficPolicy Local: its NodePort
    entries (every endpoint) leave a table for a larger one while its
    ClusterIP entry (this node's endpoints), written after them, comes to
    want that very table. The table must stay the ClusterIP's, never freed
    under it: the services added in the next syncs take fresh ranges, and
    every sync's maps equal a full pass from empty."""
    sizes = Sizes(max_services=64, max_backends=256, maglev_slots=1 << 14, ct_size=1024)
    # A ClusterIP that sorts after the node's address (192.0.2.1).
    web = svc("web", type="NodePort", clusterIP="198.18.0.1", internalTrafficPolicy="Local",
              ports=[{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}])
    steps = [
        [web, eps(ep("10.244.0.1"), ep("10.244.0.2", node="node-b"))],
        [web, eps(ep("10.244.0.1"), ep("10.244.0.2"), ep("10.244.0.3", node="node-b"))],
    ]
    for i in range(3):  # then services that take new ranges
        steps.append(steps[-1] + [svc(f"s{i}", clusterIP=f"10.96.2.{i + 1}"),
                                  eps(ep(f"10.244.1.{i + 1}"), name=f"s{i}")])
    inc_maps = new_userspace_maps(sizes)
    inc, memo = new_reconciler(inc_maps, sizes), desired.Memo()
    for step, docs in enumerate(steps):
        assert not inc.sync(desired.compute(cluster_of(docs), NODE, memo)).errors
        ref_maps = new_userspace_maps(sizes)
        ref = new_reconciler(ref_maps, sizes)
        assert not ref.sync(desired.compute(cluster_of(docs), NODE)).errors
        words = inc.prefilter.words
        assert contents(inc_maps, words, True) == contents(ref_maps, words, True), step
