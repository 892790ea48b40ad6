#!/usr/bin/env bash
# Run the upstream e2e.test against the cluster of tools/cluster/cluster.sh.
#
#   e2e.sh OUTDIR FOCUS [SKIP]
#
# FOCUS and SKIP are Ginkgo regular expressions over the full test names.
# e2e.test runs in node 1's network namespace (the API server's address and
# the nodes' addresses are reachable only there); its JUnit report lands in
# OUTDIR/junit.xml, its log in OUTDIR/e2e.log. Exit status: e2e.test's.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
STATE=${XDPLB_CLUSTER_DIR:-/var/lib/xdplb-cluster}
[ -e "$STATE/up" ] || { echo "e2e: no cluster is up ($STATE)" >&2; exit 1; }
out=$1 focus=$2 skip=${3:-}
BIN=$(cat "$STATE/bin")
mkdir -p "$out"
out=$(cd "$out" && pwd)
args=(
    --kubeconfig="$STATE/admin.kubeconfig"
    --provider=local
    --num-nodes=2
    --kubectl-path="$BIN/kubectl"
    --report-dir="$out"
    --ginkgo.junit-report="$out/junit.xml"
    --ginkgo.focus="$focus"
    --ginkgo.timeout=2h
    --ginkgo.no-color
    --disable-log-dump
    --dump-logs-on-failure=false
    --allowed-not-ready-nodes=0
    --system-pods-startup-timeout=2m
    --node-schedulable-timeout=2m
    # Pods never pull: every image is imported on each node beforehand.
    --prepull-images=false
)
[ -n "$skip" ] && args+=(--ginkgo.skip="$skip")
echo "e2e: focus '$focus'" >&2
[ -n "$skip" ] && echo "e2e: skip '$skip'" >&2
cd "$out"
rc=0
nsenter --net=/run/netns/xk-n1 -- "$BIN/e2e.test" "${args[@]}" >"$out/e2e.log" 2>&1 || rc=$?
grep -E '^(Ran [0-9]+ of|FAIL!|SUCCESS!|PASS|FAIL)' "$out/e2e.log" >&2 || true
exit "$rc"
