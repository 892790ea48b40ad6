"""Kubernetes' own sig-network e2e tests as the judge, on the real two-node
cluster of tools/cluster/cluster.sh: the same selection with real kube-proxy
(nftables mode) and with the xdplb DaemonSet, one row per test in
CONFORMANCE.md.

    python -m tests.cluster.conformance [--selection full|conformance|smoke] [--out FILE]
                                        [--proxies kube-proxy,xdplb] [--only REGEX]
                                        [--resume] [--results DIR] [--procs N]

Each run's results merge into DIR (tests/cluster/results/<selection>.<run>.json,
the run being the proxy, and the CNI when it is not the bridge plugin);
CONFORMANCE.md is written from all of them. --only narrows the selection,
--resume skips what the proxy has passed already: the full selection takes
hours per proxy, so it is run in parts. The cluster must be up (`make
conformance` brings it up and down)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "tools" / "cluster" / "cluster.sh"
E2E = REPO / "tools" / "cluster" / "e2e.sh"


@dataclass(frozen=True)
class Selection:
    focus: str
    skips: tuple[tuple[str, str], ...]


# Skipped, each for its reason; everything else the focus names runs.
SKIPS: tuple[tuple[str, str], ...] = (
    (r"LoadBalancer", "needs a cloud provider's LoadBalancer controller"),
    (r"IPv6|[Dd]ual[- ]?[Ss]tack", "IPv6 and dual-stack: this datapath serves IPv4 only so far"),
    (r"\[Disruptive\]", "restarts node components or the API server over SSH"),
    (r"\[Feature:Networking-Performance\]", "iperf2 across nodes: a benchmark, not a test of "
                                            "behaviour"),
    (r"\[Feature:NoSNAT\]", "needs a cluster set up without masquerading, a cloud's"),
    (r"\[Feature:SCTPConnectivity\]", "SCTP sockets: this machine's kernel has no SCTP "
                                       "(socket() fails with EPROTONOSUPPORT)"),
    (r"Internet connection", "needs the Internet (8.8.8.8, google.com): these machines are "
                             "offline"),
)

# The Services and the Networking granular checks, conntrack, NetworkPolicy,
# and every sig-network conformance test.
FULL = Selection(
    focus=(r"\[sig-network\] (Services|Networking|Conntrack|Netpol|NetworkPolicy)"
           r"|\[sig-network\].*\[Conformance\]"),
    skips=SKIPS,
)

# What `make test` runs on every landing: the Services conformance tests and a
# few NetworkPolicy tests (deny, allow by pod label, allow by namespace).
SMOKE_NETPOL = (
    "should support a 'default-deny-ingress' policy",
    "should support a 'default-deny-all' policy",
    "should enforce policy to allow traffic only from a pod in a different namespace based on "
    "PodSelector and NamespaceSelector",
)
SMOKE = Selection(
    focus=(r"\[sig-network\] Services.*\[Conformance\]"
           r"|\[sig-network\] Netpol NetworkPolicy between server and client ("
           + "|".join(re.escape(t) for t in SMOKE_NETPOL) + ")"),
    skips=SKIPS,
)

# Every sig-network conformance test (45 in v1.34).
CONFORMANCE = Selection(focus=r"\[sig-network\].*\[Conformance\]", skips=SKIPS)

SELECTIONS = {"full": FULL, "conformance": CONFORMANCE, "smoke": SMOKE}

PROXIES = ("kube-proxy", "xdplb")

NODEPORT_TEST = r"\[sig-network\] Services should be able to create a functioning NodePort service"


@dataclass(frozen=True)
class Result:
    name: str
    status: str  # passed | failed | skipped (at run time, by the test itself)
    seconds: float
    message: str = ""


def skip_regex(sel: Selection) -> str:
    return "|".join(f"({rx})" for rx, _ in sel.skips)


def cluster(*args: str, timeout: float = 900) -> None:
    subprocess.run(["bash", str(CLUSTER), *args], check=True, timeout=timeout)


def run_e2e(out: Path, focus: str, skip: str = "", timeout: float = 7200,
            procs: int = 1) -> list[Result]:
    """e2e.test over the selection, in `procs` parallel processes; the results
    of the tests that ran."""
    env = {**os.environ, "XDPLB_E2E_PROCS": str(procs)}
    subprocess.run(["bash", str(E2E), str(out), focus, skip], check=False, timeout=timeout,
                   env=env)
    junit = out / "junit.xml"
    if not junit.is_file():
        raise RuntimeError(f"e2e.test wrote no report; see {out / 'e2e.log'}")
    return parse_junit(junit.read_text())


def strip_labels(name: str) -> str:
    return re.sub(r" \[sig-[^\]]*\]$", "", name)


def parse_junit(text: str) -> list[Result]:
    """Ginkgo's JUnit report: every spec of the suite is listed; the ones
    filtered out carry status="skipped" with a <skipped> message of
    "skipped" and no time, a test that skipped itself says why."""
    out = []
    for case in ET.fromstring(text).iter("testcase"):
        name = case.get("name", "")
        status = case.get("status", "")
        if not name.startswith("[It] "):
            # BeforeSuite / AfterSuite: reported only when they fail.
            if status == "failed":
                failure = case.find("failure")
                msg = failure.get("message", "") if failure is not None else ""
                out.append(Result(name, "failed", float(case.get("time", "0")), msg))
            continue
        # Ginkgo appends the labels, e.g. " [sig-network, Conformance]" or
        # " [sig-network]"; the sig's label comes first.
        name = strip_labels(name[len("[It] "):])
        if status == "interrupted":
            continue  # the run was cut short (--resume runs it again)
        if status == "skipped":
            skipped = case.find("skipped")
            msg = skipped.get("message", "") if skipped is not None else ""
            if msg.strip() in ("", "skipped"):
                continue  # not selected
            out.append(Result(name, "skipped", float(case.get("time", "0")), msg))
            continue
        failure = case.find("failure")
        msg = failure.get("message", "") if failure is not None else ""
        out.append(Result(name, "passed" if status == "passed" else "failed",
                          float(case.get("time", "0")), msg))
    return out


def run_with(proxy: str, focus: str, skip: str, out: Path, procs: int) -> list[Result]:
    cluster("proxy", proxy)
    return run_e2e(out / proxy, focus, skip, procs=procs)


# --- results, kept per selection and proxy, merged over runs ------------------------
# A full selection takes hours per proxy, so it is run in parts (--only) and
# each part's results replace the same tests' earlier ones.

def cluster_cni() -> str:
    """The CNI the cluster is up with (cluster.sh up --cni)."""
    state = Path(os.environ.get("XDPLB_CLUSTER_DIR", "/var/lib/xdplb-cluster"))
    try:
        return (state / "cni").read_text().strip()
    except FileNotFoundError:
        return "bridge"


def run_label(proxy: str, cni: str) -> str:
    """The column a run fills: the proxy, and the CNI when it is not the
    bridge plugin the cluster uses by default."""
    return proxy if cni == "bridge" else f"{proxy} on {cni}"


def results_file(results: Path, sel_name: str, label: str) -> Path:
    return results / f"{sel_name}.{label.replace(' ', '_')}.json"


def labels_of(results: Path, sel_name: str) -> list[str]:
    found = [p.name[len(sel_name) + 1:-len(".json")].replace("_", " ")
             for p in results.glob(f"{sel_name}.*.json")]
    return sorted(found, key=lambda lb: (lb not in PROXIES, PROXIES.index(lb)
                                         if lb in PROXIES else 0, lb))


def load_results(path: Path) -> dict[str, dict[str, object]]:
    if not path.is_file():
        return {}
    data: dict[str, dict[str, object]] = json.loads(path.read_text())
    return data


def merge_results(path: Path, rs: list[Result], when: str) -> None:
    rows = load_results(path)
    for r in rs:
        rows[r.name] = {"status": r.status, "seconds": round(r.seconds, 1),
                        "message": r.message[:2000], "run": when}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sorted(rows.items())), indent=1) + "\n")


def report(results: Path) -> str:
    lines = [
        "# sig-network e2e: kube-proxy and xdplb on the same two nodes",
        "",
        "Kubernetes v1.34.12 `e2e.test`, run by `python -m tests.cluster.conformance` on "
        f"{platform.node()} ({platform.machine()}, kernel {platform.release()}, 2 CPUs). "
        "Two nodes, each a network namespace with its own containerd and kubelet, pods on "
        "the bridge CNI, routes between the nodes' pod CIDRs (tools/cluster/cluster.sh). "
        "kube-proxy runs in nftables mode; xdplb is the DaemonSet of deploy/ with "
        "kube-proxy absent. \"on flannel\": flanneld (host-gw) leases the nodes' subnets and "
        "routes between them instead. kube-proxy implements no NetworkPolicy and neither CNI "
        "enforces any, so with kube-proxy the NetworkPolicy tests that expect a denial fail: "
        "they are the control that shows those tests can fail. Parts of the selection ran in "
        "4 parallel `e2e.test` processes (`--procs 4`, as upstream's CI runs them; [Serial] "
        "tests alone); seconds are each test's own. Raw results, with each failure's message: "
        f"`{results.relative_to(REPO) if results.is_relative_to(REPO) else results}/`.",
    ]
    for sel_name, sel in SELECTIONS.items():
        by = {p: load_results(results_file(results, sel_name, p))
              for p in labels_of(results, sel_name)}
        by = {p: rows for p, rows in by.items() if rows}
        if not by:
            continue
        proxies = list(by)
        names = sorted({n for rows in by.values() for n in rows})
        runs = sorted({str(row["run"]) for rows in by.values() for row in rows.values()})
        lines += [
            "", f"## Selection `{sel_name}`", "",
            f"Focus: `{sel.focus}`", "",
            f"Run {', '.join(runs)}.", "",
            "| test | " + " | ".join(proxies) + " | seconds (" + ", ".join(proxies) + ") |",
            "|---|" + "---|" * len(proxies) + "---|",
        ]
        for n in names:
            cells = [str(by[p][n]["status"]) if n in by[p] else "not run" for p in proxies]
            secs = [f"{float(str(by[p][n]['seconds'])):.0f}" if n in by[p] else "-"
                    for p in proxies]
            lines.append(f"| {n.replace('|', '/')} | " + " | ".join(cells) + " | "
                         + ", ".join(secs) + " |")
        lines += ["", "Totals:", ""]
        for p in proxies:
            rows = by[p]
            counts = {s: sum(1 for r in rows.values() if r["status"] == s)
                      for s in ("passed", "failed", "skipped")}
            total = sum(float(str(r["seconds"])) for r in rows.values())
            lines.append(f"- {p}: {counts['passed']} passed, {counts['failed']} failed, "
                         f"{counts['skipped']} skipped by the test itself; "
                         f"{total:.0f} s in tests")
        if "kube-proxy" in by and "xdplb" in by:
            base, ours = by["kube-proxy"], by["xdplb"]
            worse = [n for n in names if n in base and base[n]["status"] == "passed"
                     and n in ours and ours[n]["status"] != "passed"]
            better = [n for n in names if n in ours and ours[n]["status"] == "passed"
                      and n in base and base[n]["status"] != "passed"]
            lines += ["", f"Passed with kube-proxy, not with xdplb: {len(worse)}"]
            lines += [f"- {n}" for n in worse]
            lines += ["", f"Passed with xdplb, not with kube-proxy: {len(better)}"]
            lines += [f"- {n}" for n in better]
    lines += ["", "## Skipped, and why", ""]
    lines += [f"- `{rx}`: {why}" for rx, why in SKIPS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="conformance")
    ap.add_argument("--selection", choices=tuple(SELECTIONS), default="full")
    ap.add_argument("--proxies", default="kube-proxy,xdplb")
    ap.add_argument("--only", default="",
                    help="a regular expression: run only the selected tests it also matches")
    ap.add_argument("--resume", action="store_true",
                    help="skip the tests this proxy has passed already (a run cut short)")
    ap.add_argument("--out", type=Path, default=REPO / "CONFORMANCE.md")
    ap.add_argument("--results", type=Path, default=REPO / "tests" / "cluster" / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xdplb-conformance"))
    ap.add_argument("--procs", type=int, default=1,
                    help="e2e.test processes in parallel ([Serial] tests still run alone)")
    args = ap.parse_args(argv)
    cni = cluster_cni()
    sel = SELECTIONS[args.selection]
    # Ginkgo has no "and" of focuses: --only narrows the focus, the selection's
    # own focus still has to match (checked on the results).
    focus = args.only or sel.focus
    for proxy in args.proxies.split(","):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        path = results_file(args.results, args.selection, run_label(proxy, cni))
        skip = skip_regex(sel)
        if args.resume:
            done = [n for n, row in load_results(path).items() if row["status"] == "passed"]
            skip = "|".join([skip, *(re.escape(n) for n in done)])
        rs = run_with(proxy, focus, skip, args.work, args.procs)
        rs = [r for r in rs if re.search(sel.focus, r.name)]
        merge_results(path, rs, when)
        failed = [r.name for r in rs if r.status == "failed"]
        print(f"conformance: {proxy}: {len(rs)} tests, {len(failed)} failed",
              file=sys.stderr)
    args.out.write_text(report(args.results))
    print(f"conformance: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
