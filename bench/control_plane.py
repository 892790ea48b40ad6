"""Programming cost: services with 10 endpoints each, from empty and one change at a time.

This project: desired.compute over the cluster model, then Reconciler.sync into the real
pinned maps of a freshly loaded datapath, exactly what the agent does on every change. Each
size runs in its own process (`python -m bench.control_plane worker ...`), so time and peak
RSS belong to that size alone. The peak is read twice: for the whole process (ru_maxrss,
BCC's compiler included) and for the programming step alone (VmHWM after resetting it
through /proc/self/clear_refs once the programs are loaded).

`desired.compute` (over `lb.model.Cluster`, which indexes its slices by service) and the
sync are timed separately. A change is timed as the agent runs it: the cluster as a
change-tracking watch delivers it (the changed Service and EndpointSlice new, every other
object kept, the slices' index kept up to date, `Cluster.changes` naming the service),
`desired.compute` through the agent's memo (which computes only that service again) and a
sync of the frontends that changed; the sync alone is reported too. Compute and sync run
with Python's cyclic collector held off, as the agent runs a sync (lb/collector.py).
From empty is the median of ROUNDS: between them every service is removed (one sync of
an empty cluster, also reported), so each round programs the same services into empty maps.
Changes: one endpoint of one service replaced (median of CHANGES), one service added, and
the 100 endpoints of one service replaced one by one (CHURN changes, their total).
Building the snapshot (the source's work) is not timed.

Baselines, in a throwaway network namespace: kube-proxy's rule sets for the same services
(bench.kuberules) loaded with `iptables-restore --noflush` (the Debian default `iptables`,
nf_tables based, and `iptables-legacy`) and with `nft -f`. One change for iptables is what
kube-proxy >= 1.28 sends (a partial restore: every top-level chain, KUBE-SERVICES with one
rule per service, rewritten in full plus the changed service's chains) and, for reference,
the full restore it sends on a full resync (and for every change before 1.28); for nftables
the small transaction its nftables mode sends. The rule generation (Python here, Go in
kube-proxy) is not timed. Loads projected past LOAD_CAP are not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import kuberules, workload
from bench.common import (
    REPO,
    BenchError,
    Mode,
    datapath,
    in_netns,
    log,
    median,
    throwaway_netns,
    write_result,
)

SIZES_FULL = (1_000, 10_000, 30_000, 100_000)
ENDPOINTS = 10
CHANGES = 5
ROUNDS = 3
CHURN = 100
LOAD_CAP = 150.0
NODE_IP = "192.0.2.1"
TOOLS = ("iptables", "iptables-legacy", "nftables")


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0).
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _changed_specs(specs: list[workload.SvcSpec], k: int) -> tuple[int, workload.SvcSpec]:
    """Which service the k-th change touches, and its new form."""
    idx = (k + 1) * len(specs) // (CHANGES + 2)
    return idx, workload.with_endpoint_replaced(specs[idx], 0, k + 1)


# -- this project (worker side) --------------------------------------------------------------

class Watch:
    """Snapshots as a change-tracking source hands them out: each a new Cluster that keeps
    every untouched object and the slices' index, and names the services it changed."""

    def __init__(self, specs: list[workload.SvcSpec]) -> None:
        from lb.model import Cluster

        self.cluster: Cluster = workload.cluster_of(specs)
        self.index = {s.service_key: (s,) for s in self.cluster.slices.values()}
        self.cluster = replace(self.cluster, slice_index=self.index)

    def apply(self, spec: workload.SvcSpec) -> None:
        """`spec` added or changed."""
        from lb.model import Changes

        one = workload.cluster_of([spec])
        self.index = {**self.index, **{s.service_key: (s,) for s in one.slices.values()}}
        self.cluster = replace(
            self.cluster, services={**self.cluster.services, **one.services},
            slices={**self.cluster.slices, **one.slices}, slice_index=self.index,
            changes=Changes(self.cluster.revision, frozenset(one.services)))


def ours_worker(services: int) -> dict[str, Any]:
    from lb.collector import paused
    from lb.datapath.instance import Sizes, reconciler_for
    from lb.service import desired
    from lb.service.maglev import table_size

    needed = (services + CHANGES + 2) * table_size(ENDPOINTS)
    sizes = Sizes(max_services=1 << max(12, math.ceil(math.log2(services * 1.2))),
                  max_backends=1 << max(14, math.ceil(math.log2(services * ENDPOINTS * 1.2))),
                  maglev_slots=1 << max(20, math.ceil(math.log2(needed))), ct_size=1 << 16)
    out: dict[str, Any] = {"services": services, "endpoints": services * ENDPOINTS,
                           "rss_start_kib": _status_kb("VmRSS")}
    started = time.perf_counter()
    with datapath(sizes, "cp") as dp:
        out["compile_seconds"] = time.perf_counter() - started
        out["rss_loaded_kib"] = _status_kb("VmRSS")
        file_loaded = _status_kb("RssFile")
        rec = reconciler_for(dp)
        node = workload.node_model("node", [NODE_IP])
        _reset_peak()
        specs = workload.fillers(services, ENDPOINTS)
        watch = Watch(specs)
        computes, syncs, removals = [], [], []
        for r in range(ROUNDS):
            if r:
                with paused():
                    t = time.perf_counter()
                    res = rec.sync(desired.compute(workload.cluster_of([]), node))
                    removals.append(time.perf_counter() - t)
                if res.errors or res.removed != services:
                    raise BenchError(f"removing {services} services: {res.removed} removed, "
                                     f"{res.errors[:3]}")
            memo = desired.Memo()
            with paused():
                t = time.perf_counter()
                state = desired.compute(watch.cluster, node, memo)
                computes.append(time.perf_counter() - t)
                t = time.perf_counter()
                res = rec.sync(state)
                syncs.append(time.perf_counter() - t)
            if res.errors or res.added != services:
                raise BenchError(f"sync of {services} services: {res.added} added, "
                                 f"{res.errors[:3]}")
        out["compute_seconds"], out["sync_seconds"] = median(computes), median(syncs)
        out["remove_all_seconds"] = median(removals)
        out["peak_rss_programming_kib"] = _status_kb("VmHWM")
        # The first Maglev write maps lb_maglev whole (the kernel maps a mappable array's
        # pages at mmap): kernel memory every size allocates at load, counted in RSS as
        # file pages from then on, and not the agent's own.
        out["rss_mapped_maps_kib"] = _status_kb("RssFile") - file_loaded

        def change(spec: workload.SvcSpec, what: str) -> tuple[float, float]:
            """(compute + sync, sync) of one change, checked to touch one frontend."""
            watch.apply(spec)
            with paused():
                t = time.perf_counter()
                state = desired.compute(watch.cluster, node, memo)
                t_compute = time.perf_counter() - t
                if memo.computed != 1:
                    raise BenchError(f"{what}: {memo.computed} services computed, not 1")
                t = time.perf_counter()
                res = rec.sync(state)
                t_sync = time.perf_counter() - t
            if res.errors or res.updated + res.added != 1:
                raise BenchError(f"{what}: {res.updated} updated, {res.added} added, "
                                 f"{res.errors[:3]}")
            return t_compute + t_sync, t_sync

        changes_sync, changes_total = [], []
        for k in range(CHANGES):
            idx, new = _changed_specs(specs, k)
            specs[idx] = new
            total, alone = change(new, f"change {k}")
            changes_sync.append(alone)
            changes_total.append(total)
        out["change_sync_seconds"] = median(changes_sync)
        out["change_seconds"] = median(changes_total)
        added = workload.fillers(1, ENDPOINTS, start=services + CHANGES + 1)[0]
        out["add_service_seconds"], _ = change(added, "one service added")
        # A rollout of 100 pods behind one service, one EndpointSlice update each.
        rolled = replace(specs[0], endpoints=tuple(
            workload.filler_endpoint(services * ENDPOINTS + j) for j in range(CHURN)))
        specs[0] = rolled
        change(rolled, "the rolled service at 100 endpoints")
        churn = []
        for j in range(CHURN):
            rolled = workload.with_endpoint_replaced(rolled, j, CHANGES + 1 + j)
            churn.append(change(rolled, f"rollout step {j}")[0])
        out["churn_seconds"] = sum(churn)
        out["churn_change_seconds"] = median(churn)
    out["peak_rss_process_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def policy_worker() -> dict[str, Any]:
    """NetworkPolicy programming in bench.policy_cost's cluster (1,000 policies over 1,000
    local pods, every one isolated): PolicyWriter.sync, compile and map writes, as the agent
    runs it on every sync. Its first sync; pods added one at a time to a namespace its
    policies select (median of CHANGES); a sync for a Service change (a snapshot that keeps
    the pods, namespaces and policies, as the watch hands it out)."""
    from bench import policy_cost
    from lb.collector import paused
    from lb.datapath.instance import SMALL, policy_writer_for
    from lb.encoding import ip_text
    from lb.model import Pod
    from lb.policy.contents import diff

    cluster, node = policy_cost.cluster(True), policy_cost.NODE
    out: dict[str, Any] = {"pods": len(cluster.pods), "policies": len(cluster.policies)}
    with datapath(SMALL, "cpp") as dp:
        writer = policy_writer_for(dp)

        def sync(c: Any, what: str) -> float:
            with paused():  # as the agent runs a sync
                t = time.perf_counter()
                errors = writer.sync(c, node)
                took = time.perf_counter() - t
            if errors:
                raise BenchError(f"policy, {what}: {errors[:3]}")
            return took

        out["first_seconds"] = sync(cluster, "first sync")
        out["endpoints"], out["rules"] = len(writer.current.endpoints), len(writer.current.rules)
        added, writes = [], []
        for k in range(CHANGES):
            pod = Pod("ns3", f"added-{k}", (("pod", "b"),), node.name, (f"10.244.9.{10 + k}",),
                      ports=policy_cost.PORTS)
            cluster = replace(cluster, pods={**cluster.pods, pod.key: pod})
            before = writer.current
            added.append(sync(cluster, f"pod {pod.key} added"))
            writes.append(len(diff(before, writer.current)))
            if pod.ips[0] not in {ip_text(a) for a in writer.current.endpoints}:
                raise BenchError(f"policy: {pod.key} added but not isolated")
        out["pod_added_seconds"], out["pod_added_writes"] = median(added), median(writes)
        # A pod that makes a new identity changes what rules name: a whole compile.
        out["pod_added_max_seconds"], out["pod_added_max_writes"] = max(added), max(writes)
        out["service_change_seconds"] = median(
            [sync(replace(cluster, services={}), "a Service change") for _ in range(CHANGES)])
    return out


# -- baselines (worker side) -----------------------------------------------------------------

def _restore(tool: str) -> list[str]:
    name = "iptables-restore" if tool == "iptables" else "iptables-legacy-restore"
    return [name, "-w", "5", "--noflush", "--counters"]


def rules_worker(tool: str, services: int) -> dict[str, Any]:
    specs = workload.fillers(services, ENDPOINTS)
    out: dict[str, Any] = {"tool": tool, "services": services}
    with throwaway_netns("cp") as ns:
        if tool == "nftables":
            text = kuberules.nft_ruleset(specs, [NODE_IP])
            out["rules"] = kuberules.count_nft_rules(text)
            out["load_seconds"], _ = in_netns(ns, ["nft", "-f", "-"], input=text,
                                              timeout=LOAD_CAP * 4)
            times = []
            for k in range(CHANGES):
                idx, new = _changed_specs(specs, k)
                change = kuberules.nft_endpoint_change(specs[idx], new)
                specs[idx] = new
                took, _ = in_netns(ns, ["nft", "-f", "-"], input=change)
                times.append(took)
            out["change_seconds"] = median(times)
        else:
            in_netns(ns, _restore(tool)[:-1], input=kuberules.iptables_base())
            text = kuberules.iptables_rules(specs)
            out["rules"] = kuberules.count_iptables_rules(text)
            out["load_seconds"], _ = in_netns(ns, _restore(tool), input=text,
                                              timeout=LOAD_CAP * 4)
            times = []
            for k in range(CHANGES):
                idx, new = _changed_specs(specs, k)
                gone = kuberules.sep_chain(specs[idx], specs[idx].endpoints[0])
                specs[idx] = new
                partial = kuberules.iptables_rules(specs, changed=[new], deleted_chains=[gone])
                took, _ = in_netns(ns, _restore(tool), input=partial)
                times.append(took)
            out["change_seconds"] = median(times)
            if out["load_seconds"] <= LOAD_CAP / 2:
                out["full_resync_seconds"], _ = in_netns(
                    ns, _restore(tool), input=kuberules.iptables_rules(specs),
                    timeout=LOAD_CAP * 4)
        # Children: `ip netns exec` execs the tool, so this is the largest tool process.
        out["peak_rss_tool_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return out


# -- orchestration ---------------------------------------------------------------------------

def _worker(args: Sequence[str], timeout: float) -> dict[str, Any]:
    """Run one measurement in its own process. On a timeout (or our own interruption) it
    gets SIGTERM first, so that it removes its namespace and pins itself."""
    cmd = [sys.executable, "-m", "bench.control_plane", "worker", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as e:
        proc.terminate()
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise BenchError(f"{' '.join(args)}: no result within {timeout:.0f} s") from e
        raise
    if proc.returncode != 0:
        raise BenchError(f"worker {' '.join(args)} failed: {stderr.strip()[-1500:]}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def _project(points: list[tuple[int, float]], size: int) -> float | None:
    """Time at `size` from earlier (size, seconds) points: the fitted power law of the last
    two points, or quadratic growth from a single point."""
    if not points:
        return None
    (n1, t1) = points[-1]
    exponent = 2.0
    if len(points) >= 2:
        (n0, t0) = points[-2]
        if t0 > 0 and t1 > 0 and n1 != n0:
            exponent = max(1.0, math.log(t1 / t0) / math.log(n1 / n0))
    return float(t1 * (size / n1) ** exponent)


def run(mode: Mode, sizes: Sequence[int] | None = None,
        tools: Sequence[str] = TOOLS) -> dict[str, Any]:
    sizes = sizes or ((1_000,) if mode.quick else SIZES_FULL)
    ours: list[dict[str, Any]] = []
    for n in sizes:
        row = _worker(["ours", str(n)], timeout=3600)
        ours.append(row)
        log(f"control_plane: xdplb {n} services: compute {row['compute_seconds']:.2f} s, sync "
            f"{row['sync_seconds']:.2f} s, change {row['change_seconds'] * 1000:.0f} ms "
            f"(sync alone {row['change_sync_seconds'] * 1000:.1f} ms), peak RSS "
            f"{row['peak_rss_programming_kib'] / 1024:.0f} MiB")
    policy = _worker(["policy"], timeout=1800)
    log(f"control_plane: policy under {policy['policies']:,} policies: first sync "
        f"{policy['first_seconds']:.2f} s, one pod added "
        f"{policy['pod_added_seconds'] * 1000:.0f} ms ({policy['pod_added_writes']:.0f} writes), "
        f"a Service change {policy['service_change_seconds'] * 1000:.2f} ms")
    baselines: list[dict[str, Any]] = []
    for tool in tools:
        points: list[tuple[int, float]] = []
        for n in sizes:
            projected = _project(points, n)
            if projected is not None and projected > LOAD_CAP:
                baselines.append({"tool": tool, "services": n, "skipped": True,
                                  "load_projected_seconds": projected})
                log(f"control_plane: {tool} {n} services: not run, projected "
                    f"{projected:.0f} s")
                continue
            row = _worker(["rules", tool, str(n)], timeout=LOAD_CAP * 10)
            points.append((n, row["load_seconds"]))
            baselines.append(row)
            log(f"control_plane: {tool} {n} services: {row['rules']} rules loaded in "
                f"{row['load_seconds']:.2f} s, change {row['change_seconds'] * 1000:.0f} ms")
    return {
        "method": {"endpoints_per_service": ENDPOINTS, "changes": CHANGES, "rounds": ROUNDS,
                   "churn": CHURN, "load_cap_seconds": LOAD_CAP},
        "xdplb": ours,
        "policy": policy,
        "baselines": baselines,
    }


def main(mode: Mode) -> dict[str, Any]:
    started, load = time.time(), os.getloadavg()[0]
    data = run(mode)
    path = write_result("control_plane", mode, data, started, load)
    log(f"control_plane: wrote {path}")
    return data


def _worker_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.control_plane worker")
    sub = p.add_subparsers(dest="what", required=True)
    o = sub.add_parser("ours")
    o.add_argument("services", type=int)
    sub.add_parser("policy")
    r = sub.add_parser("rules")
    r.add_argument("tool", choices=TOOLS)
    r.add_argument("services", type=int)
    args = p.parse_args(argv)
    if args.what == "ours":
        out = ours_worker(args.services)
    elif args.what == "policy":
        out = policy_worker()
    else:
        out = rules_worker(args.tool, args.services)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like an exception, so namespaces and pins are removed on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if sys.argv[1:2] == ["worker"]:
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("usage: python -m bench.control_plane worker {ours|policy|rules} ...")
