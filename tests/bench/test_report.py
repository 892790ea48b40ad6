"""The target table: each goal judged from the rows it is about."""

from __future__ import annotations

import json
from dataclasses import asdict

from bench import report


def test_packet_targets_judge_the_worst_row_over_its_empty_program() -> None:
    rows = [{"tc_empty": 30, "tc_pass": 35, "xdp_empty": 20, "xdp_pass": 25,
             "xdp_established": 60, "tc_established": 100, "tc_new": 300, "xdp_new": 350},
            {"tc_empty": 30, "tc_pass": 38, "xdp_empty": 20, "xdp_pass": 45,
             "xdp_established": 71, "tc_established": 105, "tc_new": 390, "xdp_new": 420}]
    got = {t.name: t for t in report.targets(None, None, None, rows)}
    assert got["tc pass: cost over the empty program"].met is True  # 8 ns at worst
    xdp_pass = got["XDP pass: cost over the empty program"]
    assert (xdp_pass.met, xdp_pass.measured) == (False, "25 ns (worst row)")
    assert got["XDP established: cost over the empty program"].met is False  # 51 ns
    assert got["tc established: cost over the empty program"].met is True  # 75 ns
    assert got["a new flow"].met is False and got["a new flow"].goal == "at most 400 ns"


def test_control_targets_and_their_json() -> None:
    cp = {"ours": [{"services": 10_000, "compute_seconds": 0.2, "sync_seconds": 0.5,
                    "change_seconds": 0.004, "change_sync_seconds": 0.003},
                   {"services": 30_000, "compute_seconds": 0.9, "sync_seconds": 2.0,
                    "change_seconds": 0.02, "change_sync_seconds": 0.01}],
          "base": [{"tool": "nftables", "services": 10_000, "load_seconds": 78.0,
                    "change_seconds": 1.0}]}
    cp["policy"] = {"policies": 1000, "pod_added_seconds": 0.16, "pod_added_writes": 150}
    rows = report.targets(None, None, cp)
    got = {t.name: t for t in rows}
    pod = got["one pod added under 1,000 policies"]
    assert (pod.met, pod.measured) == (False, "160 ms (150 map writes)")
    assert got["10k services programmed from empty"].met is True  # 0.7 s
    assert got["one endpoint change at 30k services"].met is False  # 20 ms
    assert got["control plane against the rule-set baselines"].met is True
    doc = json.loads(json.dumps([asdict(t) for t in rows]))
    assert all(set(d) == {"name", "goal", "measured", "met"} for d in doc)
