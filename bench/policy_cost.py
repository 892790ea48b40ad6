"""What NetworkPolicy costs per packet: nanoseconds through tc_lb_from_pod (the
sender's egress check) and tc_lb_to_pod (the receiver's ingress check), with
no policy at all and with 1,000 policies loaded.

    python -m bench.policy_cost [--quick]

writes bench/results/<date>-policy_cost[-quick].json and prints a table.

Every number comes from BPF_PROG_TEST_RUN (loader.libbpf.prog_test_run). The
flows are pod to pod (no service), so the programs never rewrite the frame:
with `repeat=N` every run sees the same packet, and what a run leaves in the
maps decides what the next run does. The paths, and how each is held:

* no policy: no policy object at all; the policy step is one miss in
  lb_pol_endpoints. Same frames as below.
* unisolated: 1,000 policies loaded, a local pod none of them selects (one
  miss, in fuller maps).
* established: the measured pod is isolated both ways and its flow is
  allowed; one run first leaves the flow's policy entries in lb_ct, so every
  one of the N runs is a hit (endpoint lookup, conntrack lookup). Checked:
  the entries' created_ns does not move during the N runs (a run that
  judged the flow again would rewrite them).
* new: the decision runs every time and the flow is remembered (endpoint,
  conntrack miss, ipcache LPM, rule lookup, port-set walk, two LRU inserts).
  A run that allows writes entries the next run would hit, so repeat=N
  cannot hold this path: each run is single (repeat=1) on an empty lb_ct.
  A single run carries the fixed cost of the kernel's timing loop; it is
  measured on the established path in the same way (single runs on the
  same frame with the entries present) and the difference is added to the
  established figure: new = established + (single new - single established).
* denied: the decision runs every time and nothing is remembered (the
  packet is dropped): repeat=N holds it. The decision's cost without the
  inserts; the drop counters must move by exactly the number of runs.

The cluster: 1,000 pods (pods a..j in each of 100 namespaces, all on the
measured node, so that every policy applies there: 1,000 isolated
endpoints, some 170,000 rules) and 1,000 policies, ten per namespace,
of the kinds of the upstream e2e matrix: deny-all ingress, allow from one
pod, from one namespace on port 81 only, namespace AND pod selector, OR'ed
peers, egress to one pod only, ipBlock with except, named port, endPort
range, egress to any namespace on UDP 53. The measured pod ns0/a is
isolated for ingress (deny-all, from pod b, namespace team=t1 on 81,
anyone on 81-90) and egress (to pod b only).

The machine may be busy with other work: every figure is measured in
rounds, each round measuring the no-policy baselines and then every path,
and a path's cost over no policy is the median over rounds of its
difference to the same round's baseline (drift cancels out).

BPF_PROG_TEST_RUN repeats one frame: map lookups hit warm caches, so these
are the costs of instructions and helpers, not of cache misses.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bench.common import one_cpu
from lb.datapath.instance import SMALL, local_pod_ips, policy_writer_for, reconciler_for
from lb.inspect import packets
from lb.model import (
    NAMESPACE_NAME_LABEL,
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
from lb.service import desired
from loader import layout, libbpf
from loader.programs import TC_FROM_POD, TC_TO_POD

FROM_POD, TO_POD = TC_FROM_POD.name, TC_TO_POD.name
NODE = Node(name="node-0", ips=("192.0.2.1",))
NAMESPACES, PODS_PER_NS, NODES = 100, 10, 1
LETTERS = "abcdefghij"
TARGET_NS = 30.0  # the most an established flow may cost over no policy
PORTS = (ContainerPort("serve-80-tcp", 80), ContainerPort("serve-81-tcp", 81),
         ContainerPort("serve-80-udp", 80, "UDP"), ContainerPort("serve-81-udp", 81, "UDP"))


def pod_ip(ns: int, letter: int) -> str:
    i = letter * NAMESPACES + ns
    return f"10.244.{i // 200}.{10 + i % 200}"


# The measured flows: ns0/a (isolated both ways) and ns0/b; ns5/c is a peer
# ns0/a's ingress denies on TCP 80, ns1/a a destination its egress denies.
M, PEER = pod_ip(0, 0), pod_ip(0, 1)
DENIED_SRC, DENIED_DST = pod_ip(5, 2), pod_ip(1, 0)
IDLE = "10.245.0.10"  # a local pod in a namespace without policies


def _sel(**labels: str) -> LabelSelector:
    return LabelSelector(tuple(sorted(labels.items())))


def _policies(n: int) -> list[NetworkPolicy]:
    """The ten policies of namespace ns<n>."""
    ns = f"ns{n}"
    pod_b = PolicyPeer(pod_selector=_sel(pod="b"))
    every_ns = PolicyPeer(namespace_selector=LabelSelector())
    team = PolicyPeer(namespace_selector=_sel(team=f"t{(n + 1) % 10}"))
    and_peer = PolicyPeer(namespace_selector=LabelSelector((), (SelectorRequirement(
        "team", "In", ("t1", "t2")),)), pod_selector=_sel(pod="b"))
    block = PolicyPeer(ip_block=IPBlock("10.244.0.0/16", (f"10.244.{n % 5}.0/24",)))
    egress = ("Egress",)
    return [
        NetworkPolicy(ns, "deny-all", LabelSelector()),
        NetworkPolicy(ns, "from-b", _sel(pod="a"), (PolicyRule((pod_b,)),)),
        NetworkPolicy(ns, "from-team-81", _sel(pod="a"),
                      (PolicyRule((team,), (PolicyPort("TCP", 81),)),)),
        NetworkPolicy(ns, "and", _sel(pod="c"), (PolicyRule((and_peer,)),)),
        NetworkPolicy(ns, "or", _sel(pod="d"), (PolicyRule((team, pod_b)),)),
        NetworkPolicy(ns, "a-to-b-only", _sel(pod="a"), (), (PolicyRule((pod_b,)),), egress),
        NetworkPolicy(ns, "cidr", _sel(pod="e"), (PolicyRule((block,)),)),
        NetworkPolicy(ns, "named", _sel(pod="f"),
                      (PolicyRule((), (PolicyPort("TCP", "serve-81-tcp"),)),)),
        NetworkPolicy(ns, "range", LabelSelector(),
                      (PolicyRule((every_ns,), (PolicyPort("TCP", 81, 90),)),)),
        NetworkPolicy(ns, "dns-out", _sel(pod="g"), (),
                      (PolicyRule((every_ns,), (PolicyPort("UDP", 53),)),), egress),
    ]


def cluster(with_policies: bool) -> Cluster:
    namespaces = {f"ns{n}": Namespace(f"ns{n}", ((NAMESPACE_NAME_LABEL, f"ns{n}"),
                                                 ("team", f"t{n % 10}")))
                  for n in range(NAMESPACES)}
    namespaces["idle"] = Namespace("idle", ((NAMESPACE_NAME_LABEL, "idle"),))
    pods = {}
    for n in range(NAMESPACES):
        for k, letter in enumerate(LETTERS[:PODS_PER_NS]):
            i = k * NAMESPACES + n
            p = Pod(f"ns{n}", letter, (("pod", letter),), f"node-{i % NODES}",
                    (pod_ip(n, k),), ports=PORTS)
            pods[p.key] = p
    idle = Pod("idle", "idle", (("pod", "idle"),), NODE.name, (IDLE,), ports=PORTS)
    pods[idle.key] = idle
    policies = ({p.key: p for n in range(NAMESPACES) for p in _policies(n)}
                if with_policies else {})
    return Cluster(pods=pods, namespaces=namespaces, policies=policies)


# --- measuring ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Flow:
    prog: str
    src: str
    dst: str
    dport: int = 80
    sport: int = 40000

    def frame(self, flags: str) -> bytes:
        return packets.build(self.src, self.sport, self.dst, self.dport, "tcp", flags=flags)


EGRESS_OK = Flow(FROM_POD, M, PEER)  # ns0/a -> ns0/b: a-to-b-only allows
INGRESS_OK = Flow(TO_POD, PEER, M)  # ns0/b -> ns0/a: from-b allows
EGRESS_DENIED = Flow(FROM_POD, M, DENIED_DST)  # ns0/a -> ns1/a: only b is allowed
INGRESS_DENIED = Flow(TO_POD, DENIED_SRC, M)  # ns5/c -> ns0/a on 80: none allows
EGRESS_IDLE = Flow(FROM_POD, IDLE, PEER)
INGRESS_IDLE = Flow(TO_POD, PEER, IDLE)


class Bench:
    def __init__(self, dp: Any, repeat: int, trials: int, singles: int) -> None:
        self.dp = dp
        self.repeat, self.trials, self.singles = repeat, trials, singles
        self.ct = dp.map("lb_ct")
        self.stats = dp.map("lb_stats")
        self.drops = dp.map("lb_pol_drops")
        self.fds = {FROM_POD: dp.prog_fd(FROM_POD), TO_POD: dp.prog_fd(TO_POD)}
        self.policy_ids: list[int] = []  # of the policies programmed
        self.problems: list[str] = []

    def run(self, flow: Flow, frame: bytes, repeat: int = 1) -> int:
        return int(libbpf.prog_test_run(self.fds[flow.prog], frame, repeat=repeat).duration_ns)

    def forget(self) -> None:
        for k in list(self.ct.keys()):
            self.ct.delete(layout.ffi.new("struct lb_ct_key *", k))

    def policy_entries(self) -> dict[tuple[int, ...], int]:
        """lb_ct's policy entries: key fields -> created_ns."""
        out: dict[tuple[int, ...], int] = {}
        for k in list(self.ct.keys()):
            if k.dir >= layout.const("LB_CT_POLICY"):
                v = self.ct.lookup(layout.ffi.new("struct lb_ct_key *", k))
                if v is not None:
                    out[(k.saddr, k.daddr, k.sport, k.dport, k.proto, k.dir)] = int(v.created_ns)
        return out

    def stat(self, name: str) -> int:
        return int(sum(s.packets for s in self.stats.lookup(layout.const(f"LB_STAT_{name}"))))

    def all_drops(self) -> int:
        return int(sum(s.packets for i in self.policy_ids for s in self.drops.lookup(i) or []))

    @contextlib.contextmanager
    def expect(self, what: str, runs: int, *, passed: bool) -> Iterator[None]:
        """Every one of `runs` runs in the block passed (or was dropped for policy)."""
        before = (self.stat("PASS_NOT_SERVICE"), self.stat("DROP_POLICY"))
        yield
        moved = (self.stat("PASS_NOT_SERVICE") - before[0], self.stat("DROP_POLICY") - before[1])
        want = (runs if passed else 0, 0 if passed else runs)
        if what.startswith(TO_POD) and passed:
            want = (0, 0)  # tc_lb_to_pod counts its drops only
        if moved != want:
            self.problems.append(f"{what}: (passed, policy drops) moved {moved}, want {want}")

    def repeated(self, flow: Flow, flags: str, what: str, *, passed: bool = True) -> float:
        frame = flow.frame(flags)
        with self.expect(what, self.repeat * self.trials, passed=passed):
            runs = [self.run(flow, frame, self.repeat) for _ in range(self.trials)]
        return float(statistics.median(runs))

    def established(self, flow: Flow, what: str) -> tuple[float, float]:
        """(ns per run with repeat, median single run), every run a hit."""
        self.forget()
        self.run(flow, flow.frame("S"))
        entries = self.policy_entries()
        if len(entries) != 2:
            self.problems.append(f"{what}: the first run left {len(entries)} policy entries")
        per_run = self.repeated(flow, "A", what)
        frame = flow.frame("A")
        with self.expect(what + " single", self.singles, passed=True):
            single = statistics.median(self.run(flow, frame) for _ in range(self.singles))
        if self.policy_entries() != entries:
            self.problems.append(f"{what}: a run judged the flow again")
        return per_run, float(single)

    def new(self, flow: Flow, what: str) -> float:
        """Median single run on an empty lb_ct: judged and remembered every time."""
        frame = flow.frame("S")
        times = []
        with self.expect(what, self.singles, passed=True):
            for _ in range(self.singles):
                self.forget()
                times.append(self.run(flow, frame))
                if len(self.policy_entries()) != 2:
                    self.problems.append(f"{what}: a run did not remember the flow")
                    break
        self.forget()
        return float(statistics.median(times))

    def denied(self, flow: Flow, what: str) -> float:
        self.forget()
        before = self.all_drops()
        per_run = self.repeated(flow, "S", what, passed=False)
        if self.all_drops() - before != self.repeat * self.trials:
            self.problems.append(f"{what}: lb_pol_drops did not count every run")
        if self.policy_entries():
            self.problems.append(f"{what}: a denied flow was remembered")
        return per_run


class Node0:
    """The measured node's datapath state, switched between the two clusters by
    difference (the same reconciler and policy writer throughout)."""

    def __init__(self, dp: Any) -> None:
        self.reconciler = reconciler_for(dp)
        self.writer = policy_writer_for(dp)

    def program(self, c: Cluster) -> float:
        started = time.perf_counter()
        res = self.reconciler.sync(desired.compute(c, NODE))
        errors = res.refusals + self.writer.sync(c, NODE)
        if errors:
            raise RuntimeError(f"programming failed: {errors[:3]}")
        return time.perf_counter() - started

    def sizes(self) -> dict[str, int]:
        m = self.writer.current
        return {"isolated_local_pods": len(m.endpoints), "ipcache": len(m.ipcache),
                "rules": len(m.rules), "port_sets": len(m.portsets),
                "policies_relevant": len(m.policies)}


PATHS = ("no policy", "1,000 policies, pod not isolated",
         "1,000 policies, allowed, established", "1,000 policies, allowed, new",
         "1,000 policies, denied (decided every run)")
FLOWS = {FROM_POD: (EGRESS_OK, EGRESS_DENIED, EGRESS_IDLE),
         TO_POD: (INGRESS_OK, INGRESS_DENIED, INGRESS_IDLE)}


def one_round(b: Bench, node: Node0, bare: Cluster, full: Cluster) -> dict[tuple[str, str], float]:
    """Every path once: the baselines with no policy, then the rest with 1,000."""
    out: dict[tuple[str, str], float] = {}
    node.program(bare)
    with one_cpu():
        for prog, (ok, _, _) in FLOWS.items():
            b.forget()
            out[(prog, PATHS[0])] = b.repeated(ok, "A", f"{prog} no policy")
    node.program(full)
    b.policy_ids = sorted(node.writer.current.policies)
    with one_cpu():
        for prog, (ok, denied, idle) in FLOWS.items():
            b.forget()
            out[(prog, PATHS[1])] = b.repeated(idle, "A", f"{prog} unisolated")
            est, est_single = b.established(ok, f"{prog} established")
            new_single = b.new(ok, f"{prog} new")
            out[(prog, PATHS[2])] = est
            out[(prog, PATHS[3])] = est + (new_single - est_single)
            out[(prog, PATHS[4])] = b.denied(denied, f"{prog} denied")
    return out


def measure(repeat: int, trials: int, singles: int, rounds: int,
            say: Callable[[str], None] = print) -> dict[str, Any]:
    from loader.build import BPFFS, BuildOptions, Datapath, remove_pins

    pin_dir = BPFFS / f"lbbench-policy-{os.getpid()}"
    info: dict[str, Any] = {}
    problems: list[str] = []
    results: list[dict[tuple[str, str], float]] = []
    bare, full = cluster(False), cluster(True)
    try:
        with Datapath(BuildOptions(pin_dir, SMALL)) as dp:
            b = Bench(dp, repeat, trials, singles)
            b.problems = problems
            node = Node0(dp)
            info["program_seconds"] = round(node.program(full), 2)
            info["with_policies"] = node.sizes()
            info["local_pods"] = len(local_pod_ips(full, NODE))
            say(f"policy_cost: 1,000 policies programmed in {info['program_seconds']} s: "
                f"{info['with_policies']}")
            for i in range(rounds):
                results.append(one_round(b, node, bare, full))
                say(f"policy_cost: round {i + 1}/{rounds} done")
    finally:
        remove_pins(pin_dir)
    rows: list[dict[str, Any]] = []
    for prog in FLOWS:
        for path in PATHS:
            values = [r[(prog, path)] for r in results]
            # Paired with the same round's baseline: drift of the machine cancels.
            over = [r[(prog, path)] - r[(prog, PATHS[0])] for r in results]
            rows.append({"prog": prog, "path": path,
                         "ns": round(statistics.median(values), 1),
                         "over_no_policy_ns": round(statistics.median(over), 1),
                         "per_round_ns": [round(v, 1) for v in values]})
    est_over = {r["prog"]: r["over_no_policy_ns"] for r in rows if r["path"] == PATHS[2]}
    return {
        "method": {
            "repeat": repeat, "trials": trials, "single_runs_per_round": singles,
            "rounds": rounds,
            "figure": "per round: median over trials of BPF_PROG_TEST_RUN's mean ns per run; "
                      "ns: median over rounds; over_no_policy_ns: median over rounds of the "
                      "difference to the same round's no-policy figure",
            "new": "established + (median single run on an empty lb_ct - median single run "
                   "with the entries present): every run judged and remembered",
            "denied": "repeat=N: the decision runs every time, nothing is remembered",
        },
        "cluster": {"pods": NAMESPACES * PODS_PER_NS + 1, "namespaces": NAMESPACES + 1,
                    "policies": NAMESPACES * 10, "nodes": NODES, **info},
        "rows": rows,
        "target_established_over_no_policy_ns": TARGET_NS,
        "established_over_no_policy_ns": est_over,
        "within_target": all(v <= TARGET_NS for v in est_over.values()),
        "verified": not problems,
        "problems": problems,
    }


def table(data: dict[str, Any]) -> str:
    rows = [("PROGRAM", "PATH", "NS/PACKET", "OVER NO POLICY")]
    rows += [(r["prog"], r["path"], f"{r['ns']:.1f}", f"{r['over_no_policy_ns']:+.1f}")
             for r in data["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    verdict = "within" if data["within_target"] else "OVER"
    lines.append(f"established over no policy: {data['established_over_no_policy_ns']} ns "
                 f"({verdict} the {TARGET_NS:.0f} ns target)"
                 + ("" if data["verified"] else f"; UNVERIFIED: {data['problems']}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.common import Mode, log, require_root, write_result

    p = argparse.ArgumentParser(prog="python -m bench.policy_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short runs (a few seconds)")
    args = p.parse_args(argv)
    require_root()
    mode = Mode(quick=args.quick)
    started, load = time.time(), os.getloadavg()[0]
    data = measure(repeat=20_000 if mode.quick else 100_000, trials=5 if mode.quick else 9,
                   singles=200 if mode.quick else 500, rounds=2 if mode.quick else 7, say=log)
    path = write_result("policy_cost", mode, data, started, load)
    print(table(data))
    log(f"policy_cost: wrote {path}")
    return 0 if data["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
