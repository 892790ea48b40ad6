# shellcheck shell=bash
# A build published into the machine-level cache ($XDPLB_CACHE_DIR, default
# /var/cache/xdplb), shared by every clone on the machine:
#
#   cache_build NAME STAMP BUILDER
#
# The output is $CACHE_ROOT/NAME/bin. It counts as complete when its stamp file
# holds STAMP (a text naming everything the build depends on); then nothing
# is built. Otherwise, under an exclusive flock (a concurrent build of the
# same NAME waits and then finds it complete), BUILDER runs with a fresh work
# directory as its argument and must leave the binaries in WORK/bin; they
# are published by a rename and the stamp is written last. Prints the bin
# directory. With CACHE_CHECK=1 nothing is built: exit 1 when incomplete.
# BUILDER's status is its last command's, checked step by step if need be:
# errexit is off inside it.
CACHE_ROOT="${XDPLB_CACHE_DIR:-/var/cache/xdplb}"

cache_complete() {  # <name> <stamp>
    [ -d "$CACHE_ROOT/$1/bin" ] && [ "$(cat "$CACHE_ROOT/$1/.complete" 2>/dev/null)" = "$2" ]
}

cache_build() {  # <name> <stamp> <builder>
    local name=$1 stamp=$2 builder=$3 out="$CACHE_ROOT/$1" work
    if cache_complete "$name" "$stamp"; then
        echo "$out/bin"
        return 0
    fi
    if [ "${CACHE_CHECK:-0}" = 1 ]; then
        echo "$name is not built yet in $out" >&2
        return 1
    fi
    mkdir -p "$CACHE_ROOT"
    (
        exec 9>"$out.lock"
        flock 9
        if cache_complete "$name" "$stamp"; then
            exit 0
        fi
        work=$(mktemp -d "$CACHE_ROOT/.build-$name.XXXXXX")
        trap 'rm -rf "$work"' EXIT
        # errexit does not hold in here (this subshell is part of an || list):
        # the builder's own status decides.
        "$builder" "$work" >&2 || { echo "$name: build failed" >&2; exit 1; }
        [ -d "$work/bin" ] || { echo "$name: the build left no bin directory" >&2; exit 1; }
        mkdir -p "$out"
        rm -f "$out/.complete"
        rm -rf "$out/bin"
        mv "$work/bin" "$out/bin"
        echo "$stamp" >"$out/.complete"
    ) || return 1
    echo "$out/bin"
}
