#!/bin/sh
# Container entrypoint of the xdplb agent: makes sure pinned maps land on the
# node's bpffs and that BCC finds kernel headers, then runs `lbctl "$@"`.
set -eu

FALLBACK_HEADERS=/usr/local/lib/xdplb/kernel-headers

# Maps are pinned under /sys/fs/bpf so established flows survive an agent
# restart. The DaemonSet bind-mounts the node's /sys/fs/bpf; if the node never
# mounted bpffs there, mount it now (Bidirectional propagation carries the mount
# back to the node, so the next agent finds the same pins).
if [ "$(stat -f -c %T /sys/fs/bpf 2>/dev/null || true)" != "bpf_fs" ]; then
    mkdir -p /sys/fs/bpf
    if ! mount -t bpf bpf /sys/fs/bpf; then
        echo "xdplb-entrypoint: /sys/fs/bpf is not bpffs and mounting it failed" >&2
    fi
fi

# Mirrors BCC's own lookup: with both build/ and source/ (Debian's split tree)
# it compiles in source/, otherwise in build/.
node_headers_usable() {
    kdir="/lib/modules/$(uname -r)"
    if [ -d "$kdir/build" ] && [ -d "$kdir/source" ]; then
        [ -f "$kdir/source/include/linux/kconfig.h" ]
    else
        [ -f "$kdir/build/include/linux/kconfig.h" ]
    fi
}

# Order of preference: the node's headers (mounted /lib/modules and /usr/src),
# the kernel's built-in /sys/kernel/kheaders.tar.xz (BCC unpacks it itself),
# then the Debian tree baked into the image. /lib/modules is read-only here, so
# instead of linking a build/ directory the fallback is named to BCC directly.
if [ -z "${BCC_KERNEL_SOURCE:-}" ] && ! node_headers_usable \
        && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
    BCC_KERNEL_SOURCE="$FALLBACK_HEADERS"
    export BCC_KERNEL_SOURCE
    echo "xdplb-entrypoint: no kernel headers for $(uname -r) on the node;" \
        "compiling against $FALLBACK_HEADERS" >&2
fi

exec lbctl "$@"
