"""lb.sources.kube without a server: the store, the reflector's list/watch loop
against a scripted API (410 relists, reconnects keep the resourceVersion,
partial lists change nothing), backoff and the Node defaults."""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
from urllib3.exceptions import ProtocolError

from lb.model import Cluster, Node
from lb.service import desired
from lb.sources import kube
from lb.sources.kube import (
    ENDPOINT_SLICES,
    NODES,
    SERVICES,
    TRIGGER_TIME_ANNOTATION,
    ApiError,
    Backoff,
    KubeSource,
    ParsedObjects,
    Reflector,
    Resource,
    Store,
    parse_time,
)
from lb.sources.manifests import build_cluster


def service(name: str, rv: str, ip: str = "10.96.0.10", ns: str = "default") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv},
            "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}


def eslice(name: str, rv: str, trigger: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "default", "resourceVersion": rv,
                            "labels": {"kubernetes.io/service-name": "web"}}
    if trigger:
        meta["annotations"] = {TRIGGER_TIME_ANNOTATION: trigger}
    return {"metadata": meta, "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.2"]}]}


class ListResp:
    def __init__(self, items: list[dict[str, Any]], rv: str, cont: str | None = None) -> None:
        meta: dict[str, Any] = {"resourceVersion": rv}
        if cont:
            meta["continue"] = cont
        self.data = json.dumps({"items": items, "metadata": meta}).encode()

    def release_conn(self) -> None:
        pass


class WatchResp:
    """A watch stream: events, cut into awkward chunks, then an optional error."""

    def __init__(self, events: list[dict[str, Any]], error: Exception | None = None,
                 lasts: float = 0.0) -> None:
        self.payload = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        self.error = error
        self.lasts = lasts
        self.closed = False

    def stream(self, amt: Any = None, decode_content: bool = True) -> Iterator[bytes]:
        for i in range(0, len(self.payload), 7):
            yield self.payload[i:i + 7]
        time.sleep(self.lasts)
        if self.error:
            raise self.error

    def close(self) -> None:
        self.closed = True

    def shutdown(self) -> None:
        self.closed = True


class ScriptedApi:
    """Answers list and watch calls from a script; stops the reflector when
    the script is done."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = list(steps)
        self.calls: list[dict[str, Any]] = []
        self.reflector: Reflector | None = None

    def get(self, path: str, params: dict[str, Any], timeout: tuple[float, float]) -> Any:
        kw = {**params, "path": path}
        self.calls.append(kw)
        if not self.steps:
            assert self.reflector is not None
            self.reflector.stop()
            raise ProtocolError("script done")
        step = self.steps.pop(0)
        if isinstance(step, Exception):
            raise step
        assert ("watch" in kw) == isinstance(step, WatchResp), (kw, step)
        return step


def reflector(api: ScriptedApi, store: Store, res: Resource = SERVICES,
              resync: float = 0) -> Reflector:
    r = Reflector(api, res, store, resync_period=resync,
                  backoff=Backoff(0.001, 0.002, random.Random(1)))
    api.reflector = r
    return r


def event(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


def gone() -> dict[str, Any]:
    return {"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                        "message": "too old resource version: 5 (9)"}}


def test_list_watch_410_relist_and_reconnect_from_the_same_version() -> None:
    store = Store(("Service",))
    api = ScriptedApi([
        ListResp([service("a", "3")], "5"),
        WatchResp([event("ADDED", service("b", "6")),
                   {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "8"}}}],
                  error=ProtocolError("connection reset")),
        # Reconnected from the bookmark's version, no list in between.
        WatchResp([event("DELETED", service("a", "9")), gone()]),
        ListResp([service("b", "6"), service("c", "11")], "12"),
        WatchResp([]),
    ])
    r = reflector(api, store)
    r.run()
    kinds = [("watch" in c, c.get("resourceVersion")) for c in api.calls]
    assert kinds[:5] == [(False, None), (True, "5"), (True, "8"), (False, None), (True, "12")]
    assert all(c["allowWatchBookmarks"] for c in api.calls if "watch" in c)
    assert {c["path"] for c in api.calls} == {"/api/v1/services"}
    assert {o["metadata"]["name"] for o in store.take() or []} == {"b", "c"}
    assert r.counters.relists == {"initial": 1, "expired": 1}
    assert r.counters.errors >= 1
    # Stored objects carry kind and apiVersion, as build_cluster needs.
    assert store.get("Service", "default/c") == {**service("c", "11"), "kind": "Service",
                                                 "apiVersion": "v1"}


def test_410_as_http_status_relists() -> None:
    store = Store(("Service",))
    api = ScriptedApi([ListResp([], "5"), ApiError(410, "Gone"),
                       ListResp([service("a", "7")], "7")])
    r = reflector(api, store)
    r.run()
    assert r.counters.relists == {"initial": 1, "expired": 1}
    assert store.get("Service", "default/a") is not None


def test_a_failed_list_changes_nothing() -> None:
    store = Store(("Service",))
    store.replace("Service", {"default/old": service("old", "1")})
    api = ScriptedApi([
        ListResp([service("a", "3")], "5", cont="page2"),
        ProtocolError("cut in the middle of the list"),
    ])
    r = reflector(api, store)
    r.run()
    assert api.calls[1]["continue"] == "page2"
    assert store.get("Service", "default/old") is not None
    assert store.get("Service", "default/a") is None
    assert r.rv is None, "the next attempt lists again"


def test_other_watch_errors_back_off_and_relist() -> None:
    store = Store(("Service",))
    api = ScriptedApi([
        ListResp([], "5"),
        WatchResp([{"type": "ERROR", "object": {"code": 500, "message": "boom"}}]),
        ListResp([], "6"),
    ])
    r = reflector(api, store)
    r.run()
    assert r.counters.relists == {"initial": 1, "error": 1}


def test_resync_lists_again_and_reports_only_real_changes() -> None:
    store = Store(("Service",))
    api = ScriptedApi([ListResp([service("a", "3")], "5"), WatchResp([], lasts=0.05),
                       ListResp([service("a", "3")], "5")])
    r = reflector(api, store, resync=0.02)
    assert store.take() is None
    r.run()
    # The watch is bounded by the resync period: it asks for a 1 s timeout.
    assert api.calls[1]["timeoutSeconds"] == 1
    assert r.counters.relists["resync"] >= 1
    assert store.take() is not None  # the first list
    assert store.take() is None  # the resync found nothing new


def test_store_offers_nothing_before_every_kind_is_listed() -> None:
    store = Store(("Service", "EndpointSlice"))
    store.replace("Service", {"default/a": service("a", "1")})
    assert store.take() is None
    store.replace("EndpointSlice", {})
    docs = store.take()
    assert docs is not None and len(docs) == 1
    assert store.take() is None
    store.apply("Service", "MODIFIED", service("a", "1"))  # same version: no change
    assert store.take() is None
    store.apply("Service", "MODIFIED", service("a", "2"))
    assert store.take() is not None


def test_programming_triggers() -> None:
    started = 1_000_000.0
    store = Store(("EndpointSlice",), started=started)
    old = "1970-01-01T00:00:00Z"
    store.replace("EndpointSlice", {"default/s0": eslice("s0", "1", old)})
    store.take()
    assert store.programmed() == [], "the initial list is not a change"
    newer = "1970-01-12T13:46:41.250000000Z"  # started + 1.25 s
    before = time.time()
    store.apply("EndpointSlice", "ADDED", eslice("s1", "2", newer))
    store.apply("EndpointSlice", "MODIFIED", eslice("s1", "3", newer))  # same annotation
    store.apply("EndpointSlice", "MODIFIED", eslice("s0", "4", old))  # before we started
    store.apply("EndpointSlice", "DELETED", eslice("s0", "5"))
    assert store.programmed() == [], "nothing programmed before a snapshot"
    assert store.take() is not None
    triggers = store.programmed()
    assert triggers[0] == pytest.approx(started + 1.25)
    assert all(t >= before for t in triggers[1:]) and len(triggers) == 4
    assert store.programmed() == []


def test_parse_time() -> None:
    assert parse_time("1970-01-01T00:00:01Z") == 1.0
    assert parse_time("1970-01-01T00:00:01.123456789Z") == pytest.approx(1.123456789)
    assert parse_time("1970-01-01T01:00:00+01:00") == 0.0
    for bad in (None, 5, "", "yesterday", "1970-13-01T00:00:00Z"):
        assert parse_time(bad) is None


def test_backoff_grows_is_capped_jittered_and_resets() -> None:
    b = Backoff(0.5, 30, random.Random(7))
    delays = [b.next() for _ in range(12)]
    for i, d in enumerate(delays):
        full = min(30, 0.5 * 2**i)
        assert full / 2 <= d <= full
    assert len(set(delays[-4:])) == 4, "jittered, even at the cap"
    b.reset()
    assert b.next() <= 0.5


def test_source_builds_the_cluster_like_files_and_completes_the_node(
        caplog: pytest.LogCaptureFixture) -> None:
    src = KubeSource(None, node_name="node-a", resources=(SERVICES, ENDPOINT_SLICES, NODES))
    bad = service("bad", "2")
    bad["spec"]["ports"] = [{"port": 70000}]
    src.store.replace("Service", {"default/a": {**service("a", "1"), "kind": "Service",
                                                "apiVersion": "v1"},
                                  "default/bad": {**bad, "kind": "Service",
                                                  "apiVersion": "v1"}})
    src.store.replace("EndpointSlice", {})
    assert src.poll() is None, "Nodes not listed yet"
    src.store.replace("Node", {"node-a": {
        "kind": "Node", "apiVersion": "v1",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "Hostname", "address": "node-a"},
                                 {"type": "InternalIP", "address": "fd00::1"},
                                 {"type": "InternalIP", "address": "192.0.2.7"}]}}})
    cluster = src.poll()
    assert cluster is not None and set(cluster.services) == {"default/a"}
    assert len(src.errors) == 1 and "spec.ports[0].port" in str(src.errors[0])
    with caplog.at_level(logging.WARNING):
        assert src.node(Node()) == Node(name="node-a", ips=("192.0.2.7",), zone="z1")
        assert src.node(Node()) == Node(name="node-a", ips=("192.0.2.7",), zone="z1")
    said = [r.getMessage() for r in caplog.records if "IPv6" in r.getMessage()]
    assert said == ["Node node-a: fd00::1: IPv6 is not programmed yet; serving IPv4 only"]
    given = Node(name="other", ips=("198.51.100.1",))
    assert src.node(given) == Node(name="other", ips=("198.51.100.1",), zone="z1")


def test_per_object_parsing_equals_building_all_at_once() -> None:
    """ParsedObjects merges one build_cluster per object: it must give what
    one build over every object gives (guards against build_cluster ever
    relating objects to each other, beyond what the API server keeps unique
    and a set of files has to be checked for)."""
    docs: list[dict[str, Any]] = [
        {**service("a", "1"), "kind": "Service", "apiVersion": "v1"},
        {**service("bad", "1", ip="not-an-ip"), "kind": "Service", "apiVersion": "v1"},
        {**eslice("a-1", "1"), "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1"},
        {"kind": "Namespace", "apiVersion": "v1",
         "metadata": {"name": "default", "labels": {"kubernetes.io/metadata.name": "default"}}},
        {"kind": "Pod", "apiVersion": "v1",
         "metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
         "spec": {"nodeName": "n", "containers": [{"name": "c"}]},
         "status": {"phase": "Running", "podIPs": [{"ip": "10.244.1.2"}]}},
        {"kind": "NetworkPolicy", "apiVersion": "networking.k8s.io/v1",
         "metadata": {"name": "deny", "namespace": "default"},
         "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}},
    ]
    whole = build_cluster([(d, "kube-apiserver") for d in docs])
    parsed = ParsedObjects()
    for _ in range(2):  # the second time from the cache
        cluster, errors = parsed.build(docs)
        assert cluster == whole.cluster
        assert [str(e) for e in errors] == [str(e) for e in whole.errors]
    assert cluster.pods and cluster.namespaces and cluster.policies and len(errors) == 1
    changed = {**docs[0], "metadata": {**docs[0]["metadata"], "resourceVersion": "2"}}
    changed["spec"] = {**changed["spec"], "clusterIP": "10.96.0.99"}
    cluster, _ = parsed.build([changed, *docs[1:]])
    assert cluster.services["default/a"].cluster_ips == ("10.96.0.99",)


def test_each_snapshot_names_the_services_its_changes_touch() -> None:
    docs: list[dict[str, Any]] = [
        {**service("web", "1"), "kind": "Service", "apiVersion": "v1"},
        {**service("other", "1", ip="10.96.0.11"), "kind": "Service", "apiVersion": "v1"},
        {**eslice("web-1", "1"), "kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1"},
        {"kind": "Pod", "apiVersion": "v1", "metadata": {"name": "p", "namespace": "default"},
         "spec": {"nodeName": "n", "containers": [{"name": "c"}]}, "status": {"phase": "Running"}},
    ]
    parsed = ParsedObjects()
    first, _ = parsed.build(docs)
    assert first.changes is None, "nothing to be against yet"
    same, _ = parsed.build(docs)
    assert same.changes is not None and same.changes.since is first.revision
    assert same.changes.services == frozenset()
    # An EndpointSlice changed: its service; a Pod changed: no service.
    slice2 = {**docs[2], "metadata": {**docs[2]["metadata"], "resourceVersion": "2"}}
    pod2 = {**docs[3], "metadata": {**docs[3]["metadata"], "resourceVersion": "2"}}
    after, _ = parsed.build([docs[0], docs[1], slice2, pod2])
    assert after.changes is not None and after.changes.since is same.revision
    assert after.changes.services == {"default/web"}
    # A Service gone, and the slice with it.
    gone, _ = parsed.build([docs[0], pod2])
    assert gone.changes is not None and gone.changes.services == {"default/other", "default/web"}


def test_a_kind_the_api_server_does_not_serve_counts_as_none(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ServiceCIDR before 1.33: a 404 is "none", so the first snapshot is
    not held back for a kind that will never list. A required kind's 404 is
    an error (retried), and holds it back."""
    monkeypatch.setattr(kube, "NOT_SERVED_RETRY", 0.0)
    for optional in (True, False):
        store = Store(("ServiceCIDR",))
        api = ScriptedApi([ApiError(404, "Not Found")])
        r = Reflector(api, Resource("ServiceCIDR", "networking.k8s.io/v1", "servicecidrs",
                                    optional=optional),
                      store, resync_period=0, backoff=Backoff(0.001, 0.002, random.Random(1)))
        api.reflector = r
        r.run()
        assert store.listed() is optional
        assert (r.counters.errors == 0) is optional


def test_service_cidrs_join_the_flag_for_the_unallocated_drop() -> None:
    cidr = {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
            "metadata": {"name": "extra"}, "spec": {"cidrs": ["10.100.0.0/16", "fd00:100::/108"]}}
    res = build_cluster([(cidr, "t")])
    assert res.errors == () and res.cluster.all_service_cidrs() == ("10.100.0.0/16",)
    state = desired.compute(res.cluster, Node(name="n", service_cidrs=("10.96.0.0/12",)))
    assert state.service_cidrs == ("10.100.0.0/16", "10.96.0.0/12")
    for spec, field in (({"cidrs": []}, "spec.cidrs"), ({"cidrs": ["10.1.0.1/16"]},
                                                        "spec.cidrs[0]"),
                        ({"cidrs": ["10.1.0.0/16", "10.2.0.0/16"]}, "spec.cidrs")):
        bad = build_cluster([({**cidr, "spec": spec}, "t")])
        assert bad.cluster.service_cidrs == {} and bad.errors[0].field == field


def test_the_store_changes_applied_one_by_one_equal_a_build_from_every_object() -> None:
    """The agent's path (Store.take_changes into ParsedObjects.apply) against a fresh
    build from every object, over 300 random watch events of Services and
    EndpointSlices (slices moving between services, bad objects among them); each
    snapshot handed out stays as it was when later ones are built."""
    rng = random.Random(7)
    store = Store(("Service", "EndpointSlice"))
    store.replace("Service", {})
    store.replace("EndpointSlice", {})
    parsed = ParsedObjects()
    mirror: dict[tuple[str, str], dict[str, Any]] = {}
    kept: list[tuple[Cluster, Cluster]] = []
    for step in range(300):
        kind = rng.choice(("Service", "EndpointSlice"))
        name = f"o{rng.randrange(12)}"
        if rng.random() < 0.25:
            obj = store.get(kind, f"default/{name}")
            if obj is not None:
                store.apply(kind, "DELETED", obj)
                del mirror[(kind, name)]
        else:
            rv = str(step)
            if kind == "Service":
                ip = "bad" if rng.random() < 0.1 else f"10.96.0.{rng.randrange(1, 250)}"
                obj = {**service(name, rv, ip=ip), "kind": kind, "apiVersion": "v1"}
            else:
                obj = {**eslice(name, rv), "kind": kind, "apiVersion": "discovery.k8s.io/v1"}
                obj["metadata"]["labels"] = {"kubernetes.io/service-name": f"o{rng.randrange(4)}"}
                obj["endpoints"] = [{"addresses": [f"10.244.1.{rng.randrange(1, 250)}"]}]
            store.apply(kind, "MODIFIED", obj)
            mirror[(kind, name)] = obj
        if rng.random() < 0.5:
            continue
        changes = store.take_changes()
        if changes is None:
            continue
        cluster, errors = parsed.apply(changes)
        whole, whole_errors = ParsedObjects().build(list(mirror.values()))
        assert cluster == whole and cluster.slice_index is not None
        assert {k: sorted(s.key for s in v) for k, v in cluster.slice_index.items()} == \
            {k: sorted(s.key for s in v) for k, v in whole._slices_by_service.items()}
        assert sorted(map(str, errors)) == sorted(map(str, whole_errors))
        kept.append((cluster, copy.deepcopy(cluster)))
    assert len(kept) > 50
    for handed, as_it_was in kept:
        assert handed == as_it_was
