#!/usr/bin/env bash
# A real two-node Kubernetes cluster on this machine, offline, with nothing in
# the root network namespace.
#
#   cluster.sh up [--proxy kube-proxy|xdplb|none] [--cni bridge|flannel]
#                                                   build what is missing, start
#   cluster.sh down                                 remove everything up made
#   cluster.sh proxy kube-proxy|xdplb|none          switch the service proxy
#   cluster.sh kubectl ARGS...                      kubectl as the admin
#   cluster.sh run CMD...                           CMD in the nodes' network (node 1)
#   cluster.sh status
#   cluster.sh agent-image                          rebuild xdplb:latest from this tree,
#                                                   import it, apply deploy/ again and
#                                                   restart the DaemonSet
#
# Topology (all namespaces made here, removed by down):
#   xk-ul   the underlay: bridge br0 198.18.0.1/24
#   xk-n1   node 1: eth0 198.18.0.11 on the underlay, pods 10.244.1.0/24 on cni0
#           (bridge CNI); etcd, kube-apiserver, controller manager, scheduler
#   xk-n2   node 2: eth0 198.18.0.12, pods 10.244.2.0/24
# Each node has a route to the other's pod CIDR through its eth0 (flannel's
# host-gw: made here with --cni bridge, by flanneld itself with --cni flannel,
# where flanneld also leases each node its subnet), its own containerd and kubelet, and its own mount namespace: the
# paths kubelet, containerd and CNI hard-code (/var/lib/kubelet, /run/containerd,
# /var/lib/cni, /etc/cni/net.d, /var/log/pods, ...), bpffs and /run/xdplb are
# bound to per-node directories there. Its processes sit in cgroups of their
# own (kubelet's cgroupRoot /xk-nN; in cgroup v2 too, where the agent's socket
# hooks attach).
#
# State lives in $XDPLB_CLUSTER_DIR (default /var/lib/xdplb-cluster). down finds
# every process it must end through the node mount namespaces and the pid files
# (nothing else is signalled), unmounts them, removes the cgroups, the network
# namespaces and the state, and restores the sysctls kubelet rewrites. down is
# safe after a failed or killed up. The nodes' containerd image stores are a
# cache, kept in $XDPLB_CACHE_DIR/containerd-<node> (default /var/cache/xdplb).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STATE=${XDPLB_CLUSTER_DIR:-/var/lib/xdplb-cluster}
NODES=(xk-n1 xk-n2)
UNDERLAY=xk-ul
UNDERLAY_GW=198.18.0.1
SERVICE_CIDR=10.96.0.0/12
CLUSTER_CIDR=10.244.0.0/16
DNS_IP=10.96.0.10
API_PORT=6443
CACHE_ROOT=${XDPLB_CACHE_DIR:-/var/cache/xdplb}
# Global sysctls kubelet sets (pkg/kubelet/cm/container_manager_linux.go,
# setupKernelTunables): saved by up, restored by down.
KUBELET_SYSCTLS=(kernel/panic kernel/panic_on_oops vm/overcommit_memory
                 kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
# Paths of a node that must not be shared with the other node.
NODE_PATHS=(/var/lib/kubelet /var/lib/cni /etc/cni/net.d /var/log/pods /var/log/containers
            /run/containerd /run/xdplb /run/netns)
CGROUP_V1=(cpu cpuacct cpuset memory devices freezer blkio pids systemd)

log() { printf "cluster: %4ds %s\n" "$SECONDS" "$*" >&2; }
die() { log "$*"; exit 1; }

node_index() { echo "${1#xk-n}"; }
node_ip() { echo "198.18.0.1$(node_index "$1")"; }
pod_cidr() { echo "10.244.$(node_index "$1").0/24"; }
API_IP=$(node_ip xk-n1)

mntns() { echo "$STATE/mnt/$1"; }
# Each node's own UTS namespace: its hostname is its node name, which
# host-network pods report (the e2e tests compare it with the node's name).
utsns() { echo "$STATE/mnt/$1.uts"; }
# A command in a node's network, mount and UTS namespaces.
in_node() {
    local node=$1
    shift
    nsenter --mount="$(mntns "$node")" --uts="$(utsns "$node")" --net="/run/netns/$node" -- "$@"
}

bin_dir() { bash "$REPO/tools/k8s-build.sh" --check 2>/dev/null | tail -n 1; }

kubectl_() { nsenter --net=/run/netns/xk-n1 -- "$BIN/kubectl" --kubeconfig="$STATE/admin.kubeconfig" "$@"; }

# --- start a daemon, keep its pid ---------------------------------------------
# spawn NAME NODE CGROUP CMD...: runs CMD in NODE's namespaces, in its own
# session, its output in $STATE/log/NAME.log, its pid in $STATE/pids/NAME.
spawn() {
    local name=$1 node=$2
    shift 2
    mkdir -p "$STATE/log" "$STATE/pids"
    echo "--- $(date +%T) $*" >>"$STATE/log/$name.log"
    # The pid file is written by the process itself before it execs, so the
    # pid is that of the daemon, in the node's cgroups.
    setsid nsenter --mount="$(mntns "$node")" --uts="$(utsns "$node")" \
        --net="/run/netns/$node" -- sh -c 'echo $$ > "$1"; for c in $3; do echo $$ > "$c/cgroup.procs"; done; shift 3; exec "$@"' \
        sh "$STATE/pids/$name" "$node" "$(node_cgroups "$node")" "$@" \
        >>"$STATE/log/$name.log" 2>&1 </dev/null &
    local i
    for i in $(seq 50); do
        [ -s "$STATE/pids/$name" ] && return 0
        sleep 0.1
    done
    die "$name did not start; see $STATE/log/$name.log"
}

stop_pid() {  # stop_pid NAME...: TERM to all, then KILL what is left after 10 s
    local name pid i pids=() left
    for name in "$@"; do
        [ -f "$STATE/pids/$name" ] || continue
        pid=$(cat "$STATE/pids/$name")
        if [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; then
            pids+=("$pid")
        fi
    done
    for i in $(seq 100); do
        left=
        for pid in "${pids[@]}"; do
            if kill -0 "$pid" 2>/dev/null; then left=1; break; fi
        done
        [ -z "$left" ] && break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    for name in "$@"; do
        rm -f "$STATE/pids/$name"
    done
}

wait_for() {  # wait_for SECONDS WHAT CMD...
    local secs=$1 what=$2 i
    shift 2
    for i in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    die "$what: not ready within ${secs}s"
}

node_cgroups() {  # the cgroup directories a node's daemons join
    local c out=
    for c in "${CGROUP_V1[@]}"; do
        [ -d "/sys/fs/cgroup/$c" ] && out+=" /sys/fs/cgroup/$c/$1"
    done
    out+=" $(cgroup2_root)/$1"
    echo "$out"
}

cgroup2_root() { awk '$3 == "cgroup2" { print $2; exit }' /proc/mounts; }

# --- network --------------------------------------------------------------------
netns_exec() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

make_network() {
    log "network: underlay $UNDERLAY (br0 $UNDERLAY_GW/24), nodes ${NODES[*]}"
    ip netns add "$UNDERLAY"
    netns_exec "$UNDERLAY" ip link set lo up
    netns_exec "$UNDERLAY" ip link add br0 type bridge
    netns_exec "$UNDERLAY" ip addr add "$UNDERLAY_GW/24" dev br0
    netns_exec "$UNDERLAY" ip link set br0 up
    local node other
    for node in "${NODES[@]}"; do
        ip netns add "$node"
        netns_exec "$node" ip link set lo up
        # Created inside the node, so nothing ever exists in the root namespace.
        netns_exec "$node" ip link add eth0 type veth peer name "ul-$node" netns "$UNDERLAY"
        netns_exec "$UNDERLAY" ip link set "ul-$node" master br0 up
        netns_exec "$node" ip addr add "$(node_ip "$node")/24" dev eth0
        netns_exec "$node" ip link set eth0 up
        netns_exec "$node" ip route add default via "$UNDERLAY_GW"
        netns_exec "$node" sysctl -qw net.ipv4.ip_forward=1
        # kube-proxy needs bridged pod-to-pod replies to pass netfilter; the
        # bridge CNI's pods share cni0.
        netns_exec "$node" sysctl -qw net.bridge.bridge-nf-call-iptables=1
    done
    [ "$CNI" = flannel ] && return 0  # flanneld's host-gw backend adds the routes
    for node in "${NODES[@]}"; do
        for other in "${NODES[@]}"; do
            [ "$node" = "$other" ] && continue
            netns_exec "$node" ip route add "$(pod_cidr "$other")" via "$(node_ip "$other")"
        done
    done
}

# --- mount namespaces and cgroups ----------------------------------------------------
make_node_mounts() {
    local node=$1 d="$STATE/$1" p
    mkdir -p "$STATE/mnt"
    if ! mountpoint -q "$STATE/mnt"; then
        mount --bind "$STATE/mnt" "$STATE/mnt"
        mount --make-private "$STATE/mnt"
    fi
    touch "$(mntns "$node")"
    unshare --mount="$(mntns "$node")" --propagation slave true
    touch "$(utsns "$node")"
    unshare --uts="$(utsns "$node")" hostname "$node"
    for p in "${NODE_PATHS[@]}"; do
        mkdir -p "$d/root$p" "$p"
        in_node "$node" mount --bind "$d/root$p" "$p"
    done
    # A bpffs of its own (the agent's pins), shared so that the agent pod's
    # Bidirectional mount of it is allowed.
    # The host's bpffs is unmounted in the node's copy first: containerd
    # checks the first mount it finds at the path.
    in_node "$node" sh -c 'while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf; done'
    in_node "$node" mount -t bpf bpf /sys/fs/bpf
    in_node "$node" mount --make-shared /sys/fs/bpf
}

make_node_cgroups() {
    local c
    for c in $(node_cgroups "$1"); do
        mkdir -p "$c"
    done
}

# --- configuration -----------------------------------------------------------------
# write_cni_config NODE SUBNET MTU: the bridge plugin, cni0 per node, veth*
# host ends; routes between nodes are the underlay's (make_network) or
# flanneld's.
write_cni_config() {
    cat >"$STATE/$1/root/etc/cni/net.d/10-xk.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "xk",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
     "hairpinMode": true, "mtu": $3,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$2"}]],
              "routes": [{"dst": "0.0.0.0/0"}]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
}

write_pki() {
    log "credentials"
    mkdir -p "$STATE/pki"
    local pki="$STATE/pki" node
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    # One CA; the API server's certificate names every address it is reached at.
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=xdplb-cluster-ca" \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
        -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
    printf 'subjectAltName=IP:%s,IP:10.96.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' \
        "$API_IP" >"$pki/apiserver.ext"
    openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
        -CAcreateserial -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
    # Static tokens: the admin (system:masters) and one per kubelet, which the
    # Node authorizer recognises by its name and group.
    local admin
    admin=$(openssl rand -hex 24)
    echo "$admin,xdplb-admin,xdplb-admin,\"system:masters\"" >"$pki/tokens.csv"
    kubeconfig "$STATE/admin.kubeconfig" "$admin"
    for node in "${NODES[@]}"; do
        local t
        t=$(openssl rand -hex 24)
        echo "$t,system:node:$node,system:node:$node,\"system:nodes\"" >>"$pki/tokens.csv"
        kubeconfig "$STATE/$node/kubelet.kubeconfig" "$t"
    done
    chmod 600 "$pki"/*.key "$pki/tokens.csv"
}

kubeconfig() {  # kubeconfig FILE TOKEN
    mkdir -p "$(dirname "$1")"
    cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: xdplb
  cluster:
    server: https://$API_IP:$API_PORT
    certificate-authority: $STATE/pki/ca.crt
users:
- name: user
  user:
    token: $2
contexts:
- name: xdplb
  context: {cluster: xdplb, user: user}
current-context: xdplb
EOF
    chmod 600 "$1"
}

# containerd's root (its image content and unpacked layers) outlives the
# cluster, as the built binaries do: importing the same 1.3 GB of images into
# an empty store took a minute of every up; into a kept one it only checks
# digests. down removes every pod first, so nothing of a cluster stays in it.
containerd_root() { echo "$CACHE_ROOT/containerd-$1"; }

write_node_config() {
    local node=$1 d="$STATE/$1"
    mkdir -p "$(containerd_root "$node")"
    cat >"$d/containerd.toml" <<EOF
version = 2
root = "$(containerd_root "$node")"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10.1"
  # runc cannot lower oom_score_adj without CAP_SYS_RESOURCE, which root lacks here.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
EOF
    # With flannel the CNI configuration follows from the subnet flanneld
    # leases (start_flannel).
    if [ "$CNI" = bridge ]; then write_cni_config "$node" "$(pod_cidr "$node")" 1500; fi
    echo "nameserver $UNDERLAY_GW" >"$d/resolv.conf"
    cat >"$d/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $(node_ip "$node")
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: /$node
failCgroupV1: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
resolvConf: $d/resolv.conf
failSwapOn: false
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%",
               nodefs.inodesFree: "1%"}
maxPods: 110
podPidsLimit: -1
EOF
}

# --- processes -------------------------------------------------------------------------
start_control_plane() {
    local pki="$STATE/pki"
    log "control plane on xk-n1: etcd, kube-apiserver, kube-controller-manager, kube-scheduler"
    spawn etcd xk-n1 "$BIN/etcd" --name=xk --data-dir="$STATE/etcd" \
        --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
        --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
        --initial-cluster=xk=http://127.0.0.1:2380 --unsafe-no-fsync --log-level=warn
    spawn kube-apiserver xk-n1 "$BIN/kube-apiserver" \
        --etcd-servers=http://127.0.0.1:2379 \
        --bind-address=0.0.0.0 --advertise-address="$API_IP" --secure-port="$API_PORT" \
        --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
        --client-ca-file="$pki/ca.crt" \
        --service-cluster-ip-range="$SERVICE_CIDR" \
        --authorization-mode=Node,RBAC --token-auth-file="$pki/tokens.csv" \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
        --kubelet-preferred-address-types=InternalIP,Hostname \
        --allow-privileged=true --shutdown-watch-termination-grace-period=2s --profiling=false
    wait_for 60 kube-apiserver kubectl_ get --raw /readyz
    spawn kube-controller-manager xk-n1 "$BIN/kube-controller-manager" \
        --kubeconfig="$STATE/admin.kubeconfig" --leader-elect=false \
        --service-cluster-ip-range="$SERVICE_CIDR" --cluster-cidr="$CLUSTER_CIDR" \
        --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
        --use-service-account-credentials=false --bind-address=127.0.0.1 \
        --cert-dir="$STATE/kcm-certs" --profiling=false --concurrent-service-endpoint-syncs=5 \
        --node-monitor-grace-period=40s
    spawn kube-scheduler xk-n1 "$BIN/kube-scheduler" \
        --kubeconfig="$STATE/admin.kubeconfig" --leader-elect=false \
        --bind-address=127.0.0.1 --cert-dir="$STATE/scheduler-certs" --profiling=false
}

start_containerd() {
    local node=$1 d="$STATE/$1"
    log "$node: containerd"
    spawn "containerd-$node" "$node" containerd --config "$d/containerd.toml"
    wait_for 30 "containerd on $node" in_node "$node" ctr --address /run/containerd/containerd.sock version
}

start_kubelet() {
    local node=$1 d="$STATE/$1"
    log "$node: kubelet"
    spawn "kubelet-$node" "$node" "$BIN/kubelet" --config="$d/kubelet.yaml" \
        --kubeconfig="$d/kubelet.kubeconfig" --hostname-override="$node" \
        --node-ip="$(node_ip "$node")" --root-dir=/var/lib/kubelet --cert-dir="$d/kubelet-pki" \
        --v=1
}

# The tarballs a node's kept store holds already, one "name inode size" line
# each. images.sh publishes every directory as hard links to the tarballs it
# built, so a tarball keeps its inode for as long as its contents stay the
# same, and a new agent image (a new directory) re-imports that tarball only,
# not the 1.3 GB of test images. The kubelet never removes images (image GC is
# off) and agent-image forgets the agent's tarball.
import_mark() { echo "$(containerd_root "$1")/xdplb-imported"; }

tarball_id() { stat -L -c '%n %i %s' "$1" | sed 's#^.*/##'; }

import_images() {
    local node=$1 f id mark have=() done_=() kept=0
    mark=$(import_mark "$node")
    [ -f "$mark" ] && mapfile -t have <"$mark"
    for f in "$IMAGES"/*.tar; do
        id=$(tarball_id "$f")
        if ((${#have[@]})) && printf '%s\n' "${have[@]}" | grep -qxF "$id"; then
            done_+=("$id")
            kept=$((kept + 1))
            continue
        fi
        in_node "$node" ctr --address /run/containerd/containerd.sock -n k8s.io images import \
            "$f" >/dev/null
        done_+=("$id")
        # After each import: an interrupted run resumes where it stopped.
        printf '%s\n' "${done_[@]}" >"$mark"
    done
    # And once more: tarballs gone from $IMAGES are forgotten.
    printf '%s\n' "${done_[@]}" >"$mark"
    log "images: $node: $((${#done_[@]} - kept)) imported, $kept there already"
}

# --- add-ons ---------------------------------------------------------------------------
apply_coredns() {
    log "CoreDNS (kube-dns at $DNS_IP)"
    kubectl_ apply -f "$HERE/coredns.yaml" >/dev/null
}

# --- proxies ----------------------------------------------------------------------------
start_kube_proxy() {
    local node
    for node in "${NODES[@]}"; do
        local conf="$STATE/$node/kube-proxy.yaml"
        cat >"$conf" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: nftables
clusterCIDR: $CLUSTER_CIDR
hostnameOverride: $node
clientConnection: {kubeconfig: $STATE/admin.kubeconfig}
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 0.0.0.0:10256
nodePortAddresses: [primary]
# nf_conntrack_max is global and root here may not write it: leave the
# conntrack sysctls as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
        # Stale tables of an earlier run would keep dead rules.
        in_node "$node" "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
        spawn "kube-proxy-$node" "$node" "$BIN/kube-proxy" --config="$conf" \
            --hostname-override="$node" --v=1
    done
}

stop_kube_proxy() {
    local node
    for node in "${NODES[@]}"; do
        stop_pid "kube-proxy-$node"
        [ -e "$(mntns "$node")" ] && mountpoint -q "$(mntns "$node")" &&
            in_node "$node" "$BIN/kube-proxy" --cleanup >/dev/null 2>&1 || true
    done
}

# The agent as deploy/ ships it: the kustomization, changed in the image
# reference and the node's device name only, plus the API server's address
# (the ConfigMap's documented keys for running without kube-proxy).
xdplb_overlay() {
    local o="$STATE/xdplb-overlay"
    rm -rf "$o"
    mkdir -p "$o"
    cp "$REPO"/deploy/{kustomization.yaml,rbac.yaml,configmap.yaml,daemonset.yaml} "$o/"
    cat >>"$o/kustomization.yaml" <<EOF
patches:
  - target: {kind: ConfigMap, name: xdplb-config}
    patch: |-
      - {op: replace, path: /data/iface, value: eth0}
      - {op: add, path: /data/k8s-service-host, value: "$API_IP"}
      - {op: add, path: /data/k8s-service-port, value: "$API_PORT"}
EOF
    # ctr names an imported xdplb:latest docker.io/library/xdplb:latest.
    sed -i "s|newName: xdplb$|newName: docker.io/library/xdplb|" "$o/kustomization.yaml"
    echo "$o"
}

start_xdplb() {
    log "xdplb agent: the DaemonSet of deploy/"
    kubectl_ apply -k "$(xdplb_overlay)" >/dev/null
    wait_for 180 "xdplb DaemonSet" xdplb_ready
}

xdplb_ready() {
    local want have
    want=$(kubectl_ -n kube-system get ds xdplb -o jsonpath='{.status.desiredNumberScheduled}')
    have=$(kubectl_ -n kube-system get ds xdplb -o jsonpath='{.status.numberReady}')
    [ -n "$want" ] && [ "$want" -gt 0 ] && [ "$have" = "$want" ]
}

stop_xdplb() {
    local node
    kubectl_ -n kube-system delete ds xdplb --ignore-not-found --wait=true >/dev/null 2>&1 || true
    # The agent leaves its programs and pins for the next agent; a switch of
    # proxy removes them, as `lbctl down` does.
    for node in "${NODES[@]}"; do
        in_node "$node" "$REPO/.venv/bin/lbctl" down >/dev/null 2>&1 || true
    done
}

set_proxy() {
    local want=$1 have
    have=$(cat "$STATE/proxy" 2>/dev/null || echo none)
    [ "$have" = "$want" ] && return 0
    case "$have" in
        kube-proxy) stop_kube_proxy ;;
        xdplb) stop_xdplb ;;
    esac
    case "$want" in kube-proxy | xdplb | none) ;; *) die "unknown proxy $want (kube-proxy, xdplb or none)" ;; esac
    # Recorded before it starts: a start that fails half-way is still
    # stopped by the next switch.
    echo "$want" >"$STATE/proxy"
    case "$want" in
        kube-proxy) log "kube-proxy (nftables) on every node"; start_kube_proxy ;;
        xdplb) start_xdplb ;;
    esac
}

# flanneld on each node (kube subnet manager, host-gw backend): it leases the
# node its spec.podCIDR, writes subnet.env and routes to the other nodes'
# subnets. Flannel's own CNI plugin only turns subnet.env into a bridge
# delegate; its module is not served here, so that step is done below.
start_flannel() {
    local node d
    printf '{"Network": "%s", "EnableNFTables": true, "Backend": {"Type": "host-gw"}}\n' \
        "$CLUSTER_CIDR" >"$STATE/flannel-net-conf.json"
    for node in "${NODES[@]}"; do
        wait_for 60 "$node registered" kubectl_ get node "$node"
        # What the controller manager's node IPAM would do; kept equal to
        # pod_cidr so that both CNI modes address pods alike.
        kubectl_ patch node "$node" -p "{\"spec\":{\"podCIDR\":\"$(pod_cidr "$node")\"}}" \
            >/dev/null
        d="$STATE/$node"
        log "$node: flanneld"
        spawn "flanneld-$node" "$node" env NODE_NAME="$node" "$FLANNEL_BIN/flanneld" \
            --kube-subnet-mgr --kubeconfig-file="$STATE/admin.kubeconfig" --iface=eth0 \
            --net-config-path="$STATE/flannel-net-conf.json" --subnet-file="$d/flannel-subnet.env" \
            --ip-masq=false --healthz-port=0
    done
    for node in "${NODES[@]}"; do
        d="$STATE/$node"
        wait_for 60 "$node: flannel's subnet" test -s "$d/flannel-subnet.env"
        # shellcheck disable=SC1090,SC1091
        (. "$d/flannel-subnet.env" &&
            write_cni_config "$node" "${FLANNEL_SUBNET%.*}.0/${FLANNEL_SUBNET#*/}" "$FLANNEL_MTU")
    done
}

nodes_ready() {
    local n
    n=$(kubectl_ get nodes --no-headers 2>/dev/null | awk '$2 == "Ready"' | wc -l)
    [ "$n" -eq "${#NODES[@]}" ]
}

system_ready() {
    # Every kube-system pod Running and Ready, as e2e.test's BeforeSuite wants.
    local out
    out=$(kubectl_ -n kube-system get pods --no-headers 2>/dev/null) || return 1
    [ -n "$out" ] || return 1
    ! echo "$out" | awk '{ split($2, r, "/"); if ($3 != "Running" || r[1] != r[2]) bad=1 } END { exit !bad }'
}

# --- up and down ---------------------------------------------------------------------------
cmd_up() {
    local proxy=kube-proxy
    CNI=bridge
    while [ $# -gt 0 ]; do
        case "$1" in
            --proxy) proxy=$2; shift 2 ;;
            --cni) CNI=$2; shift 2 ;;
            *) die "up: unknown argument $1" ;;
        esac
    done
    case "$CNI" in bridge | flannel) ;; *) die "--cni: bridge or flannel" ;; esac
    [ -e "$STATE/up" ] && die "a cluster is up already ($STATE); run down first"
    local start=$SECONDS
    BIN=$(bin_dir) || true
    [ -n "$BIN" ] || { log "building Kubernetes (tools/k8s-build.sh)"; BIN=$(bash "$REPO/tools/k8s-build.sh" | tail -n 1); }
    log "images (tools/cluster/images.sh)"
    IMAGES=$(bash "$HERE/images.sh" | tail -n 1)
    [ -d "$IMAGES" ] || die "tools/cluster/images.sh failed"
    mkdir -p "$STATE"
    touch "$STATE/up"
    echo "$BIN" >"$STATE/bin"
    echo "$IMAGES" >"$STATE/images"
    echo "$CNI" >"$STATE/cni"
    if [ "$CNI" = flannel ]; then
        FLANNEL_BIN=$(bash "$HERE/flannel-build.sh" | tail -n 1)
        [ -x "$FLANNEL_BIN/flanneld" ] || die "tools/cluster/flannel-build.sh failed"
    fi
    save_sysctls
    make_network
    local node
    for node in "${NODES[@]}"; do
        make_node_cgroups "$node"
        make_node_mounts "$node"
    done
    write_pki
    for node in "${NODES[@]}"; do write_node_config "$node"; done
    for node in "${NODES[@]}"; do start_containerd "$node"; done
    # The imports (about 1.3 GB per node) run beside each other and beside
    # the control plane's start.
    local imports=()
    log "images: importing on ${NODES[*]}"
    for node in "${NODES[@]}"; do
        import_images "$node" &
        imports+=($!)
    done
    start_control_plane
    local pid
    for pid in "${imports[@]}"; do
        wait "$pid" || die "image import failed"
    done
    log "images: imported"
    for node in "${NODES[@]}"; do start_kubelet "$node"; done
    if [ "$CNI" = flannel ]; then start_flannel; fi
    wait_for 90 "nodes" nodes_ready
    apply_coredns
    set_proxy "$proxy"
    # Without a proxy CoreDNS cannot reach the API server's ClusterIP.
    [ "$proxy" = none ] || wait_for 180 "kube-system pods" system_ready
    log "up in $((SECONDS - start)) s: nodes ${NODES[*]}, CNI $CNI, proxy $proxy; kubeconfig $STATE/admin.kubeconfig (use: $0 kubectl ...)"
}

save_sysctls() {
    local s
    [ -f "$STATE/sysctls" ] && return 0
    for s in "${KUBELET_SYSCTLS[@]}"; do
        echo "$s $(cat "/proc/sys/$s")"
    done >"$STATE/sysctls.tmp"
    mv "$STATE/sysctls.tmp" "$STATE/sysctls"
}

restore_sysctls() {
    local s v
    [ -f "$STATE/sysctls" ] || return 0
    while read -r s v; do
        echo "$v" >"/proc/sys/$s" 2>/dev/null || log "could not restore $s=$v"
    done <"$STATE/sysctls"
    rm -f "$STATE/sysctls"
}

# Pids of every process inside a node's mount namespace (containerd's shims
# and the containers too): ours, since up made the namespace.
pids_in() {
    local ns ino p
    ns=$(mntns "$1")
    mountpoint -q "$ns" 2>/dev/null || return 0
    ino=$(stat -L -c %i "$ns" 2>/dev/null) || return 0
    for p in /proc/[0-9]*; do
        [ "$(stat -L -c %i "$p/ns/mnt" 2>/dev/null)" = "$ino" ] && echo "${p#/proc/}"
    done
    return 0
}

cmd_down() {
    [ -d "$STATE" ] || { log "nothing to remove"; return 0; }
    BIN=$(cat "$STATE/bin" 2>/dev/null || bin_dir || true)
    local node pids i
    # Pods first, while containerd can still remove them, on both nodes at
    # once; kubelet is stopped first so that it does not start them again.
    log "removing the pods"
    # shellcheck disable=SC2046
    stop_pid $(printf 'kubelet-%s ' "${NODES[@]}")
    for node in "${NODES[@]}"; do
        if [ -S "$STATE/$node/root/run/containerd/containerd.sock" ] && [ -n "$BIN" ]; then
            timeout 60 nsenter --mount="$(mntns "$node")" --net="/run/netns/$node" -- \
                "$BIN/crictl" --runtime-endpoint unix:///run/containerd/containerd.sock \
                rmp -fa >/dev/null 2>&1 &
        fi
    done
    wait || true
    log "stopping the daemons"
    # shellcheck disable=SC2046
    stop_pid $(ls "$STATE/pids" 2>/dev/null)
    for node in "${NODES[@]}"; do
        for i in 1 2 3; do
            pids=$(pids_in "$node")
            [ -z "$pids" ] && break
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            sleep 0.5
        done
        # Unmounting the namespace file lets the namespace, and every mount
        # made in it (overlays, netns files, kubelet's volumes), go.
        mountpoint -q "$(mntns "$node")" 2>/dev/null && umount "$(mntns "$node")"
        mountpoint -q "$(utsns "$node")" 2>/dev/null && umount "$(utsns "$node")"
        local c
        for c in $(node_cgroups "$node"); do
            [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true
            [ -d "$c" ] && log "cgroup $c still has processes"
        done
    done
    mountpoint -q "$STATE/mnt" 2>/dev/null && umount "$STATE/mnt"
    for node in "${NODES[@]}" "$UNDERLAY"; do
        ip netns del "$node" 2>/dev/null || true
    done
    restore_sysctls
    rm -rf "$STATE"
    log "down"
}

cmd_agent_image() {
    local dir node mark
    dir=$(bash "$HERE/images.sh" --agent-only | tail -n 1)
    for node in "${NODES[@]}"; do
        mark=$(import_mark "$node")
        [ -f "$mark" ] && sed -i '/^xdplb\.tar /d' "$mark"
        in_node "$node" ctr --address /run/containerd/containerd.sock -n k8s.io images import \
            "$dir/xdplb.tar" >/dev/null
    done
    if [ "$(cat "$STATE/proxy" 2>/dev/null)" = xdplb ]; then
        # deploy/ as it is now too: the DaemonSet's arguments may have changed.
        kubectl_ apply -k "$(xdplb_overlay)" >/dev/null
        kubectl_ -n kube-system rollout restart ds/xdplb >/dev/null
        kubectl_ -n kube-system rollout status ds/xdplb --timeout=180s >/dev/null
    fi
    log "agent image from $dir imported on ${NODES[*]}"
}

cmd_status() {
    [ -e "$STATE/up" ] || { echo "no cluster"; return 1; }
    BIN=$(cat "$STATE/bin")
    echo "proxy: $(cat "$STATE/proxy" 2>/dev/null || echo none)"
    kubectl_ get nodes -o wide
    kubectl_ get pods -A -o wide
}

load_state() {
    [ -e "$STATE/up" ] || die "no cluster is up"
    BIN=$(cat "$STATE/bin")
    IMAGES=$(cat "$STATE/images")
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) cmd_down ;;
    proxy) load_state; set_proxy "$2"; [ "$2" = none ] || wait_for 180 "kube-system pods" system_ready ;;
    kubectl) load_state; shift; kubectl_ "$@" ;;
    run) load_state; shift; nsenter --net=/run/netns/xk-n1 -- "$@" ;;
    status) cmd_status ;;
    agent-image) load_state; cmd_agent_image ;;
    *) sed -n '2,9p' "$0" >&2; exit 2 ;;
esac
