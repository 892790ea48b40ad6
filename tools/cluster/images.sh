#!/usr/bin/env bash
# Build, without any container registry, the container images a test cluster
# needs, as docker-archive tarballs that a node imports with
#   ctr -n k8s.io images import FILE.tar
#
#   registry.k8s.io/pause:3.10.1                      tools/cluster/pause.c, static
#   registry.k8s.io/e2e-test-images/agnhost:2.56      agnhost on Debian minbase with
#   (also .../jessie-dnsutils:1.7)
#                                                     dash, curl, wget, nc, ip, ss, dig
#   registry.k8s.io/e2e-test-images/busybox:1.37.0-1  Debian's busybox-static
#   registry.k8s.io/e2e-test-images/nginx:1.14-4      Debian nginx-light, port 80
#   registry.k8s.io/e2e-test-images/httpd:2.4.38-4    Debian apache2, port 80
#   registry.k8s.io/coredns/coredns:v1.12.1           the coredns binary
#   registry.k8s.io/e2e-test-images/regression-issue-74839:1.2
#                                                     its binary (a raw-socket TCP
#                                                     server the Conntrack test uses)
#   xdplb:latest                                      the agent (deploy/Dockerfile)
#
# agnhost, coredns and regression-issue-74839 come from the Kubernetes build cache of tools/k8s-build.sh
# (this script only checks it, it never starts that build); the root file
# systems come from the Debian mirror through mmdebstrap, Python packages from
# PyPI. Needs root, mmdebstrap, gcc with a static libc, python3 and flock.
#
# Usage: images.sh [--check | --agent-only]
#   Progress goes to stderr; the last line of stdout is the directory holding
#   the tarballs, $XDPLB_CACHE_DIR/images-<key> (default /var/cache/xdplb).
#   --check       build nothing: exit 0 printing the directory when it is
#                 complete, 1 when it is not.
#   --agent-only  build only xdplb:latest (needs no Kubernetes binaries) and
#                 print the directory holding xdplb.tar.
#
# Caching, each in its own directory under an exclusive flock, built in a
# temporary directory and published by a rename with a stamp file inside:
#   images-test-<key>        pause, agnhost, busybox, nginx, httpd, coredns,
#                            regression-issue-74839; key: RECIPE, pause.c, the
#                            Go binaries they carry
#   images-agent-base-<key>  the agent's root file system with Debian packages
#                            and the venv; key: RECIPE, pyproject.toml,
#                            deploy/Dockerfile
#   images-agent-<key>       xdplb.tar: the base plus the current bpf/ lb/
#                            loader/ and deploy/entrypoint.sh; key: the base and
#                            the contents of those files (tracked and untracked,
#                            as git ls-files lists them)
#   images-<key>             what is printed: hard links to all the tarballs
# So a change of the project's sources rebuilds only the agent image (seconds),
# a change of pyproject.toml also its base (a minute or two). The three newest
# directories of each kind are kept.
#
# The agent image differs from `docker build -f deploy/Dockerfile` in that:
#   - the root file system is a Debian bookworm minbase from mmdebstrap (what
#     debian:bookworm-slim is made of) instead of the registry's image;
#   - it has no fallback kernel header tree (/usr/local/lib/xdplb/kernel-headers,
#     the Dockerfile's first stage): the nodes mount /lib/modules and /usr/src
#     from the host, which has the headers, and the entrypoint also accepts
#     /sys/kernel/kheaders.tar.xz;
#   - it is a single layer.
# Everything else (packages, including bpftool, the venv with its link to
# Debian's bcc, the editable install, the entrypoint, ENV, WORKDIR, ENTRYPOINT,
# CMD) is the same.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT="${XDPLB_CACHE_DIR:-/var/cache/xdplb}"
# Bump when the way any image is built changes, to force a rebuild.
RECIPE=2

SUITE=bookworm
MIRROR="${XDPLB_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY_MIRROR="${XDPLB_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

PAUSE_TAG=registry.k8s.io/pause:3.10.1
# The DNS tests' prober (jessie-dnsutils) needs only sh and dig, which agnhost's
# root file system has: one image under both names.
AGNHOST_TAG=registry.k8s.io/e2e-test-images/agnhost:2.56,registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7
BUSYBOX_TAG=registry.k8s.io/e2e-test-images/busybox:1.37.0-1
NGINX_TAG=registry.k8s.io/e2e-test-images/nginx:1.14-4
HTTPD_TAG=registry.k8s.io/e2e-test-images/httpd:2.4.38-4
COREDNS_TAG=registry.k8s.io/coredns/coredns:v1.12.1
REGRESSION_74839_TAG=registry.k8s.io/e2e-test-images/regression-issue-74839:1.2
AGENT_TAG=xdplb:latest

AGNHOST_PKGS=dash,curl,wget,netcat-openbsd,iproute2,dnsutils,ca-certificates,procps,iputils-ping,iperf
NGINX_PKGS=nginx-light
HTTPD_PKGS=apache2
# deploy/Dockerfile's list.
AGENT_PKGS=python3,python3-venv,python3-bpfcc,libbpf1,iproute2,xz-utils,bpftool
# The agent's sources as deploy/Dockerfile copies them to /opt/xdplb.
AGENT_SRC=(pyproject.toml bpf lb loader)

DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
AGENT_PATH=/opt/xdplb/venv/bin:$DEFAULT_PATH

log() { echo "images: $*" >&2; }

usage() { sed -n '/^# Usage:/,/^#$/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

mode=all
check=
case "${1:-}" in
    "") ;;
    --check) check=1 ;;
    --agent-only) mode=agent ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
esac

short_hash() { sha256sum | cut -c1-16; }

# The agent's files (NUL-separated, relative to the repository), tracked or
# untracked but not ignored, that exist in the work tree.
agent_files() {
    local f
    git -C "$REPO" ls-files -z -co --exclude-standard -- "$@" |
        while IFS= read -r -d '' f; do
            [ -f "$REPO/$f" ] && printf '%s\0' "$f"
        done
}

base_key=$( {
    echo "recipe=$RECIPE suite=$SUITE packages=$AGENT_PKGS"
    (cd "$REPO" && sha256sum pyproject.toml deploy/Dockerfile)
} | short_hash)
agent_key=$( {
    echo "base=$base_key"
    (cd "$REPO" && agent_files "${AGENT_SRC[@]}" deploy/entrypoint.sh tools/native.sh |
        xargs -0 -r sha256sum --)
} | short_hash)
BASE_DIR="$CACHE_ROOT/images-agent-base-$base_key"
AGENT_DIR="$CACHE_ROOT/images-agent-$agent_key"

is_complete() {  # <dir> <key>
    [ -f "$1/.complete" ] && [ "$(cat "$1/.complete")" = "$2" ]
}

summary_sizes() {  # <dir>
    local f
    for f in "$1"/*.tar; do
        [ -e "$f" ] || continue
        log "  $(du -h --apparent-size "$f" | cut -f1)	$(basename "$f")"
    done
}

if [ "$mode" = agent ]; then
    if is_complete "$AGENT_DIR" "$agent_key"; then
        echo "$AGENT_DIR"
        exit 0
    fi
    [ -z "$check" ] || { log "the agent image is not built yet ($AGENT_DIR)"; exit 1; }
else
    if ! BIN=$(bash "$REPO/tools/k8s-build.sh" --check 2>/dev/null); then
        log "the Kubernetes binaries are not built yet: run tools/k8s-build.sh first" \
            "(or use --agent-only)"
        exit 1
    fi
    for b in agnhost coredns regression-issue-74839; do
        [ -x "$BIN/$b" ] || { log "$BIN/$b is missing"; exit 1; }
    done
    test_key=$( {
        echo "recipe=$RECIPE suite=$SUITE agnhost=$AGNHOST_PKGS nginx=$NGINX_PKGS httpd=$HTTPD_PKGS"
        sha256sum "$HERE/pause.c" | cut -d' ' -f1
        # The k8s build publishes a new bin directory by a rename, so the
        # binaries' size and mtime change with every rebuild.
        stat -c '%n %s %Y' "$BIN/agnhost" "$BIN/coredns" "$BIN/regression-issue-74839"
    } | short_hash)
    TEST_DIR="$CACHE_ROOT/images-test-$test_key"
    key=$(echo "test=$test_key agent=$agent_key" | short_hash)
    OUT="$CACHE_ROOT/images-$key"
    if is_complete "$OUT" "$key"; then
        log "up to date in $OUT"
        echo "$OUT"
        exit 0
    fi
    [ -z "$check" ] || { log "the images are not built yet ($OUT)"; exit 1; }
fi

[ "$(id -u)" = 0 ] || { log "must run as root (mmdebstrap --mode=root, chroot)"; exit 1; }
for c in mmdebstrap gcc flock tar findmnt setsid; do
    command -v "$c" >/dev/null || { log "$c is not installed"; exit 1; }
done
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/images.lock"
if ! flock -n 9; then
    log "another image build is running; waiting for it"
    flock 9
fi

# Mount points under <dir>, deepest first (a build killed by SIGKILL can leave
# mmdebstrap's /dev, /proc and /sys mounts behind).
mounts_under() {
    findmnt -rn -o TARGET | sed 's/\\x20/ /g' | { grep -F -- "$1/" || true; } | sort -r
}
unmount_under() {
    local m
    while IFS= read -r m; do
        [ -n "$m" ] && umount -l -- "$m" 2>/dev/null || true
    done < <(mounts_under "$1")
}
remove_tree() {  # never crosses into a file system still mounted below
    unmount_under "$1"
    rm -rf --one-file-system -- "$1"
}

# Leftovers of builds that were killed; only the lock holder builds.
for d in "$CACHE_ROOT"/.images-build.*; do
    [ -e "$d" ] && remove_tree "$d"
done
work=$(mktemp -d "$CACHE_ROOT/.images-build.XXXXXX")
child=
cleanup() {
    if [ -n "$child" ]; then
        kill -TERM -- "-$child" 2>/dev/null || true
        # mmdebstrap unmounts what it mounted when it is stopped.
        for _ in $(seq 50); do
            kill -0 "$child" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL -- "-$child" 2>/dev/null || true
    fi
    remove_tree "$work"
}
trap cleanup EXIT
trap 'exit 143' TERM INT HUP
trap 'log "failed (status $?) at line $LINENO: $BASH_COMMAND"' ERR

# Runs "$@" in a session of its own with its output on stderr, so that a signal
# to this script stops the whole command (see cleanup).
run() {
    setsid "$@" >&2 &
    child=$!
    if ! wait "$child"; then
        child=
        log "failed: $*"
        exit 1
    fi
    child=
}

timings=()
timed() {  # <name> <function> [args...]
    local name=$1 t0=$SECONDS
    shift
    log "building $name"
    "$@"
    timings+=("$((SECONDS - t0))s	$name")
    log "$name: $((SECONDS - t0))s"
}

# --- helpers -------------------------------------------------------------------

# A Debian root file system in <dir> (which must not exist), minbase plus the
# comma-separated <packages>, without documentation, manual pages and locales.
debian_rootfs() {  # <dir> <packages> [mmdebstrap options...]
    local dir=$1 pkgs=$2
    shift 2
    run mmdebstrap --mode=root --variant=minbase --format=directory \
        --aptopt='Acquire::Languages "none"' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/lintian/*' \
        --include="$pkgs" "$@" "$SUITE" "$dir" \
        "deb $MIRROR $SUITE main" \
        "deb $MIRROR $SUITE-updates main" \
        "deb $SECURITY_MIRROR $SUITE-security main"
}

# Runs a command inside <dir> with a clean environment.
in_root() {  # <dir> <command...>
    local dir=$1
    shift
    chroot "$dir" /usr/bin/env -i PATH="$DEFAULT_PATH" HOME=/root LANG=C.UTF-8 \
        PYTHONDONTWRITEBYTECODE=1 "$@"
}

# The rootfs <dir> as one uncompressed layer tar, names relative to the root.
# The mount points of the API file systems are emptied: the runtime mounts them.
pack_layer() {  # <dir> <layer.tar>
    local dir=$1 out=$2
    if [ -n "$(mounts_under "$dir")" ]; then
        log "refusing to pack $dir: something is mounted below it"
        exit 1
    fi
    local d
    for d in dev proc sys run tmp; do
        [ -d "$dir/$d" ] && find "$dir/$d" -xdev -mindepth 1 -delete
    done
    rm -rf "$dir/var/lib/apt/lists/"* "$dir/var/cache/apt/"*.bin "$dir/var/cache/debconf/"*-old
    (
        cd "$dir"
        shopt -s dotglob nullglob
        entries=(*)
        tar --create --file="$out" --numeric-owner --xattrs --xattrs-include='*' \
            --sort=name --one-file-system -- "${entries[@]}"
    )
}

# Writes the docker-archive (docker save) of a one-layer image.
cat >"$work/mkimage.py" <<'EOF'
import argparse, hashlib, io, json, os, tarfile, time

p = argparse.ArgumentParser()
p.add_argument("tag", help="one or more tags, comma-separated")
p.add_argument("layer")
p.add_argument("out")
p.add_argument("--entrypoint", type=json.loads)
p.add_argument("--cmd", type=json.loads)
p.add_argument("--env", action="append", default=[])
p.add_argument("--workdir", default="/")
p.add_argument("--user", default="")
p.add_argument("--expose", action="append", default=[])
p.add_argument("--stop-signal")
a = p.parse_args()

h = hashlib.sha256()
with open(a.layer, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
diff_id = h.hexdigest()

created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
cfg = {"Env": a.env, "WorkingDir": a.workdir}
if a.entrypoint is not None:
    cfg["Entrypoint"] = a.entrypoint
if a.cmd is not None:
    cfg["Cmd"] = a.cmd
if a.user:
    cfg["User"] = a.user
if a.expose:
    cfg["ExposedPorts"] = {port: {} for port in a.expose}
if a.stop_signal:
    cfg["StopSignal"] = a.stop_signal
config = {
    "architecture": "amd64",
    "os": "linux",
    "created": created,
    "config": cfg,
    "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id]},
    "history": [{"created": created, "created_by": "tools/cluster/images.sh"}],
}
config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
layer_name = diff_id + "/layer.tar"
tags = a.tag.split(",")
manifest = [{"Config": config_name, "RepoTags": tags, "Layers": [layer_name]}]
repositories = {}
for tag in tags:
    name, _, version = tag.rpartition(":")
    repositories.setdefault(name, {})[version] = diff_id

def add_bytes(t, arcname, data):
    info = tarfile.TarInfo(arcname)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    t.addfile(info, io.BytesIO(data))

tmp = a.out + ".tmp"
with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as t:
    d = tarfile.TarInfo(diff_id)
    d.type = tarfile.DIRTYPE
    d.mode = 0o755
    d.mtime = int(time.time())
    t.addfile(d)
    info = tarfile.TarInfo(layer_name)
    info.size = os.path.getsize(a.layer)
    info.mtime = int(time.time())
    info.mode = 0o644
    with open(a.layer, "rb") as f:
        t.addfile(info, f)
    add_bytes(t, config_name, config_bytes)
    add_bytes(t, "manifest.json", json.dumps(manifest).encode())
    add_bytes(t, "repositories", json.dumps(repositories).encode())
os.rename(tmp, a.out)
EOF

# <rootfs dir> packed as the image <tag> into <out.tar>; the rest are
# mkimage.py options. The rootfs is removed afterwards.
make_image() {  # <tag> <rootfs> <out.tar> [options...]
    local tag=$1 dir=$2 out=$3
    shift 3
    pack_layer "$dir" "$work/layer.tar"
    remove_tree "$dir"
    "$PYTHON" "$work/mkimage.py" "$tag" "$work/layer.tar" "$out" "$@"
    rm -f "$work/layer.tar"
}

# Copies <files...> (relative to the repository) to <dest>, keeping their paths.
copy_sources() {  # <dest> <paths...>
    local dest=$1
    shift
    mkdir -p "$dest"
    (cd "$REPO" && agent_files "$@" | tar --create --owner=0 --group=0 --numeric-owner \
        --no-recursion --null --files-from=-) | tar --extract --directory="$dest" --no-same-owner
}

publish() {  # <staging dir> <final dir> <key>
    echo "$3" >"$1/.complete"
    rm -rf "$2.old"
    [ -e "$2" ] && mv "$2" "$2.old"
    mv "$1" "$2"
    rm -rf "$2.old"
}

prune() {  # <regex of directory names>: keeps the newest three
    local d
    find "$CACHE_ROOT" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
        -regex ".*/$1" -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- |
        while IFS= read -r d; do
            log "pruning $d"
            rm -rf --one-file-system -- "$d"
        done
}

# --- the agent -----------------------------------------------------------------

build_agent_base() {
    local root="$work/agent-base"
    local ca="${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}"
    local pipenv=(PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
                  PIP_DEFAULT_TIMEOUT="${PIP_DEFAULT_TIMEOUT:-180}")
    local v
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
        [ -n "${!v:-}" ] && pipenv+=("$v=${!v}")
    done
    # The host's CA bundle is used for pip during the build only (it may hold a
    # proxy's CA that the image must not trust).
    [ -f "$ca" ] && pipenv+=(PIP_CERT=/tmp/xdplb-build-ca.crt)
    local hook="$work/agent-hook.sh"
    {
        echo '#!/bin/sh'
        echo 'set -eu'
        echo 'root=$1'
        printf 'src=%q\n' "$work/agent-src"
        printf 'ca=%q\n' "$ca"
        cat <<'EOF'
mkdir -p "$root/opt/xdplb"
cp -a "$src/." "$root/opt/xdplb/"
[ -f "$ca" ] && cp "$ca" "$root/tmp/xdplb-build-ca.crt"
EOF
        printf 'chroot "$root" /usr/bin/env -i PATH=%q HOME=/root LANG=C.UTF-8' "$DEFAULT_PATH"
        printf ' %q' "${pipenv[@]}"
        cat <<'EOF'
 /bin/sh -eux -c '
    python3 -m venv /opt/xdplb/venv
    site="$(/opt/xdplb/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()[\"purelib\"])")"
    mkdir -p /opt/xdplb/venv/bcc-link
    ln -s /usr/lib/python3/dist-packages/bcc /opt/xdplb/venv/bcc-link/bcc
    echo /opt/xdplb/venv/bcc-link > "$site/bcc-debian.pth"
    /opt/xdplb/venv/bin/pip install --no-cache-dir -e /opt/xdplb
'
rm -f "$root/tmp/xdplb-build-ca.crt"
EOF
    } >"$hook"
    chmod 0755 "$hook"
    copy_sources "$work/agent-src" "${AGENT_SRC[@]}"
    debian_rootfs "$root" "$AGENT_PKGS" --customize-hook="$hook \"\$1\""
    rm -rf "$work/agent-src"
    mkdir -p "$work/stage-base"
    pack_layer "$root" "$work/stage-base/rootfs.tar"
    remove_tree "$root"
    publish "$work/stage-base" "$BASE_DIR" "$base_key"
}

build_agent() {
    local root="$work/agent"
    mkdir -p "$root"
    tar --extract --file="$BASE_DIR/rootfs.tar" --directory="$root" \
        --numeric-owner --xattrs --xattrs-include='*'
    # The sources of the base are replaced by the current ones; the editable
    # install (metadata, entry points, venv) only depends on pyproject.toml,
    # which is part of the base's key.
    local p
    for p in "${AGENT_SRC[@]}"; do
        rm -rf "${root:?}/opt/xdplb/$p"
    done
    copy_sources "$root/opt/xdplb" "${AGENT_SRC[@]}"
    install -m 0755 "$REPO/deploy/entrypoint.sh" "$root/usr/local/bin/xdplb-entrypoint"
    # Built here, as the Dockerfile's native stage does: the image has no compiler.
    bash "$REPO/tools/native.sh" "$root/opt/xdplb/lb/libnative.so"

    log "checking the agent image"
    chroot "$root" /usr/bin/env -i PATH="$AGENT_PATH" HOME=/root LANG=C.UTF-8 \
        PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 /bin/sh -ec '
            cd /opt/xdplb
            python -c "import bcc, lb, loader, pyroute2, kubernetes"
            python -c "from lb import native; assert native.lib()"
            lbctl --help >/dev/null
            bpftool version >/dev/null
            ip -V >/dev/null
            test -x /usr/local/bin/xdplb-entrypoint' >&2

    mkdir -p "$work/stage-agent"
    make_image "$AGENT_TAG" "$root" "$work/stage-agent/xdplb.tar" \
        --entrypoint '["/usr/local/bin/xdplb-entrypoint"]' --cmd '["--help"]' \
        --env "PATH=$AGENT_PATH" --env PYTHONUNBUFFERED=1 --workdir /opt/xdplb
    publish "$work/stage-agent" "$AGENT_DIR" "$agent_key"
}

# --- the test images -----------------------------------------------------------

build_pause() {
    local root="$work/pause"
    mkdir -p "$root"
    gcc -static -O2 -Wall -o "$root/pause" "$HERE/pause.c"
    strip "$root/pause"
    make_image "$PAUSE_TAG" "$root" "$stage/pause.tar" \
        --entrypoint '["/pause"]' --env "PATH=$DEFAULT_PATH" --user 65535:65535
}

write_passwd() {  # <root>
    mkdir -p "$1/etc"
    cat >"$1/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
EOF
    cat >"$1/etc/group" <<'EOF'
root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
wheel:x:10:root
mail:x:12:
www-data:x:33:
operator:x:37:
users:x:100:
nogroup:x:65534:
nobody:x:65534:
EOF
}

build_busybox() {
    local x="$work/busybox-deb" root="$work/busybox"
    # extract: only unpacks busybox-static, runs nothing.
    run mmdebstrap --mode=root --variant=extract --include=busybox-static \
        "$SUITE" "$x" "deb $MIRROR $SUITE main" "deb $SECURITY_MIRROR $SUITE-security main"
    local bb
    bb=$(find "$x" -path "$x/usr/bin/busybox" -o -path "$x/bin/busybox" -type f | head -n 1)
    [ -n "$bb" ] || { log "no busybox binary in busybox-static"; exit 1; }
    mkdir -p "$root"/{bin,dev,proc,sys,tmp,root,home,usr/sbin,var/spool/mail,var/www}
    chmod 1777 "$root/tmp"
    chmod 0700 "$root/root"
    install -m 0755 "$bb" "$root/bin/busybox"
    remove_tree "$x"
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    mkdir -p "$root/usr/bin"
    ln -sf ../../bin/env "$root/usr/bin/env"
    write_passwd "$root"
    echo 'hosts: files dns' >"$root/etc/nsswitch.conf"
    chroot "$root" /bin/sh -ec 'test "$(readlink /bin/sh)" = busybox; for c in wget nc nslookup sleep ping; do command -v "$c"; done' >&2
    make_image "$BUSYBOX_TAG" "$root" "$stage/busybox.tar" \
        --cmd '["sh"]' --env "PATH=$DEFAULT_PATH"
}

build_agnhost() {
    local root="$work/agnhost"
    debian_rootfs "$root" "$AGNHOST_PKGS"
    # As the upstream image (test/images/agnhost/Dockerfile): /agnhost, its
    # alias /agnhost-2, /coredns for the DNS tests, /uploads for netexec, the
    # porter's TLS pair, /usr/local/bin/iperf.
    install -m 0755 "$BIN/agnhost" "$root/agnhost"
    install -m 0755 "$BIN/coredns" "$root/coredns"
    ln -s agnhost "$root/agnhost-2"
    mkdir -p "$root/uploads"
    ln -sf /usr/bin/iperf "$root/usr/local/bin/iperf"
    if command -v openssl >/dev/null; then
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=localhost \
            -keyout "$root/localhost.key" -out "$root/localhost.crt" 2>/dev/null
    fi
    in_root "$root" /bin/sh -ec '
        test "$(readlink -f /bin/sh)" = /usr/bin/dash
        /agnhost --help >/dev/null
        curl --version | head -n 1; wget --version | head -n 1
        nc -h 2>&1 | head -n 1; ip -V; ss -V; dig -v 2>&1
        for c in nslookup ps ping iperf bash; do command -v "$c"; done
    ' >&2
    # Debian's CA bundle, for the coredns image.
    cp "$root/etc/ssl/certs/ca-certificates.crt" "$work/ca-certificates.crt"
    make_image "$AGNHOST_TAG" "$root" "$stage/agnhost.tar" \
        --entrypoint '["/agnhost"]' --cmd '["pause"]' --env "PATH=$DEFAULT_PATH" \
        --expose 80/tcp --expose 8080/tcp --expose 8081/tcp --expose 9376/tcp
}

build_nginx() {
    local root="$work/nginx"
    debian_rootfs "$root" "$NGINX_PKGS"
    # As nginx:1.14-alpine: port 80 (IPv4 only), /usr/share/nginx/html, logs on
    # the container's stdout and stderr.
    rm -f "$root/etc/nginx/sites-enabled/"*
    cat >"$root/etc/nginx/sites-enabled/default" <<'EOF'
server {
    listen 80 default_server;
    server_name localhost;
    root /usr/share/nginx/html;
    index index.html index.htm;
    location / {
        try_files $uri $uri/ =404;
    }
}
EOF
    [ -f "$root/usr/share/nginx/html/index.html" ] ||
        echo '<html><body><h1>Welcome to nginx!</h1></body></html>' \
            >"$root/usr/share/nginx/html/index.html"
    in_root "$root" nginx -t >&2
    ln -sf /dev/stdout "$root/var/log/nginx/access.log"
    ln -sf /dev/stderr "$root/var/log/nginx/error.log"
    make_image "$NGINX_TAG" "$root" "$stage/nginx.tar" \
        --cmd '["nginx", "-g", "daemon off;"]' --env "PATH=$DEFAULT_PATH" --expose 80/tcp
}

build_httpd() {
    local root="$work/httpd"
    debian_rootfs "$root" "$HTTPD_PKGS"
    # As httpd:2.4.38-alpine: httpd-foreground serving "It works!" on port 80.
    cat >"$root/usr/local/bin/httpd-foreground" <<'EOF'
#!/bin/sh
set -e
. /etc/apache2/envvars
mkdir -p "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR" "$APACHE_LOG_DIR"
rm -f "$APACHE_PID_FILE"
exec apache2 -DFOREGROUND "$@"
EOF
    chmod 0755 "$root/usr/local/bin/httpd-foreground"
    echo 'ServerName localhost' >"$root/etc/apache2/conf-enabled/zz-servername.conf"
    echo '<html><body><h1>It works!</h1></body></html>' >"$root/var/www/html/index.html"
    in_root "$root" /bin/sh -ec '. /etc/apache2/envvars; mkdir -p "$APACHE_RUN_DIR" "$APACHE_LOCK_DIR"; apache2 -t' >&2
    ln -sf /proc/self/fd/1 "$root/var/log/apache2/access.log"
    ln -sf /proc/self/fd/2 "$root/var/log/apache2/error.log"
    ln -sf /proc/self/fd/1 "$root/var/log/apache2/other_vhosts_access.log"
    make_image "$HTTPD_TAG" "$root" "$stage/httpd.tar" \
        --cmd '["httpd-foreground"]' --env "PATH=$DEFAULT_PATH" --expose 80/tcp \
        --stop-signal SIGWINCH
}

build_coredns() {
    local root="$work/coredns"
    mkdir -p "$root/etc/ssl/certs" "$root/tmp"
    chmod 1777 "$root/tmp"
    install -m 0755 "$BIN/coredns" "$root/coredns"
    # Debian's CA bundle, from the agnhost build (never the host's).
    [ -f "$work/ca-certificates.crt" ] && cp "$work/ca-certificates.crt" "$root/etc/ssl/certs/"
    write_passwd "$root"
    "$root/coredns" -version >&2
    # Runs as root, not as upstream's nonroot user with a file capability on
    # /coredns: the kubeadm-style Deployment (drop ALL, add NET_BIND_SERVICE)
    # works either way, and no xattr has to survive the import.
    make_image "$COREDNS_TAG" "$root" "$stage/coredns.tar" \
        --entrypoint '["/coredns"]' --env "PATH=$DEFAULT_PATH" \
        --expose 53/tcp --expose 53/udp
}

build_regression_74839() {
    local root="$work/regression-74839"
    # As upstream's test/images/regression-issue-74839: the static binary as
    # /regression-issue-74839, its entrypoint; it listens on TCP port 9000.
    mkdir -p "$root/tmp"
    chmod 1777 "$root/tmp"
    install -m 0755 "$BIN/regression-issue-74839" "$root/regression-issue-74839"
    write_passwd "$root"
    make_image "$REGRESSION_74839_TAG" "$root" "$stage/regression-issue-74839.tar" \
        --entrypoint '["/regression-issue-74839"]' --env "PATH=$DEFAULT_PATH" --expose 9000/tcp
}

build_test_images() {
    stage="$work/stage-test"
    mkdir -p "$stage"
    timed pause build_pause
    timed busybox build_busybox
    timed agnhost build_agnhost
    timed coredns build_coredns
    timed nginx build_nginx
    timed httpd build_httpd
    timed regression-issue-74839 build_regression_74839
    publish "$stage" "$TEST_DIR" "$test_key"
}

# --- main ----------------------------------------------------------------------

start=$SECONDS
log "building in $work (recipe $RECIPE, $SUITE from $MIRROR)"

if ! is_complete "$AGENT_DIR" "$agent_key"; then
    if ! is_complete "$BASE_DIR" "$base_key"; then
        timed agent-base build_agent_base
        prune 'images-agent-base-[0-9a-f]{16}'
    fi
    timed agent build_agent
    prune 'images-agent-[0-9a-f]{16}'
fi

if [ "$mode" = agent ]; then
    log "done in $((SECONDS - start))s:"
    for t in "${timings[@]}"; do
        log "  $t"
    done
    summary_sizes "$AGENT_DIR"
    echo "$AGENT_DIR"
    exit 0
fi

if ! is_complete "$TEST_DIR" "$test_key"; then
    timed test-images build_test_images
    prune 'images-test-[0-9a-f]{16}'
fi

mkdir -p "$work/stage-out"
for f in "$TEST_DIR"/*.tar "$AGENT_DIR"/*.tar; do
    ln "$f" "$work/stage-out/" 2>/dev/null || cp "$f" "$work/stage-out/"
done
publish "$work/stage-out" "$OUT" "$key"
prune 'images-[0-9a-f]{16}'

log "done in $((SECONDS - start))s; build times:"
for t in "${timings[@]}"; do
    log "  $t"
done
log "tarballs in $OUT:"
summary_sizes "$OUT"
echo "$OUT"
