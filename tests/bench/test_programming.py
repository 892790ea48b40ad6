"""The network-programming benchmark's own pieces: kube-proxy's chain names (checked
against kube-proxy's own test fixtures, pkg/proxy/iptables/proxier_test.go and
pkg/proxy/nftables/helpers_test.go of v1.34), histogram quantiles and the targets."""

from __future__ import annotations

from bench import programming, workload

SVC1 = workload.SvcSpec("svc1", "172.30.0.41", 80, 80, ("10.180.0.1",), port_name="p80",
                        namespace="ns1")


def test_chain_names_are_kube_proxys() -> None:
    assert programming.nft_service_chain(SVC1) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert programming.iptables_service_chain(SVC1) == "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert programming.iptables_endpoint_chain(SVC1, "10.180.0.1") == "KUBE-SEP-SXIVWICOYRO3J4NJ"


def test_histogram_quantiles_are_bucket_bounds_of_the_observations_between_scrapes() -> None:
    text = """# TYPE x_seconds histogram
x_seconds_bucket{le="0.01"} %d
x_seconds_bucket{le="0.1"} %d
x_seconds_bucket{le="1.0"} %d
x_seconds_bucket{le="+Inf"} %d
x_seconds_count %d
x_seconds_sum %f
"""
    before = programming.histograms(text % (5, 5, 5, 5, 5, 0.02), ["x_seconds"])["x_seconds"]
    # 100 more: 60 under 10 ms, 39 more under 100 ms, one under 1 s.
    after = programming.histograms(text % (65, 104, 105, 105, 105, 2.02),
                                   ["x_seconds"])["x_seconds"]
    s = programming.histogram_summary(before, after)
    assert s["count"] == 100
    assert s["p50_le_ms"] == 10.0 and s["p99_le_ms"] == 100.0
    assert abs(s["mean_ms"] - 20.0) < 1e-9


def _row(proxy: str, services: int, p50: float, p99: float, first: float) -> dict[str, object]:
    return {"proxy": proxy, "services": services, "missed": 0, "first_sync_seconds": first,
            "latency_ms": {"p50": p50, "p99": p99}}


def test_targets_judge_the_10k_p99_and_every_row_against_kube_proxy() -> None:
    doc = {"rows": [_row("xdplb", 10_000, 20, 80, 9.0),
                    _row("kube-proxy nftables", 10_000, 300, 900, 4.0),
                    _row("kube-proxy iptables", 10_000, 10, 1200, 12.0)]}
    p99, versus = programming.targets(doc)
    assert p99["met"] is True and p99["measured"] == "80.0 ms"
    assert versus["met"] is False
    assert versus["measured"] == ("4 of 6 rows; behind: first sync vs kube-proxy nftables "
                                  "at 10,000, p50 vs kube-proxy iptables at 10,000")
