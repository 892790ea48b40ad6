"""The desired state's memo: recomputing only the services whose objects
changed gives what a full recompute gives."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from lb.model import Cluster, Node
from lb.service import desired
from lb.sources.manifests import build_cluster
from tests.unit.test_desired import NODE, ep, eps, svc


def cluster_of(docs: list[dict[str, Any]]) -> Cluster:
    res = build_cluster((d, "t") for d in docs)
    assert not res.errors, res.errors
    return res.cluster


def keeping(old: Cluster, new: Cluster) -> Cluster:
    """`new` with every object equal to one of `old` replaced by that one, as
    a watch keeps the objects no event touched."""
    def merged(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        return {k: a[k] if k in a and a[k] == v else v for k, v in b.items()}
    return replace(new, services=merged(old.services, new.services),
                   slices=merged(old.slices, new.slices))


def service_docs(i: int, rng: random.Random) -> list[dict[str, Any]]:
    name = f"s{i}"
    kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
    spec: dict[str, Any] = {"type": kind, "clusterIP": f"10.96.1.{i + 1}",
                            "ports": [{"name": "http", "port": 80, "targetPort": "web",
                                       **({"nodePort": 30000 + i} if kind != "ClusterIP"
                                          else {})}]}
    if rng.random() < 0.3:
        spec["externalTrafficPolicy"] = "Local"
    endpoints = [ep(f"10.244.{i}.{j + 1}", node=rng.choice(["node-a", "node-b"]),
                    ready=rng.random() < 0.8) for j in range(rng.randint(0, 4))]
    return [svc(name, **spec), eps(*endpoints, name=name)]


def mutate(docs: dict[int, list[dict[str, Any]]], rng: random.Random,
           make: Callable[[int, random.Random], list[dict[str, Any]]] = service_docs,
           count: int = 30) -> set[str]:
    """One change of the kinds a cluster sees (of services `make` writes);
    the services it touches."""
    i = rng.randrange(count)
    what = rng.random()
    if i not in docs or what < 0.15:
        docs[i] = make(i, rng)
    elif what < 0.25:
        del docs[i]
    elif what < 0.75:
        endpoints = docs[i][1]["endpoints"]
        if endpoints and rng.random() < 0.7:
            e = rng.choice(endpoints)
            if rng.random() < 0.5:
                e["conditions"]["ready"] = not e["conditions"]["ready"]
            else:
                e["conditions"]["terminating"] = not e["conditions"]["terminating"]
                e["conditions"]["serving"] = True
        elif endpoints and rng.random() < 0.5:
            endpoints.remove(rng.choice(endpoints))
        else:
            endpoints.append(ep(f"10.244.{i}.{rng.randint(10, 30)}"))
    elif what < 0.9:
        docs[i][0]["spec"]["ports"][0]["port"] = rng.choice([80, 81, 8080])
    else:
        docs[i][0]["spec"]["sessionAffinity"] = rng.choice(["None", "ClientIP"])
    return {f"default/s{i}"}


def test_a_memo_follows_every_change_as_a_full_recompute_would() -> None:
    rng = random.Random(7)
    docs: dict[int, list[dict[str, Any]]] = {}
    memo, fresh_memo = desired.Memo(), desired.Memo()
    node = NODE
    last = cluster_of([])
    for step in range(400):
        touched = mutate(docs, rng)
        if step % 97 == 96:  # the node changes now and then: everything again
            node = replace(node, ips=(f"192.0.2.{step % 200 + 1}",))
            touched = {f"default/s{i}" for i in docs}
        flat = [d for i in sorted(docs) for d in copy.deepcopy(docs[i])]
        fresh = cluster_of(flat)           # a file source: every object new
        kept = keeping(last, fresh)        # a watch: untouched objects kept
        full = desired.compute(fresh, node)
        for cluster, m in ((kept, memo), (fresh, fresh_memo)):
            state = desired.compute(cluster, node, m)
            assert desired.drift(state, full) == 0, step
            assert state == full, step
        # The watch's memo computed only what the change touched.
        present = {k for k in touched if k in kept.services}
        assert memo.computed <= len(present) or step % 97 == 96, (step, memo.computed)
        assert memo.computed + memo.reused == len(kept.services)
        last = kept


def test_an_untouched_service_keeps_its_very_entries() -> None:
    rng = random.Random(1)
    docs = {i: service_docs(i, rng) for i in range(5)}
    before = cluster_of([d for i in sorted(docs) for d in docs[i]])
    memo = desired.Memo()
    first = desired.compute(before, NODE, memo)
    assert memo.computed == 5
    docs[2][1]["endpoints"].append(ep("10.244.2.99"))
    after = keeping(before, cluster_of([d for i in sorted(docs) for d in docs[i]]))
    second = desired.compute(after, NODE, memo)
    assert (memo.computed, memo.reused) == (1, 4)
    for f, e in second.entries.items():
        if e.service != "default/s2":
            assert e is first.entries[f]
    assert second == desired.compute(after, NODE)


def test_drift_counts_the_entries_that_differ() -> None:
    state = desired.compute(cluster_of([svc(type="NodePort"), eps(ep("10.244.1.5"))]), NODE)
    assert desired.drift(state, state) == 0
    other = desired.compute(cluster_of([svc(type="NodePort"), eps(ep("10.244.1.6"))]), NODE)
    # The ClusterIP and the NodePort's two scopes: three frontends differ.
    assert desired.drift(state, other) == len(state.entries) == 3
    moved = replace(state, node_ip="192.0.2.9")
    assert desired.drift(state, moved) == 1
    assert desired.drift(state, replace(state, entries={})) == 3


def test_a_changed_node_recomputes_everything() -> None:
    cluster = cluster_of([svc(), eps(ep("10.244.1.5"))])
    memo = desired.Memo()
    desired.compute(cluster, NODE, memo)
    desired.compute(cluster, Node(name="node-a", ips=("192.0.2.7",)), memo)
    assert memo.computed == 1 and memo.reused == 0
