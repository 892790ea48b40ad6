"""Reading Kubernetes YAML: every error names its field; bad objects are
skipped while the others still count."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.sources.manifests import ManifestError, load

GOOD = """
apiVersion: v1
kind: Service
metadata: {name: good, namespace: default}
spec:
  clusterIP: 10.96.0.20
  ports: [{port: 80}]
"""


@pytest.mark.parametrize(("spec", "field"), [
    ("clusterIP: 10.96.0.300\n  ports: [{port: 80}]", "spec.clusterIP"),
    ("clusterIPs: [10.96.0.300]\n  ports: [{port: 80}]", "spec.clusterIPs[0]"),
    ("clusterIP: 10.96.0.21\n  ports: [{port: 70000}]", "spec.ports[0].port"),
    ("clusterIP: 10.96.0.21\n  ports: [{port: '80'}]", "spec.ports[0].port"),
    ("clusterIP: 10.96.0.21\n  ports: [{port: 80, protocol: ICMP}]", "spec.ports[0].protocol"),
    ("clusterIP: 10.96.0.21\n  type: Magic\n  ports: [{port: 80}]", "spec.type"),
    ("clusterIP: 10.96.0.21\n  ports: [{port: 80, nodePort: 0}]", "spec.ports[0].nodePort"),
    ("clusterIP: 10.96.0.21\n  ports: {port: 80}", "spec.ports"),
])
def test_bad_service_is_skipped_naming_the_field(tmp_path: Path, spec: str, field: str) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(GOOD + f"""---
apiVersion: v1
kind: Service
metadata: {{name: bad, namespace: default}}
spec:
  {spec}
""")
    res = load([f])
    assert list(res.cluster.services) == ["default/good"]
    assert len(res.errors) == 1 and res.errors[0].field == field, res.errors


def test_not_yaml_is_an_error_of_the_file(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("a: [b\n")
    with pytest.raises(ManifestError) as e:
        load([f])
    assert e.value.field == "yaml"


def test_list_kind_is_flattened(tmp_path: Path) -> None:
    f = tmp_path / "m.yaml"
    f.write_text("apiVersion: v1\nkind: List\nitems:\n" + "\n".join(
        "  " + line for line in GOOD.strip().splitlines()).replace("  apiVersion", "- apiVersion",
                                                                  1))
    assert list(load([f]).cluster.services) == ["default/good"]


def test_endpoint_slice_conditions_default_as_kube_proxy_reads_them(tmp_path: Path) -> None:
    """pkg/proxy/endpointslicecache.go: a missing condition is true, except
    terminating (not `serving` defaulting to `ready`, as an older API
    comment had it)."""
    f = tmp_path / "m.yaml"
    f.write_text("""
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: s, namespace: default, labels: {kubernetes.io/service-name: good}}
addressType: IPv4
ports: [{name: "", port: 8080}]
endpoints:
- addresses: [10.244.1.1]
- addresses: [10.244.1.2]
  conditions: {ready: false}
""")
    (es,) = load([f]).cluster.slices.values()
    a, b = es.endpoints
    assert (a.ready, a.serving, a.terminating) == (True, True, False)
    assert (b.ready, b.serving, b.terminating) == (False, True, False)
