"""Bad input from files, refused as the API server would refuse it: the
object (or the one endpoint) is skipped with its field named, the rest
still counts, and nothing broken is programmed."""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.model import Node
from lb.policy import compile_policy, lookup
from lb.sources import files, manifests
from lb.sources.files import FileSource
from lb.sources.manifests import ManifestError, Rules, load

SERVICE = """
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  {spec}
"""


def slice_of(service: str, endpoints: str, name: str | None = None) -> str:
    return f"""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: {name or service + "-1"}
  namespace: default
  labels: {{kubernetes.io/service-name: {service}}}
addressType: IPv4
ports: [{{port: 80}}]
endpoints:
{endpoints}
"""


def write(tmp_path: Path, *docs: str) -> Path:
    f = tmp_path / "objects.yaml"
    f.write_text("\n---\n".join(docs))
    return f


def svc(name: str, spec: str) -> str:
    return SERVICE.format(name=name, spec=spec)


GOOD = svc("good", "clusterIP: 10.96.0.20\n  ports: [{port: 80}]")


def test_a_string_condition_is_refused_not_read_as_true(tmp_path: Path) -> None:
    res = load([write(tmp_path, GOOD, slice_of("good", """
- addresses: [10.244.0.5]
  conditions: {ready: "false"}
- addresses: [10.244.0.6]
  conditions: {ready: true}
"""))])
    eps = res.cluster.slices["default/good-1"].endpoints
    assert [e.ip for e in eps] == ["10.244.0.6"]
    assert [e.field for e in res.errors] == ["endpoints[0].conditions.ready"]


def test_an_integer_is_not_an_address(tmp_path: Path) -> None:
    res = load([write(tmp_path, GOOD, svc("int", "clusterIP: 167772161\n  ports: [{port: 80}]"))])
    assert list(res.cluster.services) == ["default/good"]
    assert res.errors[0].field == "spec.clusterIP"
    assert "expected an IP address string" in str(res.errors[0])


def test_cluster_ip_must_match_the_first_of_cluster_ips(tmp_path: Path) -> None:
    res = load([write(tmp_path, svc("two", "clusterIP: 10.96.0.30\n  clusterIPs: [10.96.0.31]\n"
                                           "  ports: [{port: 80}]"))])
    assert res.cluster.services == {}
    assert res.errors[0].field == "spec.clusterIPs[0]"
    assert "must match spec.clusterIP" in str(res.errors[0])


SPECIAL = ["0.0.0.0", "127.0.0.1", "169.254.1.1", "224.0.0.1", "239.1.2.3", "255.255.255.255"]


@pytest.mark.parametrize("addr", SPECIAL)
@pytest.mark.parametrize(("spec", "field"), [
    ("clusterIP: {a}\n  ports: [{{port: 80}}]", "spec.clusterIP"),
    ("clusterIP: 10.96.0.40\n  externalIPs: [{a}]\n  ports: [{{port: 80}}]",
     "spec.externalIPs[0]"),
])
def test_a_special_address_is_no_service_address(tmp_path: Path, addr: str, spec: str,
                                                  field: str) -> None:
    res = load([write(tmp_path, GOOD, svc("special", spec.format(a=addr)))])
    assert list(res.cluster.services) == ["default/good"]
    assert [e.field for e in res.errors] == [field]


def _full_path(text: str) -> str | None:
    """What the ipaddress path says of `text`: the address, or None if refused."""
    try:
        addr = manifests._address(text, "f", "w")
    except ManifestError:
        return None
    return str(addr) if addr.version == 4 and manifests._special(addr) is None else None


# Octets drawn near every edge that _special draws.
OCTET = st.one_of(st.sampled_from([0, 1, 126, 127, 128, 168, 169, 170, 223, 224, 239, 240,
                                   253, 254, 255]), st.integers(0, 255))


@settings(max_examples=2000, deadline=None)
@given(st.tuples(OCTET, OCTET, OCTET, OCTET),
       st.sampled_from(["{}", "{}", "{}", "0{}", "{} ", "{}.0", "::ffff:{}"]))
def test_the_quick_address_check_agrees_with_the_full_one(
        octets: tuple[int, int, int, int], form: str) -> None:
    text = form.format(ipaddress.IPv4Address(bytes(octets)))
    try:
        quick: str | None = manifests._usable_ip(text, "f", "w")
    except ManifestError:
        quick = None
    assert quick == _full_path(text)
    # Only what the full path takes in the same words is taken without it.
    if manifests._plain_ipv4(text):
        assert _full_path(text) == text


def test_the_quick_address_check_takes_the_common_case() -> None:
    assert manifests._plain_ipv4("10.244.1.7")
    assert not any(manifests._plain_ipv4(a) for a in SPECIAL)


@pytest.mark.parametrize("addr", SPECIAL)
def test_a_special_address_is_no_load_balancer_ip(tmp_path: Path, addr: str) -> None:
    doc = svc("lb", "type: LoadBalancer\n  clusterIP: 10.96.0.41\n  ports: [{port: 80}]\n"
                    f"status:\n  loadBalancer:\n    ingress: [{{ip: {addr}}}]")
    res = load([write(tmp_path, doc)])
    assert res.cluster.services == {}
    assert [e.field for e in res.errors] == ["status.loadBalancer.ingress[0].ip"]


@pytest.mark.parametrize("addr", SPECIAL)
def test_a_special_address_is_no_endpoint(tmp_path: Path, addr: str) -> None:
    res = load([write(tmp_path, GOOD, slice_of("good", f"- addresses: [{addr}]\n"
                                                       "- addresses: [10.244.0.7]"))])
    assert [e.ip for e in res.cluster.slices["default/good-1"].endpoints] == ["10.244.0.7"]
    assert [e.field for e in res.errors] == ["endpoints[0].addresses[0]"]


def test_an_endpoint_at_its_own_service_address_is_left_out(tmp_path: Path) -> None:
    res = load([write(tmp_path, GOOD, slice_of("good", "- addresses: [10.96.0.20]\n"
                                                       "- addresses: [10.244.0.8]"))])
    assert [e.ip for e in res.cluster.slices["default/good-1"].endpoints] == ["10.244.0.8"]
    assert "10.96.0.20 is an address of service default/good itself" in str(res.errors[0])


@pytest.mark.parametrize("port", [22, 29999, 32768])
def test_a_node_port_outside_the_range_is_refused(tmp_path: Path, port: int) -> None:
    doc = svc("np", f"type: NodePort\n  clusterIP: 10.96.0.50\n  ports: [{{port: 80, "
                    f"nodePort: {port}}}]")
    res = load([write(tmp_path, doc)])
    assert res.cluster.services == {}
    assert res.errors[0].field == "spec.ports[0].nodePort"
    assert "outside the node-port range 30000-32767" in str(res.errors[0])


def test_the_node_port_range_is_the_operators(tmp_path: Path) -> None:
    doc = svc("np", "type: NodePort\n  clusterIP: 10.96.0.50\n  ports: [{port: 80, "
                    "nodePort: 8080}]")
    f = write(tmp_path, doc)
    assert "default/np" in load([f], Rules(node_port_range=(8000, 9000))).cluster.services
    assert load([f]).cluster.services == {}


def test_one_bad_address_skips_that_endpoint_not_the_slice(tmp_path: Path) -> None:
    res = load([write(tmp_path, GOOD, slice_of("good", """
- addresses: [10.244.0.9]
- addresses: [10.244.0.300]
- addresses: [10.244.0.10]
  nodeName: n1
"""))])
    eps = res.cluster.slices["default/good-1"].endpoints
    assert [(e.ip, e.node_name) for e in eps] == [("10.244.0.9", None), ("10.244.0.10", "n1")]
    assert [e.field for e in res.errors] == ["endpoints[1].addresses[0]"]


def test_a_bad_address_in_legacy_endpoints_skips_that_address(tmp_path: Path) -> None:
    legacy = """
apiVersion: v1
kind: Endpoints
metadata: {name: good, namespace: default}
subsets:
- addresses: [{ip: 10.244.0.11}, {ip: 127.0.0.1}]
  ports: [{port: 80}]
"""
    res = load([write(tmp_path, GOOD, legacy)])
    [es] = res.cluster.slices.values()
    assert [e.ip for e in es.endpoints] == ["10.244.0.11"]
    assert [e.field for e in res.errors] == ["subsets[0].addresses[1].ip"]


def test_a_v1beta1_object_is_reported_not_ignored(tmp_path: Path) -> None:
    beta = slice_of("good", "- addresses: [10.244.0.12]").replace(
        "discovery.k8s.io/v1", "discovery.k8s.io/v1beta1")
    res = load([write(tmp_path, GOOD, beta)])
    assert res.cluster.slices == {}
    assert res.errors[0].field == "apiVersion"
    assert "'discovery.k8s.io/v1beta1' is not read: EndpointSlice is discovery.k8s.io/v1" \
        in str(res.errors[0])


def test_unknown_fields_are_reported_and_the_object_kept(tmp_path: Path) -> None:
    doc = svc("typo", "clusterIP: 10.96.0.60\n  externalTraficPolicy: Local\n"
                      "  ports: [{port: 80, nodeport: 30080}]")
    res = load([write(tmp_path, doc)])
    assert "default/typo" in res.cluster.services and res.errors == ()
    assert sorted(w.field for w in res.warnings) == ["spec.externalTraficPolicy",
                                                     "spec.ports[].nodeport"]


def test_the_same_object_twice_keeps_the_first_and_says_so(tmp_path: Path) -> None:
    again = svc("good", "clusterIP: 10.96.0.21\n  ports: [{port: 81}]")
    res = load([write(tmp_path, GOOD, again)])
    assert res.cluster.services["default/good"].cluster_ips == ("10.96.0.20",)
    assert "defined twice" in str(res.errors[0])


@pytest.mark.parametrize(("spec", "held"), [
    ("clusterIP: 10.96.0.20\n  ports: [{port: 81}]", "ClusterIP 10.96.0.20"),
    ("type: NodePort\n  clusterIP: 10.96.0.71\n  ports: [{port: 80, nodePort: 30080}]",
     "nodePort 30080/TCP"),
])
def test_what_the_api_keeps_unique_held_twice_refuses_the_later(
        tmp_path: Path, spec: str, held: str) -> None:
    first = svc("first", "type: NodePort\n  clusterIP: 10.96.0.20\n  ports: [{port: 80, "
                         "nodePort: 30080}]")
    res = load([write(tmp_path, first, svc("later", spec))])
    assert list(res.cluster.services) == ["default/first"]
    assert f"{held} is held by service default/first already" in str(res.errors[0])


def test_ports_of_a_multi_port_service_are_named_uniquely(tmp_path: Path) -> None:
    unnamed = svc("u", "clusterIP: 10.96.0.72\n  ports: [{port: 80}, {name: b, port: 81}]")
    twice = svc("t", "clusterIP: 10.96.0.73\n  ports: [{name: a, port: 80}, "
                     "{name: a, port: 81}]")
    res = load([write(tmp_path, unnamed, twice)])
    assert res.cluster.services == {}
    assert [e.field for e in res.errors] == ["spec.ports[0].name", "spec.ports[1].name"]


def test_a_file_with_no_objects_is_an_error_not_an_empty_set(tmp_path: Path) -> None:
    f = tmp_path / "objects.yaml"
    f.write_text("# being rewritten\n")
    with pytest.raises(ManifestError, match="holds no objects"):
        load([f])
    f.write_text("apiVersion: v1\nkind: List\nitems: []\n")
    assert load([f]).cluster.services == {}


def _settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "SETTLE_SECONDS", 0.0)


def test_an_emptied_file_keeps_the_last_good_state(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _settle(monkeypatch)
    f = write(tmp_path, GOOD)
    source = FileSource([f])
    first = source.poll()
    assert first is not None and list(first.services) == ["default/good"]
    f.write_text("")  # `kubectl get ... > file`, before kubectl wrote a byte
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert source.poll() is None
    assert list(source.last_good.services) == ["default/good"]
    f.write_text("apiVersion: v1\nkind: List\nitems: []\n")  # meant: no objects
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    emptied = source.poll()
    assert emptied is not None and emptied.services == {}


def test_a_change_is_read_once_the_files_stand_still(tmp_path: Path) -> None:
    f = write(tmp_path, GOOD)
    source = FileSource([f])
    assert source.poll() is not None
    f.write_text(GOOD.replace("10.96.0.20", "10.96.0.22"))
    assert source.poll() is None  # just changed: it may still be being written
    time.sleep(files.SETTLE_SECONDS + 0.05)
    got = source.poll()
    assert got is not None and got.services["default/good"].cluster_ips == ("10.96.0.22",)


def test_a_skipped_object_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                         ) -> None:
    f = write(tmp_path, GOOD, svc("bad", "clusterIP: 10.96.0.300\n  ports: [{port: 80}]"))
    with caplog.at_level(logging.INFO):
        assert FileSource([f]).poll() is not None
    lines = [r.getMessage() for r in caplog.records if "default/bad" in r.getMessage()]
    assert len(lines) == 1, lines


# --- NetworkPolicy fails closed --------------------------------------------------------

NODE = Node(name="n1", ips=("192.0.2.1",))
PODS = {"web": "10.244.0.21", "db": "10.244.0.22", "other": "10.244.0.23"}


def pods_and(*policies: str) -> str:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: app}"]
    for name, ip in PODS.items():
        docs.append(f"""apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: app, labels: {{role: {name}}}}}
spec: {{nodeName: n1, containers: [{{name: c}}]}}
status: {{phase: Running, podIP: {ip}}}""")
    return "\n---\n".join([*docs, *policies])


def verdicts(tmp_path: Path, *policies: str) -> tuple[dict[tuple[str, str], bool], Any]:
    res = load([write(tmp_path, pods_and(*policies))])
    compiled = compile_policy(res.cluster, NODE)
    assert compiled.errors == ()
    return {(a, b): lookup(compiled, PODS[a], PODS[b], "TCP", 80).allowed
            for a in PODS for b in PODS if a != b}, res


def test_a_policy_with_a_broken_rule_isolates_the_pods_it_selects(tmp_path: Path) -> None:
    """A deny-all for `db` with a typo in its rule: skipped, it would allow
    everything it was written to deny."""
    broken = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-only-web, namespace: app}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [{podSelektor: {matchLabels: {role: web}}}]}]"""
    got, res = verdicts(tmp_path, broken)
    assert got[("web", "db")] is False and got[("other", "db")] is False
    assert got[("db", "web")] is False, "its egress too: which directions it meant is unread"
    assert got[("web", "other")] is True, "pods it does not select are untouched"
    [err] = res.errors
    assert "fails closed" in str(err) and "db-only-web" in str(err)
    assert res.cluster.policies["app/db-only-web"].broken


def test_a_policy_with_a_broken_selector_isolates_its_namespace(tmp_path: Path) -> None:
    broken = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: app}
spec:
  podSelector: {matchExpressions: [{key: role, operator: in, values: [db]}]}
  policyTypes: [Ingress]"""
    got, _ = verdicts(tmp_path, broken)
    assert not any(allowed for (_, _dst), allowed in got.items()), got


def test_a_fixed_policy_applies_as_written(tmp_path: Path) -> None:
    fixed = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-only-web, namespace: app}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress: [{from: [{podSelector: {matchLabels: {role: web}}}]}]"""
    got, res = verdicts(tmp_path, fixed)
    assert res.errors == ()
    assert got[("web", "db")] is True and got[("other", "db")] is False
    assert got[("db", "web")] is True
