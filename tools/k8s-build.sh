#!/usr/bin/env bash
# Build a pinned Kubernetes from source with Go: the control plane
# (kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd at the
# release that Kubernetes release itself depends on), the node (kubelet,
# kube-proxy), the upstream e2e suite (e2e.test) and its test images' binaries
# (agnhost, regression-issue-74839), and the cluster add-ons CoreDNS and
# crictl, each from its own module.
#
# The binaries land in a machine-level cache, $XDPLB_CACHE_DIR/k8s-<version>/bin
# (default /var/cache/xdplb), so every clone on the same machine reuses them.
# The script is idempotent and safe to run concurrently: the build happens under
# an exclusive flock and is published only when every binary is complete.
#
# Progress goes to stderr; the last line of stdout is the bin directory.
# With --check, nothing is built: exit 0 (printing the bin directory) when the
# binaries are already there, 1 when they are not.
#
# Technique: a throwaway Go module requires k8s.io/kubernetes at the release and
# replaces each k8s.io/* staging module (listed as "=> ./staging/..." in that
# release's go.mod) with its published v0.<minor>.<patch> twin; then `go build`
# the cmd packages.
set -euo pipefail

K8S_VERSION="${XDPLB_K8S_VERSION:-v1.34.12}"
CACHE_ROOT="${XDPLB_CACHE_DIR:-/var/cache/xdplb}"
# Bump when the way the binaries are built changes, to force a rebuild.
RECIPE=3

OUT="$CACHE_ROOT/k8s-$K8S_VERSION"
BIN="$OUT/bin"
STAMP="$OUT/.complete"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kubelet kube-proxy
          agnhost regression-issue-74839 e2e.test coredns crictl)
COREDNS_VERSION="${XDPLB_COREDNS_VERSION:-v1.12.1}"
CRICTL_VERSION="${XDPLB_CRICTL_VERSION:-v1.34.0}"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"

log() { echo "k8s-build: $*" >&2; }

stamp_text() { echo "recipe=$RECIPE kubernetes=$K8S_VERSION"; }

is_complete() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_text)" ] || return 1
    local b
    for b in "${BINARIES[@]}"; do
        [ -x "$BIN/$b" ] || return 1
    done
}

if is_complete; then
    echo "$BIN"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    log "Kubernetes $K8S_VERSION is not built yet in $OUT"
    exit 1
fi

command -v go >/dev/null || { log "go is not installed"; exit 1; }
command -v flock >/dev/null || { log "flock is not installed (util-linux)"; exit 1; }

mkdir -p "$CACHE_ROOT"
exec 9>"$OUT.lock"
if ! flock -n 9; then
    log "another build of $K8S_VERSION is running; waiting for it"
    flock 9
fi

# Someone else may have finished the build while this one waited.
if is_complete; then
    echo "$BIN"
    exit 0
fi

# Leftovers of builds that were killed; only the lock holder builds.
rm -rf "$CACHE_ROOT/.build-$K8S_VERSION".*
work=$(mktemp -d "$CACHE_ROOT/.build-$K8S_VERSION.XXXXXX")
build_pid=
cleanup() {
    # The go command and its compilers run in their own process group.
    if [ -n "$build_pid" ]; then
        kill -TERM -- "-$build_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP

export GOTOOLCHAIN=local
export GOFLAGS="-p=${XDPLB_BUILD_PARALLEL:-2} -buildvcs=false"
export CGO_ENABLED=0
# go's own scratch space, inside $work so that cleanup removes it even when
# the build is killed.
export GOTMPDIR="$work/tmp"
mkdir -p "$GOTMPDIR"
# A soft heap target for the compiler and linker processes.
export GOMEMLIMIT="${GOMEMLIMIT:-6GiB}"

start=$(date +%s)
log "building Kubernetes $K8S_VERSION in $work (go: $(go env GOVERSION))"

# The release's own go.mod: its replace block names the staging modules, and
# its require block pins etcd.
if ! download=$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" 2>&1); then
    log "cannot download k8s.io/kubernetes@$K8S_VERSION:"
    echo "$download" >&2
    exit 1
fi
k8s_gomod=$(echo "$download" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
[ -f "$k8s_gomod" ] || { log "could not download k8s.io/kubernetes@$K8S_VERSION"; exit 1; }

mapfile -t staging < <(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/.*#\1#p' \
    "$k8s_gomod")
((${#staging[@]})) || { log "no staging modules found in $k8s_gomod"; exit 1; }
etcd_version=$(sed -n 's#^[[:space:]]*go\.etcd\.io/etcd/server/v3[[:space:]]\{1,\}\(v[^[:space:]]*\).*#\1#p' \
    "$k8s_gomod" | sed -n 1p)
[ -n "$etcd_version" ] || { log "no etcd server version in $k8s_gomod"; exit 1; }
go_directive=$(sed -n 's/^go[[:space:]]\{1,\}\([0-9.]*\)$/\1/p' "$k8s_gomod" | sed -n 1p)
log "staging modules: ${#staging[@]} at $STAGING_VERSION; etcd $etcd_version; go $go_directive"

{
    echo "module xdplb.invalid/k8sbuild"
    echo
    echo "go $go_directive"
    echo
    echo "require ("
    echo "	k8s.io/kubernetes $K8S_VERSION"
    echo "	go.etcd.io/etcd/server/v3 $etcd_version"
    echo ")"
    echo
    echo "replace ("
    for m in "${staging[@]}"; do
        echo "	$m => $m $STAGING_VERSION"
    done
    echo ")"
} >"$work/go.mod"

build_date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION"
    ldflags+=" -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$build_date"
done

mkdir -p "$work/bin"
cd "$work"
# Runs "$@" in the background and in a new session, so that a signal to this
# script can stop the whole build (see cleanup) instead of leaving it running.
run_go() {
    setsid "$@" >&2 &
    build_pid=$!
    if ! wait "$build_pid"; then
        build_pid=
        log "failed: $*"
        exit 1
    fi
    build_pid=
}

log "control plane, node and the test images' binaries"
run_go go build -mod=mod -trimpath -ldflags "$ldflags" -o "$work/bin/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl \
    k8s.io/kubernetes/cmd/kubelet \
    k8s.io/kubernetes/cmd/kube-proxy \
    k8s.io/kubernetes/test/images/agnhost \
    k8s.io/kubernetes/test/images/regression-issue-74839 \
    go.etcd.io/etcd/server/v3
# Without -vet=off, go test runs vet over the whole tree first.
log "e2e.test"
run_go go test -mod=mod -vet=off -trimpath -ldflags "$ldflags" -c -o "$work/bin/e2e.test" \
    k8s.io/kubernetes/test/e2e

# CoreDNS and crictl are modules of their own, each built in a throwaway
# module of its own so their dependency graphs do not mix with Kubernetes'.
build_module() {  # <module> <version> <package> <binary>
    local dir="$work/mod-$4"
    mkdir -p "$dir"
    printf 'module xdplb.invalid/%s\n\ngo %s\n\nrequire %s %s\n' \
        "$4" "$go_directive" "$1" "$2" >"$dir/go.mod"
    log "$4 ($1 $2)"
    cd "$dir"
    run_go go build -mod=mod -trimpath -ldflags "-s -w" -o "$work/bin/$4" "$3"
    cd "$work"
}
build_module github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns coredns
build_module sigs.k8s.io/cri-tools "$CRICTL_VERSION" sigs.k8s.io/cri-tools/cmd/crictl crictl
cd /
# go names the etcd binary after its module path without the major version.
mv "$work/bin/server" "$work/bin/etcd"

for b in "${BINARIES[@]}"; do
    [ -x "$work/bin/$b" ] || { log "missing $b after build"; exit 1; }
done
"$work/bin/kube-apiserver" --version >&2
# sed reads all of it: `head -n 1` could close the pipe while etcd still
# writes, and pipefail would fail the build on the SIGPIPE.
"$work/bin/etcd" --version | sed -n 1p >&2

# Publish: replace any stale bin dir, then write the stamp last.
mkdir -p "$OUT"
rm -f "$STAMP"
rm -rf "$OUT/bin.old"
[ -d "$BIN" ] && mv "$BIN" "$OUT/bin.old"
mv "$work/bin" "$BIN"
rm -rf "$OUT/bin.old"
cp "$work/go.mod" "$OUT/go.mod"
[ -f "$work/go.sum" ] && cp "$work/go.sum" "$OUT/go.sum"
stamp_text >"$STAMP"
log "built in $(($(date +%s) - start))s"
echo "$BIN"
