#!/usr/bin/env bash
# Run the upstream e2e.test against the cluster of tools/cluster/cluster.sh.
#
#   e2e.sh OUTDIR FOCUS [SKIP]
#
# FOCUS and SKIP are Ginkgo regular expressions over the full test names.
# e2e.test runs in node 1's network namespace (the API server's address and
# the nodes' addresses are reachable only there); its JUnit report lands in
# OUTDIR/junit.xml, its log in OUTDIR/e2e.log. Exit status: e2e.test's.
#
# With XDPLB_E2E_PROCS=N (N > 1) the Ginkgo CLI runs N e2e.test processes in
# parallel, as upstream's hack/ginkgo-e2e.sh does; [Serial] tests still run
# alone, after the rest. The CLI is built once from its Go module, at the
# version Kubernetes itself requires, into the machine's cache.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/cache.sh
. "$HERE/../lib/cache.sh"
STATE=${XDPLB_CLUSTER_DIR:-/var/lib/xdplb-cluster}
[ -e "$STATE/up" ] || { echo "e2e: no cluster is up ($STATE)" >&2; exit 1; }
out=$1 focus=$2 skip=${3:-}
BIN=$(cat "$STATE/bin")
PROCS=${XDPLB_E2E_PROCS:-1}
# k8s.io/kubernetes v1.34's go.mod requires github.com/onsi/ginkgo/v2 v2.21.0.
GINKGO_VERSION=v2.21.0
mkdir -p "$out"
out=$(cd "$out" && pwd)

build_ginkgo() {  # <work>
    printf 'module xdplb.invalid/ginkgo\n\ngo 1.24\n\nrequire github.com/onsi/ginkgo/v2 %s\n' \
        "$GINKGO_VERSION" >"$1/go.mod"
    echo "e2e: building the Ginkgo CLI $GINKGO_VERSION"
    (cd "$1" && GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" \
        go build -mod=mod -trimpath -o "$1/bin/ginkgo" github.com/onsi/ginkgo/v2/ginkgo)
}

# The framework's own flags; the Ginkgo ones follow, spelled for e2e.test
# itself or for the Ginkgo CLI.
args=(
    --kubeconfig="$STATE/admin.kubeconfig"
    --provider=local
    --num-nodes=2
    --kubectl-path="$BIN/kubectl"
    --report-dir="$out"
    --disable-log-dump
    --dump-logs-on-failure=false
    --allowed-not-ready-nodes=0
    --system-pods-startup-timeout=2m
    --node-schedulable-timeout=2m
    # Pods never pull: every image is imported on each node beforehand.
    --prepull-images=false
)
gargs=(--junit-report="$out/junit.xml" --focus="$focus" --timeout=2h --no-color)
[ -n "$skip" ] && gargs+=(--skip="$skip")
echo "e2e: focus '$focus'" >&2
[ -n "$skip" ] && echo "e2e: skip '$skip'" >&2
cd "$out"
rc=0
if [ "$PROCS" -gt 1 ]; then
    ginkgo=$(cache_build "ginkgo-$GINKGO_VERSION" "ginkgo=$GINKGO_VERSION" build_ginkgo)/ginkgo
    echo "e2e: $PROCS processes in parallel" >&2
    nsenter --net=/run/netns/xk-n1 -- "$ginkgo" --procs="$PROCS" "${gargs[@]}" \
        "$BIN/e2e.test" -- "${args[@]}" >"$out/e2e.log" 2>&1 || rc=$?
else
    nsenter --net=/run/netns/xk-n1 -- "$BIN/e2e.test" "${args[@]}" "${gargs[@]/#--/--ginkgo.}" \
        >"$out/e2e.log" 2>&1 || rc=$?
fi
grep -E '^(Ran [0-9]+ of|FAIL!|SUCCESS!|PASS|FAIL)' "$out/e2e.log" >&2 || true
exit "$rc"
