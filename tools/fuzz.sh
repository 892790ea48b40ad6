#!/usr/bin/env bash
# `make fuzz`: the differential test (kernel programs vs the userspace
# datapath) over FUZZ_PACKETS packets, in chunks of FUZZ_CHUNK packets, each
# its own pytest process with its own random seed, FUZZ_JOBS at a time. One
# process per chunk keeps Hypothesis's memory and pytest's per-test timeout
# bounded; a failing chunk prints its log (with the blob that reproduces it).
# Scenarios run up to FUZZ_MAX_OPS ops (CI's run: 100), so that more of the
# time goes to packets than to programming tables.
set -euo pipefail
cd "$(dirname "$0")/.."

total=${FUZZ_PACKETS:-1000000}
chunk=${FUZZ_CHUNK:-100000}
max_ops=${FUZZ_MAX_OPS:-200}
jobs=${FUZZ_JOBS:-$(nproc)}
chunks=$(( (total + chunk - 1) / chunk ))
logs=$(mktemp -d /tmp/xdplb-fuzz.XXXXXX)
trap 'rm -rf "$logs"' EXIT

run_chunk() {
    local i=$1 log="$logs/chunk-$1.log" start=$SECONDS
    if HYPOTHESIS_PROFILE=fuzz LB_DIFF_PACKETS="$chunk" LB_DIFF_MAX_OPS="$max_ops" .venv/bin/python -m pytest -q \
        -p no:cacheprovider tests/differential >"$log" 2>&1; then
        echo "fuzz: chunk $i of $chunks: $chunk packets, no divergence ($((SECONDS - start)) s)"
    else
        echo "fuzz: chunk $i of $chunks FAILED:"
        cat "$log"
        return 1
    fi
}
export -f run_chunk
export logs chunk chunks max_ops

start=$SECONDS
if seq 1 "$chunks" | xargs -P "$jobs" -I{} bash -c 'run_chunk {}'; then
    echo "fuzz: $((chunks * chunk)) packets through both datapaths, no divergence" \
         "($((SECONDS - start)) s)"
else
    exit 1
fi
