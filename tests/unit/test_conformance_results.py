"""Reading Ginkgo's JUnit report of e2e.test (tests/cluster/conformance.py)."""

from __future__ import annotations

from tests.cluster.conformance import parse_junit

CASES = (
    ('[BeforeSuite]', 'status="passed" time="1"', ''),
    ('[It] [sig-network] Services should serve a basic endpoint from pods [Conformance] '
     '[sig-network, Conformance]', 'status="passed" time="12.5"', ''),
    ('[It] [sig-network] Networking Granular Checks: Services should update endpoints: http '
     '[sig-network]', 'status="failed" time="95"', '<failure message="timed out">x</failure>'),
    ('[It] [sig-network] Services should be cut short [sig-network]',
     'status="interrupted" time="7"', '<failure message="interrupted">x</failure>'),
    ('[It] [sig-network] Services should be rejected for evicted pods [sig-network]',
     'status="skipped" time="0"', '<skipped message="skipped"></skipped>'),
    ('[It] [sig-network] Services should work with 3 nodes [sig-network]',
     'status="skipped" time="0.1"',
     '<skipped message="skipped - Need at least 3 nodes"></skipped>'),
)
REPORT = "<testsuites><testsuite>" + "".join(
    f'<testcase name="{n}" {a}>{body}</testcase>' for n, a, body in CASES) + \
    "</testsuite></testsuites>"


def test_names_lose_ginkgos_labels_but_keep_their_own_tags() -> None:
    rs = {r.name: r for r in parse_junit(REPORT)}
    assert set(rs) == {
        "[sig-network] Services should serve a basic endpoint from pods [Conformance]",
        "[sig-network] Networking Granular Checks: Services should update endpoints: http",
        "[sig-network] Services should work with 3 nodes",
    }, "specs not selected or cut short are left out; BeforeSuite only when it fails"
    failed = rs["[sig-network] Networking Granular Checks: Services should update endpoints: http"]
    assert (failed.status, failed.seconds, failed.message) == ("failed", 95.0, "timed out")
    assert rs["[sig-network] Services should work with 3 nodes"].status == "skipped"
