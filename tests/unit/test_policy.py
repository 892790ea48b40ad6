"""NetworkPolicy: parsing, the reference semantics, the compiled maps and the
datapath's lookup over them. The upstream e2e matrix (namespaces x, y, z with
pods a, b, c; ports 80 and 81) is written out cell by cell; random clusters
check that the compiled lookup agrees with the reference everywhere."""

from __future__ import annotations

import ipaddress
import time
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lb.encoding import ip_int
from lb.model import (
    Cluster,
    ContainerPort,
    IPBlock,
    LabelSelector,
    Namespace,
    NetworkPolicy,
    Node,
    Pod,
    PolicyPeer,
    PolicyPort,
    PolicyRule,
    SelectorRequirement,
)
from lb.policy import (
    CompiledPolicy,
    Verdict,
    allowed,
    apply,
    check,
    combine,
    compile_incremental,
    compile_policy,
    decode,
    describe,
    diff,
    encode,
    lookup,
)
from lb.policy.common import EGRESS, INGRESS, pods_by_ip
from lb.policy.compiler import normalize
from lb.policy.contents import MAX_CHAIN, PORTS_PER_SET, PortRange
from lb.sources.manifests import build_cluster

NODE1 = Node(name="node-1", ips=("192.0.2.1",))
NODE2 = Node(name="node-2", ips=("192.0.2.2",))
NODES = (NODE1, NODE2)


# --- object builders ------------------------------------------------------------------


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"ns": name, **labels}}}


def pod(ns: str, name: str, ip: str, node: str = "node-1", labels: dict[str, str] | None = None,
        ports: list[dict[str, Any]] | None = None, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"pod": name} if labels is None else labels},
            "spec": {"nodeName": node, **spec,
                     "containers": [{"name": "c", "ports": ports or []}]},
            "status": {"podIP": ip, "podIPs": [{"ip": ip}], "phase": "Running"}}


def netpol(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("podSelector", {})
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def load(*docs: dict[str, Any]) -> Cluster:
    res = build_cluster((d, "test") for d in docs)
    assert not res.errors, res.errors
    return res.cluster


def compiled_view(cluster: Cluster, nodes: tuple[Node, ...] = NODES
                  ) -> dict[str | None, CompiledPolicy]:
    return {n.name: compile_policy(cluster, n) for n in nodes}


def across(cluster: Cluster, compiled: dict[str | None, CompiledPolicy], src: str, dst: str,
           proto: int | str, port: int) -> Verdict:
    """What the datapath of the whole cluster decides: the sender's node
    checks egress, the receiver's node ingress."""
    by_ip = pods_by_ip(cluster.pods.values())
    first = next(iter(compiled.values()))

    def at(ip: str) -> CompiledPolicy:
        p = by_ip.get(ip_int(ip))
        return compiled.get(p.node_name, first) if p else first

    return combine(check(at(src), EGRESS, src, dst, proto, port),
                   check(at(dst), INGRESS, dst, src, proto, port))


# --- the upstream e2e matrix ---------------------------------------------------------

MATRIX_PODS = [f"{n}/{p}" for n in "xyz" for p in "abc"]
MATRIX_IP = {f"{n}/{p}": f"10.244.0.{10 * (i + 1) + j}"
             for i, n in enumerate("xyz") for j, p in enumerate("abc")}
# As upstream: every pod serves 80 and 81 over TCP, UDP and SCTP, ports named
# serve-<port>-<protocol>.
MATRIX_PORTS = [{"name": f"serve-{p}-{proto.lower()}", "containerPort": p, "protocol": proto}
                for p in (80, 81) for proto in ("TCP", "UDP", "SCTP")]


def matrix_cluster(*policies: dict[str, Any], spread: bool = False) -> Cluster:
    docs = [namespace(n) for n in "xyz"]
    for i, key in enumerate(MATRIX_PODS):
        ns, name = key.split("/")
        node = "node-2" if spread and i % 2 else "node-1"
        docs.append(pod(ns, name, MATRIX_IP[key], node, ports=MATRIX_PORTS))
    return load(*docs, *policies)


def parse_matrix(text: str) -> dict[tuple[str, str], bool]:
    """Rows are senders, columns receivers; '.' reachable, 'X' not."""
    lines = [line.split() for line in text.strip().splitlines()]
    cols = [f"{c[0]}/{c[1]}" for c in lines[0]]
    out = {}
    for row in lines[1:]:
        src = f"{row[0][0]}/{row[0][1]}"
        assert len(row) == 10, row
        for dst, cell in zip(cols, row[1:], strict=True):
            assert cell in ".X", cell
            out[(src, dst)] = cell == "."
    assert len(out) == 81
    return out


def assert_matrix(policies: list[dict[str, Any]], proto: str, port: int, text: str) -> None:
    expected = parse_matrix(text)
    for spread in (False, True):
        cluster = matrix_cluster(*policies, spread=spread)
        compiled = compiled_view(cluster)
        wrong = []
        for (src, dst), want in expected.items():
            s, d = MATRIX_IP[src], MATRIX_IP[dst]
            ref = allowed(cluster, s, d, proto, port, NODES)
            got = across(cluster, compiled, s, d, proto, port)
            if ref.allowed != want or got != ref:
                wrong.append(f"{src} -> {dst}: expected {'.' if want else 'X'}, "
                             f"reference {ref}, compiled {got}")
        assert not wrong, f"{proto}/{port} spread={spread}:\n" + "\n".join(wrong)


ALL_REACHABLE = """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
"""

# Only x/a's column closed (a pod always reaches itself).
NOTHING_TO_XA = """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  X  .  .  .  .  .  .  .  .
xc  X  .  .  .  .  .  .  .  .
ya  X  .  .  .  .  .  .  .  .
yb  X  .  .  .  .  .  .  .  .
yc  X  .  .  .  .  .  .  .  .
za  X  .  .  .  .  .  .  .  .
zb  X  .  .  .  .  .  .  .  .
zc  X  .  .  .  .  .  .  .  .
"""

POD_A = {"matchLabels": {"pod": "a"}}


def test_no_policy_everything_reachable() -> None:
    assert_matrix([], "TCP", 80, ALL_REACHABLE)


def test_deny_all_ingress() -> None:
    deny = netpol("x", "deny-all", policyTypes=["Ingress"])
    assert_matrix([deny], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  X  X  .  .  .  .  .  .
xb  X  .  X  .  .  .  .  .  .
xc  X  X  .  .  .  .  .  .  .
ya  X  X  X  .  .  .  .  .  .
yb  X  X  X  .  .  .  .  .  .
yc  X  X  X  .  .  .  .  .  .
za  X  X  X  .  .  .  .  .  .
zb  X  X  X  .  .  .  .  .  .
zc  X  X  X  .  .  .  .  .  .
""")


def test_deny_all_egress() -> None:
    deny = netpol("y", "deny-all-egress", policyTypes=["Egress"])
    assert_matrix([deny], "UDP", 81, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  X  X  X  .  X  X  X  X  X
yb  X  X  X  X  .  X  X  X  X
yc  X  X  X  X  X  .  X  X  X
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
""")


def test_allow_ingress_from_one_pod() -> None:
    pol = netpol("x", "allow-b-to-a", podSelector=POD_A,
                 ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    # A podSelector alone means the policy's namespace: y/b and z/b stay out.
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  .  .  .  .  .  .  .  .  .
xc  X  .  .  .  .  .  .  .  .
ya  X  .  .  .  .  .  .  .  .
yb  X  .  .  .  .  .  .  .  .
yc  X  .  .  .  .  .  .  .  .
za  X  .  .  .  .  .  .  .  .
zb  X  .  .  .  .  .  .  .  .
zc  X  .  .  .  .  .  .  .  .
""")


def test_allow_from_one_namespace_on_port_81_only() -> None:
    pol = netpol("x", "allow-y-81", podSelector=POD_A,
                 ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                           "ports": [{"port": 81}]}])
    assert_matrix([pol], "TCP", 81, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  X  .  .  .  .  .  .  .  .
xc  X  .  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  X  .  .  .  .  .  .  .  .
zb  X  .  .  .  .  .  .  .  .
zc  X  .  .  .  .  .  .  .  .
""")
    assert_matrix([pol], "TCP", 80, NOTHING_TO_XA)
    # The port's protocol defaults to TCP: UDP 81 is not allowed.
    assert_matrix([pol], "UDP", 81, NOTHING_TO_XA)


def test_pod_and_namespace_selector_in_one_peer_is_and() -> None:
    pol = netpol("x", "and", podSelector=POD_A, ingress=[{"from": [{
        "namespaceSelector": {"matchExpressions": [
            {"key": "ns", "operator": "In", "values": ["y", "z"]}]},
        "podSelector": {"matchLabels": {"pod": "b"}}}]}])
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  X  .  .  .  .  .  .  .  .
xc  X  .  .  .  .  .  .  .  .
ya  X  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  X  .  .  .  .  .  .  .  .
za  X  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  X  .  .  .  .  .  .  .  .
""")


def test_separate_peers_are_or() -> None:
    pol = netpol("x", "or", podSelector=POD_A, ingress=[{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}},
        {"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  .  .  .  .  .  .  .  .  .
xc  X  .  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  X  .  .  .  .  .  .  .  .
zb  X  .  .  .  .  .  .  .  .
zc  X  .  .  .  .  .  .  .  .
""")


def test_egress_to_one_pod_only() -> None:
    pol = netpol("x", "a-to-b-only", podSelector=POD_A, policyTypes=["Egress"],
                 egress=[{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  X  X  X  X  X  X  X
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
""")


EXCEPT_Y_A_B = {"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.0.20/31"]}}


def test_ip_block_with_except() -> None:
    # 10.244.0.20/31 holds y/a (.20) and y/b (.21); ipBlock matches pod addresses.
    pol = netpol("x", "cidr", podSelector=POD_A, ingress=[{"from": [EXCEPT_Y_A_B]}])
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  X  .  .  .  .  .  .  .  .
yb  X  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
""")


def test_ip_block_except_is_reopened_by_another_peer() -> None:
    # The except removes y/b from the block, not from the rule: the second
    # peer still admits it (peers are OR).
    pol = netpol("x", "cidr-or-yb", podSelector=POD_A, ingress=[{"from": [
        EXCEPT_Y_A_B,
        {"namespaceSelector": {"matchLabels": {"ns": "y"}},
         "podSelector": {"matchLabels": {"pod": "b"}}}]}])
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  X  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
""")


def test_egress_ip_block_with_except() -> None:
    pol = netpol("x", "egress-cidr", podSelector=POD_A, policyTypes=["Egress"], egress=[
        {"to": [{"ipBlock": {"cidr": "10.244.0.0/24", "except": ["10.244.0.30/32"]}}]}])
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  X  .  .
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
""")


def test_named_port() -> None:
    pol = netpol("x", "named", podSelector=POD_A, ingress=[{"ports": [{"port": "serve-81-tcp"}]}])
    assert_matrix([pol], "TCP", 81, ALL_REACHABLE)
    assert_matrix([pol], "TCP", 80, NOTHING_TO_XA)
    assert_matrix([pol], "UDP", 81, NOTHING_TO_XA)
    udp = netpol("x", "named-udp", podSelector=POD_A,
                 ingress=[{"ports": [{"protocol": "UDP", "port": "serve-81-udp"}]}])
    assert_matrix([udp], "UDP", 81, ALL_REACHABLE)
    assert_matrix([udp], "TCP", 81, NOTHING_TO_XA)


def test_egress_named_port() -> None:
    pol = netpol("x", "egress-named", podSelector=POD_A, policyTypes=["Egress"],
                 egress=[{"ports": [{"port": "serve-80-tcp"}]}])
    assert_matrix([pol], "TCP", 80, ALL_REACHABLE)
    assert_matrix([pol], "TCP", 81, """
    xa xb xc ya yb yc za zb zc
xa  .  X  X  X  X  X  X  X  X
xb  .  .  .  .  .  .  .  .  .
xc  .  .  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  .  .  .  .  .  .  .  .  .
zb  .  .  .  .  .  .  .  .  .
zc  .  .  .  .  .  .  .  .  .
""")


def test_end_port_range() -> None:
    pol = netpol("x", "range", ingress=[{
        "from": [{"namespaceSelector": {}}], "ports": [{"port": 81, "endPort": 90}]}])
    assert_matrix([pol], "TCP", 81, ALL_REACHABLE)
    assert_matrix([pol], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  X  X  .  .  .  .  .  .
xb  X  .  X  .  .  .  .  .  .
xc  X  X  .  .  .  .  .  .  .
ya  X  X  X  .  .  .  .  .  .
yb  X  X  X  .  .  .  .  .  .
yc  X  X  X  .  .  .  .  .  .
za  X  X  X  .  .  .  .  .  .
zb  X  X  X  .  .  .  .  .  .
zc  X  X  X  .  .  .  .  .  .
""")


def test_policies_add_up() -> None:
    deny = netpol("x", "deny-all", policyTypes=["Ingress"])
    from_y = netpol("x", "from-y", ingress=[{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}])
    assert_matrix([deny, from_y], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  X  X  .  .  .  .  .  .
xb  X  .  X  .  .  .  .  .  .
xc  X  X  .  .  .  .  .  .  .
ya  .  .  .  .  .  .  .  .  .
yb  .  .  .  .  .  .  .  .  .
yc  .  .  .  .  .  .  .  .  .
za  X  X  X  .  .  .  .  .  .
zb  X  X  X  .  .  .  .  .  .
zc  X  X  X  .  .  .  .  .  .
""")


def test_ingress_and_egress_both_must_allow() -> None:
    deny_egress = netpol("y", "deny-egress", policyTypes=["Egress"])
    a_from_y = netpol("x", "a-from-y", podSelector=POD_A, ingress=[{"from": [
        {"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}])
    assert_matrix([deny_egress, a_from_y], "TCP", 80, """
    xa xb xc ya yb yc za zb zc
xa  .  .  .  .  .  .  .  .  .
xb  X  .  .  .  .  .  .  .  .
xc  X  .  .  .  .  .  .  .  .
ya  X  X  X  .  X  X  X  X  X
yb  X  X  X  X  .  X  X  X  X
yc  X  X  X  X  X  .  X  X  X
za  X  .  .  .  .  .  .  .  .
zb  X  .  .  .  .  .  .  .  .
zc  X  .  .  .  .  .  .  .  .
""")


# --- attribution, exemptions, edge cases ---------------------------------------------


def both(cluster: Cluster, src: str, dst: str, proto: int | str, port: int,
         node: Node = NODE1) -> Verdict:
    """Reference and compiled (one node) must agree; the verdict."""
    ref = allowed(cluster, src, dst, proto, port, NODES)
    got = lookup(compile_policy(cluster, node), src, dst, proto, port)
    assert got == ref, (ref, got)
    return ref


def test_drop_blames_the_first_selecting_policy_and_allow_credits_the_first_allowing() -> None:
    cluster = matrix_cluster(
        netpol("x", "b-web", podSelector=POD_A, ingress=[{"ports": [{"port": 81}]}]),
        netpol("x", "a-deny", podSelector=POD_A, policyTypes=["Ingress"]),
        netpol("x", "c-all", podSelector=POD_A, ingress=[{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]),
    )
    xa, xb, xc = (MATRIX_IP[k] for k in ("x/a", "x/b", "x/c"))
    dropped = both(cluster, xc, xa, "TCP", 80)
    assert dropped == Verdict(False, "x/a-deny", "ingress", "denied")
    assert str(dropped) == "DROP policy x/a-deny"
    # 81 from x/b: both b-web and c-all allow; b-web comes first by name.
    assert both(cluster, xb, xa, "TCP", 81) == Verdict(True, "x/b-web", "ingress", "allowed")
    assert both(cluster, xb, xa, "UDP", 80).policy == "x/c-all"
    assert both(cluster, xb, xa, 1, 0).policy == "x/c-all"  # no ports: any protocol


def test_ingress_from_the_pods_own_node_is_always_allowed() -> None:
    cluster = matrix_cluster(netpol("x", "deny", policyTypes=["Ingress"]))
    xa = MATRIX_IP["x/a"]
    assert both(cluster, "192.0.2.1", xa, "TCP", 80).reason == "node"
    # Another node's address is not exempt (x/a runs on node-1).
    assert not both(cluster, "192.0.2.2", xa, "TCP", 80).allowed
    # The hairpin source stands for the pod itself.
    c = compile_policy(cluster, NODE1)
    assert lookup(c, NODE1.hairpin_ip, xa, "TCP", 80).allowed
    assert lookup(c, xa, xa, "TCP", 80).reason == "self"


def test_egress_to_the_node_is_not_exempt() -> None:
    cluster = matrix_cluster(netpol("x", "deny", policyTypes=["Egress"]))
    assert not both(cluster, MATRIX_IP["x/a"], "192.0.2.1", "TCP", 10250).allowed


def test_host_network_pods_are_neither_selected_nor_matched_by_selectors() -> None:
    cluster = load(
        namespace("x"),
        pod("x", "a", "10.244.0.10", labels={"app": "web"}),
        pod("x", "host", "192.0.2.2", node="node-2", labels={"app": "web"}, hostNetwork=True),
        netpol("x", "web", podSelector={"matchLabels": {"app": "web"}},
               ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]),
    )
    c = compile_policy(cluster, NODE2)
    assert not c.maps.endpoints  # the hostNetwork pod is not isolated
    assert not both(cluster, "192.0.2.2", "10.244.0.10", "TCP", 80).allowed
    assert both(cluster, "10.244.0.10", "192.0.2.2", "TCP", 80).reason == "not-isolated"


def test_terminal_pods_do_not_count() -> None:
    done = pod("x", "done", "10.244.0.11", labels={"app": "web"})
    done["status"]["phase"] = "Succeeded"
    cluster = load(
        namespace("x"), pod("x", "a", "10.244.0.10", labels={}), done,
        netpol("x", "p", ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}]}]),
    )
    assert not both(cluster, "10.244.0.11", "10.244.0.10", "TCP", 80).allowed


def test_ipv6_block_matches_nothing_rather_than_everything() -> None:
    cluster = matrix_cluster(netpol("x", "v6", podSelector=POD_A,
                                    ingress=[{"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]))
    assert not both(cluster, MATRIX_IP["y/a"], MATRIX_IP["x/a"], "TCP", 80).allowed


def test_rule_with_selector_matching_nobody_allows_nobody() -> None:
    cluster = matrix_cluster(netpol("x", "none", podSelector=POD_A, ingress=[{"from": [
        {"podSelector": {"matchLabels": {"pod": "nope"}}}]}]))
    assert not both(cluster, MATRIX_IP["x/b"], MATRIX_IP["x/a"], "TCP", 80).allowed


def test_empty_rule_allows_everything_and_external_sources() -> None:
    cluster = matrix_cluster(netpol("x", "all", ingress=[{}]))
    assert both(cluster, "198.51.100.7", MATRIX_IP["x/a"], "SCTP", 9).allowed
    assert both(cluster, "198.51.100.7", MATRIX_IP["x/a"], 1, 0).allowed


def test_ports_without_port_number_cover_the_protocol() -> None:
    cluster = matrix_cluster(netpol("x", "udp", podSelector=POD_A,
                                    ingress=[{"ports": [{"protocol": "UDP"}]}]))
    assert both(cluster, "198.51.100.7", MATRIX_IP["x/a"], "UDP", 53).allowed
    assert not both(cluster, "198.51.100.7", MATRIX_IP["x/a"], "TCP", 53).allowed
    assert not both(cluster, "198.51.100.7", MATRIX_IP["x/a"], 1, 0).allowed


def test_named_port_resolves_per_destination_pod() -> None:
    docs = [namespace("x"),
            pod("x", "a", "10.244.0.10", ports=[{"name": "http", "containerPort": 8080}]),
            pod("x", "b", "10.244.0.11", ports=[{"name": "http", "containerPort": 9090}]),
            pod("x", "c", "10.244.0.12", node="node-2")]
    ing = load(*docs, netpol("x", "http-in", ingress=[{"ports": [{"port": "http"}]}]))
    assert both(ing, "10.244.0.12", "10.244.0.10", "TCP", 8080).allowed
    assert not both(ing, "10.244.0.12", "10.244.0.10", "TCP", 9090).allowed
    assert both(ing, "10.244.0.12", "10.244.0.11", "TCP", 9090, NODE1).allowed
    eg = load(*docs, netpol("x", "http-out", podSelector={"matchLabels": {"pod": "c"}},
                            policyTypes=["Egress"], egress=[{"ports": [{"port": "http"}]}]))
    for dst, port, ok in (("10.244.0.10", 8080, True), ("10.244.0.10", 9090, False),
                          ("10.244.0.11", 9090, True), ("198.51.100.1", 8080, False)):
        assert both(eg, "10.244.0.12", dst, "TCP", port, NODE2).allowed is ok
    # For egress the sender's own numbers for the name do not count.
    eg = load(*docs, netpol("x", "a-out", podSelector={"matchLabels": {"pod": "a"}},
                            policyTypes=["Egress"], egress=[{"ports": [{"port": "http"}]}]))
    assert both(eg, "10.244.0.10", "10.244.0.11", "TCP", 9090).allowed
    assert not both(eg, "10.244.0.10", "10.244.0.11", "TCP", 8080).allowed
    assert not both(eg, "10.244.0.10", "10.244.0.12", "TCP", 8080).allowed


def test_peer_with_an_identity_but_no_rule_of_its_own_falls_back_to_any() -> None:
    # x/b has an identity (x/a's policy names it); x/c's rules are all "any".
    cluster = matrix_cluster(
        netpol("x", "a-from-b", podSelector=POD_A, ingress=[{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]),
        netpol("x", "c-81", podSelector={"matchLabels": {"pod": "c"}},
               ingress=[{"ports": [{"port": 81}]}]))
    c = compile_policy(cluster, NODE1)
    xb = ip_int(MATRIX_IP["x/b"])
    assert c.maps.ipcache[(xb, 32)].identity != 0
    assert both(cluster, MATRIX_IP["x/b"], MATRIX_IP["x/c"], "TCP", 81).allowed
    assert not both(cluster, MATRIX_IP["x/b"], MATRIX_IP["x/c"], "TCP", 80).allowed
    assert both(cluster, MATRIX_IP["x/b"], MATRIX_IP["x/a"], "TCP", 80).allowed


def test_egress_named_port_with_ip_block_peer() -> None:
    docs = [namespace("x"),
            pod("x", "a", "10.244.0.10", ports=[{"name": "http", "containerPort": 8080}]),
            pod("x", "b", "10.244.1.10", ports=[{"name": "http", "containerPort": 8080}]),
            pod("x", "c", "10.244.0.12")]
    cluster = load(*docs, netpol("x", "out", podSelector={"matchLabels": {"pod": "c"}},
                                 policyTypes=["Egress"], egress=[{
                                     "to": [{"ipBlock": {"cidr": "10.244.0.0/24"}}],
                                     "ports": [{"port": "http"}]}]))
    assert both(cluster, "10.244.0.12", "10.244.0.10", "TCP", 8080).allowed
    assert not both(cluster, "10.244.0.12", "10.244.1.10", "TCP", 8080).allowed
    assert not both(cluster, "10.244.0.12", "10.244.0.99", "TCP", 8080).allowed


def test_namespace_without_object_still_has_its_name_label() -> None:
    cluster = load(pod("x", "a", "10.244.0.10"), pod("q", "b", "10.244.0.11"),
                   netpol("x", "p", ingress=[{"from": [{"namespaceSelector": {"matchLabels": {
                       "kubernetes.io/metadata.name": "q"}}}]}]))
    assert both(cluster, "10.244.0.11", "10.244.0.10", "TCP", 80).allowed


def test_only_local_pods_are_enforced() -> None:
    cluster = matrix_cluster(netpol("x", "deny", policyTypes=["Ingress", "Egress"]),
                             spread=True)
    c1 = compile_policy(cluster, NODE1)
    local = {ip_int(MATRIX_IP[k]) for i, k in enumerate(MATRIX_PODS) if k[0] == "x" and i % 2 == 0}
    assert set(c1.maps.endpoints) == local
    # x/b runs on node-2: node-1 does not check its ingress.
    assert lookup(c1, MATRIX_IP["y/a"], MATRIX_IP["x/b"], "TCP", 80).allowed


def test_node_without_name_enforces_every_pod() -> None:
    cluster = matrix_cluster(netpol("x", "deny", policyTypes=["Ingress"]), spread=True)
    c = compile_policy(cluster, Node(ips=("192.0.2.1",)))
    assert len(c.maps.endpoints) == 3


# --- the compiled form ---------------------------------------------------------------


def test_normalize_is_disjoint_and_credits_the_first_policy() -> None:
    tagged = [(1, 6, 80, 90, 11), (0, 6, 85, 100, 10), (2, 17, 53, 53, 12), (3, 0, 0, 65535, 13),
              (4, 6, 1, 1000, 14)]
    assert normalize(tagged) == (
        PortRange(6, 80, 84, 11), PortRange(6, 85, 100, 10), PortRange(17, 53, 53, 12),
        PortRange(0, 0, 65535, 13))
    # Adjacent pieces of one policy merge.
    assert normalize([(0, 6, 80, 80, 1), (0, 6, 81, 81, 1)]) == (PortRange(6, 80, 81, 1),)


def test_ip_block_entries_and_identities() -> None:
    cluster = matrix_cluster(netpol("x", "cidr", podSelector=POD_A,
                                    ingress=[{"from": [EXCEPT_Y_A_B]}]))
    c = compile_policy(cluster, NODE1)
    prefixes = {(str(ipaddress.IPv4Address(n)), p) for n, p in c.maps.ipcache}
    # The block and its except; pods inside add nothing (same class as the block).
    assert ("10.244.0.0", 16) in prefixes and ("10.244.0.20", 31) in prefixes
    assert not any(p == 32 and ip.startswith("10.244.") for ip, p in prefixes)
    assert c.maps.ipcache[(ip_int("10.244.0.20"), 31)].identity == 0


def test_pods_with_the_same_labels_share_an_identity() -> None:
    docs = [namespace("x"), pod("x", "a", "10.244.0.10", labels={"app": "db"})]
    docs += [pod("x", f"web{i}", f"10.244.1.{i}", node="node-2", labels={"app": "web"})
             for i in range(1, 50)]
    cluster = load(*docs, netpol("x", "db", podSelector={"matchLabels": {"app": "db"}},
                                 ingress=[{"from": [{"podSelector": {
                                     "matchLabels": {"app": "web"}}}]}]))
    c = compile_policy(cluster, NODE1)
    web_ids = {c.maps.ipcache[(ip_int(f"10.244.1.{i}"), 32)].identity for i in range(1, 50)}
    assert len(web_ids) == 1
    assert len(c.maps.rules) == 1 and len(c.maps.portsets) == 1


def test_port_sets_chain_and_overflow_fails_closed() -> None:
    n = PORTS_PER_SET * 3
    ports = [{"port": 1000 + 2 * i} for i in range(n)]
    cluster = matrix_cluster(netpol("x", "many", podSelector=POD_A, ingress=[{"ports": ports}]))
    c = compile_policy(cluster, NODE1)
    (slot,) = set(c.maps.rules.values())
    chain = [slot]
    while c.maps.portsets[chain[-1]].next:
        chain.append(c.maps.portsets[chain[-1]].next)
    assert len(chain) == 3 and not c.errors
    assert both(cluster, MATRIX_IP["y/a"], MATRIX_IP["x/a"], "TCP", 1000 + 2 * (n - 1)).allowed
    limit = PORTS_PER_SET * MAX_CHAIN
    ports = [{"port": 1000 + 2 * i} for i in range(limit + 1)]
    cluster = matrix_cluster(netpol("x", "many", podSelector=POD_A, ingress=[{"ports": ports}]))
    c = compile_policy(cluster, NODE1)
    assert c.errors and "only" in str(c.errors[0])
    assert not lookup(c, MATRIX_IP["y/a"], MATRIX_IP["x/a"], "TCP", 1000 + 2 * limit).allowed


def test_encode_decode_round_trip() -> None:
    cluster = matrix_cluster(
        netpol("x", "p", podSelector=POD_A, policyTypes=["Ingress", "Egress"],
               ingress=[{"from": [EXCEPT_Y_A_B], "ports": [{"port": 80, "endPort": 81}]}],
               egress=[{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve-81-udp",
                                                                      "protocol": "UDP"}]}]))
    c = compile_policy(cluster, NODE1)
    raw = encode(c.maps)
    assert decode(raw, c.maps.policies) == replace(c.maps)
    key = next(iter(raw["lb_pol_endpoints"]))
    assert key == bytes(ipaddress.IPv4Address(MATRIX_IP["x/a"]).packed)  # network order


def relabel(cluster: Cluster, key: str, **labels: str) -> Cluster:
    p = cluster.pods[key]
    return replace(cluster, pods={**cluster.pods, key: replace(
        p, labels=tuple(sorted({**dict(p.labels), **labels}.items())))})


def test_recompile_keeps_numbers_and_diff_is_small() -> None:
    clients = netpol("x", "p", podSelector=POD_A, ingress=[{"from": [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"role": "client"}}}]}])
    cluster = matrix_cluster(clients)
    c0 = compile_policy(cluster, NODE1)
    assert compile_policy(cluster, NODE1, previous=c0).maps == c0.maps
    # The first client: its identity's port set, the rule, then its address.
    c1 = compile_policy(relabel(cluster, "z/c", role="client"), NODE1, previous=c0)
    d = diff(c0.maps, c1.maps)
    assert [(m, op) for m, op, _, _ in d.steps()] == [
        ("lb_pol_portsets", "put"), ("lb_pol_rules", "put"), ("lb_pol_ipcache", "put")]
    assert apply(c0.maps, d) == c1.maps
    # Another client of the same class: one ipcache entry and nothing else.
    c2, d = compile_incremental(
        c1, relabel(relabel(cluster, "z/c", role="client"), "y/b", role="client"), NODE1)
    assert [(m, op, k) for m, op, k, _ in d.steps()] == [
        ("lb_pol_ipcache", "put", (ip_int(MATRIX_IP["y/b"]), 32))]
    assert lookup(c2, MATRIX_IP["y/b"], MATRIX_IP["x/a"], "TCP", 80).allowed
    # The last client leaves: removals in reverse order.
    c3 = compile_policy(cluster, NODE1, previous=c2)
    assert [(m, op) for m, op, _, _ in diff(c2.maps, c3.maps).steps()] == [
        ("lb_pol_ipcache", "delete"), ("lb_pol_ipcache", "delete"),
        ("lb_pol_rules", "delete"), ("lb_pol_portsets", "delete")]


def test_describe() -> None:
    cluster = matrix_cluster(
        netpol("x", "deny", policyTypes=["Ingress"]),
        netpol("x", "from-b", podSelector=POD_A, ingress=[{
            "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]))
    rows = describe(compile_policy(cluster, NODE1))
    # 9 pods, two directions each, one rule at most: one row per direction.
    assert len(rows) == 18
    xa = [r for r in rows if r["pod"] == "x/a" and r["direction"] == "ingress"]
    assert xa == [{"pod": "x/a", "direction": "ingress", "isolated": True,
                   "drop_policy": "x/deny", "drops": None,
                   "peer": "#1 x/b (ns x pods [pod=b])", "ports": "TCP 80",
                   "policy": "x/from-b"}]
    ya = [r for r in rows if r["pod"] == "y/a" and r["direction"] == "egress"]
    assert ya == [{"pod": "y/a", "direction": "egress", "isolated": False,
                   "drop_policy": None, "drops": None, "peer": "-", "ports": "-",
                   "policy": None}]


# --- parsing -------------------------------------------------------------------------


def test_parse_pod_namespace_and_policy_defaults() -> None:
    cluster = load(
        namespace("x", team="blue"),
        {"apiVersion": "v1", "kind": "Pod",
         "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"}},
         "spec": {"nodeName": "node-1", "containers": [
             {"name": "c", "ports": [{"name": "http", "containerPort": 8080},
                                     {"containerPort": 53, "protocol": "UDP"}]}]},
         "status": {"podIPs": [{"ip": "fd00::1"}, {"ip": "10.244.0.10"}]}},
        netpol("x", "p", ingress=[{"ports": [{"port": 80}]}]),
        netpol("x", "q", egress=[{}]),
        netpol("x", "r", egress=[]),
    )
    p = cluster.pods["x/a"]
    assert p.ips == ("10.244.0.10",) and p.phase == "Running" and not p.host_network
    assert p.ports == (ContainerPort("http", 8080, "TCP"), ContainerPort("", 53, "UDP"))
    assert dict(cluster.namespaces["x"].labels) == {
        "ns": "x", "team": "blue", "kubernetes.io/metadata.name": "x"}
    pol = cluster.policies["x/p"]
    assert pol.policy_types == ("Ingress",) and pol.pod_selector == LabelSelector()
    assert pol.ingress == (PolicyRule((), (PolicyPort("TCP", 80),)),)
    assert cluster.policies["x/q"].policy_types == ("Ingress", "Egress")
    assert cluster.policies["x/r"].policy_types == ("Ingress",)  # egress: [] is no rule


def test_parse_policy_in_full() -> None:
    cluster = load(netpol(
        "x", "full", podSelector={"matchLabels": {"app": "db"}, "matchExpressions": [
            {"key": "tier", "operator": "NotIn", "values": ["b", "a"]}]},
        policyTypes=["Egress", "Ingress"],
        ingress=[{"from": [{"ipBlock": {"cidr": "10.0.0.1/8", "except": ["10.1.0.0/16"]}},
                           {"namespaceSelector": {"matchExpressions": [
                               {"key": "env", "operator": "Exists"}]},
                            "podSelector": {}}],
                  "ports": [{"protocol": "SCTP", "port": 7, "endPort": 9},
                            {"port": "grpc-web"}]}],
        egress=[{"to": [{"podSelector": {"matchExpressions": [
            {"key": "x", "operator": "DoesNotExist"}]}}]}]))
    pol = cluster.policies["x/full"]
    assert pol.pod_selector == LabelSelector((("app", "db"),), (
        SelectorRequirement("tier", "NotIn", ("a", "b")),))
    assert pol.policy_types == ("Ingress", "Egress")
    (rule,) = pol.ingress
    assert rule.peers == (
        PolicyPeer(ip_block=IPBlock("10.0.0.0/8", ("10.1.0.0/16",))),
        PolicyPeer(pod_selector=LabelSelector(), namespace_selector=LabelSelector(
            (), (SelectorRequirement("env", "Exists"),))))
    assert rule.ports == (PolicyPort("SCTP", 7, 9), PolicyPort("TCP", "grpc-web"))
    assert pol.egress[0].peers[0].namespace_selector is None


@pytest.mark.parametrize(("spec", "field"), [
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]}]},
     "spec.ingress[0].from[0].ipBlock"),
    ({"ingress": [{"from": [{}]}]}, "spec.ingress[0].from[0]"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    ({"ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.0.0.0/8"]}}]}]},
     "spec.ingress[0].from[0].ipBlock.except[0]"),
    ({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.300/8"}}]}]},
     "spec.egress[0].to[0].ipBlock.cidr"),
    ({"ingress": [{"ports": [{"port": "http", "endPort": 90}]}]},
     "spec.ingress[0].ports[0].endPort"),
    ({"ingress": [{"ports": [{"port": 90, "endPort": 80}]}]}, "spec.ingress[0].ports[0].endPort"),
    ({"ingress": [{"ports": [{"port": 0}]}]}, "spec.ingress[0].ports[0].port"),
    ({"ingress": [{"ports": [{"port": "Not_A_Name"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"ingress": [{"ports": [{"port": "80"}]}]}, "spec.ingress[0].ports[0].port"),
    ({"ingress": [{"ports": [{"protocol": "ICMP"}]}]}, "spec.ingress[0].ports[0].protocol"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Is"}]}},
     "spec.podSelector.matchExpressions[0].operator"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]}},
     "spec.podSelector.matchExpressions[0].values"),
    ({"podSelector": {"matchLabels": {"version": 1}}}, "spec.podSelector.matchLabels.version"),
    ({"policyTypes": ["Ingress", "Sideways"]}, "spec.policyTypes[1]"),
    ({"policyTypes": ["Ingress", "Ingress"]}, "spec.policyTypes"),
    ({"ingress": {"from": []}}, "spec.ingress"),
    ({"egress": [{"to": [{"namespaceSelector": []}]}]}, "spec.egress[0].to[0].namespaceSelector"),
])
def test_bad_policy_fails_closed_naming_the_field(spec: dict[str, Any], field: str) -> None:
    """Reported with its field, and kept as a policy without rules: what it
    selects is isolated until it is fixed."""
    res = build_cluster([(netpol("x", "bad", **spec), "t"), (netpol("x", "good"), "t")])
    assert sorted(res.cluster.policies) == ["x/bad", "x/good"]
    bad = res.cluster.policies["x/bad"]
    assert bad.broken and bad.ingress == () and bad.egress == ()
    assert len(res.errors) == 1 and res.errors[0].field == field, res.errors


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d["spec"]["containers"][0]["ports"].append({"containerPort": 70000}),
     "spec.containers[0].ports[0].containerPort"),
    (lambda d: d["status"].update(podIPs=[{"ip": "10.0.0.300"}]), "status.podIPs[0].ip"),
    (lambda d: d["spec"].update(hostNetwork="yes"), "spec.hostNetwork"),
    (lambda d: d["metadata"]["labels"].update(n=3), "metadata.labels.n"),
])
def test_bad_pod_is_skipped_naming_the_field(change: Any, field: str) -> None:
    bad = pod("x", "bad", "10.0.0.1")
    change(bad)
    res = build_cluster([(bad, "t"), (pod("x", "good", "10.0.0.2"), "t")])
    assert list(res.cluster.pods) == ["x/good"]
    assert len(res.errors) == 1 and res.errors[0].field == field, res.errors


def test_selector_operators() -> None:
    def sel(op: str, *values: str) -> LabelSelector:
        return LabelSelector((), (SelectorRequirement("k", op, values),))

    assert sel("In", "a", "b").matches({"k": "a"}) and not sel("In", "a").matches({})
    assert sel("NotIn", "a").matches({}) and sel("NotIn", "a").matches({"k": "b"})
    assert not sel("NotIn", "a").matches({"k": "a"})
    assert sel("Exists").matches({"k": ""}) and not sel("Exists").matches({"j": "a"})
    assert sel("DoesNotExist").matches({"j": "a"}) and not sel("DoesNotExist").matches({"k": "a"})
    both_sel = LabelSelector((("a", "1"),), (SelectorRequirement("k", "Exists"),))
    assert both_sel.matches({"a": "1", "k": "x"}) and not both_sel.matches({"a": "1"})
    assert LabelSelector().matches({})


# --- random clusters: the compiled lookup agrees with the reference ------------------

KEYS = ("app", "tier")
VALUES = ("web", "db")
POOL = [f"10.0.0.{i}" for i in range(1, 13)]
PROBE_ADDRS = [*POOL, "10.0.0.13", "10.0.1.1", "192.0.2.1", "192.0.2.2", "198.51.100.1"]
NAMED = [("http", 80, "TCP"), ("http", 81, "TCP"), ("dns", 53, "UDP"), ("alt", 81, "SCTP")]

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)


@st.composite
def selector_st(draw: st.DrawFn, keys: tuple[str, ...] = KEYS) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["matchLabels"] = draw(st.dictionaries(st.sampled_from(keys), st.sampled_from(VALUES),
                                                  max_size=1))
    exprs = []
    for _ in range(draw(st.integers(0, 1))):
        op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
        e: dict[str, Any] = {"key": draw(st.sampled_from(keys)), "operator": op}
        if op in ("In", "NotIn"):
            e["values"] = draw(st.lists(st.sampled_from(VALUES), min_size=1, max_size=2,
                                        unique=True))
        exprs.append(e)
    if exprs:
        out["matchExpressions"] = exprs
    return out


@st.composite
def ip_block_st(draw: st.DrawFn) -> dict[str, Any]:
    if draw(st.integers(0, 9)) == 0:
        return {"cidr": draw(st.sampled_from(["fd00::/8", "0.0.0.0/0"]))}
    base = draw(st.sampled_from([*POOL, "10.0.1.1", "198.51.100.1"]))
    net = ipaddress.ip_network(f"{base}/{draw(st.integers(26, 32))}", strict=False)
    excepts = []
    for _ in range(draw(st.integers(0, 2))):
        if net.prefixlen == 32:
            break
        plen = draw(st.integers(net.prefixlen + 1, 32))
        host = net.network_address + draw(st.integers(0, net.num_addresses - 1))
        excepts.append(str(ipaddress.ip_network(f"{host}/{plen}", strict=False)))
    return {"cidr": str(net), **({"except": excepts} if excepts else {})}


@st.composite
def peer_st(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return {"ipBlock": draw(ip_block_st())}
    out: dict[str, Any] = {}
    if kind in (1, 3):
        out["podSelector"] = draw(selector_st())
    if kind in (2, 3):
        out["namespaceSelector"] = draw(selector_st(("team", "env")))
    return out


@st.composite
def port_st(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out["protocol"] = draw(st.sampled_from(["TCP", "UDP", "SCTP"]))
    kind = draw(st.integers(0, 3))
    if kind == 1:
        out["port"] = draw(st.sampled_from([53, 80, 81]))
    elif kind == 2:
        lo = draw(st.sampled_from([53, 80, 81]))
        out.update(port=lo, endPort=lo + draw(st.integers(0, 2)))
    elif kind == 3:
        out["port"] = draw(st.sampled_from(["http", "dns", "alt"]))
    return out


@st.composite
def rule_st(draw: st.DrawFn, peers_field: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if draw(st.booleans()):
        out[peers_field] = draw(st.lists(peer_st(), max_size=2))
    if draw(st.booleans()):
        out["ports"] = draw(st.lists(port_st(), max_size=2))
    return out


@st.composite
def cluster_docs_st(draw: st.DrawFn) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for ns in "xyz":
        if draw(st.integers(0, 4)):  # sometimes no Namespace object at all
            extra = draw(st.dictionaries(st.sampled_from(["team", "env"]),
                                         st.sampled_from(VALUES), max_size=2))
            docs.append(namespace(ns, **extra))
    ips = draw(st.permutations(POOL))
    for i in range(draw(st.integers(1, 8))):
        node = draw(st.sampled_from(["node-1", "node-2"]))
        host = draw(st.integers(0, 9)) == 0
        ip = ("192.0.2.1" if node == "node-1" else "192.0.2.2") if host else ips[i]
        ports = [{"name": n, "containerPort": p, "protocol": pr}
                 for n, p, pr in draw(st.lists(st.sampled_from(NAMED), max_size=2,
                                               unique_by=lambda t: t[0]))]
        doc = pod(draw(st.sampled_from("xyz")), f"p{i}", ip, node,
                  labels=draw(labels_st), ports=ports, hostNetwork=host)
        if draw(st.integers(0, 14)) == 0:
            doc["status"]["phase"] = "Failed"
        docs.append(doc)
    for i in range(draw(st.integers(0, 4))):
        spec: dict[str, Any] = {"podSelector": draw(selector_st())}
        if draw(st.booleans()):
            spec["policyTypes"] = draw(st.lists(st.sampled_from(["Ingress", "Egress"]),
                                                min_size=1, max_size=2, unique=True))
        if draw(st.booleans()):
            spec["ingress"] = draw(st.lists(rule_st("from"), max_size=2))
        if draw(st.booleans()):
            spec["egress"] = draw(st.lists(rule_st("to"), max_size=2))
        docs.append(netpol(draw(st.sampled_from("xyz")), f"pol{i}", **spec))
    return docs


probe_st = st.tuples(st.sampled_from(PROBE_ADDRS), st.sampled_from(PROBE_ADDRS),
                     st.sampled_from(["TCP", "UDP", "SCTP", 1]), st.sampled_from([53, 80, 81, 82]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_docs_st(), st.lists(probe_st, min_size=10, max_size=30))
def test_compiled_lookup_agrees_with_reference(docs: list[dict[str, Any]],
                                               probes: list[tuple[str, str, Any, int]]) -> None:
    cluster = load(*docs)
    compiled = compiled_view(cluster)
    decoded = {name: replace(c, maps=decode(encode(c.maps), c.maps.policies))
               for name, c in compiled.items()}
    for src, dst, proto, port in probes:
        ref = allowed(cluster, src, dst, proto, port, NODES)
        assert across(cluster, compiled, src, dst, proto, port) == ref, (src, dst, proto, port)
        assert across(cluster, decoded, src, dst, proto, port) == ref


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_docs_st(), cluster_docs_st(), st.lists(probe_st, min_size=10, max_size=20))
def test_recompile_from_previous(before: list[dict[str, Any]], after: list[dict[str, Any]],
                                 probes: list[tuple[str, str, Any, int]]) -> None:
    c0 = compile_policy(load(*before), NODE1)
    cluster = load(*after)
    fresh = compile_policy(cluster, NODE1)
    c1 = compile_policy(cluster, NODE1, previous=c0)
    assert apply(c0.maps, diff(c0.maps, c1.maps)) == c1.maps
    for src, dst, proto, port in probes:
        assert lookup(c1, src, dst, proto, port) == lookup(fresh, src, dst, proto, port)
    # A number both compiles use means the same thing in both, so the diff can
    # be applied entry by entry.
    for cls, ident in c1.identities.items():
        assert c0.identity_classes.get(ident, cls) == cls
    for ranges, chain in c1.portset_slots.items():
        for content, old in c0.portset_slots.items():
            if set(chain) & set(old):
                assert (content, old) == (ranges, chain)
    for key, pid in c1.policy_ids.items():
        assert c0.maps.policies.get(pid, key) == key


@st.composite
def pod_change_st(draw: st.DrawFn, cluster: Cluster) -> Cluster:
    """`cluster` with what pods do most: one comes (often a copy of another's
    namespace, labels and ports at a new address, or of its labels and ports
    in another namespace), goes, or is relabelled."""
    pods = dict(cluster.pods)
    kinds = ["copy", "elsewhere", "new", "gone", "relabel"]
    kind = draw(st.sampled_from(kinds)) if pods else "new"
    if kind in ("copy", "elsewhere", "new"):
        free = [ip for ip in POOL if ip not in {a for p in pods.values() for a in p.ips}]
        if not free:
            return cluster
        ip = draw(st.sampled_from(free))
        if kind != "new":
            like = pods[draw(st.sampled_from(sorted(pods)))]
            ns = draw(st.sampled_from("xyz")) if kind == "elsewhere" else like.namespace
            new = replace(like, namespace=ns, name=f"{like.name}-copy", ips=(ip,))
        else:
            new = replace(next(iter(load(pod(draw(st.sampled_from("xyz")), "fresh", ip,
                                                 labels=draw(labels_st))).pods.values())))
        pods[new.key] = new
    elif kind == "gone":
        del pods[draw(st.sampled_from(sorted(pods)))]
    else:
        key = draw(st.sampled_from(sorted(pods)))
        pods[key] = replace(pods[key], labels=tuple(sorted(draw(labels_st).items())))
    return replace(cluster, pods=pods)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster_docs_st(), st.data())
def test_pod_changes_reuse_the_previous_rules_to_the_same_result(
        docs: list[dict[str, Any]], data: st.DataObject) -> None:
    cluster = load(*docs)
    c0 = compile_policy(cluster, NODE1)
    for _ in range(3):
        cluster = data.draw(pod_change_st(cluster))
        c1 = compile_policy(cluster, NODE1, previous=c0)
        whole = compile_policy(cluster, NODE1, previous=replace(c0, rule_memo=None))
        # What a whole compile from the same previous gives, numbers included.
        assert whole.rules_delta is None
        assert c1 == whole and c1.maps == whole.maps
        assert c1.portset_slots == whole.portset_slots
        full = diff(c0.maps, c1.maps)
        event("reused" if c1.rules_delta is not None else "compiled whole")
        if c1.rules_delta is not None:
            # The compile's own account of its rule changes is the diff's.
            assert c1.rules_delta.put == full.rules.put
            assert set(c1.rules_delta.delete) == set(full.rules.delete)
            assert apply(c0.maps, diff(c0.maps, c1.maps, c1.rules_delta)) == c1.maps
        c0 = c1


def test_a_pod_like_the_others_is_compiled_alone() -> None:
    # One policy admits pod=b to every pod=a of namespace x; a third a arrives.
    cluster = load(
        pod("x", "a1", "10.0.0.1", labels={"pod": "a"}), pod("x", "a2", "10.0.0.2",
                                                          labels={"pod": "a"}),
        pod("x", "b", "10.0.0.3"), pod("y", "c", "10.0.0.4"),
        netpol("x", "from-b", podSelector={"matchLabels": {"pod": "a"}}, ingress=[{
            "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]))
    c0 = compile_policy(cluster, NODE1)
    grown = replace(cluster, pods={**cluster.pods, **load(
        pod("x", "a3", "10.0.0.5", labels={"pod": "a"})).pods})
    c1 = compile_policy(grown, NODE1, previous=c0)
    assert c1.rules_delta is not None and not c1.rules_delta.delete
    assert {local for local, _, _ in c1.rules_delta.put} == {ip_int("10.0.0.5")}
    assert c1.maps == compile_policy(grown, NODE1).maps
    assert lookup(c1, "10.0.0.3", "10.0.0.5", "TCP", 80).allowed
    assert not lookup(c1, "10.0.0.4", "10.0.0.5", "TCP", 80).allowed
    assert not lookup(c1, "10.0.0.3", "10.0.0.5", "TCP", 81).allowed
    # The first pod=b of namespace x is a peer no identity stood for: the
    # rules that name it are compiled again, and admit it.
    cluster = replace(grown, pods={k: v for k, v in grown.pods.items() if k != "x/b"})
    c0 = compile_policy(cluster, NODE1)
    back = compile_policy(grown, NODE1, previous=c0)
    assert back.rules_delta is None and back.maps == compile_policy(grown, NODE1).maps
    assert lookup(back, "10.0.0.3", "10.0.0.5", "TCP", 80).allowed
    # A policy change compiles everything again.
    changed = replace(grown, policies={k: replace(v, egress=v.ingress, policy_types=(
        "Ingress", "Egress")) for k, v in grown.policies.items()})
    c2 = compile_policy(changed, NODE1, previous=c1)
    assert c2.rules_delta is None and c2.maps == compile_policy(changed, NODE1).maps


# --- compile time --------------------------------------------------------------------


def synthetic(pods: int, policies: int, namespaces: int, nodes: int) -> Cluster:
    """Deployments of 20 apps over the namespaces; each policy isolates one
    app and admits clients by pod selector, namespace+pod selector, ipBlock
    or anyone, on numbered, named or ranged ports; a third also limit egress."""
    nss = {f"ns{i}": Namespace(f"ns{i}", (("kubernetes.io/metadata.name", f"ns{i}"),
                                          ("team", f"t{i % 10}")))
           for i in range(namespaces)}
    all_pods = {}
    for i in range(pods):
        labels = (("app", f"app{(i // namespaces) % 20}"), ("tier", ("fe", "be", "db")[i % 3]))
        ports = (ContainerPort("http", (80, 8080)[i % 2]), ContainerPort("metrics", 9090))
        p = Pod(f"ns{i % namespaces}", f"p{i}", labels, f"node-{i % nodes}",
                (f"10.{100 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}",), ports=ports)
        all_pods[p.key] = p
    pols = {}
    for i in range(policies):
        kind = i % 4
        if kind == 0:
            peers: tuple[PolicyPeer, ...] = (PolicyPeer(pod_selector=LabelSelector(
                (("tier", "fe"),))),)
        elif kind == 1:
            peers = (PolicyPeer(namespace_selector=LabelSelector((("team", f"t{i % 10}"),)),
                                pod_selector=LabelSelector((("app", f"app{i % 20}"),))),)
        elif kind == 2:
            peers = (PolicyPeer(ip_block=IPBlock(f"172.{16 + i % 16}.0.0/16",
                                                 (f"172.{16 + i % 16}.{i % 256}.0/24",))),)
        else:
            peers = ()
        allow: tuple[PolicyPort, ...] = (
            (), (PolicyPort("TCP", 80),), (PolicyPort("TCP", "http"),),
            (PolicyPort("TCP", 8000, 8100), PolicyPort("UDP", 53)))[i % 4]
        egress = ((PolicyRule((PolicyPeer(namespace_selector=LabelSelector(),
                                          pod_selector=LabelSelector((("tier", "db"),))),),
                              (PolicyPort("TCP", "http"),)),) if i % 3 == 0 else ())
        pol = NetworkPolicy(f"ns{i % namespaces}", f"pol{i}",
                            LabelSelector((("app", f"app{(i // namespaces) % 20}"),)),
                            (PolicyRule(peers, allow),), egress,
                            ("Ingress", "Egress") if egress else ("Ingress",))
        pols[pol.key] = pol
    return Cluster(pods=all_pods, namespaces=nss, policies=pols)


@pytest.mark.parametrize(("pods", "policies", "namespaces", "nodes"), [
    (100, 1000, 10, 1),
    (10000, 1000, 100, 100),
])
def test_compile_time(pods: int, policies: int, namespaces: int, nodes: int) -> None:
    cluster = synthetic(pods, policies, namespaces, nodes)
    node = Node("node-0", ("192.0.2.1",))
    start = time.perf_counter()
    c = compile_policy(cluster, node)
    took = time.perf_counter() - start
    again = compile_policy(cluster, node, previous=c)
    assert again.maps == c.maps and not c.errors
    assert len(c.local_pods) == 100 and c.maps.endpoints and took < 10, took
    print(f"\n{pods} pods, {policies} policies: {took:.2f}s, "
          f"{len(c.maps.endpoints)} isolated local pods, {len(c.maps.ipcache)} ipcache, "
          f"{len(c.identities)} identities, {len(c.maps.rules)} rules, "
          f"{len(c.maps.portsets)} port sets")
