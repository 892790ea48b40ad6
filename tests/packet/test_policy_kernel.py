"""NetworkPolicy through the real programs: every matrix of the upstream
e2e suite (tests/unit/test_policy.py: its policies and its expected
matrices, read from there) programmed into the kernel maps and traced pair
by pair through the sender's hook (tc_lb_from_pod, egress) and the
receiver's (tc_lb_to_pod, ingress), all nine pods on this node. Then what
the matrices cannot show: replies, established flows across a policy
change, services (policy sees the backend) and the per-policy drop
counters."""

from __future__ import annotations

import copy
import inspect
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any
from unittest import mock

import pytest

import tests.unit.test_policy as upstream
from lab import objects
from lb.datapath.instance import (
    POLICY_WRITER_MAPS,
    SMALL,
    local_pod_ips,
    policy_writer_for,
    reconciler_for,
)
from lb.encoding import ip_int, ip_text
from lb.inspect import packets
from lb.inspect.trace import TC_ACT_SHOT, TO_POD, Probe, Tracer
from lb.model import Cluster, Node
from lb.policy import compile_policy, describe, lookup
from lb.policy import view as policy_view
from lb.policy.kernel import PolicyWriter
from lb.policy.kernel import read as read_policy_maps
from lb.service import desired
from loader import layout, libbpf
from loader.build import BuildOptions, Datapath, remove_pins
from tests.conftest import new_pin_dir, require_root
from tests.unit.test_policy import MATRIX_IP, MATRIX_PODS, POD_A, matrix_cluster, netpol

NODE = Node(name="node-1", ips=("192.0.2.1",), service_cidrs=("10.96.0.0/12",))
VIP = "10.96.0.10"
XA, XB, XC = (MATRIX_IP[k] for k in ("x/a", "x/b", "x/c"))
YA, ZA = MATRIX_IP["y/a"], MATRIX_IP["z/a"]
TC_ACT_OK = 0


# --- the matrices, as tests/unit/test_policy.py writes them ---------------------------


@dataclass(frozen=True)
class Matrix:
    test: str  # the unit test that states it
    seq: int  # its how-manieth matrix
    policies: tuple[dict[str, Any], ...]
    proto: str
    port: int
    text: str  # its expected matrix, rows senders, columns receivers

    @property
    def id(self) -> str:
        return f"{self.test.removeprefix('test_')}-{self.seq}-{self.proto}{self.port}"


def upstream_matrices() -> list[Matrix]:
    """Every (policies, protocol, port, expected matrix) the unit tests check,
    recorded by running each matrix test with its assert_matrix replaced."""
    found: list[Matrix] = []

    def record(test: str) -> Callable[..., None]:
        def assert_matrix(policies: list[dict[str, Any]], proto: str, port: int,
                          text: str) -> None:
            seq = sum(1 for m in found if m.test == test)
            found.append(Matrix(test, seq, tuple(copy.deepcopy(policies)), proto, port, text))
        return assert_matrix

    for name, fn in sorted(vars(upstream).items()):
        if not (name.startswith("test_") and inspect.isfunction(fn)
                and "assert_matrix" in fn.__code__.co_names
                and not inspect.signature(fn).parameters):
            continue
        with mock.patch.object(upstream, "assert_matrix", record(name)):
            fn()
    return found


MATRICES = upstream_matrices()


def test_every_matrix_of_the_unit_tests_is_here() -> None:
    calls = inspect.getsource(upstream).count("assert_matrix(") - 1  # less its def
    assert len(MATRICES) == calls >= 24, [m.id for m in MATRICES]
    assert len({m.id for m in MATRICES}) == len(MATRICES)


# --- one datapath for the whole module -----------------------------------------------


class KernelNode:
    """The programs loaded once; each program() writes the state of another
    cluster (the policy maps through the same PolicyWriter, by difference)."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.reconciler = reconciler_for(dp)
        self.policy = policy_writer_for(dp)
        self.ct = dp.map("lb_ct")
        self.drops = dp.map("lb_pol_drops")

    def program(self, cluster: Cluster, *, forget_flows: bool = True) -> Tracer:
        res = self.reconciler.sync(desired.compute(cluster, NODE))
        errors = res.refusals + self.policy.sync(cluster, NODE)
        assert not errors, errors
        if forget_flows:
            self.forget_flows()
        return Tracer(self.dp, local_pod_ips(cluster, NODE), dict(self.policy.current.policies))

    def forget_flows(self) -> None:
        for k in list(self.ct.keys()):
            self.ct.delete(layout.ffi.new("struct lb_ct_key *", k))

    def policy_flows(self) -> int:
        keys = list(self.ct.keys())  # BpfMap is not iterable itself
        return sum(1 for k in keys if k.dir >= layout.const("LB_CT_POLICY"))

    def drop_counts(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for pid, name in self.policy.current.policies.items():
            out[name] = sum(s.packets for s in self.drops.lookup(pid) or [])
        return out


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelNode]:
    require_root()
    pin_dir = new_pin_dir("policy")
    try:
        with Datapath(BuildOptions(pin_dir, SMALL)) as dp:
            yield KernelNode(dp)
    finally:
        remove_pins(pin_dir)


def line(tracer: Tracer, src: str, sport: int, dst: str, dport: int, proto: str) -> str:
    return tracer.run(Probe(src, sport, dst, dport, proto.lower(), "pod")).line()


# --- the matrices --------------------------------------------------------------------


def short(key: str) -> str:
    return key.replace("/", "")


def render(cells: dict[tuple[str, str], bool]) -> list[str]:
    out = ["    " + " ".join(f"{short(d):<2}" for d in MATRIX_PODS)]
    for s in MATRIX_PODS:
        out.append(f"{short(s)}  " + "  ".join("." if cells[(s, d)] else "X"
                                               for d in MATRIX_PODS))
    return out


def side_by_side(expected: dict[tuple[str, str], bool],
                 measured: dict[tuple[str, str], bool]) -> str:
    left, right = render(expected), render(measured)
    rows = [f"{'expected':<31}  measured"]
    rows += [f"{a:<31}  {b}" for a, b in zip(left, right, strict=True)]
    return "\n".join(rows)


@pytest.mark.parametrize("m", MATRICES, ids=lambda m: m.id)
def test_matrix_through_the_kernel(kernel: KernelNode, m: Matrix) -> None:
    cluster = matrix_cluster(*m.policies)
    compiled = compile_policy(cluster, NODE)
    expected = upstream.parse_matrix(m.text)
    tracer = kernel.program(cluster)
    before = kernel.drop_counts()
    measured: dict[tuple[str, str], bool] = {}
    wrong: list[str] = []
    blamed: Counter[str] = Counter()
    for i, (src, dst) in enumerate((s, d) for s in MATRIX_PODS for d in MATRIX_PODS):
        s, d = MATRIX_IP[src], MATRIX_IP[dst]
        got = line(tracer, s, 40000 + i, d, m.port, m.proto)
        verdict = lookup(compiled, s, d, m.proto, m.port)
        want = "PASS not-service" if expected[(src, dst)] else f"DROP policy {verdict.policy}"
        measured[(src, dst)] = got == "PASS not-service"
        if not expected[(src, dst)]:
            blamed[str(verdict.policy)] += 1
        if got != want:
            wrong.append(f"{src} -> {dst}: expected {want!r}, kernel {got!r}")
    assert not wrong, (f"{m.id} ({m.test}):\n{side_by_side(expected, measured)}\n"
                       + "\n".join(wrong))
    # Every drop was counted once, against the policy it was blamed on.
    after = kernel.drop_counts()
    counted = Counter({k: after[k] - before.get(k, 0) for k in after})
    assert +counted == +blamed, (counted, blamed)


# --- replies, established flows, services ----------------------------------------------


def test_reply_of_an_allowed_connection_passes_from_an_egress_isolated_pod(
        kernel: KernelNode) -> None:
    # y may open nothing; x accepts nothing: x/a -> y/a is allowed (x/a's
    # egress and y/a's ingress are open), and so is all of its reply.
    cluster = matrix_cluster(netpol("y", "deny-egress", policyTypes=["Egress"]),
                             netpol("x", "deny-ingress", policyTypes=["Ingress"]))
    for proto in ("TCP", "UDP"):
        tracer = kernel.program(cluster)
        assert line(tracer, XA, 41000, YA, 80, proto) == "PASS not-service"
        # The reply leaves y/a (egress-isolated) and enters x/a (ingress-isolated).
        assert line(tracer, YA, 80, XA, 41000, proto) == "PASS not-service"
        assert line(tracer, XA, 41000, YA, 80, proto) == "PASS not-service"
        assert line(tracer, YA, 80, XA, 41000, proto) == "PASS not-service"
        # What is not a reply is judged: a new connection of y/a, and one to x/a.
        assert line(tracer, YA, 80, XA, 41001, proto) == "DROP policy y/deny-egress"
        assert line(tracer, YA, 81, XA, 41000, proto) == "DROP policy y/deny-egress"
        assert line(tracer, ZA, 80, XA, 41000, proto) == "DROP policy x/deny-ingress"


def test_egress_verdict_does_not_stand_in_for_the_receivers_ingress(
        kernel: KernelNode) -> None:
    # x/a is egress-isolated and may reach x/b; x/b accepts nobody. Both
    # checks run on this node for the same packet: each decides for itself.
    cluster = matrix_cluster(
        netpol("x", "a-to-b", podSelector=POD_A, policyTypes=["Egress"],
               egress=[{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]),
        netpol("x", "b-closed", podSelector={"matchLabels": {"pod": "b"}},
               policyTypes=["Ingress"]))
    tracer = kernel.program(cluster)
    for sport in (42000, 42000, 42001):
        assert line(tracer, XA, sport, XB, 80, "TCP") == "DROP policy x/b-closed"
    assert line(tracer, XA, 42002, XC, 80, "TCP") == "DROP policy x/a-to-b"
    assert kernel.policy_flows() == 4  # x/a's egress allowed it: a -> b and its reply


def test_established_connection_survives_a_policy_that_now_denies_it(
        kernel: KernelNode) -> None:
    """Upstream leaves it to the implementation whether a policy change
    affects existing connections; here an allowed connection stays allowed
    for as long as it is alive, and new ones meet the new policy."""
    allow_b = netpol("x", "allow-b-to-a", podSelector=POD_A,
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    deny = netpol("x", "deny-all", policyTypes=["Ingress"])
    for proto in ("TCP", "UDP"):
        tracer = kernel.program(matrix_cluster(allow_b))
        assert line(tracer, XB, 43000, XA, 80, proto) == "PASS not-service"
        assert line(tracer, XC, 43000, XA, 80, proto) == "DROP policy x/allow-b-to-a"
        tracer = kernel.program(matrix_cluster(deny), forget_flows=False)
        assert line(tracer, XB, 43000, XA, 80, proto) == "PASS not-service", "the second packet"
        assert line(tracer, XA, 80, XB, 43000, proto) == "PASS not-service", "its reply"
        assert line(tracer, XB, 43001, XA, 80, proto) == "DROP policy x/deny-all"
        assert line(tracer, XC, 43000, XA, 80, proto) == "DROP policy x/deny-all"


def test_syn_on_a_closed_connection_is_judged_by_the_policy_in_force(
        kernel: KernelNode) -> None:
    allow_b = netpol("x", "allow-b-to-a", podSelector=POD_A,
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    kernel.program(matrix_cluster(allow_b))

    def through(flags: str) -> tuple[int, int]:
        frame = packets.build(XB, 43500, XA, 80, "tcp", flags=flags)
        out = libbpf.prog_test_run(kernel.dp.prog_fd("tc_lb_from_pod"), frame)
        return out.retval, libbpf.prog_test_run(kernel.dp.prog_fd(TO_POD), out.data).retval

    assert through("S") == (TC_ACT_OK, TC_ACT_OK)
    assert through("FA") == (TC_ACT_OK, TC_ACT_OK)
    kernel.program(matrix_cluster(netpol("x", "deny-all", policyTypes=["Ingress"])),
                   forget_flows=False)
    assert through("A") == (TC_ACT_OK, TC_ACT_OK), "the closing connection's last packets"
    # The client reuses its port at once: a new connection, judged anew.
    assert through("S") == (TC_ACT_OK, TC_ACT_SHOT)


def test_connection_of_pods_no_policy_isolated_is_judged_once_one_does(
        kernel: KernelNode) -> None:
    """Flows of pods without an endpoint entry are not remembered (that
    keeps their cost at one hash miss): when a policy later isolates one
    end, the flow's next packet is judged like a new one."""
    tracer = kernel.program(matrix_cluster())
    assert line(tracer, XB, 44000, XA, 80, "TCP") == "PASS not-service"
    assert kernel.policy_flows() == 0
    tracer = kernel.program(matrix_cluster(netpol("x", "deny-all", policyTypes=["Ingress"])),
                            forget_flows=False)
    assert line(tracer, XB, 44000, XA, 80, "TCP") == "DROP policy x/deny-all"


def service_to_xa() -> list[dict[str, Any]]:
    ports = [objects.Port("web-tcp", 80, 80, "TCP"), objects.Port("web-udp", 80, 80, "UDP")]
    return [objects.service("web", VIP, ports, namespace="x"),
            objects.endpoint_slice("web", ports, [(XA, "node-1")], namespace="x")]


def test_policy_sees_the_backend_not_the_service_address(kernel: KernelNode) -> None:
    # x/a admits x/b only; x/b and x/c accept nothing from elsewhere either,
    # so the replies to x/b (from the service address) meet an isolated pod.
    cluster = matrix_cluster(
        *service_to_xa(),
        netpol("x", "allow-b-to-a", podSelector=POD_A,
               ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]),
        netpol("x", "others-closed", podSelector={"matchExpressions": [
            {"key": "pod", "operator": "NotIn", "values": ["a"]}]}, policyTypes=["Ingress"]))
    tracer = kernel.program(cluster)
    before = kernel.drop_counts()
    for proto in ("TCP", "UDP"):
        assert line(tracer, XB, 45000, VIP, 80, proto) == f"DNAT {XA}:80"
        # The reply, reverse-translated to come from the service, enters x/b.
        assert line(tracer, XA, 80, XB, 45000, proto) == "PASS reverse-nat"
        assert line(tracer, XB, 45000, VIP, 80, proto) == f"DNAT {XA}:80"
        for src in (XC, YA):
            assert line(tracer, src, 45000, VIP, 80, proto) == "DROP policy x/allow-b-to-a"
        # Straight to the backend: the same verdicts.
        assert line(tracer, XB, 45001, XA, 80, proto) == "PASS not-service"
        assert line(tracer, XC, 45001, XA, 80, proto) == "DROP policy x/allow-b-to-a"
    counted = kernel.drop_counts() - before
    assert counted == Counter({"x/allow-b-to-a": 6}), counted


def test_egress_policy_sees_the_backend_not_the_service_address(kernel: KernelNode) -> None:
    # x/a may reach x/b only; the service's backend is x/c.
    port = objects.Port("http", 80, 80)
    cluster = matrix_cluster(
        objects.service("web", VIP, [port], namespace="x"),
        objects.endpoint_slice("web", [port], [(XC, "node-1")], namespace="x"),
        netpol("x", "a-to-b-only", podSelector=POD_A, policyTypes=["Egress"],
               egress=[{"to": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]))
    tracer = kernel.program(cluster)
    assert line(tracer, XA, 46000, VIP, 80, "TCP") == "DROP policy x/a-to-b-only"
    assert line(tracer, XB, 46000, VIP, 80, "TCP") == f"DNAT {XC}:80"


def test_drop_counters_count_packets_and_bytes_per_policy(kernel: KernelNode) -> None:
    cluster = matrix_cluster(netpol("x", "deny-all", policyTypes=["Ingress"]),
                             netpol("y", "deny-egress", policyTypes=["Egress"]))
    tracer = kernel.program(cluster)
    ids = {name: pid for pid, name in kernel.policy.current.policies.items()}

    def counter(name: str) -> tuple[int, int]:
        per_cpu = kernel.drops.lookup(ids[name]) or []
        return sum(s.packets for s in per_cpu), sum(s.bytes for s in per_cpu)

    x0, y0 = counter("x/deny-all"), counter("y/deny-egress")
    for i in range(5):
        assert line(tracer, ZA, 47000 + i, XA, 80, "TCP") == "DROP policy x/deny-all"
    for i in range(3):
        # y/a's egress is checked first: its policy is blamed, x/deny-all is not.
        assert line(tracer, YA, 47100 + i, XA, 80, "UDP") == "DROP policy y/deny-egress"
    x1, y1 = counter("x/deny-all"), counter("y/deny-egress")
    tcp_len, udp_len = 14 + 20 + 20, 14 + 20 + 8
    assert (x1[0] - x0[0], x1[1] - x0[1]) == (5, 5 * tcp_len)
    assert (y1[0] - y0[0], y1[1] - y0[1]) == (3, 3 * udp_len)



def test_drop_counter_of_a_reused_policy_id_starts_at_zero(kernel: KernelNode) -> None:
    # Policy ids are reused once free: a counter carries nothing over.
    owner: dict[int, str] = {}
    for ns in "xyzxy":
        name = f"{ns}/closed"
        tracer = kernel.program(matrix_cluster(netpol(ns, "closed", policyTypes=["Ingress"])))
        (pid,) = (i for i, n in kernel.policy.current.policies.items() if n == name)
        owner.setdefault(pid, name)
        assert kernel.drop_counts()[name] == 0, (pid, name)
        for sport in (49000, 49001):
            src = XA if ns == "z" else ZA
            got = line(tracer, src, sport, MATRIX_IP[f"{ns}/a"], 80, "TCP")
            assert got == f"DROP policy {name}"
        assert kernel.drop_counts()[name] == 2
    assert any(owner[pid] != name for pid, name in kernel.policy.current.policies.items()
               if pid in owner), owner


# --- `lbctl maps policy` -------------------------------------------------------------------


def test_policy_is_compiled_again_only_when_what_it_reads_changed(kernel: KernelNode) -> None:
    deny = netpol("x", "deny", policyTypes=["Ingress"])
    cluster = matrix_cluster(deny)
    kernel.program(cluster)
    compiled = kernel.policy.compiled
    assert compiled is not None and ip_int(XA) in compiled.maps.endpoints
    # A Service change (a snapshot sharing the pods, namespaces and policies), and the
    # same objects parsed anew: the maps stay as they are, nothing is compiled.
    kernel.program(replace(cluster, services={}))
    kernel.program(matrix_cluster(deny))
    assert kernel.policy.compiled is compiled
    # A new pod in the isolated namespace is compiled, written, and isolated.
    new_ip = "10.244.0.99"
    assert new_ip not in MATRIX_IP.values()
    grown = replace(cluster, pods={**cluster.pods, **upstream.load(
        upstream.pod("x", "d", new_ip, ports=upstream.MATRIX_PORTS)).pods})
    tracer = kernel.program(grown)
    assert kernel.policy.compiled is not compiled
    assert ip_int(new_ip) in kernel.policy.current.endpoints
    assert line(tracer, XB, 48000, new_ip, 80, "TCP") == "DROP policy x/deny"
    assert line(tracer, XB, 48000, XA, 80, "TCP") == "DROP policy x/deny"


def test_a_pod_like_the_others_writes_its_own_rules_only(kernel: KernelNode) -> None:
    cluster = matrix_cluster(netpol("x", "from-b", podSelector=POD_A, ingress=[{
        "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]))
    kernel.program(cluster)
    before = kernel.policy.current
    new_ip = "10.244.0.98"
    assert new_ip not in MATRIX_IP.values()
    grown = replace(cluster, pods={**cluster.pods, **upstream.load(upstream.pod(
        "x", "a2", new_ip, labels={"pod": "a"}, ports=upstream.MATRIX_PORTS)).pods})
    rules_map = kernel.policy.maps["lb_pol_rules"]
    with mock.patch.object(rules_map, "update", wraps=rules_map.update) as writes:
        assert kernel.policy.sync(grown, NODE, check=True) == []
    compiled = kernel.policy.compiled
    assert compiled is not None and compiled.rules_delta is not None
    assert kernel.policy.drifted == 0
    # Only the new pod's rules were written, and the kernel holds the whole compile.
    assert {local for local, _, _ in compiled.rules_delta.put} == {ip_int(new_ip)}
    assert writes.call_count == len(compiled.rules_delta.put) > 0
    held = read_policy_maps(kernel.policy.maps)
    assert held.rules == compiled.maps.rules != before.rules
    assert held.endpoints == compiled.maps.endpoints
    tracer = kernel.program(grown)
    assert line(tracer, XB, 48000, new_ip, 80, "TCP") == "PASS not-service"
    assert line(tracer, XC, 48000, new_ip, 80, "TCP") == "DROP policy x/from-b"


def test_the_periodic_check_mends_what_a_wrong_reuse_wrote(
        kernel: KernelNode, caplog: pytest.LogCaptureFixture) -> None:
    cluster = matrix_cluster(netpol("x", "from-b", podSelector=POD_A, ingress=[{
        "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]))
    kernel.program(cluster)
    new_ip = "10.244.0.97"
    grown = replace(cluster, pods={**cluster.pods, **upstream.load(upstream.pod(
        "x", "a3", new_ip, labels={"pod": "a"}, ports=upstream.MATRIX_PORTS)).pods})
    # A reuse gone wrong: the kept rules forget every identity but 0's.
    compiled = kernel.policy.compiled
    assert compiled is not None and compiled.rule_memo is not None
    memo = compiled.rule_memo
    kernel.policy.compiled = replace(compiled, rule_memo=replace(
        memo, by_key={k: (any_slot, {}) for k, (any_slot, _) in memo.by_key.items()}))
    assert kernel.policy.sync(grown, NODE) == []  # no check due: the wrong rules are written
    tracer = kernel.program(grown)  # the same inputs, no check: nothing compiled
    assert line(tracer, XB, 48000, new_ip, 80, "TCP") == "DROP policy x/from-b"
    # The check is due: the policy is compiled whole, the difference counted and mended.
    with caplog.at_level(logging.ERROR, logger="lb.policy.kernel"):
        assert kernel.policy.sync(grown, NODE, check=True) == []
    assert kernel.policy.drifted > 0 and "differ from a full recompute" in caplog.text
    tracer = kernel.program(grown)
    assert line(tracer, XB, 48000, new_ip, 80, "TCP") == "PASS not-service"
    assert read_policy_maps(kernel.policy.maps).rules == compile_policy(grown, NODE).maps.rules
    # Checked and right: the next check finds nothing to compare.
    assert kernel.policy.sync(grown, NODE, check=True) == [] and kernel.policy.drifted == 0


def test_policy_view_reads_back_what_the_compiler_wrote(kernel: KernelNode) -> None:
    cluster = matrix_cluster(
        netpol("x", "deny", policyTypes=["Ingress"]),
        netpol("x", "from-b", podSelector=POD_A, ingress=[{
            "from": [{"podSelector": {"matchLabels": {"pod": "b"}}}], "ports": [{"port": 80}]}]),
        netpol("y", "out", podSelector={"matchLabels": {"pod": "a"}}, policyTypes=["Egress"],
               egress=[{"to": [{"ipBlock": {"cidr": "10.244.0.0/24",
                                            "except": ["10.244.0.30/32"]}}],
                        "ports": [{"port": "serve-81-udp", "protocol": "UDP"},
                                  {"port": 8000, "endPort": 8100}]}]))
    tracer = kernel.program(cluster)
    before = kernel.drop_counts()["x/deny"]  # the counters outlive a policy's id
    assert line(tracer, XC, 48000, XA, 80, "TCP") == "DROP policy x/deny"
    maps = {name: kernel.dp.map(name) for name in (
        "lb_pol_endpoints", "lb_pol_ipcache", "lb_pol_rules", "lb_pol_portsets", "lb_pol_drops")}
    got = policy_view.rows(maps)
    compiled = kernel.policy.compiled
    assert compiled is not None
    names = compiled.maps.policies
    ids = {name: pid for pid, name in names.items()}

    # The same rules as the compile describes, numbers for names.
    ip_of = {name: ip_text(addr) for addr, name in compiled.local_pods.items()}
    want = {(ip_of[r["pod"]], r["direction"], r["peer"].split()[0], r["ports"], r["policy"])
            for r in describe(compiled) if r["policy"] is not None}
    seen = {(r["pod"], r["direction"], r["peer"].split()[0], r["ports"], names[r["policy"]])
            for r in got if r["policy"] is not None}
    assert seen == want and want
    # Isolated pods only; x/b and x/c: isolated ingress without a rule, egress open.
    assert {r["pod"] for r in got} == {XA, XB, XC, YA}
    xb = [r for r in got if r["pod"] == XB]
    assert [(r["direction"], r["isolated"], r["peer"], r["drop_policy"]) for r in xb] == [
        ("ingress", True, "-", ids["x/deny"]), ("egress", False, "-", None)]
    xa_in = next(r for r in got if r["pod"] == XA and r["direction"] == "ingress")
    assert xa_in["drop_policy"] == ids["x/deny"] and xa_in["drops"] == before + 1
    # What an agent adopts after a restart is what was written (names aside).
    again = PolicyWriter({name: kernel.dp.map(name) for name in POLICY_WRITER_MAPS},
                         kernel.dp.sizes)
    assert again.recover() == len(compiled.maps.endpoints) == 4
    assert again.current == replace(compiled.maps, policies={})
    # y/a's egress: pods of the block have a UDP 81 by name, other addresses do not.
    ya = {r["peer"].split(" ", 1)[1]: r["ports"] for r in got
          if r["pod"] == YA and r["direction"] == "egress"}
    assert ya.pop("10.244.0.0/24") == "TCP 8000-8100", ya
    assert set(ya.values()) == {"TCP 8000-8100, UDP 81"}, ya
    assert not any(ZA in peer for peer in ya), "z/a is excepted from the block"


def test_every_fragment_of_a_datagram_meets_the_policy(kernel: KernelNode) -> None:
    # Only the first fragment has the ports; the rest are judged by them too,
    # so a denied datagram cannot slip in in pieces.
    allow_b = netpol("x", "allow-b-to-a", podSelector=POD_A,
                     ingress=[{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}])
    kernel.program(matrix_cluster(allow_b))
    # Ingress policy meets what enters the pod (its veth's egress).
    to_pod = kernel.dp.prog_fd(TO_POD)
    for ident, (src, want) in enumerate(((XC, [TC_ACT_SHOT] * 3), (XB, [0] * 3)), 1):
        whole = packets.build(src, 44000, XA, 80, "udp", payload=b"f" * 2500, ident=ident)
        frags = packets.fragment(whole, 1024)
        assert [libbpf.prog_test_run(to_pod, f).retval for f in frags] == want, src
