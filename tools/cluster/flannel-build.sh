#!/usr/bin/env bash
# Build flanneld (github.com/flannel-io/flannel) from its Go module, for the
# cluster's "--cni flannel" mode, into the machine-level cache
# $XDPLB_CACHE_DIR/flannel-<version>/bin (default /var/cache/xdplb; see
# tools/lib/cache.sh). The last line of stdout is the bin directory; --check
# builds nothing and exits 1 when it is not there yet.
#
# flanneld's main links every backend, and the Tencent Cloud VPC SDK that one
# of them imports is not served by the module proxy here: a stand-in module
# (tools/cluster/tencentvpc-stub) replaces it. Only host-gw is used. Its udp
# backend needs cgo, so this build, unlike the Kubernetes one, keeps it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../lib/cache.sh
. "$HERE/../lib/cache.sh"
VERSION="${XDPLB_FLANNEL_VERSION:-v0.28.10}"
RECIPE=1

build() {  # <work>
    local work=$1
    command -v go >/dev/null || { echo "flannel-build: go is not installed"; return 1; }
    # The stand-in is copied in, so the build does not depend on where this clone is.
    cp -r "$HERE/tencentvpc-stub" "$work/tencentvpc-stub" || return 1
    cat >"$work/go.mod" <<MOD
module xdplb.invalid/flanneld

go 1.24

require github.com/flannel-io/flannel $VERSION

replace github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/vpc => ./tencentvpc-stub
MOD
    echo "flannel-build: flanneld $VERSION"
    (cd "$work" && GOTOOLCHAIN=local GOFLAGS="-buildvcs=false" \
        go build -mod=mod -trimpath \
        -ldflags "-s -w -X github.com/flannel-io/flannel/pkg/version.Version=$VERSION" \
        -o "$work/bin/flanneld" github.com/flannel-io/flannel)
}

stub=$(cat "$HERE"/tencentvpc-stub/go.mod "$HERE"/tencentvpc-stub/*/*.go | sha256sum | cut -c1-12)
[ "${1:-}" = "--check" ] && export CACHE_CHECK=1
cache_build "flannel-$VERSION" "recipe=$RECIPE flannel=$VERSION stub=$stub" build
