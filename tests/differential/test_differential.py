"""The kernel programs against lb.datapath.userspace, packet by packet.

Every frame of a scenario goes through the kernel (BPF_PROG_TEST_RUN) and
through the userspace datapath, in the same order, both programmed by the
same reconciler code from the same desired state; return value, output
bytes and the stat reason that moved must be identical, and so must
conntrack, affinity and the counters afterwards (except timestamps).

HYPOTHESIS_PROFILE=fuzz draws at random (a new seed each run) instead of
the default, derandomized run, so CI sees the same packets every time;
LB_DIFF_PACKETS sets the packet count (20,000 by default). `make fuzz` runs
1,000,000 in chunks of 100,000, each its own process (tools/fuzz.sh).
"""

from __future__ import annotations

import array
import errno
import functools
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from lb.datapath.instance import Sizes, policy_writer_for, reconciler_for
from lb.datapath.userspace.maps import DictMap
from lb.datapath.userspace.programs import (
    PROGRAMS,
    Nat,
    Pkt,
    UserspaceDatapath,
    Verdict,
    nat_skb,
    nat_xdp,
    parse,
)
from lb.inspect import packets
from lb.model import Cluster, Node
from lb.service import maglev
from lb.service.desired import DesiredState, Memo, compute, drift
from lb.service.reconcile import Reconciler
from lb.sources.manifests import API_RULES, build_cluster
from lb.verdicts import reason
from loader import layout, libbpf
from loader.build import BuildOptions, Datapath, remove_pins
from loader.maps import BpfMap, possible_cpus, specs
from tests.conftest import REPO, new_pin_dir, require_root

XDP, TC, TO_POD, TO_EXTERNAL = PROGRAMS
ENTRY = {"xdp": XDP, "tc": TC, "to_pod": TO_POD, "to_external": TO_EXTERNAL}
U64 = (1 << 64) - 1
NODE_NAME = "node-a"
# Small maps keep clearing them between examples cheap; a table that does
# not fit is refused by both reconcilers alike, which is compared too.
SIZES = Sizes(max_services=1024, max_backends=4096, maglev_slots=1 << 17, ct_size=16384)

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
PACKETS = int(os.environ.get("LB_DIFF_PACKETS", 20_000))
# Ops per scenario, at most (MAX_OPS / 2 on average). Programming a table
# costs as much as a hundred packets, so `make fuzz` draws longer scenarios
# (LB_DIFF_MAX_OPS) to spend its time on packets.
MAX_OPS = int(os.environ.get("LB_DIFF_MAX_OPS", 100))
# The random tables get 60% of the packets, the fixed table the rest; both
# ask for a margin over the average so that the budget is met. Longer
# scenarios overrun Hypothesis's choice buffer more often: 35 packets per
# 100 ops, 30 per 100 of 200 (measured).
PER_EXAMPLE = max(1, MAX_OPS * 27 // 100)
TABLE_EXAMPLES = max(1, PACKETS * 6 // 10 // PER_EXAMPLE)
FIXED_EXAMPLES = max(1, PACKETS * 4 // 10 // PER_EXAMPLE)

_common = {
    "deadline": None,
    # No explain phase: it traces every line, which makes a failing run
    # take many times longer on Python 3.11.
    "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
    "database": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                              HealthCheck.large_base_example],
}
# Registered under their own names: loading them is this module's business.
settings.register_profile("differential", derandomize=True, **_common)
settings.register_profile("fuzz", derandomize=False, print_blob=True, **_common)
BASE = settings.get_profile("fuzz" if PROFILE == "fuzz" else "differential")

SENT = {"packets": 0, "examples": 0}


# --- the kernel side ------------------------------------------------------------------


def tc_refuses(frame: bytes) -> bool:
    """BPF_PROG_TEST_RUN builds no skb for an IPv4 or IPv6 ethertype whose
    network header is cut short (EINVAL): not comparable through tc."""
    ethertype = frame[12:14]
    return (ethertype == b"\x08\x00" and len(frame) < 34) or (
        ethertype == b"\x86\xdd" and len(frame) < 54)


def clear_maps(maps: Mapping[str, BpfMap], twin: Mapping[str, DictMap] | None = None) -> None:
    """Empty every map: hash entries deleted, array slots zeroed. `twin`,
    the userspace maps that went through the same writes, says which array
    slots can be other than zero (zeroing whole policy arrays per example
    would cost more than the packets)."""
    for name, m in maps.items():
        if isinstance(m, DictMap):
            m.clear()
            continue
        if m.spec.kind.endswith("array"):
            size = layout.sizeof(m.spec.value_type)
            if m.spec.percpu:
                size = (size + 7) // 8 * 8 * possible_cpus()
            if twin is None:
                n = libbpf.map_info(m.fd).max_entries
                keys = array.array("I", range(n)).tobytes()
            else:
                written = twin[name].written_keys()
                n, keys = len(written), b"".join(written)
            if n:
                m.update_batch(keys, bytes(size * n), n)
        else:
            for k in list(m.keys()):
                m.delete(layout.ffi.new(f"{m.spec.key_type} *", k))


class KernelSide:
    """The compiled programs; the verdict's reason is the counter that moved."""

    def __init__(self, dp: Datapath) -> None:
        self.dp = dp
        self.maps = {name: dp.map(name) for name in specs()}
        self.fds = {p: dp.prog_fd(p) for p in PROGRAMS}
        # The userspace maps of the last example: which slots it wrote.
        self.twin: dict[str, DictMap] | None = None
        stat = layout.sizeof("struct lb_stat")
        assert stat % 8 == 0, "per-CPU values are read as an array of struct lb_stat"
        self.counts = self.read_stats()

    def read_stats(self) -> list[tuple[int, int]]:
        """(packets, bytes) per reason, over all CPUs, in one syscall."""
        f = libbpf.ffi()
        n, cpus = layout.const("LB_STAT_MAX"), possible_cpus()
        keys = f.new("uint32_t[]", n)
        vals = f.new("char[]", n * cpus * layout.sizeof("struct lb_stat"))
        count = f.new("uint32_t *", n)
        out = f.new("uint32_t *")
        opts = f.new("struct bpf_map_batch_opts *")
        opts.sz = f.sizeof("struct bpf_map_batch_opts")
        ret = libbpf.lib().bpf_map_lookup_batch(self.maps["lb_stats"].fd, f.NULL, out, keys,
                                                vals, count, opts)
        if ret < 0 and ret != -errno.ENOENT:  # ENOENT: the end was reached
            libbpf.check(ret, "batch lookup of lb_stats")
        assert count[0] == n
        stats = layout.ffi.from_buffer("struct lb_stat[]", bytes(f.buffer(vals)))
        return [(sum(stats[i * cpus + c].packets for c in range(cpus)),
                 sum(stats[i * cpus + c].bytes for c in range(cpus))) for i in range(n)]

    def run(self, prog: str, frame: bytes) -> Verdict | None:
        """None when the kernel refuses to build the test skb."""
        try:
            r = libbpf.prog_test_run(self.fds[prog], frame)
        except libbpf.BpfError as e:
            if e.errno == errno.EINVAL and prog != XDP and tc_refuses(frame):
                return None
            raise
        after = self.read_stats()
        moved = [i for i, (a, b) in enumerate(zip(self.counts, after, strict=True)) if a != b]
        # One counter per packet; tc_lb_to_pod counts reverse NAT and drops
        # only, tc_lb_to_external reverse NAT only.
        assert len(moved) == 1 or (prog in (TO_POD, TO_EXTERNAL) and not moved), \
            f"counters moved: {moved}"
        for i in moved:
            assert after[i][0] == self.counts[i][0] + 1
            assert after[i][1] == self.counts[i][1] + len(frame)
        self.counts = after
        return Verdict(r.retval, r.data, moved[0] if moved else None)


@pytest.fixture(scope="module")
def kernel() -> Iterator[KernelSide]:
    """One compiled datapath for the whole module, in its own pin directory."""
    require_root()
    pin_dir = new_pin_dir("diff")
    # Both reconcilers ask for the same Maglev tables; the function is pure,
    # so the second asks a cache (it is most of the time spent programming).
    populate = maglev.populate_array

    @functools.lru_cache(maxsize=4096)
    def cached(names: tuple[str, ...], size: int,
               labels: tuple[int, ...] | None) -> array.array[int]:
        return populate(list(names), size, labels)

    def populate_cached(names: Sequence[str], size: int,
                        labels: Sequence[int] | None = None) -> array.array[int]:
        # A copy: the reconciler keeps what it is given.
        return array.array("I", cached(tuple(names), size, None if labels is None
                                       else tuple(labels)))

    try:
        with pytest.MonkeyPatch.context() as mp, Datapath(BuildOptions(pin_dir, SIZES)) as dp:
            mp.setattr(maglev, "populate_array", populate_cached)
            yield KernelSide(dp)
    finally:
        remove_pins(pin_dir)


# --- the cluster: Kubernetes objects from a compact description -----------------------


@dataclass(frozen=True)
class PortSpec:
    protocol: str = "TCP"
    port: int = 80
    target: int = 8080
    node_port: int | None = None


@dataclass(frozen=True)
class EpSpec:
    ip: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node: str | None = NODE_NAME


@dataclass(frozen=True)
class SvcSpec:
    type: str = "ClusterIP"
    cluster_ip: str = "10.96.0.1"
    ports: tuple[PortSpec, ...] = (PortSpec(),)
    endpoints: tuple[EpSpec, ...] = ()
    external_ips: tuple[str, ...] = ()
    lb_ips: tuple[str, ...] = ()
    source_ranges: tuple[str, ...] = ()
    affinity: int | None = None  # ClientIP timeout in seconds
    etp_local: bool = False
    itp_local: bool = False
    publish_not_ready: bool = False


def docs_of(services: tuple[SvcSpec, ...]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i, s in enumerate(services):
        name = f"s{i}"
        ports = []
        for j, p in enumerate(s.ports):
            port: dict[str, Any] = {"name": f"p{j}", "protocol": p.protocol, "port": p.port,
                                    "targetPort": p.target}
            if p.node_port is not None:
                port["nodePort"] = p.node_port
            ports.append(port)
        spec: dict[str, Any] = {
            "type": s.type, "clusterIP": s.cluster_ip, "ports": ports,
            "externalIPs": list(s.external_ips),
            "externalTrafficPolicy": "Local" if s.etp_local else "Cluster",
            "internalTrafficPolicy": "Local" if s.itp_local else "Cluster",
            "publishNotReadyAddresses": s.publish_not_ready,
        }
        if s.source_ranges:
            spec["loadBalancerSourceRanges"] = list(s.source_ranges)
        if s.affinity is not None:
            spec["sessionAffinity"] = "ClientIP"
            spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": s.affinity}}
        svc: dict[str, Any] = {"apiVersion": "v1", "kind": "Service",
                               "metadata": {"name": name, "namespace": "default"}, "spec": spec}
        if s.lb_ips:
            svc["status"] = {"loadBalancer": {"ingress": [{"ip": ip} for ip in s.lb_ips]}}
        docs.append(svc)
        if not s.endpoints:
            continue
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": f"p{j}", "port": p.target, "protocol": p.protocol}
                      for j, p in enumerate(s.ports)],
            "endpoints": [
                {"addresses": [e.ip], "nodeName": e.node,
                 "conditions": {"ready": e.ready, "serving": e.serving,
                                "terminating": e.terminating}}
                for e in s.endpoints],
        })
    return docs


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Frontends claimed twice are logged; random tables have many."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass(frozen=True)
class RuleSpec:
    """One NetworkPolicy rule: from/to pods labelled app=`app`, or from/to
    `cidr`, or (neither) any peer; on `ports` or every port."""

    app: str | None = None
    cidr: str | None = None
    ports: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class PolSpec:
    """A NetworkPolicy over the pods labelled app=`select` (None: all);
    `ingress`/`egress` None when the policy is not of that type."""

    select: str | None = None
    ingress: tuple[RuleSpec, ...] | None = None
    egress: tuple[RuleSpec, ...] | None = None


def _rule_doc(r: RuleSpec, peers: str) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    if r.app is not None:
        doc[peers] = [{"podSelector": {"matchLabels": {"app": r.app}}}]
    elif r.cidr is not None:
        doc[peers] = [{"ipBlock": {"cidr": r.cidr}}]
    if r.ports:
        doc["ports"] = [{"protocol": proto, "port": port} for proto, port in r.ports]
    return doc


def policy_docs(policies: tuple[PolSpec, ...]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for i, pol in enumerate(policies):
        spec: dict[str, Any] = {
            "podSelector": {"matchLabels": {"app": pol.select}} if pol.select else {},
            "policyTypes": [t for t, rules in (("Ingress", pol.ingress), ("Egress", pol.egress))
                            if rules is not None],
        }
        if pol.ingress is not None:
            spec["ingress"] = [_rule_doc(r, "from") for r in pol.ingress]
        if pol.egress is not None:
            spec["egress"] = [_rule_doc(r, "to") for r in pol.egress]
        docs.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                     "metadata": {"name": f"np{i}", "namespace": "default"}, "spec": spec})
    return docs


def pod_docs() -> list[dict[str, Any]]:
    """Every pod address, labelled app=a or app=b, on node-a (10.244.0.x)
    or node-b: what policies select and what the ipcache holds."""
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"pod{i}", "namespace": "default",
                          "labels": {"app": "ab"[i % 2]}},
             "spec": {"nodeName": NODE_NAME if ip.startswith("10.244.0.") else "node-b",
                      "containers": [{"name": "c"}]},
             "status": {"podIP": ip, "phase": "Running"}}
            for i, ip in enumerate(POD_IPS)]


def cluster_of(services: tuple[SvcSpec, ...], policies: tuple[PolSpec, ...] = ()) -> Cluster:
    docs = docs_of(services) + (policy_docs(policies) + pod_docs() if policies else [])
    # As the API source has them: two services may claim one frontend (the
    # desired state keeps the first), which a set of files may not.
    result = build_cluster(((d, "differential") for d in docs), API_RULES)
    assert not result.errors, result.errors
    return result.cluster


def node_of(node_ips: tuple[str, ...], service_cidrs: tuple[str, ...] = ()) -> Node:
    return Node(name=NODE_NAME, ips=node_ips, service_cidrs=service_cidrs)


def desired_of(services: tuple[SvcSpec, ...], node_ips: tuple[str, ...],
               service_cidrs: tuple[str, ...] = ()) -> DesiredState:
    with _quiet("lb.service.desired"):
        return compute(cluster_of(services), node_of(node_ips, service_cidrs))


def resynced(services: tuple[SvcSpec, ...], keep: int, flip: int, drop: int
             ) -> tuple[SvcSpec, ...]:
    """The services with endpoint i dropped unless bit i of `keep` is set,
    its readiness flipped when bit i of `flip` is, and service j gone
    (its ports changed to one no packet is sent to) when bit j of `drop` is."""
    out, i = [], 0
    for j, s in enumerate(services):
        if drop >> j & 1:
            s = SvcSpec(**{**s.__dict__, "ports": (PortSpec("TCP", 1, 1),)})
        eps = []
        for e in s.endpoints:
            if keep >> i & 1:
                flipped = flip >> i & 1
                eps.append(EpSpec(e.ip, e.ready != flipped, e.serving != flipped, e.terminating,
                                  e.node))
            i += 1
        out.append(SvcSpec(**{**s.__dict__, "endpoints": tuple(eps)}))
    return tuple(out)


# --- frames -----------------------------------------------------------------------------------

ETH_ADDRS = packets.DST_MAC + packets.SRC_MAC
TCP, UDP = 6, 17


def _payload(n: int) -> bytes:
    return bytes((i * 31 + n) & 0xFF for i in range(n))


def frame_of(src: str, sport: int, dst: str, dport: int, proto: int, *, flags: int = 0x02,
             payload: int = 0, ttl: int = 64, ip_opts: int = 0, tcp_opts: int = 0,
             udp_nosum: bool = False) -> bytes:
    """A well-formed frame with correct checksums; `ip_opts` and `tcp_opts`
    are counts of 4-byte words of options."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    body = _payload(payload)
    if proto == TCP:
        hdr = struct.pack("!HHIIBBHHH", sport, dport, 0x01020304, 0x0A0B0C0D,
                          (5 + tcp_opts) << 4, flags, 65535, 0, 0) + b"\x01" * (4 * tcp_opts)
        l4 = hdr + body
        csum = packets.checksum(s + d + struct.pack("!BBH", 0, TCP, len(l4)) + l4)
        l4 = l4[:16] + struct.pack("!H", csum) + l4[18:]
    elif proto == UDP:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(body), 0) + body
        csum = packets.checksum(s + d + struct.pack("!BBH", 0, UDP, len(l4)) + l4) or 0xFFFF
        l4 = l4[:6] + struct.pack("!H", 0 if udp_nosum else csum) + l4[8:]
    else:
        # Port-shaped bytes that must not be taken for ports.
        l4 = struct.pack("!HH", sport, dport) + body
    opts = (b"\x01" * (4 * ip_opts - 1) + b"\x00") if ip_opts else b""
    ihl = 5 + ip_opts
    ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(l4), 0x1234, 0, ttl, proto,
                     0, s, d) + opts
    ip = ip[:10] + struct.pack("!H", packets.checksum(ip)) + ip[12:]
    return ETH_ADDRS + b"\x08\x00" + ip + l4


@dataclass(frozen=True)
class Mut:
    """One way to damage a frame (offsets follow the original headers)."""

    kind: str
    value: int


def mutate(frame: bytes, muts: tuple[Mut, ...]) -> bytes:
    b = bytearray(frame)
    l4 = 14 + (frame[14] & 0xF) * 4
    proto = frame[23]

    def put16(off: int, v: int) -> None:
        if off + 2 <= len(b):
            b[off:off + 2] = (v & 0xFFFF).to_bytes(2, "big")

    def get16(off: int) -> int:
        return int.from_bytes(b[off:off + 2], "big") if off + 2 <= len(b) else 0

    def nibble(off: int, v: int, high: bool) -> None:
        if off < len(b):
            b[off] = (b[off] & 0x0F) | (v << 4) if high else (b[off] & 0xF0) | v

    for m in muts:
        k, v = m.kind, m.value
        if k == "truncate":
            del b[max(14, v):]
        elif k == "pad":
            b += _payload(v)
        elif k == "ethertype":
            put16(12, v)
        elif k in ("version", "ihl"):
            nibble(14, v, k == "version")
        elif k == "tot_len":
            put16(16, get16(16) + v)
        elif k == "frag":
            put16(20, v)
        elif k == "proto":
            if len(b) > 23:
                b[23] = v
        elif k == "doff":
            nibble(l4 + 12, v, True)
        elif k == "udp_len":
            put16(l4 + 4, get16(l4 + 4) + v)
        elif k == "ip_csum":
            put16(24, v)
        elif k == "l4_csum":
            put16(l4 + (16 if proto == TCP else 6), v)
        elif k == "byte" and v >> 8 < len(b):
            b[v >> 8] = v & 0xFF
    return bytes(b)


Tuple4 = tuple[str, int, str, int]


def _native_ip(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), sys.byteorder)


def _native_port(port: int) -> int:
    return int.from_bytes(port.to_bytes(2, "big"), sys.byteorder)


def aim_checksums(frame: bytes, entry: str, expect: Tuple4, l4_target: int | None,
                  ip_target: int | None) -> bytes:
    """The frame with checksum fields chosen so that, if the datapath
    rewrites it to `expect`, they come out as the targets (0x0000, 0xffff
    and their neighbours are where 16-bit one's-complement arithmetic has
    two zeros and the XDP and tc paths can part)."""
    p = Pkt()
    if parse(frame, p) >= 0:
        return frame
    n = Nat(_native_ip(expect[0]), _native_ip(expect[2]), _native_port(expect[1]),
            _native_port(expect[3]))
    rewrite = nat_xdp if entry == "xdp" else nat_skb
    fields = []
    if l4_target is not None:
        fields.append((p.l4_off + (16 if p.proto == TCP else 6), l4_target))
    if ip_target is not None:
        fields.append((24, ip_target))
    out = bytearray(frame)
    for off, target in fields:
        def result(c: int, off: int = off) -> int:
            b = bytearray(out)
            b[off:off + 2] = c.to_bytes(2, "big")
            rewrite(b, p, n)
            return int.from_bytes(b[off:off + 2], "big")

        base = 0x8000
        guess = (target - result(base) + base) % 0xFFFF
        choice = guess
        for c in (guess, guess + 0xFFFF, guess - 1, guess + 1, guess - 2, guess + 2):
            if 0 <= c <= 0xFFFF and result(c) == target:
                choice = c
                break
        out[off:off + 2] = choice.to_bytes(2, "big")
    return bytes(out)


# --- what a scenario does ----------------------------------------------------------------


@dataclass(frozen=True)
class Send:
    entry: str
    src: str
    sport: int
    dst: str
    dport: int
    proto: int
    flags: int = 0x02
    payload: int = 0
    ttl: int = 64
    ip_opts: int = 0
    tcp_opts: int = 0
    udp_nosum: bool = False
    muts: tuple[Mut, ...] = ()


@dataclass(frozen=True)
class Follow:
    """Another packet of an earlier flow (index modulo the flows so far)."""

    flow: int
    entry: str
    flags: int = 0x10
    payload: int = 0
    l4_csum: int | None = None
    ip_csum: int | None = None


@dataclass(frozen=True)
class Reply:
    """The answer to an earlier flow, from where the datapath sent it."""

    flow: int
    entry: str
    flags: int = 0x12
    payload: int = 0
    l4_csum: int | None = None
    ip_csum: int | None = None


@dataclass(frozen=True)
class Age:
    """Every conntrack and affinity entry last used `seconds` ago."""

    seconds: int


@dataclass(frozen=True)
class Resync:
    """Reprogram with endpoints dropped or flipped, services removed (see
    `resynced`); every Resync starts from the scenario's services."""

    keep: int
    flip: int
    drop: int = 0


@dataclass(frozen=True)
class Deliver:
    """What the datapath made of an earlier flow's packet, handed to the
    receiving pod's hook (tc_lb_to_pod: its ingress policy)."""

    flow: int


Op = Send | Follow | Reply | Age | Resync | Deliver


@dataclass(frozen=True)
class Scenario:
    node_ips: tuple[str, ...]
    services: tuple[SvcSpec, ...]
    ops: tuple[Op, ...]
    service_cidrs: tuple[str, ...] = ()
    policies: tuple[PolSpec, ...] = ()


@dataclass(frozen=True)
class Flow:
    entry: str
    proto: int
    sent: Tuple4
    out: Tuple4
    out_frame: bytes = b""

    @property
    def translated(self) -> bool:
        return self.sent != self.out


# --- running both sides ---------------------------------------------------------------------


class Clock:
    """bpf_ktime_get_ns for the userspace side: a microsecond per call, so
    nothing expires unless an Age op says so (as in the kernel, where a
    scenario lasts well under the shortest lifetime)."""

    def __init__(self) -> None:
        self.now = 1_000_000_000_000

    def __call__(self) -> int:
        self.now += 1000
        return self.now


def _describe(v: Verdict | None) -> str:
    if v is None:
        return "refused"
    return f"retval={v.retval} reason={reason(v.reason).name} out={v.data.hex()}"


class Pair:
    """Both datapaths, emptied, with one reconciler each."""

    def __init__(self, kernel: KernelSide) -> None:
        clear_maps(kernel.maps, kernel.twin)
        kernel.counts = kernel.read_stats()
        self.k = kernel
        self.clock = Clock()
        self.u = UserspaceDatapath.new(SIZES, self.clock)
        self.umaps = kernel.twin = dict(self.u.maps)
        self.krec: Reconciler = reconciler_for(kernel.dp)
        self.urec: Reconciler = reconciler_for(self.u)
        self.kpol = policy_writer_for(kernel.dp)
        self.upol = policy_writer_for(self.u)
        self.flows: list[Flow] = []
        self.sent = 0

    def program(self, state: DesiredState, cluster: Cluster | None = None,
                node: Node | None = None) -> None:
        with _quiet("lb.service.reconcile"):
            kr, ur = self.krec.sync(state), self.urec.sync(state)
        assert kr == ur, f"the reconcilers disagree: kernel {kr} userspace {ur}"
        if cluster is not None and node is not None:
            with _quiet("lb.policy"):
                # A compile that reused the previous one's rules is checked
                # against a whole one, as the agent's periodic check does.
                kp = self.kpol.sync(cluster, node, check=True)
                up = self.upol.sync(cluster, node, check=True)
            assert kp == up, f"the policy writers disagree: kernel {kp} userspace {up}"
            assert self.kpol.drifted == self.upol.drifted == 0

    def send(self, entry: str, frame: bytes) -> Verdict:
        prog = ENTRY[entry]
        kv = self.k.run(prog, frame)
        if kv is None:
            prog = XDP
            kv = self.k.run(prog, frame)
        uv = self.u.run(prog, frame)
        self.sent += 1
        if kv != uv:
            raise AssertionError(
                f"packet {self.sent} through {prog} differs\n  in:     {frame.hex()}\n"
                f"  kernel: {_describe(kv)}\n  user:   {_describe(uv)}")
        assert kv is not None
        return kv

    def record(self, entry: str, frame: bytes, v: Verdict) -> None:
        sent, out = packets.parse(frame), packets.parse(v.data)
        if sent is None:
            return
        after = out or sent
        self.flows.append(Flow(entry, sent.proto, (sent.src, sent.sport, sent.dst, sent.dport),
                               (after.src, after.sport, after.dst, after.dport), v.data))

    def age(self, seconds: int) -> None:
        delta = seconds * 1_000_000_000
        kernel_now = self.k.dp.opts.clock.now_ns()
        for maps, now in ((self.k.maps, kernel_now), (self.umaps, self.clock.now)):
            for name, stamp in (("lb_ct", "last_seen_ns"), ("lb_affinity", "last_used_ns")):
                m = maps[name]
                for k, v in list(m.items()):
                    setattr(v, stamp, (now - delta) & U64)
                    m.update(layout.ffi.new(f"{m.spec.key_type} *", k), v)

    def check_state(self) -> None:
        ct_fields = ("backend_id", "svc_id", "group_id", "nat_addr", "nat_port", "flags")
        for name, fields in (("lb_ct", ct_fields), ("lb_affinity", ("backend_id",))):
            kt, ut = table_of(self.k.maps[name], fields), table_of(self.umaps[name], fields)
            assert kt == ut, f"{name} differs:\n  kernel: {kt}\n  user:   {ut}"
        user = [(s[0].packets, s[0].bytes) for _, s in self.umaps["lb_stats"].items()]
        assert self.k.counts == user, "the counters differ"
        for i in range(1, 16):  # policy ids are small
            kd = sum(s.packets for s in self.k.maps["lb_pol_drops"].lookup(i) or [])
            assert kd == self.umaps["lb_pol_drops"].lookup(i)[0].packets, f"policy {i} drops"
        # What the reconcilers wrote to the maps that are not arrays.
        for name in ("lb_services", "lb_vips", "lb_svc_cidrs", "lb_source_ranges"):
            kt, ut = raw_table_of(self.k.maps[name]), raw_table_of(self.umaps[name])
            assert kt == ut, f"{name} differs:\n  kernel: {kt}\n  user:   {ut}"


def table_of(m: BpfMap, fields: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    key_type = m.spec.key_type
    return {layout.to_bytes(layout.ffi.new(f"{key_type} *", k)).hex():
            tuple(getattr(v, f) for f in fields) for k, v in m.items()}


def raw_table_of(m: BpfMap) -> dict[str, str]:
    spec = m.spec
    return {layout.to_bytes(layout.ffi.new(f"{spec.key_type} *", k)).hex():
            layout.to_bytes(layout.ffi.new(f"{spec.value_type} *", v)).hex()
            for k, v in m.items()}


def run_scenario(kernel: KernelSide, sc: Scenario) -> None:
    pair = Pair(kernel)
    node = node_of(sc.node_ips, sc.service_cidrs)
    memo = Memo()

    def program(services: tuple[SvcSpec, ...]) -> None:
        cluster = cluster_of(services, sc.policies)
        with _quiet("lb.service.desired"):
            # Programmed as the agent does, through the memo, which must
            # agree with a full recompute every time.
            state = compute(cluster, node, memo)
            assert drift(state, compute(cluster, node)) == 0
        pair.program(state, cluster, node)

    program(sc.services)
    for op in sc.ops:
        if isinstance(op, Age):
            pair.age(op.seconds)
        elif isinstance(op, Resync):
            program(resynced(sc.services, op.keep, op.flip, op.drop))
        elif isinstance(op, Deliver):
            if pair.flows:
                frame = pair.flows[op.flow % len(pair.flows)].out_frame
                pair.send("to_pod", frame)
        elif isinstance(op, Send):
            frame = mutate(frame_of(op.src, op.sport, op.dst, op.dport, op.proto, flags=op.flags,
                                    payload=op.payload, ttl=op.ttl, ip_opts=op.ip_opts,
                                    tcp_opts=op.tcp_opts, udp_nosum=op.udp_nosum), op.muts)
            pair.record(op.entry, frame, pair.send(op.entry, frame))
        else:
            # Flows the datapath translated are the interesting ones.
            flows = [f for f in pair.flows if f.translated] or pair.flows
            if flows:
                f = flows[op.flow % len(flows)]
            else:
                f = Flow("tc", TCP, ("10.244.0.1", 40000, "10.96.0.1", 80),
                         ("10.244.0.1", 40000, "10.96.0.1", 80))
            if isinstance(op, Follow):
                tup, expect = f.sent, f.out
            else:
                tup = (f.out[2], f.out[3], f.out[0], f.out[1])
                expect = (f.sent[2], f.sent[3], f.sent[0], f.sent[1])
            frame = frame_of(tup[0], tup[1], tup[2], tup[3], f.proto, flags=op.flags,
                             payload=op.payload)
            frame = aim_checksums(frame, op.entry, expect, op.l4_csum, op.ip_csum)
            pair.record(op.entry, frame, pair.send(op.entry, frame))
    pair.check_state()
    SENT["packets"] += pair.sent
    SENT["examples"] += 1


# --- strategies -------------------------------------------------------------------------------

CLUSTER_IPS = [f"10.96.0.{i}" for i in range(1, 9)]
LB_IPS = [f"203.0.113.{i}" for i in range(1, 5)]
EXTERNAL_IPS = [f"198.51.100.{i}" for i in range(1, 5)]
POD_IPS = [f"10.244.{a}.{b}" for a in (0, 1) for b in range(1, 13)]
NODE_IPS = ["192.0.2.1", "192.0.2.2"]
CLIENTS = ["198.51.100.77", "100.64.0.1", "0.0.0.0", "255.255.255.255", "127.0.0.9", "224.0.0.251",
           "0.3.2.1"]
SERVICE_PORTS = [53, 80, 443, 8080]
TARGET_PORTS = [53, 80, 8080, 5353, 9000]
NODE_PORTS = list(range(30000, 30010))
SOURCE_RANGES = [(), ("198.51.100.0/24",), ("10.244.0.0/25", "203.0.113.7/32")]
SERVICE_CIDRS = [(), ("10.96.0.0/24",), ("10.96.0.0/29", "10.97.0.0/16")]
# In the service CIDRs, held by no service.
UNUSED_VIPS = ["10.96.0.200", "10.97.1.1"]

any_ip = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
any_port = st.integers(0, 65535)
entries = st.sampled_from(["tc", "xdp", "tc", "xdp", "to_pod", "to_external"])
tcp_flags = st.one_of(st.sampled_from([0x02, 0x10, 0x18, 0x11, 0x04, 0x14, 0x12, 0x01, 0x05]),
                      st.integers(0, 255))
# Mostly small; sometimes a full 1500-byte frame.
payloads = st.one_of(st.integers(0, 64), st.sampled_from([1400, 1458]))
csum_targets = st.one_of(st.none(), st.sampled_from([0x0000, 0xFFFF, 0x0001, 0xFFFE]))


@st.composite
def ports_of(draw: st.DrawFn, node_port: bool) -> tuple[PortSpec, ...]:
    ports: dict[tuple[str, int], PortSpec] = {}
    for _ in range(draw(st.integers(1, 3))):
        p = PortSpec(
            protocol=draw(st.sampled_from(["TCP", "UDP"])),
            port=draw(st.sampled_from(SERVICE_PORTS)),
            target=draw(st.sampled_from(TARGET_PORTS)),
            node_port=draw(st.sampled_from(NODE_PORTS)) if node_port else None,
        )
        # A service may not repeat a protocol and port (the API refuses it).
        ports.setdefault((p.protocol, p.port), p)
    return tuple(ports.values())


endpoint_specs = st.builds(
    EpSpec,
    # Now and then a hostNetwork endpoint on a node's own address.
    ip=st.sampled_from(POD_IPS + NODE_IPS),
    ready=st.booleans(),
    serving=st.booleans(),
    terminating=st.booleans(),
    node=st.sampled_from([NODE_NAME, "node-b", None]),
)


@st.composite
def service_specs(draw: st.DrawFn) -> SvcSpec:
    kind = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
    return SvcSpec(
        type=kind,
        cluster_ip=draw(st.sampled_from([*CLUSTER_IPS, "None"])),
        ports=draw(ports_of(kind != "ClusterIP")),
        endpoints=tuple(draw(st.lists(endpoint_specs, max_size=10))),
        external_ips=tuple(draw(st.lists(st.sampled_from(EXTERNAL_IPS), max_size=1))),
        lb_ips=tuple(draw(st.lists(st.sampled_from(LB_IPS), max_size=2, unique=True)))
        if kind == "LoadBalancer" else (),
        source_ranges=draw(st.sampled_from(SOURCE_RANGES)),
        # Far from every age an Age op sets, so that wall-clock time spent
        # by the kernel side cannot tip an affinity over its timeout.
        affinity=draw(st.one_of(st.none(), st.sampled_from([10, 100, 10800]))),
        etp_local=draw(st.booleans()),
        itp_local=draw(st.booleans()),
        publish_not_ready=draw(st.booleans()),
    )


rule_specs = st.builds(
    RuleSpec,
    app=st.one_of(st.none(), st.sampled_from(["a", "b"])),
    cidr=st.one_of(st.none(), st.sampled_from(["198.51.100.0/24", "10.244.1.0/24",
                                               "0.0.0.0/0"])),
    ports=st.lists(st.tuples(st.sampled_from(["TCP", "UDP"]),
                             st.sampled_from(TARGET_PORTS + SERVICE_PORTS)),
                   max_size=2).map(tuple),
)
policy_specs = st.builds(
    PolSpec,
    select=st.one_of(st.none(), st.sampled_from(["a", "b"])),
    ingress=st.one_of(st.none(), st.lists(rule_specs, max_size=2).map(tuple)),
    egress=st.one_of(st.none(), st.lists(rule_specs, max_size=2).map(tuple)),
).filter(lambda p: p.ingress is not None or p.egress is not None)

mutations = st.one_of(
    st.builds(Mut, st.just("truncate"), st.integers(14, 200)),
    st.builds(Mut, st.just("pad"), st.integers(1, 64)),
    st.builds(Mut, st.just("ethertype"),
              st.one_of(st.sampled_from([0x0806, 0x86DD, 0x8100, 0x0000, 0x0008]),
                        st.integers(0, 0xFFFF))),
    st.builds(Mut, st.just("version"), st.integers(0, 15)),
    st.builds(Mut, st.just("ihl"), st.integers(0, 15)),
    st.builds(Mut, st.just("tot_len"),
              st.one_of(st.sampled_from([-1, 1, -20, 4]), st.integers(-65535, 65535))),
    st.builds(Mut, st.just("frag"),
              st.one_of(st.sampled_from([0x2000, 0x0001, 0x1FFF, 0x4000, 0x8000, 0x6000]),
                        st.integers(0, 0xFFFF))),
    st.builds(Mut, st.just("proto"), st.integers(0, 255)),
    st.builds(Mut, st.just("doff"), st.integers(0, 15)),
    st.builds(Mut, st.just("udp_len"),
              st.one_of(st.sampled_from([-8, -1, 1, 100]), st.integers(-65535, 65535))),
    st.builds(Mut, st.just("ip_csum"), st.integers(0, 0xFFFF)),
    st.builds(Mut, st.just("l4_csum"), st.one_of(st.sampled_from([0, 0xFFFF]),
                                                 st.integers(0, 0xFFFF))),
    st.builds(Mut, st.just("byte"), st.integers(0, 120 * 256 - 1)),
)


def frontends_of(services: tuple[SvcSpec, ...], node_ips: tuple[str, ...]
                 ) -> list[tuple[str, int, int]]:
    out = set()
    for s in services:
        for p in s.ports:
            proto = TCP if p.protocol == "TCP" else UDP
            ips = [*s.external_ips, *s.lb_ips] + ([s.cluster_ip] if s.cluster_ip != "None" else [])
            out |= {(ip, p.port, proto) for ip in ips}
            if p.node_port is not None:
                out |= {(ip, p.node_port, proto) for ip in node_ips}
    return sorted(out)


def endpoints_of(services: tuple[SvcSpec, ...]) -> list[tuple[str, int, int]]:
    return sorted({(e.ip, p.target, TCP if p.protocol == "TCP" else UDP)
                   for s in services for p in s.ports for e in s.endpoints})


def op_strategy(services: tuple[SvcSpec, ...], node_ips: tuple[str, ...],
                ages: bool) -> st.SearchStrategy[Op]:
    targets = frontends_of(services, node_ips) or [("10.96.0.1", 80, TCP)]
    pods = endpoints_of(services) or targets
    some_ip = st.one_of(st.sampled_from(CLUSTER_IPS + UNUSED_VIPS + NODE_IPS + LB_IPS
                                        + EXTERNAL_IPS + POD_IPS), any_ip)
    dests = st.one_of(
        st.sampled_from(targets),
        st.sampled_from(targets),
        st.sampled_from(pods),
        st.tuples(some_ip, st.one_of(st.sampled_from(SERVICE_PORTS + NODE_PORTS), any_port),
                  st.one_of(st.sampled_from([TCP, UDP]), st.integers(0, 255))),
    )
    sources = st.one_of(st.sampled_from(POD_IPS + CLIENTS), any_ip)
    sports = st.one_of(st.sampled_from([40000, 40001, 53, 0, 65535]), any_port)
    sends = st.builds(
        lambda entry, src, sport, dst, flags, payload, ttl, ip_opts, tcp_opts, nosum, muts: Send(
            entry, src, sport, dst[0], dst[1], dst[2], flags, payload, ttl, ip_opts, tcp_opts,
            nosum, muts),
        entries, sources, sports, dests, tcp_flags, payloads,
        st.sampled_from([64, 1, 0, 255]), st.one_of(st.just(0), st.integers(1, 10)),
        st.one_of(st.just(0), st.integers(1, 10)), st.booleans(),
        st.one_of(st.just(()), st.lists(mutations, min_size=1, max_size=3).map(tuple)),
    )
    flow = st.integers(0, 1000)
    follows = st.builds(Follow, flow, entries, tcp_flags, payloads, csum_targets,
                        csum_targets)
    replies = st.builds(Reply, flow, entries, tcp_flags, payloads, csum_targets,
                        csum_targets)
    delivers = st.builds(Deliver, flow)
    branches: list[st.SearchStrategy[Op]] = [sends, sends, sends, follows, follows, replies,
                                             replies, delivers]
    if ages:
        # Rarer than packets: a Resync costs as much as a hundred of them.
        branches *= 2
        branches.append(st.one_of(
            st.builds(Age, st.sampled_from([3, 30, 300, 3000, 15000, 30000])),
            st.builds(Resync, st.integers(0, 2**200 - 1), st.integers(0, 2**200 - 1),
                      st.one_of(st.just(0), st.integers(0, 2**20 - 1)))))
    return st.one_of(branches)


@st.composite
def scenarios(draw: st.DrawFn, fixed: tuple[SvcSpec, ...] | None = None) -> Scenario:
    node_ips = draw(st.sampled_from([(NODE_IPS[0],), tuple(NODE_IPS)]))
    services = fixed or tuple(draw(st.lists(service_specs(), min_size=1, max_size=20)))
    cidrs = draw(st.sampled_from(SERVICE_CIDRS))
    policies = tuple(draw(st.one_of(st.just([]), st.lists(policy_specs, min_size=1,
                                                          max_size=3))))
    op = op_strategy(services, node_ips, ages=fixed is None)
    ops = tuple(draw(op) for _ in range(draw(st.integers(1, MAX_OPS))))
    return Scenario(node_ips, services, ops, cidrs, policies)


# A small fixed table: every verdict is reachable, and no table has to be
# computed per example, so this one spends its time on packets.
FIXED = (
    SvcSpec(type="NodePort", cluster_ip="10.96.0.1",
            ports=(PortSpec("TCP", 80, 8080, 30080), PortSpec("UDP", 53, 5353, 30053)),
            endpoints=(EpSpec("10.244.0.1"), EpSpec("10.244.1.1", node="node-b"))),
    SvcSpec(type="LoadBalancer", cluster_ip="10.96.0.2", affinity=100,
            ports=(PortSpec("TCP", 443, 8443, 30443),), lb_ips=("203.0.113.1",),
            endpoints=(EpSpec("10.244.0.2"), EpSpec("10.244.0.3"), EpSpec("10.244.1.2"))),
    SvcSpec(type="NodePort", cluster_ip="10.96.0.3", etp_local=True,
            ports=(PortSpec("UDP", 53, 53, 30000),), endpoints=(EpSpec("10.244.1.3", node=None),)),
    SvcSpec(cluster_ip="10.96.0.4", ports=(PortSpec("TCP", 80, 80),)),
    SvcSpec(type="LoadBalancer", cluster_ip="10.96.0.5", lb_ips=("203.0.113.2",),
            source_ranges=("198.51.100.0/24",), ports=(PortSpec("UDP", 53, 53, 30001),),
            endpoints=(EpSpec("10.244.0.5"), EpSpec("10.244.1.5", node="node-b"))),
)


# --- the tests ---------------------------------------------------------------------------------


# Edges pinned whatever the generator draws: checksums that come out as
# 0x0000 or 0xffff (where XDP's RFC 1624 code and the kernel's tc helpers
# part), frames the tc test run refuses, REJECT with and without IP options.
EDGES = (
    Scenario(
        node_ips=("192.0.2.1",),
        services=(SvcSpec(cluster_ip="10.96.0.1", ports=(PortSpec("UDP", 53, 53),),
                          endpoints=(EpSpec("10.244.0.1"),)),
                  SvcSpec(cluster_ip="10.96.0.2", ports=(PortSpec("TCP", 80, 80),))),
        ops=(Send("tc", "10.244.0.9", 40000, "10.96.0.1", 53, UDP),
             Follow(0, "tc", l4_csum=0x0000), Follow(0, "tc", l4_csum=0xFFFF),
             Follow(0, "xdp", l4_csum=0x0000), Reply(0, "xdp", l4_csum=0x0000),
             Reply(0, "tc", l4_csum=0x0000), Reply(0, "tc", ip_csum=0x0000),
             Send("tc", "10.244.0.9", 40001, "10.96.0.1", 53, UDP, udp_nosum=True)),
    ),
    Scenario(
        node_ips=("192.0.2.1",),
        services=(SvcSpec(cluster_ip="10.96.0.2", ports=(PortSpec("TCP", 80, 80),)),),
        ops=(Send("tc", "10.244.0.9", 1, "10.96.0.2", 80, TCP, muts=(Mut("truncate", 33),)),
             Send("tc", "10.244.0.9", 1, "10.96.0.2", 80, TCP),
             Send("tc", "10.244.0.9", 1, "10.96.0.2", 80, TCP, ip_opts=1),
             Send("tc", "10.244.0.9", 1, "10.96.0.2", 81, UDP),
             Send("tc", "10.244.0.9", 1, "10.96.0.7", 81, UDP)),
        service_cidrs=("10.96.0.0/24",),
    ),
)


# Shrinking a failure replays whole scenarios; Hypothesis caps it at 5 min.
@pytest.mark.timeout(1800)
@settings(BASE, max_examples=TABLE_EXAMPLES)
@given(sc=scenarios())
@example(sc=EDGES[0])
@example(sc=EDGES[1])
def test_random_tables_agree(kernel: KernelSide, sc: Scenario) -> None:
    run_scenario(kernel, sc)


# Found by this test: a SYN through the receiving pod's ingress check on a
# flow whose FIN it had seen (kernel: judged afresh, dropped; the model had
# let it pass as known).
REOPENED = Scenario(
    node_ips=("192.0.2.1",), services=FIXED,
    ops=(Follow(0, "tc", 0x02), Reply(0, "tc", 0x11), Deliver(1), Follow(1, "tc", 0x02),
         Deliver(2)),
    policies=(PolSpec(select=None, ingress=(), egress=None),),
)


@pytest.mark.timeout(1800)
@settings(BASE, max_examples=FIXED_EXAMPLES)
@given(sc=scenarios(fixed=FIXED))
@example(sc=REOPENED)
def test_fixed_table_agrees(kernel: KernelSide, sc: Scenario) -> None:
    run_scenario(kernel, sc)


def test_packet_budget_was_met() -> None:
    """Runs after the two above (file order) and says how much they sent."""
    print(f"differential: {SENT['packets']} packets in {SENT['examples']} examples")
    if SENT["examples"] >= TABLE_EXAMPLES + FIXED_EXAMPLES:
        assert SENT["packets"] >= PACKETS, SENT


# --- kube-proxy's semantics, asserted on both datapaths ------------------------------------
# Both datapaths run each packet (Pair.send asserts they agree); the test asserts what
# kube-proxy does.


def test_idle_flow_never_reaches_a_pod_of_another_service(kernel: KernelSide) -> None:
    a = SvcSpec(cluster_ip="10.96.0.1", ports=(PortSpec("TCP", 80, 8080),),
                endpoints=(EpSpec("10.244.0.1"),))
    b = SvcSpec(cluster_ip="10.96.0.2", ports=(PortSpec("TCP", 443, 9443),))
    a_gone, b_up = replace(a, endpoints=()), replace(b, endpoints=(EpSpec("10.244.1.1"),))
    pair = Pair(kernel)
    pair.program(desired_of((a, b), (NODE_IPS[0],)))
    first = pair.send("tc", frame_of("10.244.5.5", 40000, "10.96.0.1", 80, TCP))
    assert _reason(first) == "new"
    # s0 loses its pod; its freed backend id may later go to s1's new pod
    # (ids are reused once the fresh ones run out).
    pair.program(desired_of((a_gone, b), (NODE_IPS[0],)))
    pair.program(desired_of((a_gone, b_up), (NODE_IPS[0],)))
    again = pair.send("tc", frame_of("10.244.5.5", 40000, "10.96.0.1", 80, TCP, flags=0x10))
    assert _reason(again) == "no-endpoints", f"sent on: {packets.parse(again.data)}"


def test_fragments_agree(kernel: KernelSide) -> None:
    # Datagrams in two fragments, both ways through the ClusterIP and in
    # through a NodePort, with a later fragment that lost its first.
    svc = SvcSpec(type="NodePort", cluster_ip="10.96.0.1",
                  ports=(PortSpec("UDP", 53, 5353, 30053),),
                  endpoints=(EpSpec("10.244.0.1"), EpSpec("10.244.0.2")))
    pair = Pair(kernel)
    pair.program(desired_of((svc,), (NODE_IPS[0],)))
    for i, (entry, dst, dport) in enumerate((("tc", "10.96.0.1", 53),
                                             ("xdp", NODE_IPS[0], 30053))):
        for sport in range(40000, 40006):
            whole = frame_of("10.244.5.5", sport + 100 * i, dst, dport, UDP, payload=2000)
            first, later = packets.fragment(whole, 1480)
            out = [pair.send(entry, first), pair.send(entry, later)]
            assert [_reason(v) for v in out] == ["new", "established"]
            back = packets.parse(packets.reassemble([v.data for v in out]))
            assert back is not None and back.l4_csum_ok
    orphan = packets.fragment(frame_of("10.244.5.6", 41000, "10.96.0.1", 53, UDP,
                                       payload=2000), 1480)[1]
    assert _reason(pair.send("tc", bytes(orphan[:18]) + b"\x43\x21" + orphan[20:])) == \
        "frag-no-first"
    kt = raw_table_of(pair.k.maps["lb_frags"])
    assert kt and kt == raw_table_of(pair.umaps["lb_frags"])
    pair.check_state()


def test_affinity_does_not_break_internal_traffic_policy_local(kernel: KernelSide) -> None:
    svc = SvcSpec(type="LoadBalancer", cluster_ip="10.96.0.1", lb_ips=("203.0.113.1",),
                  itp_local=True, affinity=10800, ports=(PortSpec("TCP", 80, 8080, 30080),),
                  endpoints=(EpSpec("10.244.0.1"), EpSpec("10.244.1.1", node="node-b")))
    pair = Pair(kernel)
    pair.program(desired_of((svc,), (NODE_IPS[0],)))
    for i in range(1, 100):
        # A pod reaching the LoadBalancer IP may get any endpoint ...
        client = f"10.244.0.{100 + i}"
        out = packets.parse(pair.send("tc", frame_of(client, 40000, "203.0.113.1", 80, TCP)).data)
        assert out is not None
        if out.dst == "10.244.1.1":
            break
    else:
        raise AssertionError("no client was sent to the remote endpoint")
    # ... but through the ClusterIP only the local one (internalTrafficPolicy: Local).
    out = packets.parse(pair.send("tc", frame_of(client, 40001, "10.96.0.1", 80, TCP)).data)
    assert out is not None and out.dst == "10.244.0.1"


# --- the userspace side on its own: what the kernel cannot be made to show -----------------


def _svc(**kw: Any) -> tuple[SvcSpec, ...]:
    return (SvcSpec(**kw),)


def _userspace(services: tuple[SvcSpec, ...], sizes: Sizes = SIZES
               ) -> tuple[UserspaceDatapath, dict[str, DictMap], Clock]:
    clock = Clock()
    dp = UserspaceDatapath.new(sizes, clock)
    res = reconciler_for(dp).sync(desired_of(services, (NODE_IPS[0],)))
    assert not res.errors
    return dp, dict(dp.maps), clock


def _reason(v: Verdict) -> str:
    return reason(v.reason).name


def test_conntrack_expires_as_the_lifetimes_say() -> None:
    dp, _, clock = _userspace(_svc(ports=(PortSpec("UDP", 53, 53), PortSpec("TCP", 80, 80)),
                                   endpoints=(EpSpec("10.244.0.1"),)))
    udp = frame_of("10.244.1.5", 4000, "10.96.0.1", 53, UDP)
    assert _reason(dp.tc_lb_from_pod(udp)) == "new"
    clock.now += 59 * 10**9
    assert _reason(dp.tc_lb_from_pod(udp)) == "established"
    clock.now += 61 * 10**9
    assert _reason(dp.tc_lb_from_pod(udp)) == "new", "60 s of silence ends a UDP flow"

    syn = frame_of("10.244.1.5", 4001, "10.96.0.1", 80, TCP, flags=0x02)
    fin = frame_of("10.244.1.5", 4001, "10.96.0.1", 80, TCP, flags=0x11)
    ack = frame_of("10.244.1.5", 4001, "10.96.0.1", 80, TCP, flags=0x10)
    assert _reason(dp.tc_lb_from_pod(syn)) == "new"
    clock.now += 61 * 10**9
    assert _reason(dp.tc_lb_from_pod(syn)) == "new", "an unanswered SYN is gone after 60 s"
    synack = frame_of("10.244.0.1", 80, "10.244.1.5", 4001, TCP, flags=0x12)
    assert _reason(dp.tc_lb_from_pod(synack)) == "reverse-nat"
    clock.now += 3600 * 10**9
    assert _reason(dp.tc_lb_from_pod(fin)) == "established", "an open TCP flow lives 6 h"
    clock.now += 9 * 10**9
    assert _reason(dp.tc_lb_from_pod(ack)) == "established"
    clock.now += 11 * 10**9
    assert _reason(dp.tc_lb_from_pod(ack)) == "new", "10 s after a FIN the flow is gone"
    # The reply entry expires too: an answer after that is not translated.
    reply = frame_of("10.244.0.1", 80, "10.244.1.5", 4002, TCP, flags=0x12)
    assert _reason(dp.tc_lb_from_pod(frame_of("10.244.1.5", 4002, "10.96.0.1", 80, TCP))) == "new"
    assert _reason(dp.tc_lb_from_pod(reply)) == "reverse-nat"
    clock.now += 7 * 3600 * 10**9
    assert _reason(dp.tc_lb_from_pod(reply)) == "not-service"


def test_affinity_holds_within_its_timeout_only() -> None:
    eps = tuple(EpSpec(f"10.244.0.{i}") for i in range(1, 9))
    dp, maps, clock = _userspace(_svc(affinity=30, endpoints=eps))

    def backend(sport: int) -> str:
        out = packets.parse(dp.tc_lb_from_pod(frame_of("10.244.1.5", sport, "10.96.0.1", 80,
                                                       TCP)).data)
        assert out is not None
        return out.dst

    first = backend(1000)
    assert {backend(p) for p in range(1001, 1050)} == {first}
    # Past the timeout the client's next connection is placed as any new
    # flow is, and sticks again: over expiries it moves between backends.
    key = layout.new("struct lb_affinity_key", client=_native_ip("10.244.1.5"), group_id=1)
    seen = set()
    for i in range(20):
        clock.now += 31 * 10**9
        before = maps["lb_affinity"].lookup(key).last_used_ns
        now_on = backend(2000 + 100 * i)
        assert maps["lb_affinity"].lookup(key).last_used_ns > before
        assert {backend(2001 + 100 * i + j) for j in range(5)} == {now_on}
        seen.add(now_on)
    assert len(seen) > 1, "the same backend after every expiry: affinity never ends"


def test_dictmap_has_the_kernel_semantics() -> None:
    spec = specs()
    h = DictMap(spec["lb_services"], 2)
    k1, k2, k3 = (layout.new("struct lb_svc_key", addr=i, port=80, proto=6) for i in (1, 2, 3))
    v = layout.new("struct lb_svc_val", svc_id=7)[0]
    h.update(k1, v)
    with pytest.raises(libbpf.BpfError) as e:
        h.update(k1, v, libbpf.BPF_NOEXIST)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(libbpf.BpfError) as e:
        h.update(k2, v, libbpf.BPF_EXIST)
    assert e.value.errno == errno.ENOENT
    h.update(k2, v)
    with pytest.raises(libbpf.BpfError) as e:
        h.update(k3, v)
    assert e.value.errno == errno.E2BIG, "a full hash refuses a new key"
    h.update(k2, layout.new("struct lb_svc_val", svc_id=8)[0])  # replacing is fine when full
    assert h.lookup(k2).svc_id == 8 and h.lookup(k3) is None
    assert h.delete(k1) and not h.delete(k1)
    assert [k.addr for k in list(h.keys())] == [2]

    lru = DictMap(spec["lb_ct"], 2)
    keys = [layout.new("struct lb_ct_key", saddr=i) for i in (1, 2, 3)]
    val = layout.new("struct lb_ct_val", svc_id=1)[0]
    lru.update(keys[0], val)
    lru.update(keys[1], val)
    assert lru.ref(lru.key_bytes(keys[0])) is not None  # the datapath uses entry 1
    lru.update(keys[2], val)
    assert [k.saddr for k in list(lru.keys())] == [1, 3], "the least recently used goes"

    arr = DictMap(spec["lb_backends"], 4)
    assert arr.lookup(3).addr == 0 and arr.lookup(4) is None
    assert list(arr.keys()) == [0, 1, 2, 3]
    with pytest.raises(libbpf.BpfError) as e:
        arr.update(4, layout.new("struct lb_backend", addr=1)[0])
    assert e.value.errno == errno.E2BIG
    with pytest.raises(libbpf.BpfError) as e:
        arr.delete(1)
    assert e.value.errno == errno.EINVAL
    arr.update_batch(array.array("I", [1, 2]).tobytes(),
                     b"".join(layout.to_bytes(layout.new("struct lb_backend", addr=a))
                              for a in (10, 20)), 2)
    assert [b.addr for _, b in arr.items()] == [0, 10, 20, 0]

    stats = DictMap(spec["lb_stats"], 32)
    assert [s.packets for s in stats.lookup(5)] == [0], "per-CPU: one CPU"
    maglev = DictMap(spec["lb_maglev"], 8)
    maglev.update(2, 9)
    assert maglev.lookup(2) == 9


def test_dictmap_lpm_tries_match_the_longest_prefix() -> None:
    for spec in (s for s in specs().values() if s.kind == "lpm_trie"):
        m = DictMap(spec, 3)
        ksize, vsize = layout.sizeof(spec.key_type), layout.sizeof(spec.value_type)
        bits = 8 * (ksize - 4)

        def key(plen: int, top: int, bits: int = bits, ksize: int = ksize) -> bytes:
            """A key of prefix length `plen` whose data starts with byte `top`."""
            return (plen.to_bytes(4, sys.byteorder)
                    + (top << (bits - 8) | 0x5A).to_bytes(ksize - 4, "big"))

        def val(v: int, vsize: int = vsize) -> bytes:
            return v.to_bytes(vsize, sys.byteorder)

        m.update(key(8, 10), val(1))
        m.update(key(16, 10), val(2))
        assert m.ref(key(bits, 10)) == val(2), "the longest prefix wins"
        assert m.ref(key(8, 10)) == val(1), "the lookup's own length bounds the match"
        assert m.ref(key(bits, 11)) is None and m.lookup(key(bits, 11)) is None
        m.update(key(16, 10)[:-1] + b"\x77", val(3))  # other bits past the prefix: same entry
        assert len(list(m.keys())) == 2 and m.ref(key(bits, 10)) == val(3)
        m.update(key(0, 0), val(4))
        assert m.ref(key(bits, 11)) == val(4), "a /0 matches everything"
        for code, k in ((errno.ENOSPC, key(24, 12)), (errno.EINVAL, key(bits + 1, 12))):
            with pytest.raises(libbpf.BpfError) as e:
                m.update(k, val(5))
            assert e.value.errno == code
        assert m.delete(key(16, 10)) and not m.delete(key(16, 10))
        assert m.ref(key(bits, 10)) == val(1)


def test_reconciler_reports_a_full_service_map() -> None:
    sizes = Sizes(max_services=3, max_backends=64, maglev_slots=1 << 12, ct_size=64)
    services = tuple(SvcSpec(cluster_ip=f"10.96.0.{i}", endpoints=(EpSpec("10.244.0.1"),))
                     for i in range(1, 4))
    res = reconciler_for(UserspaceDatapath.new(sizes)).sync(
        desired_of(services, (NODE_IPS[0],)))
    # Ids run out first (ids are 1..limit-1): the third frontend is refused.
    assert len(res.errors) == 1 and res.added == 2, res
    assert res.refusals[0].map_name == "lb_services", res
    hash_full = UserspaceDatapath.new(sizes)
    hash_full.maps["lb_services"].max_entries = 1
    res = reconciler_for(hash_full).sync(desired_of(services[:2], (NODE_IPS[0],)))
    assert len(res.errors) == 1 and "Argument list too long" not in res.errors[0], res
    assert "map lb_services is full" in res.errors[0], res


# --- lbctl trace --datapath userspace -------------------------------------------------------

TOMCAT = REPO / "deploy" / "examples" / "tomcat.yaml"


def _lbctl(args: list[str], as_nobody: bool) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lb.cli", *args]
    if as_nobody:
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO, timeout=120)


def test_lbctl_trace_userspace_matches_kernel_without_root() -> None:
    require_root()
    # Somewhere the unprivileged user can read.
    tmp = Path(tempfile.mkdtemp(prefix="lbdiff-"))
    tmp.chmod(0o755)
    batch = tmp / "probes.jsonl"
    lines = [{"src": f"10.244.1.5:{p}", "dst": "10.97.222.179:8080"} for p in range(33000, 33040)]
    lines += [{"src": "198.51.100.10:5000", "dst": dst, "from": "external"}
              for dst in ("192.0.2.1:30080", "203.0.113.10:8080", "10.97.222.179:8080")]
    lines += [{"src": "10.244.1.5:1", "dst": "10.97.222.179:9999", "proto": "udp"}]
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    batch.chmod(0o644)
    # The Tomcat pods on this node, open only to pods labelled role=frontend:
    # a probe to them crosses their ingress policy too.
    policy = tmp / "policy.yaml"
    policy.write_text(yaml.safe_dump_all([
        *({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": labels},
           "spec": {"nodeName": "kubernetes-node-01", "containers": [{"name": "c"}]},
           "status": {"podIP": ip, "phase": "Running"}}
          for name, ip, labels in (("tomcat-a", "10.244.1.10", {"name": "tomcat"}),
                                   ("tomcat-b", "10.244.1.11", {"name": "tomcat"}),
                                   ("client", "10.244.1.5", {"role": "other"}))),
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": "tomcat-in", "namespace": "default"},
         "spec": {"podSelector": {"matchLabels": {"name": "tomcat"}},
                  "policyTypes": ["Ingress"],
                  "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]}]}},
    ]))
    policy.chmod(0o644)
    args = ["trace", "-f", str(TOMCAT), "--batch", str(batch), "--node-ip", "192.0.2.1"]
    with_policy = [*args, "-f", str(policy), "--node-name", "kubernetes-node-01"]
    try:
        outputs = [(_lbctl([*a, "--datapath", "userspace"], as_nobody=True).stdout,
                    _lbctl(a, as_nobody=False).stdout) for a in (args, with_policy)]
    finally:
        shutil.rmtree(tmp)
    for user, kern in outputs:
        assert user == kern
        assert len(user.splitlines()) == len(lines)
    assert '"reason": "policy default/tomcat-in"' in outputs[1][0]
