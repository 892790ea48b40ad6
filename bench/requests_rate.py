"""HTTP requests/s and new connections/s through a ClusterIP and a NodePort (wrk).

Four kinds, each in its own lab topology (node, outside client, a client pod, two backend
pods running lab.servers http), so no kind ever sees another's rules or programs:

* direct: no translation at all, wrk's two threads each pinned to one backend pod (the
  limit; from outside, the outside namespace routes the pod CIDR via the node);
* xdplb: this project's programs (tc on every pod veth, XDP on the node device), the maps
  programmed by desired.compute and the Reconciler;
* iptables / nftables: kube-proxy's rule layouts (bench.kuberules) loaded into the node
  namespace with iptables-restore / nft -f.

Scales: the measured service plus N-1 filler ClusterIPs (2 endpoints each); in iptables'
KUBE-SERVICES the measured service's rule comes last. A second service with one endpoint
(web1) is measured with keep-alive against wrk straight to web1: the cost of the translation
without the spread of connections over two backends, which direct's one-thread-per-pod
split does not have. Per repetition every kind gets fresh
pod namespaces (client and backends: no TIME_WAIT or PAWS state left from earlier runs) and
an empty conntrack table (netfilter's in the node namespace, or the BPF one); the node
namespace and its rules or maps stay. A repetition runs keep-alive via ClusterIP, keep-alive
via NodePort, then new connections (`Connection: close`) via ClusterIP and via NodePort, the
kinds taking turns on every row in an order that rotates per repetition. The two
new-connection rows never share a 4-tuple at the backends (pod source vs node/outside
source), and keep-alive runs leave no TIME_WAIT at the backends (the client closes them).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench import kuberules, workload, wrk
from bench.common import (
    REPO,
    BenchError,
    Mode,
    clear_map,
    datapath,
    log,
    median,
    write_result,
)
from bench.workload import SvcSpec
from lab.clients import curl
from lab.topology import Node, Pod, Topology, TopologySpec
from lb.datapath.instance import Sizes, reconciler_for
from loader.programs import TC_FROM_POD, XDP_EXTERNAL

KINDS = ("direct", "xdplb", "iptables", "nftables")
# clusterip-one: a second service whose only endpoint is web1, against wrk straight to web1:
# the translation alone, without the service spreading connections over two backends.
PATHS = ("clusterip", "nodeport", "clusterip-one")
LOADS = ("keepalive", "connections")
ROWS = [(load, path) for load in LOADS for path in PATHS
        if (load, path) != ("connections", "clusterip-one")]
VIP, PORT, TARGET, NODE_PORT = "10.96.0.10", 80, 8080, 30080
ONE_VIP = "10.96.0.11"
POD_IPS = {"client": "10.244.1.2", "web1": "10.244.1.3", "web2": "10.244.1.4"}
FILLER_ENDPOINTS = 2
SCALES_FULL = (1, 1_000, 10_000)
SIZES = Sizes(max_services=1 << 15, max_backends=1 << 15, maglev_slots=1 << 23,
              ct_size=1 << 18)
POD_PROGRAM, NODE_PROGRAM = TC_FROM_POD.name, XDP_EXTERNAL.name
_FLUSH_CT = "from pyroute2 import Conntrack; Conntrack().flush()"


def web_spec() -> SvcSpec:
    return SvcSpec("web", VIP, PORT, TARGET, (POD_IPS["web1"], POD_IPS["web2"]),
                   node_port=NODE_PORT)


def web_one_spec() -> SvcSpec:
    return SvcSpec("web-one", ONE_VIP, PORT, TARGET, (POD_IPS["web1"],))


@dataclass
class Lab:
    """One kind's topology for one scale."""

    kind: str
    topo: Topology
    load_seconds: float = 0.0
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def node(self) -> Node:
        return self.topo.node


# Runs inside the node namespace (`ip netns exec`), with the program fds inherited: the
# attachment cannot land anywhere else, and it is lb.datapath.attach, as the agent uses it.
_ATTACH = """
import sys
from pyroute2 import IPRoute
from lb.datapath.attach import attach_tc, attach_xdp
from loader.programs import TC_FROM_POD
fd, kind, devs = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
with IPRoute() as ipr:
    for dev in devs:
        if kind == "xdp":
            mode = attach_xdp(ipr, dev, fd)
            assert mode == "native", mode
        else:
            attach_tc(ipr, dev, fd, TC_FROM_POD.name)
"""


def _attach(node: Node, fd: int, kind: str, devs: Sequence[str]) -> None:
    res = subprocess.run(["ip", "netns", "exec", node.ns, sys.executable, "-c", _ATTACH,
                          str(fd), kind, *devs], pass_fds=(fd,), capture_output=True,
                         text=True, timeout=60, cwd=REPO)
    if res.returncode != 0:
        raise BenchError(f"attaching {kind} to {devs} in {node.ns}: {res.stderr.strip()}")


def _build(kind: str, specs: Sequence[SvcSpec], dp: Any) -> Lab:
    topo = Topology.build(TopologySpec.single(pods=0))
    lab = Lab(kind, topo)
    try:
        node = topo.node
        topo.exec(topo.external, ["sysctl", "-q", "-w",
                                  "net.ipv4.ip_local_port_range=1024 65535"])
        if kind == "direct":
            topo.exec(topo.external, ["ip", "route", "add", node.pod_cidr, "via", node.ip])
        elif kind == "xdplb":
            # NodePort replies are reverse-translated before routing with the node's address
            # as source; the agent sets the same (see lb.agent.loop.allow_local_source).
            topo.exec(node, ["sysctl", "-q", "-w", "net.ipv4.conf.all.accept_local=1"])
            _attach(node, dp.prog_fd(NODE_PROGRAM), "xdp", ["eth0"])
        elif kind == "iptables":
            start = time.perf_counter()
            topo.exec(node, ["iptables-restore", "--noflush"], input=kuberules.iptables_base())
            topo.exec(node, ["iptables-restore", "--noflush", "--counters"],
                      input=kuberules.iptables_rules(specs), timeout=1800)
            lab.load_seconds = time.perf_counter() - start
        elif kind == "nftables":
            start = time.perf_counter()
            topo.exec(node, ["nft", "-f", "-"], input=kuberules.nft_ruleset(specs, [node.ip]),
                      timeout=1800)
            lab.load_seconds = time.perf_counter() - start
        else:
            raise ValueError(kind)
    except BaseException:
        topo.close()
        raise
    return lab


def refresh_pods(lab: Lab, dp: Any, workers: int) -> None:
    """New client and backend namespaces (no TCP state left), servers started, tc attached."""
    topo, node = lab.topo, lab.node
    for pod in list(lab.pods.values()):
        topo.remove_pod(pod)
    lab.pods = {name: topo.add_pod(node, name=name, ip=ip) for name, ip in POD_IPS.items()}
    client = lab.pods["client"]
    topo.exec(client, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65535"])
    for name in ("web1", "web2"):
        topo.start_http(lab.pods[name], TARGET, workers=workers)
    if lab.kind == "xdplb":
        clear_map(dp.map("lb_ct"))
        _attach(node, dp.prog_fd(POD_PROGRAM), "tc",
                [pod.host_veth for pod in lab.pods.values()])
    elif lab.kind in ("iptables", "nftables"):
        topo.exec(node, [sys.executable, "-c", _FLUSH_CT])


def check_isolation(lab: Lab) -> None:
    """Programs only where the kind says, rules only where the kind says."""
    topo, node = lab.topo, lab.node
    link = topo.exec(node, ["ip", "-d", "link", "show", "eth0"]).stdout
    qdiscs = topo.exec(node, ["tc", "qdisc", "show"]).stdout
    rules = topo.exec(node, ["nft", "list", "ruleset"]).stdout
    has_bpf = "prog/xdp" in link or "clsact" in qdiscs
    if has_bpf != (lab.kind == "xdplb"):
        raise BenchError(f"{lab.kind}: BPF programs {'missing' if not has_bpf else 'present'}")
    if bool(rules.strip()) != (lab.kind in ("iptables", "nftables")):
        raise BenchError(f"{lab.kind}: netfilter rules {'missing' if not rules else 'present'}")


def targets_of(lab: Lab) -> dict[str, tuple[Any, str, tuple[str, ...]]]:
    """path -> (where wrk runs, url, hosts to split over)."""
    topo = lab.topo
    client = lab.pods["client"]
    backends = (POD_IPS["web1"], POD_IPS["web2"])
    if lab.kind == "direct":
        url = f"http://{backends[0]}:{TARGET}/"
        return {"clusterip": (client, url, backends), "nodeport": (topo.external, url, backends),
                "clusterip-one": (client, url, ())}
    return {"clusterip": (client, f"http://{VIP}:{PORT}/", ()),
            "nodeport": (topo.external, f"http://{lab.node.ip}:{NODE_PORT}/", ()),
            "clusterip-one": (client, f"http://{ONE_VIP}:{PORT}/", ())}


def _tcp_counters(lab: Lab, where: Any) -> dict[str, int]:
    """TCP counters of one namespace: SYN retransmits at the client, listen drops and SYNs
    refused by PAWS against a TIME_WAIT socket at the backends."""
    text = lab.topo.exec(where, ["cat", "/proc/net/netstat"]).stdout.splitlines()
    values: dict[str, int] = {}
    for names, numbers in zip(text[::2], text[1::2], strict=False):
        values.update(zip(names.split()[1:], map(int, numbers.split()[1:]), strict=False))
    return {k: values.get(k, 0) for k in ("TCPSynRetrans", "ListenDrops", "PAWSTimewait")}


def _tcp_state(lab: Lab, where: Any) -> dict[str, int]:
    client = _tcp_counters(lab, where)
    backends = [_tcp_counters(lab, lab.pods[n]) for n in ("web1", "web2")]
    return {"syn_retrans": client["TCPSynRetrans"],
            "listen_drops": sum(b["ListenDrops"] for b in backends),
            "paws_timewait": sum(b["PAWSTimewait"] for b in backends)}


def check_reachable(lab: Lab) -> None:
    for path, (where, url, split) in targets_of(lab).items():
        seen = set()
        for _ in range(8):
            for target in split or (url,):
                u = f"http://{target}:{TARGET}/" if split else target
                seen.add(curl(lab.topo, where, u, timeout=3).split()[0])
        want = {"web1"} if path == "clusterip-one" else {"web1", "web2"}
        if seen != want:
            raise BenchError(f"{lab.kind} {path}: {sorted(seen)} answered, not {sorted(want)}")


def _one_run(lab: Lab, n: int, path: str, load: str, rep: int,
             seconds: float) -> dict[str, Any]:
    where, url, split = targets_of(lab)[path]
    tcp0 = _tcp_state(lab, where)
    result = wrk.run(lab.topo, where, url, seconds=seconds, close=load == "connections",
                     split=split)
    tcp1 = _tcp_state(lab, where)
    log(f"requests: {n:>6} services {lab.kind:>9} {path:>13} {load:>11}: "
        f"{result.requests_per_s:9.0f}/s p50 {result.p50_ms:.2f} ms "
        f"p99 {result.p99_ms:.2f} ms errors {result.socket_errors}")
    return {"services": n, "kind": lab.kind, "path": path, "load": load, "rep": rep,
            **result.as_json(), **{k: tcp1[k] - tcp0[k] for k in tcp0},
            "load_average": round(os.getloadavg()[0], 2)}


@contextlib.contextmanager
def open_labs(specs: Sequence[SvcSpec], dp: Any) -> Iterator[dict[str, Lab]]:
    labs: dict[str, Lab] = {}
    try:
        for kind in KINDS:
            labs[kind] = _build(kind, specs, dp)
            if labs[kind].load_seconds:
                log(f"requests: {kind}: rules for {len(specs)} services loaded in "
                    f"{labs[kind].load_seconds:.1f} s")
        yield labs
    finally:
        for lab in labs.values():
            lab.topo.close()


def run(mode: Mode, scales: Sequence[int] | None = None, kinds: Sequence[str] = KINDS,
        reps: int | None = None, seconds: float | None = None,
        workers: int = 2) -> dict[str, Any]:
    scales = scales or ((1,) if mode.quick else SCALES_FULL)
    reps = reps or (1 if mode.quick else 3)
    seconds = seconds or (2.0 if mode.quick else 5.0)
    runs: list[dict[str, Any]] = []
    loads: dict[str, dict[str, float]] = {}
    with datapath(SIZES, "req") as dp:
        rec = reconciler_for(dp)
        node_model = workload.node_model("node", [TopologySpec().nodes[0].ip])
        for n in scales:
            specs = [*workload.fillers(n - 1, FILLER_ENDPOINTS), web_one_spec(), web_spec()]
            started = time.perf_counter()
            res = rec.sync(workload.desired_of(specs, node_model))
            if res.errors:
                raise BenchError(f"programming {n} services: {res.errors[:3]}")
            log(f"requests: {n} services programmed into the maps in "
                f"{time.perf_counter() - started:.1f} s")
            with open_labs(specs, dp) as labs:
                loads[str(n)] = {k: round(v.load_seconds, 2) for k, v in labs.items()
                                 if v.load_seconds}
                order = [k for k in KINDS if k in kinds]
                for rep in range(reps):
                    rotated = order[rep % len(order):] + order[:rep % len(order)]
                    for kind in rotated:
                        refresh_pods(labs[kind], dp, workers)
                        check_isolation(labs[kind])
                        check_reachable(labs[kind])
                    # Kinds take turns run by run, so a change in background load hits
                    # every kind of a row alike.
                    for load, path in ROWS:
                        for kind in rotated:
                            runs.append(_one_run(labs[kind], n, path, load, rep, seconds))
    return {
        "method": {
            "wrk": f"-t2 -c32 -d{seconds:g}s --latency --timeout 2s",
            "repetitions": reps, "backend_workers": workers,
            "filler_endpoints": FILLER_ENDPOINTS,
            "clean_state": "fresh client and backend pod namespaces for every kind at the "
                           "start of each repetition; "
                           "conntrack flushed in the node namespace (netfilter kinds), BPF "
                           "conntrack map cleared (xdplb)",
            "iptables": "iptables-restore (the Debian default `iptables`, see machine)",
        },
        "rule_load_seconds": loads,
        "runs": runs,
        "summary": summarize(runs),
    }


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over repetitions per (services, path, load, kind), with xdplb's ratios."""
    groups: dict[tuple[int, str, str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["services"], r["path"], r["load"], r["kind"]), []).append(r)
    rows = []
    for (n, path, load, kind), rs in sorted(groups.items()):
        rows.append({"services": n, "path": path, "load": load, "kind": kind,
                     "requests_per_s": median([r["requests_per_s"] for r in rs]),
                     "p50_ms": median([r["p50_ms"] for r in rs]),
                     "p99_ms": median([r["p99_ms"] for r in rs]),
                     "socket_errors": sum(r["socket_errors"] for r in rs),
                     "syn_retrans": sum(r.get("syn_retrans", 0) for r in rs),
                     "listen_drops": sum(r.get("listen_drops", 0) for r in rs),
                     "paws_timewait": sum(r.get("paws_timewait", 0) for r in rs),
                     "runs": len(rs)})
    by = {(r["services"], r["path"], r["load"], r["kind"]): r for r in rows}
    for r in rows:
        ours = by.get((r["services"], r["path"], r["load"], "xdplb"))
        if ours and r["requests_per_s"] > 0:
            r["xdplb_ratio"] = ours["requests_per_s"] / r["requests_per_s"]
    return rows


def main(mode: Mode) -> dict[str, Any]:
    started, load = time.time(), os.getloadavg()[0]
    data = run(mode)
    path = write_result("requests", mode, data, started, load)
    log(f"requests: wrote {path}")
    return data
