"""Where the keep-alive p99 through a service comes from: many short wrk runs per kind.

    python -m bench.tail_latency [--quick]

writes bench/results/<date>-tail_latency[-quick].json; `python -m bench --report-only`
renders it into RESULTS.md.

The requests benchmark (bench.requests_rate) reports one median of three runs per row, and
its keep-alive p99 differs between kinds by 2-4x from one full run to the next. This one
asks whether that difference is the datapath's: the same labs and wrk command (one
service, ClusterIP from a pod, two backends and the one-backend service), REPS repetitions
(4 s runs; about 11 minutes) with the kinds taking turns, and per run:

* p50 and p99 (wrk --latency);
* the busiest backend worker's share: connections held by the worker holding most, over
  all 32 (the servers pre-fork workers that accept from one socket, so a worker can take
  many connections at once);
* CPU per request: busy time of all cores (/proc/stat) over the run, divided by requests;
* for xdplb, packets through its programs per request (lb_stats, all reasons), which with
  the per-packet cost of bench.packet_cost bounds the datapath's share of a request.

A kind's p99 is reported as the median and the quartiles over its runs: one run says little
when the scheduler of two cores decides the tail.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import requests_rate as rr
from bench import workload, wrk
from bench.common import (
    BenchError,
    Mode,
    datapath,
    log,
    require_root,
    stat_counts,
    write_result,
)
from lab.topology import TopologySpec
from lb.datapath.instance import reconciler_for

KINDS = ("direct", "xdplb", "iptables", "nftables")
PATHS = ("clusterip", "clusterip-one")
CONNECTIONS = 32
REPS = 16


def _busy_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all cores."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0]
    fields = [int(v) for v in first.split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total


def _busiest_worker(lab: rr.Lab) -> int:
    """Connections held by the backend worker process holding most."""
    held: collections.Counter[str] = collections.Counter()
    for name in ("web1", "web2"):
        text = lab.topo.exec(lab.pods[name], ["ss", "-tnpH", "state", "established",
                                               f"( sport = :{rr.TARGET} )"]).stdout
        held.update(f"{name}/{pid}" for pid in re.findall(r"pid=(\d+)", text))
    return max(held.values(), default=0)


def _one(lab: rr.Lab, dp: Any, path: str, rep: int, seconds: float) -> dict[str, Any]:
    where, url, split = rr.targets_of(lab)[path]
    seen: dict[str, int] = {}

    def sample() -> None:
        # Once wrk's connections are all open, well before it ends.
        time.sleep(min(1.0, seconds / 3))
        seen["busiest"] = _busiest_worker(lab)

    sampler = threading.Thread(target=sample)
    stats0 = sum(stat_counts(dp)) if lab.kind == "xdplb" else 0
    cpu0 = _busy_jiffies()
    sampler.start()
    result = wrk.run(lab.topo, where, url, seconds=seconds, split=split)
    sampler.join()
    cpu1 = _busy_jiffies()
    hz = os.sysconf("SC_CLK_TCK")
    row: dict[str, Any] = {
        "kind": lab.kind, "path": path, "rep": rep, **result.as_json(),
        "busiest_worker_share": round(seen.get("busiest", 0) / CONNECTIONS, 3),
        "cpu_us_per_request": round((cpu1[0] - cpu0[0]) / hz * 1e6 / max(1, result.requests),
                                    1),
        "cpu_busy_share": round((cpu1[0] - cpu0[0]) / max(1, cpu1[1] - cpu0[1]), 3),
    }
    if lab.kind == "xdplb":
        row["packets_per_request"] = round((sum(stat_counts(dp)) - stats0)
                                           / max(1, result.requests), 2)
    log(f"tail: {rep} {lab.kind:>9} {path:>13}: {result.requests_per_s:8.0f}/s "
        f"p50 {result.p50_ms:.2f} p99 {result.p99_ms:.2f} ms, busiest worker "
        f"{row['busiest_worker_share']:.0%}, {row['cpu_us_per_request']} us CPU/request")
    return row


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["path"], r["kind"]), []).append(r)
    rows = []
    for (path, kind), rs in sorted(groups.items(), key=lambda kv: (
            PATHS.index(kv[0][0]), KINDS.index(kv[0][1]))):
        q1, p99, q3 = _quartiles([r["p99_ms"] for r in rs])
        row = {"path": path, "kind": kind, "runs": len(rs),
               "requests_per_s": statistics.median(r["requests_per_s"] for r in rs),
               "p50_ms": statistics.median(r["p50_ms"] for r in rs),
               "p99_ms": p99, "p99_q1_ms": q1, "p99_q3_ms": q3,
               "p99_min_ms": min(r["p99_ms"] for r in rs),
               "p99_max_ms": max(r["p99_ms"] for r in rs),
               "busiest_worker_share": statistics.median(r["busiest_worker_share"]
                                                         for r in rs),
               "cpu_us_per_request": statistics.median(r["cpu_us_per_request"] for r in rs)}
        if kind == "xdplb":
            row["packets_per_request"] = statistics.median(r["packets_per_request"]
                                                           for r in rs)
        rows.append(row)
    return rows


def measure(reps: int, seconds: float, kinds: Sequence[str] = KINDS) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    specs = [rr.web_one_spec(), rr.web_spec()]
    with datapath(rr.SIZES, "tail") as dp:
        node_model = workload.node_model("node", [TopologySpec().nodes[0].ip])
        res = reconciler_for(dp).sync(workload.desired_of(specs, node_model))
        if res.errors:
            raise BenchError(f"programming the services: {res.errors[:3]}")
        with rr.open_labs(specs, dp) as labs:
            for rep in range(reps):
                order = [k for k in KINDS if k in kinds]
                order = order[rep % len(order):] + order[:rep % len(order)]
                for kind in order:
                    rr.refresh_pods(labs[kind], dp, workers=2)
                    rr.check_isolation(labs[kind])
                    rr.check_reachable(labs[kind])
                for path in PATHS:
                    for kind in order:
                        runs.append(_one(labs[kind], dp, path, rep, seconds))
    return {
        "method": {"wrk": f"-t2 -c{CONNECTIONS} -d{seconds:g}s --latency --timeout 2s",
                   "repetitions": reps, "services": 1, "backend_workers": 2,
                   "p99": "median and quartiles over the repetitions"},
        "runs": runs,
        "summary": summarize(runs),
    }


def _packet_ns() -> float | None:
    """tc established ns per packet, the newest packet_cost result's worst row."""
    from bench.report import newest

    doc = newest("packet_cost")
    rows = doc.get("rows", []) if doc else []
    return max((r["tc_established"] for r in rows), default=None)


def markdown(doc: dict[str, Any]) -> list[str]:
    m = doc["method"]
    out = ["## Keep-alive tail latency, run by run", "",
           f"wrk `{m['wrk']}` via the ClusterIP of one service from a pod, "
           f"{m['repetitions']} repetitions, the kinds taking turns (same labs as section 1). "
           "p99 as the median over runs, with the quartiles and the extremes: one run's p99 "
           "moves several-fold on two cores. `busiest worker`: connections held by the "
           "backend worker holding most (the servers' workers accept from one socket). "
           "`CPU/request`: busy time of both cores over the run per request.", "",
           "| path | kind | requests/s | p50 ms | p99 ms (median) | p99 quartiles | p99 range "
           "| busiest worker | CPU/request |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["summary"]:
        out.append(f"| {r['path']} | {r['kind']} | {r['requests_per_s']:,.0f} | "
                   f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                   f"{r['p99_q1_ms']:.2f}-{r['p99_q3_ms']:.2f} | "
                   f"{r['p99_min_ms']:.2f}-{r['p99_max_ms']:.2f} | "
                   f"{r['busiest_worker_share']:.0%} | {r['cpu_us_per_request']:.0f} us |")
    by = {(r["path"], r["kind"]): r for r in doc["summary"]}
    compared = [f"{path} {by[(path, 'xdplb')]['p99_ms']:.2f} against "
                f"{by[(path, 'nftables')]['p99_ms']:.2f} ms "
                f"({by[(path, 'xdplb')]['p99_ms'] / by[(path, 'nftables')]['p99_ms']:.2f}x)"
                for path in PATHS if (path, "xdplb") in by and (path, "nftables") in by]
    if compared:
        out += ["", "Median p99, xdplb against nftables: " + "; ".join(compared) + "."]
    ours = [r for r in doc["summary"] if r["kind"] == "xdplb" and "packets_per_request" in r]
    ns = _packet_ns()
    if ours and ns:
        ppr = max(r["packets_per_request"] for r in ours)
        cpu = min(r["cpu_us_per_request"] for r in ours)
        out += ["", f"xdplb's programs see {ppr:.1f} packets per request; at the worst tc "
                f"established cost of section 2 ({ns:.0f} ns) that is "
                f"{ppr * ns / 1000:.1f} us of the {cpu:.0f} us of CPU a request takes "
                f"({ppr * ns / 10 / cpu:.1f}%): the datapath cannot make a millisecond "
                "tail."]
    return out


def run(mode: Mode, reps: int | None = None) -> dict[str, Any]:
    """Measure and write bench/results/<date>-tail_latency[-quick].json."""
    started, load = time.time(), os.getloadavg()[0]
    data = measure(reps=reps or (2 if mode.quick else REPS),
                   seconds=2.0 if mode.quick else 4.0)
    path = write_result("tail_latency", mode, data, started, load)
    log(f"tail: wrote {path}")
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tail_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two repetitions of 2 s")
    p.add_argument("--reps", type=int, help=f"repetitions (default {REPS}, quick 2)")
    args = p.parse_args(argv)
    require_root()
    print("\n".join(markdown(run(Mode(quick=args.quick), args.reps))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
