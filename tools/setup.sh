#!/usr/bin/env bash
# Idempotent set-up of a fresh Debian machine: packages, the kernel-headers
# links BCC needs, bpffs, and the venv with the project installed editable.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(clang llvm libbpf-dev libbpf1 bpftool python3-bpfcc linux-headers-amd64
      iproute2 curl wrk iptables nftables hping3 ethtool python3-venv openssl
      # The demo's host-network Ingress controller (lab/ingress.py).
      nginx-light
      # The real-node cluster (tools/cluster): runtime, CNI, image building.
      containerd runc containernetworking-plugins conntrack socat mmdebstrap util-linux)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# BCC compiles against /lib/modules/$(uname -r)/build. This kernel ships no
# headers of its own; Debian's newest header tree carries the UAPI we use.
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n 1)
    mkdir -p "/lib/modules/$kver"
    ln -sfn "$hdr" "/lib/modules/$kver/build"
    ln -sfn "$common" "/lib/modules/$kver/source"
    echo "setup: linked /lib/modules/$kver/build -> $hdr"
fi

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# BCC's Python package comes from Debian; the venv sees only its bcc folder.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir -p .venv/bcc-link
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/bcc-link/bcc
echo "$PWD/.venv/bcc-link" > "$site/bcc-debian.pth"

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
bash tools/native.sh
echo "setup: ready"
