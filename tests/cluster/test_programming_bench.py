"""The network-programming benchmark at its smallest, for real: a real API server, this
project's agent and the real kube-proxy binary (nftables and iptables modes), each
serving every change it was given, and each proxy's own network-programming histogram
counting those changes."""

from __future__ import annotations

import pytest

from bench import programming
from bench.common import Mode
from tests.conftest import require_root

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

CHANGES = 3


def test_every_proxy_serves_every_change() -> None:
    require_root()
    doc = programming.run(Mode(quick=True), sizes=(20,), changes=CHANGES)
    rows = {r["proxy"]: r for r in doc["rows"]}
    assert set(rows) == set(programming.PROXIES)
    for proxy, r in rows.items():
        assert r["missed"] == 0, proxy
        assert r["latency_ms"] is not None and 0 < r["latency_ms"]["max"] < 1000 * \
            programming.CHANGE_TIMEOUT, proxy
        # The trigger-time annotation reached the proxy's own histogram for every change.
        assert r["own_programming"]["count"] >= CHANGES, (proxy, r["own_programming"])
        assert r["own_sync"]["count"] >= 1, proxy
        assert r["first_sync_seconds"] > 0 and r["rss_mib"] > 0, proxy
    table = programming.markdown(doc)
    assert sum(line.startswith("| 20 |") for line in table) == len(programming.PROXIES)
