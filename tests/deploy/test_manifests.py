"""Offline checks of deploy/: every YAML document against the Kubernetes OpenAPI
schemas (strict, so unknown fields fail), and the properties the agent relies on
that a schema cannot express."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

# Paths the agent uses on the node; the DaemonSet must share them with the host.
from lb.datapath.attach import STATE_DIR
from loader.build import BPFFS

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
EXAMPLES = DEPLOY / "examples"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"

# Newest schema set kubernetes-validate ships; pinned so results do not drift.
K8S_VERSION = "1.37"

METRICS_PORT = 10249
READ_VERBS = {"get", "list", "watch"}

# The objects this directory must always provide.
OWN_OBJECTS = {
    ("ServiceAccount", "xdplb"),
    ("ClusterRole", "xdplb"),
    ("ClusterRoleBinding", "xdplb"),
    ("ConfigMap", "xdplb-config"),
    ("DaemonSet", "xdplb"),
}

# kubernetes-validate has no schema for kustomize's own file. This covers the
# fields a kustomization here may use and rejects any other, like strict mode.
_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
KUSTOMIZATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "kustomize.config.k8s.io/v1beta1"},
        "kind": {"const": "Kustomization"},
        "namespace": _STR,
        "resources": {"type": "array", "items": _STR, "uniqueItems": True},
        "commonAnnotations": _STR_MAP,
        "labels": {"type": "array", "items": {"type": "object"}},
        "patches": {"type": "array", "items": {"type": "object"}},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {"name": _STR, "newName": _STR, "newTag": _STR, "digest": _STR},
            },
        },
    },
}


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))

    @property
    def name(self) -> str:
        return str(self.body.get("metadata", {}).get("name"))

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(DEPLOY)}#{self.index}:{self.kind}/{self.name}"


def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_docs() -> list[Doc]:
    docs = []
    for path in _yaml_files():
        for i, body in enumerate(yaml.safe_load_all(path.read_text())):
            if body is None:  # empty document, e.g. a trailing `---`
                continue
            assert isinstance(body, dict), f"{path}#{i} is not a mapping"
            docs.append(Doc(path, i, body))
    return docs


DOCS = _load_docs()
K8S_DOCS = [d for d in DOCS if d.kind != "Kustomization"]


def validate(body: dict[str, Any], strict: bool = True) -> None:
    """Raise unless `body` is a valid object of a kind Kubernetes knows."""
    kubernetes_validate.validate(body, K8S_VERSION, strict=strict)


def only(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d.body for d in DOCS if d.kind == kind and (name is None or d.name == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def agent_container() -> dict[str, Any]:
    containers = only("DaemonSet", "xdplb")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


# --- schema validation ---------------------------------------------------------


def test_schema_version_is_shipped() -> None:
    shipped = {".".join(v.split(".")[:2]) for v in kubernetes_validate.utils.all_versions()}
    assert K8S_VERSION in shipped


@pytest.mark.parametrize("doc", K8S_DOCS, ids=lambda d: d.id)
def test_document_is_valid_kubernetes(doc: Doc) -> None:
    # SchemaNotFoundError (an unknown kind or a removed apiVersion) fails too.
    try:
        validate(doc.body)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{doc.id}: {where}: {e.message}")


def test_kustomization_is_valid() -> None:
    kustomizations = [d for d in DOCS if d.kind == "Kustomization"]
    assert [d.path for d in kustomizations] == [KUSTOMIZATION]
    jsonschema.validate(kustomizations[0].body, KUSTOMIZATION_SCHEMA)


def test_own_objects_are_among_the_validated() -> None:
    seen = {(d.kind, d.name) for d in K8S_DOCS}
    assert seen >= OWN_OBJECTS
    own_files = {d.path for d in K8S_DOCS if (d.kind, d.name) in OWN_OBJECTS}
    assert all(EXAMPLES not in p.parents for p in own_files)


def test_every_yaml_file_holds_a_document() -> None:
    # A file that parses to nothing would be silently skipped by the checks above.
    assert {d.path for d in DOCS} == set(_yaml_files())


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda s: s.update(hostNetwork="yes"), id="wrong-type"),
        pytest.param(lambda s: s.update(hostNetworking=True), id="unknown-field"),
        pytest.param(lambda s: s["containers"][0].pop("name"), id="missing-required"),
    ],
)
def test_validator_rejects_a_broken_daemonset(mutate: Any) -> None:
    broken = copy.deepcopy(only("DaemonSet", "xdplb"))
    mutate(broken["spec"]["template"]["spec"])
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)


def test_strict_mode_is_what_catches_typos() -> None:
    typo = copy.deepcopy(only("DaemonSet", "xdplb"))
    typo["spec"]["template"]["spec"]["containers"][0]["securityContext"] = {"priviledged": True}
    validate(typo, strict=False)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(typo)


def test_unknown_kind_is_not_skipped() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "extensions/v1beta1", "kind": "Deployment", "metadata": {}})


def test_kustomization_schema_rejects_unknown_fields() -> None:
    broken = dict(only("Kustomization"), resource=["rbac.yaml"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KUSTOMIZATION_SCHEMA)


def _kubectl() -> str | None:
    """kubectl from PATH, else one tools/k8s-build.sh left in its cache."""
    found = shutil.which("kubectl")
    if found:
        return found
    cache = Path(os.environ.get("XDPLB_CACHE_DIR", "/var/cache/xdplb"))
    built = sorted(cache.glob("k8s-*/bin/kubectl"))
    return str(built[-1]) if built else None


KUBECTL = _kubectl()


# The checks above cover the kustomization's fields; this one also proves that
# kustomize itself accepts it and what it emits is valid. Extra, so it may skip.
@pytest.mark.skipif(KUBECTL is None, reason="no kubectl (with built-in kustomize) found")
def test_rendered_kustomization_is_valid() -> None:
    assert KUBECTL is not None
    out = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True
    ).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == OWN_OBJECTS
    for body in rendered:
        validate(body)
        if body["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert body["metadata"]["namespace"] == "kube-system"


# --- RBAC ------------------------------------------------------------------------


def test_cluster_role_is_read_only() -> None:
    for rule in only("ClusterRole", "xdplb")["rules"]:
        assert set(rule["verbs"]) <= READ_VERBS, rule
        assert "*" not in rule.get("resources", []), rule
        assert "*" not in rule.get("apiGroups", []), rule
        assert "nonResourceURLs" not in rule, rule


def test_cluster_role_covers_what_the_agent_watches() -> None:
    wanted = {
        ("", "services"),
        ("", "endpoints"),
        ("", "pods"),
        ("", "namespaces"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "networkpolicies"),
    }
    granted = {
        (group, resource)
        for rule in only("ClusterRole", "xdplb")["rules"]
        if set(rule["verbs"]) >= READ_VERBS
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert wanted <= granted


def test_binding_ties_role_to_the_agent_account() -> None:
    sa = only("ServiceAccount", "xdplb")
    binding = only("ClusterRoleBinding", "xdplb")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "xdplb",
    }
    assert {
        "kind": "ServiceAccount",
        "name": sa["metadata"]["name"],
        "namespace": sa["metadata"]["namespace"],
    } in binding["subjects"]
    ds = only("DaemonSet", "xdplb")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert ds["metadata"]["namespace"] == sa["metadata"]["namespace"] == "kube-system"


# --- DaemonSet -------------------------------------------------------------------


def test_daemonset_runs_privileged_on_every_node() -> None:
    ds = only("DaemonSet", "xdplb")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert agent_container()["securityContext"]["privileged"] is True
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels["app.kubernetes.io/name"] == "xdplb"


def _mounts() -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Container mount path -> (volumeMount, volume)."""
    volumes = {
        v["name"]: v for v in only("DaemonSet", "xdplb")["spec"]["template"]["spec"]["volumes"]
    }
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in agent_container()["volumeMounts"]}


def test_daemonset_shares_bpffs_with_the_node() -> None:
    mount, volume = _mounts()[str(BPFFS)]
    assert volume["hostPath"]["path"] == str(BPFFS)
    assert volume["hostPath"]["type"] == "DirectoryOrCreate"
    # Pins and a bpffs mounted by the entrypoint must be visible on the node.
    assert mount["mountPropagation"] == "Bidirectional"


def test_daemonset_host_mounts() -> None:
    mounts = _mounts()
    for path in ("/lib/modules", "/usr/src"):
        mount, volume = mounts[path]
        assert volume["hostPath"]["path"] == path
        assert mount.get("readOnly") is True, path
    _, cgroup = mounts["/sys/fs/cgroup"]
    assert cgroup["hostPath"]["path"] == "/sys/fs/cgroup"
    # lb.datapath.attach records what it attached here; a container-local copy would be
    # lost on restart, leaving programs nobody knows to detach.
    _, state = mounts[str(STATE_DIR)]
    assert state["hostPath"]["path"] == str(STATE_DIR)


def _resolve_port(port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = {p["name"]: p["containerPort"] for p in agent_container()["ports"]}
    return int(named[port])


def test_probes_hit_the_metrics_port() -> None:
    c = agent_container()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == METRICS_PORT
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c[probe]["httpGet"]
        assert get["path"] == path
        assert _resolve_port(get["port"]) == METRICS_PORT, probe
    # The agent must listen where the probes and Prometheus look.
    args = c["args"]
    addr = args[args.index("--metrics-addr") + 1]
    assert addr.rsplit(":", 1)[1] == str(METRICS_PORT)
    annotations = only("DaemonSet", "xdplb")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_resources() -> None:
    res = agent_container()["resources"]
    assert res["requests"] == {"cpu": "100m", "memory": "128Mi"}
    assert res["limits"]["memory"] == "512Mi"


def test_args_only_reference_defined_env() -> None:
    # Kubernetes leaves an undefined $(VAR) in args as literal text.
    c = agent_container()
    defined = {e["name"] for e in c["env"]}
    used = {m for a in c["args"] for m in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a)}
    assert used == {"LB_IFACE", "NODE_NAME", "NODE_IP", "LB_MAGLEV_MIN_TABLE_SIZE"}
    assert used <= defined


def test_required_config_keys_exist() -> None:
    configmaps = {d.name: d.body for d in DOCS if d.kind == "ConfigMap" and d.path.parent == DEPLOY}
    for env in agent_container()["env"]:
        ref = env.get("valueFrom", {}).get("configMapKeyRef")
        if ref is None or ref.get("optional"):
            continue
        assert ref["key"] in configmaps[ref["name"]]["data"], env["name"]
    assert configmaps["xdplb-config"]["data"]["iface"] == "eth0"


# --- kustomization and image -------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = only("Kustomization")
    manifests = {
        p.relative_to(DEPLOY).as_posix()
        for p in _yaml_files()
        if p != KUSTOMIZATION and EXAMPLES not in p.parents
    }
    assert set(kustomization["resources"]) == manifests
    assert kustomization["namespace"] == "kube-system"
    images = {i["name"]: i for i in kustomization["images"]}
    assert agent_container()["image"].split(":")[0] in images


def test_entrypoint_is_valid_shell() -> None:
    script = DEPLOY / "entrypoint.sh"
    assert script.stat().st_mode & 0o111
    subprocess.run(["sh", "-n", str(script)], check=True)


def test_dockerfile_copies_existing_paths() -> None:
    # Catches a rename in the repository that would only surface at image build.
    text = (DEPLOY / "Dockerfile").read_text()
    sources = [
        src
        for line in text.splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for src in line.split()[1:-1]
    ]
    assert sources
    for src in sources:
        assert (REPO / src).exists(), src
    assert re.search(r"^FROM debian:bookworm", text, re.M)
    assert 'ENTRYPOINT ["/usr/local/bin/xdplb-entrypoint"]' in text
