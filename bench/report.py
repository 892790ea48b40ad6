"""bench/RESULTS.md and its plots, rebuilt from the newest result of each benchmark.

A full run's results are preferred; a benchmark with only quick results is shown from those
and labelled so.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, RESULTS_DIR, RESULTS_MD

PLOTS = BENCH_DIR / "plots"
KIND_LABEL = {"direct": "direct (no service)", "xdplb": "xdplb (this project)",
              "iptables": "kube-proxy iptables", "nftables": "kube-proxy nftables"}
KIND_COLOR = {"direct": "#888888", "xdplb": "#1f77b4", "iptables": "#d62728",
              "nftables": "#ff7f0e"}


def newest(name: str) -> dict[str, Any] | None:
    """The newest full result of `name`, else the newest quick one."""
    for pattern in (f"*-{name}.json", f"*-{name}-quick.json"):
        found = sorted(RESULTS_DIR.glob(pattern), key=lambda p: (p.name[:10], p.stat().st_mtime))
        if found:
            doc: dict[str, Any] = json.loads(found[-1].read_text())
            doc["_file"] = str(found[-1].relative_to(BENCH_DIR))
            return doc
    return None


# -- formatting ------------------------------------------------------------------------------

def _n(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _secs(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.0f} ms" if value >= 0.01 else f"{value * 1000:.1f} ms"
    return f"{value:.1f} s"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return [*out, ""]


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


# -- plots -----------------------------------------------------------------------------------

def _plot(name: str, draw: Callable[[Any], None]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(12, 6.5))
    draw(fig)
    fig.tight_layout()
    path = PLOTS / f"{name}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"plots/{path.name}"


def _requests_plot(summary: list[dict[str, Any]]) -> str:
    def draw(fig: Any) -> None:
        panels = [(p, load) for load in ("keepalive", "connections")
                  for p in ("clusterip", "nodeport", "clusterip-one")
                  if any(r["path"] == p and r["load"] == load for r in summary)]
        scales = sorted({r["services"] for r in summary})
        kinds = [k for k in KIND_LABEL if any(r["kind"] == k for r in summary)]
        for i, (path, load) in enumerate(panels):
            ax = fig.add_subplot(2, 3, i + 1)
            width = 0.8 / max(1, len(kinds))
            for j, kind in enumerate(kinds):
                vals = [next((r["requests_per_s"] for r in summary if r["services"] == n
                              and r["path"] == path and r["load"] == load
                              and r["kind"] == kind), 0.0) for n in scales]
                xs = [x + (j - (len(kinds) - 1) / 2) * width for x in range(len(scales))]
                ax.bar(xs, vals, width, label=KIND_LABEL[kind], color=KIND_COLOR[kind])
            ax.set_xticks(range(len(scales)), [f"{n:,}" for n in scales])
            ax.set_xlabel("services installed")
            ax.set_ylabel("requests/s" if load == "keepalive" else "connections/s")
            name = {"clusterip": "ClusterIP", "nodeport": "NodePort",
                    "clusterip-one": "ClusterIP, 1 backend"}[path]
            ax.set_title(f"{name}, "
                         f"{'keep-alive' if load == 'keepalive' else 'new connection each'}",
                         fontsize=10)
            if i == 0:
                ax.legend(fontsize=8)
    return _plot("requests", draw)


def _packet_plot(rows: list[dict[str, Any]]) -> str:
    def draw(fig: Any) -> None:
        backends = sorted({r["backends"] for r in rows})
        for i, key in enumerate(("established", "new")):
            ax = fig.add_subplot(1, 2, i + 1)
            for prog, style in (("tc", "-"), ("xdp", "--")):
                for b in backends:
                    pts = sorted((r["services"], r[f"{prog}_{key}"]) for r in rows
                                 if r["backends"] == b)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o",
                            label=f"{prog}, {b} backend{'s' if b > 1 else ''}")
            ax.set_xscale("log")
            ax.set_ylim(bottom=0)
            ax.set_xlabel("services installed")
            ax.set_ylabel("ns per packet")
            ax.set_title("established flow (DNAT_ESTABLISHED)" if key == "established"
                         else "new flow (DNAT_NEW, conntrack insert)")
            ax.legend(fontsize=7)
    return _plot("packet_cost", draw)


def _control_plot(doc: dict[str, Any]) -> str:
    def draw(fig: Any) -> None:
        ours = doc["xdplb"]
        base = [b for b in doc["baselines"] if not b.get("skipped")]
        for i, key in enumerate(("program", "change")):
            ax = fig.add_subplot(1, 2, i + 1)
            if key == "program":
                series = {"xdplb (compute + sync)": [
                    (r["services"], _ours_program(r)) for r in ours]}
            else:
                series = {"xdplb (compute + sync)": [
                    (r["services"], _ours_change(r)) for r in ours],
                    "xdplb (sync alone)": [
                    (r["services"], r["change_sync_seconds"]) for r in ours]}
            for tool in sorted({b["tool"] for b in base}):
                field = "load_seconds" if key == "program" else "change_seconds"
                series[f"kube-proxy {tool}"] = [(b["services"], b[field]) for b in base
                                                if b["tool"] == tool]
            for label, pts in series.items():
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("services (10 endpoints each)")
            ax.set_ylabel("seconds")
            ax.set_title("program from empty" if key == "program" else "apply one change")
            ax.legend(fontsize=7)
    return _plot("control_plane", draw)


# -- sections --------------------------------------------------------------------------------

def _ours(r: dict[str, Any], key: str) -> float:
    """`compute_seconds` or `change_seconds` of one xdplb row; results written before the
    model indexed its slices have them as `..._indexed_seconds`."""
    return float(r[f"{key}_seconds"] if f"{key}_seconds" in r else r[f"{key}_indexed_seconds"])


def _ours_program(r: dict[str, Any]) -> float:
    """Programming from empty: compute plus sync."""
    return _ours(r, "compute") + float(r["sync_seconds"])


def _ours_change(r: dict[str, Any]) -> float:
    """One change: compute plus sync (median over the changes)."""
    return _ours(r, "change")


def _machine_line(m: dict[str, Any]) -> str:
    return (f"{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, kernel {m['kernel']}, "
            f"Python {m['python']}")


def _machine(docs: Sequence[dict[str, Any]]) -> list[str]:
    """Every machine the results come from (lettered when more than one), and
    which run was made on which."""
    m = docs[0]["machine"]
    machines: list[str] = []
    for d in docs:
        if _machine_line(d["machine"]) not in machines:
            machines.append(_machine_line(d["machine"]))
    label = {line: f"machine {chr(ord('A') + i)}: " if len(machines) > 1 else ""
             for i, line in enumerate(machines)}
    out = ["## Machine", "", *(f"- {label[line]}{line}" for line in machines),
           f"- `iptables` is {m['iptables']}; also {m['iptables_legacy']}; {m['nft']}; "
           f"{m['wrk']}"]
    for d in docs:
        loads = d.get("load_average")
        extra = f", load average {loads[0]:.1f} -> {loads[1]:.1f}" if loads else ""
        where = label[_machine_line(d["machine"])].removesuffix(": ")
        out.append(f"- `{d['_file']}`: {d['mode']} run started {d['started']}, took "
                   f"{d['seconds'] / 60:.1f} min{extra}" + (f", on {where}" if where else ""))
    return [*out, ""]


def _requests_section(doc: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    summary = doc["summary"]
    by = {(r["services"], r["path"], r["load"], r["kind"]): r for r in summary}
    scales = sorted({r["services"] for r in summary})
    method = doc["method"]
    out = ["## 1. Requests through a service (wrk)", "",
           f"wrk `{method['wrk']}` from a client pod to the ClusterIP (and from the outside "
           "namespace to the NodePort) of a service with two backend pods running "
           f"`lab.servers http` ({method['backend_workers']} workers each, TCP_NODELAY, "
           f"backlog 1024). Median of {method['repetitions']} repetition(s); within a "
           "repetition the kinds take turns on every row (in an order rotating per "
           "repetition), so a change in background load hits all of them alike. Each kind "
           "lives in its own lab topology; `direct` sends to the pod IPs themselves, one wrk "
           "thread per pod. Services installed (the `services` column): the measured one plus "
           f"fillers (ClusterIPs with {method['filler_endpoints']} endpoints each) up to that "
           "count, and `web-one`, a ClusterIP whose only endpoint is the first pod; in "
           "iptables' KUBE-SERVICES the measured service is the last rule. The two-backend "
           "rows compare a service, which spreads 32 connections over two pods (Maglev, or "
           "kube-proxy's random choice), with direct's exact 16/16 split; the one-backend "
           "rows (`web-one` against wrk straight to that pod) isolate the translation "
           "itself.", "",
           "Clean state (TIME_WAIT and PAWS): " + method["clean_state"] + ". So no run "
           "inherits TIME_WAIT sockets or conntrack entries from an earlier one. Within a "
           "repetition keep-alive runs come first (wrk closes those connections, so the "
           "backends keep no TIME_WAIT from them); the new-connection runs (`Connection: "
           "close`, one request per connection, the backend closes first) via ClusterIP and "
           "via NodePort never share a 4-tuple at the backends (pod source vs node or "
           "outside source). Inside one new-connection run the client's ports (1024-65535, "
           "even ones first for connect()) do come round again after about 30k connections; "
           "a SYN meeting its own TIME_WAIT socket is accepted (timestamps increase), and the "
           "counters below show whether any was refused.", ""]
    loads = doc.get("rule_load_seconds") or {}
    if loads:
        out += ["Rule sets loaded into the node namespace before the runs: " + "; ".join(
            f"{n} services: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(t.items()))
            for n, t in loads.items()) + ".", ""]
    verdicts: dict[str, Any] = {"direct": [], "beats": []}
    titles = {"clusterip": "ClusterIP from a pod",
              "nodeport": "NodePort from outside (XDP on the node device for xdplb)",
              "clusterip-one": "ClusterIP of a one-backend service from a pod (keep-alive)"}
    for path, title in titles.items():
        rows = []
        for load in ("keepalive", "connections"):
            for n in scales:
                get: dict[str, Any] = {k: by.get((n, path, load, k)) for k in KIND_LABEL}
                ours = get["xdplb"]
                if ours is None:
                    continue

                def rate(k: str, get: dict[str, Any] = get) -> str:
                    r = get[k]
                    return "n/a" if r is None else \
                        f"{r['requests_per_s']:,.0f} ({r['p50_ms']:.2f} / {r['p99_ms']:.2f})"

                ratios = {k: (ours["requests_per_s"] / get[k]["requests_per_s"]
                              if get[k] else None) for k in ("direct", "iptables", "nftables")}
                if ratios["direct"] is not None:
                    verdicts["direct"].append((path, load, n, ratios["direct"]))
                for k in ("iptables", "nftables"):
                    if ratios[k] is not None:
                        verdicts["beats"].append((path, load, n, k, ratios[k]))
                rows.append([load.replace("keepalive", "keep-alive")
                             .replace("connections", "new conn."), f"{n:,}",
                             rate("direct"), rate("xdplb"), rate("iptables"), rate("nftables"),
                             _ratio(ratios["direct"]), _ratio(ratios["iptables"]),
                             _ratio(ratios["nftables"])])
        out += [f"### {title}", "", "requests/s (p50 / p99 latency in ms); ratios are "
                "xdplb's requests/s over the other's.", ""]
        out += _table(["load", "services", "direct", "xdplb", "iptables", "nftables",
                       "vs direct", "vs iptables", "vs nftables"], rows)
    def total(key: str) -> int:
        return sum(int(r.get(key, 0)) for r in summary)

    out += [f"Over all runs: wrk socket errors {total('socket_errors')}, client SYN "
            f"retransmits {total('syn_retrans')}, backend listen drops "
            f"{total('listen_drops')}, SYNs refused by PAWS at a TIME_WAIT socket "
            f"{total('paws_timewait')}.", ""]
    lossy = [r for r in summary if r.get("syn_retrans") or r.get("paws_timewait")]
    if lossy:
        out += ["Rows whose SYNs were retransmitted (each costs the client a 1 s timeout), "
                f"summed over the {method['repetitions']} repetition(s):", ""]
        out += _table(["path", "load", "services", "kind", "client SYN retransmits",
                       "refused by PAWS at a backend TIME_WAIT socket"],
                      [[r["path"], r["load"], f"{r['services']:,}", r["kind"],
                        str(r["syn_retrans"]), str(r["paws_timewait"])] for r in lossy])
    out += [
            f"![requests]({_requests_plot(summary)})", ""]
    return out, verdicts


def _packet_section(doc: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    rows = doc["rows"]
    m = doc["method"]
    out = ["## 2. Cost per packet (BPF_PROG_TEST_RUN)", "",
           "Nanoseconds per packet as the kernel reports them for the real programs. "
           f"Established: `repeat={m['repeat']:,}` on a mirror pair of services (service A's "
           "backend is service B's VIP, B's backend is A's VIP), so that every repetition is "
           "a conntrack hit plus a full DNAT even though each run sees the frame the previous "
           f"one rewrote; the best of {m['trials']} trials (other work on the machine only "
           "adds time; the medians are in the JSON). The whole sweep runs "
           f"{m.get('sweeps', 1)} time(s), each on a freshly loaded datapath; a "
           "configuration whose established cost came out more than 15% above the lowest "
           "seen so far was measured again after a pause (the machine's other work comes "
           "in bursts and only adds time; a cost that really grew with the service count "
           "would show every time), and each row shows the lowest figure over all "
           "measurements of its configuration (`measured` column). New flows: `repeat=1` on "
           f"{m['single_runs']:,} frames with distinct source ports (each misses conntrack and "
           "inserts two entries; XDP's NodePort also picks a masquerade port), median, minus "
           "the fixed cost of a single timed run, measured on the established path as "
           "median(repeat=1) - mean(repeat=N). Pass: a frame that is no service. Every row is "
           "checked against the datapath's per-reason counters (lb_stats): each run must "
           "have counted as the path it is reported under. Fillers are ClusterIP services "
           "with one endpoint, programmed through desired.compute and the Reconciler (the "
           "same path as the agent). The frame repeats, so caches are warm: this is the cost "
           "of instructions and helpers, not of cache misses.", ""]
    out += ["Empty: the pass frame through a program that only returns, on the same hook, "
            "measured interleaved with the pass runs: what BPF_PROG_TEST_RUN itself costs, "
            "and what the targets subtract.", ""]
    table = []
    for r in sorted(rows, key=lambda r: (r["backends"], r["services"])):
        table.append([f"{r['services']:,}", f"{r['backends']:,}", _n(r.get("tc_empty")),
                      _n(r["tc_pass"]), _n(r["tc_established"]), _n(r["tc_new"]),
                      _n(r.get("xdp_empty")), _n(r["xdp_pass"]),
                      _n(r["xdp_established"]), _n(r["xdp_new"]),
                      str(r.get("measurements", 1)),
                      "yes" if r["verified"] else "**no**"])
    out += _table(["services", "backends", "tc empty", "tc pass", "tc established", "tc new",
                   "XDP empty", "XDP pass", "XDP established", "XDP new", "measured",
                   "verified"], table)
    flat: dict[str, Any] = {}
    for key in ("tc_established", "xdp_established", "tc_new", "xdp_new"):
        worst = 0.0
        for b in {r["backends"] for r in rows}:
            pts = [r[key] for r in rows if r["backends"] == b]
            if len(pts) > 1 and min(pts) > 0:
                worst = max(worst, max(pts) / min(pts))
        flat[key] = worst or None
    out += ["Spread over the service counts (largest / smallest, worst backend count): " +
            ", ".join(f"{k.replace('_', ' ')} {_ratio(v)}" for k, v in flat.items()) + ".", "",
            f"![packet cost]({_packet_plot(rows)})", ""]
    return out, flat


def _control_section(doc: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    ours = doc["xdplb"]
    base = doc["baselines"]
    out = ["## 3. Control plane: programming services (10 endpoints each)", "",
           "xdplb: `desired.compute` over the cluster model, then `Reconciler.sync` into the "
           "pinned maps of a loaded datapath, in a fresh process per size. From empty: "
           f"the median of {doc['method'].get('rounds', 1)} rounds, every service removed "
           "between them (one sync of an empty cluster, its own column). A change is "
           "applied as the agent does: the snapshot as a change-tracking watch delivers it "
           "(the changed objects new, the others kept, `Cluster.changes` naming the "
           "service), `desired.compute` through the agent's memo (which computes that one "
           "service again), then a sync of the frontends that changed. One change = one "
           "endpoint of one service replaced, median of "
           f"{doc['method']['changes']}. Peak RSS is the agent process's high-water mark "
           "while programming (after the programs were loaded, less lb_maglev's pages, which "
           "the kernel allocates at load and maps whole into the agent at its first Maglev "
           "write) and for the whole process (BCC's compiler and the mapped array "
           "included).", "",
           "Baselines: kube-proxy's rule sets for the same services loaded into a throwaway "
           "namespace. iptables: `iptables-restore --noflush --counters`; one change is the "
           "partial restore kube-proxy >= 1.28 sends (KUBE-SERVICES and the other top-level "
           "chains in full, plus the changed service's chains), `full resync` the complete "
           "restore (its periodic resync, and every change before 1.28). nftables: `nft -f`; "
           "one change is the transaction kube-proxy's nftables mode sends (new endpoint "
           "chain, service chain flushed and rewritten, old endpoint chain removed). Peak RSS "
           "is the tool's. Sizes projected to take longer than "
           f"{doc['method']['load_cap_seconds']:.0f} s were not run.", ""]
    rows = []
    for r in ours:
        programming = (r["peak_rss_programming_kib"] - r["rss_loaded_kib"]
                       - r.get("rss_mapped_maps_kib", 0))
        rows.append([f"{r['services']:,}", _secs(_ours(r, "compute")),
                     _secs(r["sync_seconds"]), _secs(_ours_program(r)),
                     _secs(r.get("remove_all_seconds")),
                     _secs(_ours_change(r)), _secs(r["change_sync_seconds"]),
                     f"{programming / 1024:.0f} MiB (+{r['rss_loaded_kib'] / 1024:.0f})",
                     f"{programming / 1024 / (r['services'] / 1000):.1f} MiB",
                     f"{r['peak_rss_process_kib'] / 1024:.0f} MiB"])
    out += ["### xdplb", ""]
    out += _table(["services", "compute", "sync", "program (compute + sync)",
                   "every service removed", "change (compute + sync)", "change: sync alone",
                   "RSS programming (+loaded)", "per 1,000 services", "RSS peak"], rows)
    rows = []
    for b in base:
        if b.get("skipped"):
            rows.append([b["tool"], f"{b['services']:,}", "n/a",
                         f"~{_secs(b['load_projected_seconds'])} (projected, not run)",
                         "n/a", "n/a", "n/a"])
            continue
        rows.append([b["tool"], f"{b['services']:,}", f"{b['rules']:,}",
                     _secs(b["load_seconds"]), _secs(b["change_seconds"]),
                     _secs(b.get("full_resync_seconds")),
                     f"{b['peak_rss_tool_kib'] / 1024:.0f} MiB"])
    churn = [r for r in ours if "churn_seconds" in r]
    if churn:
        out += ["### xdplb: churn", "",
                "One service added (10 endpoints); a rollout behind one service of 100 "
                "endpoints: each endpoint replaced in turn, one EndpointSlice update each "
                "(compute + sync of every step).", ""]
        out += _table(["services", "one service added", "rollout: 100 changes in all",
                       "rollout: median change"],
                      [[f"{r['services']:,}", _secs(r["add_service_seconds"]),
                        _secs(r["churn_seconds"]), _secs(r["churn_change_seconds"])]
                       for r in churn])
    pol = doc.get("policy")
    if pol:
        out += ["### xdplb: NetworkPolicy", "",
                f"`PolicyWriter.sync` (compile, then the map writes that differ) over "
                f"{pol['pods']:,} pods and {pol['policies']:,} policies (the cluster of "
                f"`bench/policy_cost.py`: {pol['endpoints']:,} isolated local pods, "
                f"{pol['rules']:,} rules). One pod added: a pod its namespace's policies "
                "select, median of "
                f"{doc['method']['changes']}; the slowest of them (a pod that makes a new "
                "identity changes what the rules name, and is a whole compile). A Service "
                "change: a snapshot that keeps the pods, namespaces and policies, as the "
                "watch hands one out.", ""]
        slowest = pol.get("pod_added_max_seconds")
        out += _table(["first sync", "one pod added", "map writes for it",
                       "slowest pod added (writes)", "a Service change"],
                      [[_secs(pol["first_seconds"]), _secs(pol["pod_added_seconds"]),
                        f"{pol['pod_added_writes']:.0f}",
                        "-" if slowest is None else
                        f"{_secs(slowest)} ({pol['pod_added_max_writes']:.0f})",
                        _secs(pol["service_change_seconds"])]])
    out += ["### kube-proxy's rule sets", ""]
    out += _table(["tool", "services", "rules", "load from empty", "one change",
                   "full resync", "tool peak RSS"], rows)
    out += [f"![control plane]({_control_plot(doc)})", ""]
    return out, {"ours": ours, "base": base, "policy": pol}


# Per-packet targets over the empty program of the same hook (ns): path, hook, goal.
PACKET_GOALS = (("pass", "xdp", 10), ("pass", "tc", 10), ("established", "xdp", 50),
                ("established", "tc", 80))
NEW_FLOW_GOAL = 400
# The control plane's goals (seconds).
PROGRAM_10K_GOAL = 1.0
CHANGE_GOAL = 0.005

TARGETS_JSON = RESULTS_DIR / "targets.json"


@dataclass(frozen=True)
class Target:
    """One row of the target table: `met` is None when nothing measured it."""

    name: str
    goal: str
    measured: str
    met: bool | None


def _packet_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """The worst row of each path against its goal; `new` is already net of the
    single-run overhead, so it is compared as it stands."""
    out: list[Target] = []
    if not rows or any("tc_empty" not in r for r in rows):
        return out
    for path, hook, goal in PACKET_GOALS:
        worst = max(r[f"{hook}_{path}"] - r[f"{hook}_empty"] for r in rows)
        out.append(Target(f"{'XDP' if hook == 'xdp' else hook} {path}: cost over the empty "
                          "program", f"at most {goal} ns", f"{worst:.0f} ns (worst row)",
                          worst <= goal))
    worst_new = max(max(r["tc_new"], r["xdp_new"]) for r in rows)
    out.append(Target("a new flow", f"at most {NEW_FLOW_GOAL} ns",
                      f"{worst_new:.0f} ns (worst row)", worst_new <= NEW_FLOW_GOAL))
    return out


def _tail_target(tail: dict[str, Any]) -> Target:
    """Keep-alive p99 against nftables', medians over the runs of tail_latency."""
    by = {(r["path"], r["kind"]): r["p99_ms"] for r in tail["summary"]}
    pairs = [(path, by[(path, "xdplb")], by[(path, "nftables")]) for path, kind in by
             if kind == "xdplb" and (path, "nftables") in by]
    return Target(f"keep-alive p99 (median over {tail['method']['repetitions']} runs)",
                  "at or below nftables'",
                  "; ".join(f"{p} {ours:.2f} vs {theirs:.2f} ms" for p, ours, theirs in pairs),
                  all(ours <= theirs for _, ours, theirs in pairs) if pairs else None)


def _request_targets(req: dict[str, Any]) -> list[Target]:
    one = [v for v in req["direct"] if v[1] == "keepalive" and v[0] == "clusterip-one"]
    ka = [v for v in req["direct"] if v[1] == "keepalive" and v[0] != "clusterip-one"]
    conn = [v for v in req["direct"] if v[1] == "connections"]
    beats = req["beats"]
    lost = [f"{p} {load} {n:,} vs {k} {_ratio(r)}" for p, load, n, k, r in beats if r < 1]
    return [
        Target("keep-alive requests/s, one backend (translation alone)",
               "within 3% of direct",
               ", ".join(f"{n:,} services: {_ratio(r)}" for _, _, n, r in one) or "n/a",
               min(r for *_, r in one) >= 0.97 if one else None),
        Target("keep-alive requests/s, two backends", "within 3% of direct",
               ", ".join(f"{p} {n:,}: {_ratio(r)}" for p, _, n, r in ka) or "n/a",
               min(r for *_, r in ka) >= 0.97 if ka else None),
        Target("new connections/s against direct", "(for reference)",
               ", ".join(f"{p} {n:,}: {_ratio(r)}" for p, _, n, r in conn) or "n/a", None),
        Target("requests/s against both rule-based baselines", "ahead on every row",
               f"{len(beats) - len(lost)} of {len(beats)} rows"
               + (f"; behind: {'; '.join(lost)}" if lost else ""),
               not lost if beats else None),
    ]


def _control_targets(cp: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    at = {r["services"]: r for r in cp["ours"]}
    r10 = at.get(10_000)
    if r10:
        program = _ours_program(r10)
        out.append(Target("10k services programmed from empty", f"under {_secs(PROGRAM_10K_GOAL)}",
                          f"{_secs(program)} (compute + sync)", program < PROGRAM_10K_GOAL))
    for n in (30_000, 100_000):
        r = at.get(n)
        if r:
            change = _ours_change(r)
            out.append(Target(f"one endpoint change at {n // 1000}k services",
                              f"under {_secs(CHANGE_GOAL)} (compute + sync)",
                              f"{_secs(change)} (compute + sync), "
                              f"{_secs(r['change_sync_seconds'])} (sync alone)",
                              change < CHANGE_GOAL))
    pol = cp.get("policy")
    if pol:
        took = pol["pod_added_seconds"]
        out.append(Target(f"one pod added under {pol['policies']:,} policies",
                          f"under {_secs(CHANGE_GOAL)} (compile + map writes)",
                          f"{_secs(took)} ({pol['pod_added_writes']:.0f} map writes)",
                          took < CHANGE_GOAL))
    lost_cp = []
    total_cp = 0
    for b in cp["base"]:
        if b.get("skipped"):
            continue
        r = at.get(b["services"])
        if not r:
            continue
        total_cp += 2
        if _ours_program(r) >= b["load_seconds"]:
            lost_cp.append(f"load {b['tool']} {b['services']:,}")
        if _ours_change(r) >= b["change_seconds"]:
            lost_cp.append(f"change {b['tool']} {b['services']:,}")
    out.append(Target("control plane against the rule-set baselines", "ahead on every row",
                      f"{total_cp - len(lost_cp)} of {total_cp} rows"
                      + (f"; behind: {', '.join(lost_cp)}" if lost_cp else ""),
                      not lost_cp if total_cp else None))
    return out


def targets(req: dict[str, Any] | None, flat: dict[str, Any] | None,
            cp: dict[str, Any] | None, pkt_rows: list[dict[str, Any]] | None = None,
            tail: dict[str, Any] | None = None) -> list[Target]:
    out: list[Target] = []
    if req is not None:
        out += _request_targets(req)
    if tail is not None:
        out.append(_tail_target(tail))
    if flat is not None:
        est = [v for k, v in flat.items() if k.endswith("established") and v]
        out.append(Target("packet cost from 1 to 100k services", "flat (at most 1.1x)",
                          ", ".join(f"{k.replace('_', ' ')} {_ratio(v)}"
                                    for k, v in flat.items()),
                          max(est) <= 1.1 if est else None))
    out += _packet_targets(pkt_rows or [])
    if cp is not None:
        out += _control_targets(cp)
    return out


def _targets_md(rows: Sequence[Target]) -> list[str]:
    return ["## Targets", "", "Reported, not asserted (also in `bench/results/targets.json`). "
            "Ratios are this project over the other (higher is better for requests/s).", "",
            *_table(["target", "goal", "measured", "met"],
                    [[t.name, t.goal, t.measured, "" if t.goal == "(for reference)"
                      else _yes(t.met)] for t in rows])]


def _others() -> list[tuple[dict[str, Any], list[str], list[Target]]]:
    """Results of other benchmark modules in bench/ that render themselves: a module
    `bench.<name>` with `markdown(doc) -> list[str]` and, optionally,
    `targets(doc) -> list[dict]` (rows of the target table, Target's fields)."""
    names = {p.name[11:-5].removesuffix("-quick") for p in RESULTS_DIR.glob("*.json")}
    out = []
    for name in sorted(names - {"requests", "packet_cost", "control_plane"}):
        try:
            module = importlib.import_module(f"bench.{name}")
        except ImportError:
            continue
        render = getattr(module, "markdown", None)
        doc = newest(name)
        if callable(render) and doc is not None:
            judge = getattr(module, "targets", None)
            rows = [Target(**t) for t in judge(doc)] if callable(judge) else []
            out.append((doc, list(render(doc)), rows))
    return out


def write() -> Path:
    req = newest("requests")
    pkt = newest("packet_cost")
    cp = newest("control_plane")
    others = _others()
    docs = [d for d in (req, pkt, cp) if d is not None] + [d for d, _, _ in others]
    out = ["# Benchmarks", "",
           "Generated by `python -m bench` (`make bench`; `make bench-quick` runs every row at "
           "the smallest scale) from the newest files in `bench/results/`. Every comparison "
           "was measured in the same run; nothing here is asserted by a test.", ""]
    if not docs:
        out += ["No results yet: run `python -m bench`.", ""]
        RESULTS_MD.write_text("\n".join(out))
        return RESULTS_MD
    sections: list[str] = []
    req_v = flat = cp_v = None
    if req is not None:
        lines, req_v = _requests_section(req)
        sections += lines
    if pkt is not None:
        lines, flat = _packet_section(pkt)
        sections += lines
    if cp is not None:
        lines, cp_v = _control_section(cp)
        sections += lines
    for _, lines, _ in others:
        sections += [*lines, ""]
    out += _machine(docs)
    rows = targets(req_v, flat, cp_v, pkt["rows"] if pkt is not None else None,
                   newest("tail_latency"))
    rows += [t for _, _, more in others for t in more]
    TARGETS_JSON.write_text(json.dumps([asdict(t) for t in rows], indent=1) + "\n")
    out += _targets_md(rows)
    out += sections
    notes = BENCH_DIR / "NOTES.md"
    if notes.exists():
        out += [notes.read_text().rstrip(), ""]
    RESULTS_MD.write_text("\n".join(out))
    return RESULTS_MD
