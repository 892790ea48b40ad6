"""The benchmarks' own pieces: kube-proxy rule sets that the real tools accept, and a
packet-cost smoke run through the real programs. Timings are not asserted."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from bench import kuberules, packet_cost, workload, wrk
from bench.common import Mode, throwaway_netns
from lb.datapath.instance import Sizes
from tests.conftest import require_root

NODE_IP = "192.0.2.1"


def specs() -> list[workload.SvcSpec]:
    return [*workload.fillers(3, 2),
            workload.SvcSpec("single", "10.96.0.11", 53, 5353, ("10.244.1.9",),
                             port_name="dns", protocol="UDP"),
            workload.SvcSpec("web", "10.96.0.10", 80, 8080, ("10.244.1.3", "10.244.1.4"),
                             node_port=30080)]


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    with throwaway_netns("test") as ns:
        yield ns


def ns_run(ns: str, argv: list[str], text: str = "") -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["ip", "netns", "exec", ns, *argv], input=text, text=True,
                         capture_output=True, timeout=60)
    assert res.returncode == 0, f"{' '.join(argv)}: {res.stderr}\n{text}"
    return res


@pytest.mark.parametrize("restore", ["iptables-restore", "iptables-legacy-restore"])
def test_iptables_rule_sets_are_accepted(netns: str, restore: str) -> None:
    full = kuberules.iptables_rules(specs())
    ns_run(netns, [restore, "--test", "--noflush"], kuberules.iptables_base())
    ns_run(netns, [restore, "--test", "--noflush"], full)
    # A partial sync refers to chains that exist already: load the full set first.
    ns_run(netns, [restore, "--noflush"], kuberules.iptables_base())
    ns_run(netns, [restore, "--noflush", "--counters"], full)
    old = specs()
    new = workload.with_endpoint_replaced(old[-1], 0, 1)
    partial = kuberules.iptables_rules(
        [*old[:-1], new], changed=[new],
        deleted_chains=[kuberules.sep_chain(old[-1], old[-1].endpoints[0])])
    ns_run(netns, [restore, "--test", "--noflush", "--counters"], partial)
    save = "iptables-save" if restore == "iptables-restore" else "iptables-legacy-save"
    nat = ns_run(netns, [save, "-t", "nat"]).stdout
    services = [ln for ln in nat.splitlines() if ln.startswith("-A KUBE-SERVICES")]
    # The measured service (last spec) is matched last, before the NodePort catch-all.
    assert "10.96.0.10/32" in services[-2] and "KUBE-NODEPORTS" in services[-1]
    assert "--probability 0.5000000000" in nat and "--to-destination 10.244.1.4:8080" in nat
    assert "-A KUBE-NODEPORTS" in nat and "--dport 30080" in nat


def test_nft_rule_sets_are_accepted(netns: str) -> None:
    old = specs()
    ruleset = kuberules.nft_ruleset(old, [NODE_IP])
    ns_run(netns, ["nft", "-c", "-f", "-"], ruleset)
    ns_run(netns, ["nft", "-f", "-"], ruleset)
    new = workload.with_endpoint_replaced(old[-1], 0, 1)
    ns_run(netns, ["nft", "-c", "-f", "-"], kuberules.nft_endpoint_change(old[-1], new))
    listing = ns_run(netns, ["nft", "list", "table", "ip", "kube-proxy"]).stdout
    assert "10.96.0.10 . tcp . 80 : goto service-" in listing
    assert "numgen random mod 2 vmap" in listing
    assert "tcp . 30080 : goto external-" in listing


def test_wrk_summary_is_read() -> None:
    out = """Running 2s test @ http://10.96.0.10/
  2 threads and 32 connections
  Latency Distribution
     50%  512.00us
     75%  845.00us
     90%    3.10ms
     99%    1.20s
  157130 requests in 2.01s, 22.48MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
Requests/sec:  78172.22
"""
    r = wrk.parse(out)
    assert (r.requests_per_s, r.requests, r.p50_ms, r.p99_ms) == (78172.22, 157130, 0.512, 1200)
    assert r.socket_errors == 5 and r.seconds == pytest.approx(2.01)


def test_packet_cost_smoke() -> None:
    require_root()
    small = Sizes(max_services=256, max_backends=1024, maglev_slots=1 << 16, ct_size=1 << 14)
    data = packet_cost.run(Mode(quick=True), scales=(1,), backends=(1,), repeat=1000,
                           trials=3, singles=100, sizes=small)
    (row,) = data["rows"]
    assert row["verified"], row["problems"]
    for key in ("tc_pass", "tc_established", "tc_new_raw", "xdp_pass", "xdp_established",
                "xdp_new_raw"):
        assert row[key] > 0, key
