#!/usr/bin/env bash
# Build flanneld (github.com/flannel-io/flannel) from its Go module, for the
# cluster's "--cni flannel" mode, into the machine-level cache
# $XDPLB_CACHE_DIR/flannel-<version>/bin (default /var/cache/xdplb), the way
# tools/k8s-build.sh builds Kubernetes. The last line of stdout is the bin
# directory; --check builds nothing and exits 1 when it is not there yet.
#
# flanneld's main links every backend, and the Tencent Cloud VPC SDK that one
# of them imports is not served by the module proxy here: a stand-in module
# (tools/cluster/tencentvpc-stub) replaces it. Only host-gw is used. Its udp
# backend needs cgo, so this build, unlike the Kubernetes one, keeps it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VERSION="${XDPLB_FLANNEL_VERSION:-v0.28.10}"
CACHE_ROOT="${XDPLB_CACHE_DIR:-/var/cache/xdplb}"
RECIPE=1
OUT="$CACHE_ROOT/flannel-$VERSION"
BIN="$OUT/bin"
STAMP="$OUT/.complete"

log() { echo "flannel-build: $*" >&2; }
stamp_text() { echo "recipe=$RECIPE flannel=$VERSION stub=$(cat "$HERE"/tencentvpc-stub/go.mod "$HERE"/tencentvpc-stub/*/*.go | sha256sum | cut -c1-12)"; }
is_complete() { [ -x "$BIN/flanneld" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$(stamp_text)" ]; }

if is_complete; then echo "$BIN"; exit 0; fi
[ "${1:-}" = "--check" ] && { log "flanneld $VERSION is not built yet in $OUT"; exit 1; }
command -v go >/dev/null || { log "go is not installed"; exit 1; }

mkdir -p "$CACHE_ROOT"
exec 9>"$OUT.lock"
flock 9
if is_complete; then echo "$BIN"; exit 0; fi

work=$(mktemp -d "$CACHE_ROOT/.build-flannel.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The stand-in is copied in, so the build does not depend on where this clone is.
cp -r "$HERE/tencentvpc-stub" "$work/tencentvpc-stub"
cat >"$work/go.mod" <<MOD
module xdplb.invalid/flanneld

go 1.24

require github.com/flannel-io/flannel $VERSION

replace github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc => ./tencentvpc-stub
MOD
start=$(date +%s)
log "flanneld $VERSION"
(cd "$work" && GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" \
    go build -mod=mod -trimpath -ldflags "-s -w -X github.com/flannel-io/flannel/pkg/version.Version=$VERSION" \
    -o "$work/bin/flanneld" github.com/flannel-io/flannel) >&2
mkdir -p "$OUT"
rm -rf "$BIN"
mv "$work/bin" "$BIN"
stamp_text >"$STAMP"
log "built in $(($(date +%s) - start))s"
echo "$BIN"
