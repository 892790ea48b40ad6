"""bpf/lb.c in Python: the same parse, decisions, map accesses, rewrite,
REJECT replies, NetworkPolicy checks and counters, step by step, so that a frame comes out bit for
bit as the kernel programs leave it. Each function names the C function it
follows; keep the two in step (tests/differential checks it). The packet
programs only: the cgroup socket hooks (sock_*4) have no frames to model.

Values read from a frame are native-endian integers of its bytes, as a BPF
program loads them, which is also how the maps store them; the checksum
arithmetic runs on those same integers, as the C and the kernel helpers do.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from lb.datapath.userspace.maps import DictMap, new_userspace_maps
from lb.encoding import filter_bit
from lb.model import PROTO_NUMBERS
from lb.policy.contents import walk_chain
from lb.verdicts import DROPS, POLICED, REJECTS, REWRITES
from loader import layout
from loader.programs import PACKET_PROGRAMS
from loader.sizes import Sizes

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
PROGRAMS = tuple(p.name for p in PACKET_PROGRAMS)

_ffi = layout.ffi
_C = layout.CONSTS

IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP = (PROTO_NUMBERS[n] for n in ("TCP", "UDP", "SCTP"))
_ETH_LEN = 14
_ETH_P_IP = b"\x08\x00"
_IP_DF, _IP_MF, _IP_OFFSET = 0x4000, 0x2000, 0x1FFF
FRAG_NONE, FRAG_FIRST, FRAG_LATER = 0, 1, 2
_TCP_FIN, _TCP_SYN, _TCP_RST, _TCP_ACK = 0x01, 0x02, 0x04, 0x10
_MAX_L4_OFF = _ETH_LEN + 60
_SCTP_HLEN = 12
_IP_CSUM_OFF, _IP_SRC_OFF, _IP_DST_OFF = _ETH_LEN + 10, _ETH_LEN + 12, _ETH_LEN + 16
_NSEC_PER_SEC = 1_000_000_000
_U16, _U32, _U64 = 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1
_JHASH_INITVAL = 0xDEADBEEF

_U16N = struct.Struct("=H")
_U32N = struct.Struct("=I")
_BE16 = struct.Struct("!H")

_STAT = {name[len("LB_STAT_"):]: v for name, v in _C.items() if name.startswith("LB_STAT_")}
_POL_INGRESS, _POL_EGRESS = _C["LB_POL_INGRESS"], _C["LB_POL_EGRESS"]
# Each policy check's own conntrack key space.
_CT_POLICY, _CT_POLICY_INGRESS = _C["LB_CT_POLICY"], _C["LB_CT_POLICY_INGRESS"]


# --- bpf/lib/hash.h ------------------------------------------------------------


def _rol32(w: int, s: int) -> int:
    return ((w << s) | (w >> (32 - s))) & _U32


def jhash_3words(a: int, b: int, c: int, initval: int) -> int:
    """lb_jhash_3words: the kernel's jhash_3words (lookup3's final mix)."""
    initval = (initval + _JHASH_INITVAL + (3 << 2)) & _U32
    a = (a + initval) & _U32
    b = (b + initval) & _U32
    c = (c + initval) & _U32
    c ^= b
    c = (c - _rol32(b, 14)) & _U32
    a ^= c
    a = (a - _rol32(c, 11)) & _U32
    b ^= a
    b = (b - _rol32(a, 25)) & _U32
    c ^= b
    c = (c - _rol32(b, 16)) & _U32
    a ^= c
    a = (a - _rol32(c, 4)) & _U32
    b ^= a
    b = (b - _rol32(a, 14)) & _U32
    c ^= b
    c = (c - _rol32(b, 24)) & _U32
    return c


# --- bpf/lib/parse.h -------------------------------------------------------------


@dataclass
class Pkt:
    """struct lb_pkt."""

    len: int = 0
    l3_off: int = 0
    l4_off: int = 0
    saddr: int = 0
    daddr: int = 0
    sport: int = 0
    dport: int = 0
    proto: int = 0
    tcp_flags: int = 0
    ip_id: int = 0  # as stored (network order read natively)
    frag: int = FRAG_NONE
    df: bool = False


def parse(frame: bytes | bytearray, p: Pkt) -> int:
    """lb_parse: -1 when `p` holds a TCP/UDP 5-tuple, else the stat reason.
    A frame here is all linear, so the C's `len` (the whole packet) and
    `data_end` (the end of the linear part) are the same, and tc's pull of
    the headers into the linear part has nothing to do."""
    end = p.len = len(frame)
    if end < _ETH_LEN:
        return _STAT["DROP_MALFORMED"]
    if frame[12:14] != _ETH_P_IP:
        return _STAT["PASS_NOT_IP"]
    if end < _ETH_LEN + 20:
        return _STAT["DROP_MALFORMED"]
    vihl = frame[_ETH_LEN]
    if vihl >> 4 != 4 or vihl & 0xF < 5:
        return _STAT["DROP_MALFORMED"]
    ihl_len = (vihl & 0xF) * 4
    tot_len = _BE16.unpack_from(frame, _ETH_LEN + 2)[0]
    if tot_len < ihl_len or _ETH_LEN + tot_len > end:
        return _STAT["DROP_MALFORMED"]

    p.l3_off = _ETH_LEN
    p.l4_off = l4 = _ETH_LEN + ihl_len
    p.saddr = _U32N.unpack_from(frame, _IP_SRC_OFF)[0]
    p.daddr = _U32N.unpack_from(frame, _IP_DST_OFF)[0]
    p.proto = frame[_ETH_LEN + 9]
    p.sport = p.dport = p.tcp_flags = 0
    p.ip_id = _U16N.unpack_from(frame, _ETH_LEN + 4)[0]
    p.frag = FRAG_NONE

    frag_off = _BE16.unpack_from(frame, _ETH_LEN + 6)[0]
    p.df = bool(frag_off & _IP_DF)
    if frag_off & _IP_OFFSET:
        if p.proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
            return _STAT["PASS_FRAGMENT"]
        p.frag = FRAG_LATER
        return -1
    if frag_off & _IP_MF:
        p.frag = FRAG_FIRST
    if p.proto not in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP):
        return _STAT["PASS_OTHER_PROTO"]

    # The ports open all three headers; the C reads them behind one bound.
    if l4 + 8 > end:
        return _STAT["DROP_MALFORMED"]
    p.sport = _U16N.unpack_from(frame, l4)[0]
    p.dport = _U16N.unpack_from(frame, l4 + 2)[0]
    if p.proto == IPPROTO_SCTP:
        # The 12-byte common header: ports, verification tag, CRC32c.
        if l4 + _SCTP_HLEN > end or tot_len - ihl_len < _SCTP_HLEN:
            return _STAT["DROP_MALFORMED"]
        return -1
    if p.proto == IPPROTO_TCP:
        if l4 + 20 > end:
            return _STAT["DROP_MALFORMED"]
        doff = frame[l4 + 12] >> 4
        if doff < 5 or doff * 4 > tot_len - ihl_len:
            return _STAT["DROP_MALFORMED"]
        p.tcp_flags = frame[l4 + 13]
    else:
        ulen = _BE16.unpack_from(frame, l4 + 4)[0]
        if ulen < 8 or (p.frag == FRAG_NONE and ulen > tot_len - ihl_len):
            return _STAT["DROP_MALFORMED"]
    return -1


# --- bpf/lib/csum.h and the kernel's checksum helpers -----------------------------


def _fold16(s: int) -> int:
    s = (s & _U16) + (s >> 16)
    s = (s & _U16) + (s >> 16)
    return s & _U16


def xdp_csum_replace4(csum: int, old: int, new: int) -> int:
    """lb_csum_replace4 (RFC 1624, eqn. 3)."""
    s = ~csum & _U16
    nold = ~old & _U32
    s += (nold & _U16) + (nold >> 16) + (new & _U16) + (new >> 16)
    return ~_fold16(s) & _U16


def xdp_csum_replace2(csum: int, old: int, new: int) -> int:
    """lb_csum_replace2."""
    s = (~csum & _U16) + (~old & _U16) + new
    return ~_fold16(s) & _U16


def _csum_add(a: int, b: int) -> int:
    r = (a + b) & _U32
    return r + (r < b)


def kernel_csum_replace4(csum: int, old: int, new: int) -> int:
    """The kernel's csum_replace4 (include/net/checksum.h), which both
    bpf_l3_csum_replace and, for an skb without CHECKSUM_PARTIAL,
    bpf_l4_csum_replace apply (2-byte fields as zero-extended words)."""
    tmp = _csum_add(~csum & _U32, ~old & _U32)
    return ~_fold16(_csum_add(tmp, new)) & _U16


# --- bpf/lib/nat.h -----------------------------------------------------------------


@dataclass(frozen=True)
class Nat:
    """struct lb_nat: the packet's new addresses and ports (native values)."""

    saddr: int
    daddr: int
    sport: int
    dport: int


def l4_csum_off(p: Pkt) -> int:
    return p.l4_off + (16 if p.proto == IPPROTO_TCP else 6)


def nat_xdp(buf: bytearray, p: Pkt, n: Nat) -> int:
    """lb_nat_xdp: direct writes with RFC 1624 updates; a UDP checksum of
    zero stays zero and a computed zero becomes 0xffff. A later fragment
    has addresses only."""
    end = len(buf)
    l4 = p.l4_off
    if end < _ETH_LEN + 20:
        return -1
    later = p.frag == FRAG_LATER
    if p.proto == IPPROTO_SCTP:
        # No checksum over addresses, and no port rewrite (see the C).
        if not later and (n.sport != p.sport or n.dport != p.dport):
            return -1
        later = True
    if not later and (l4 > _MAX_L4_OFF or l4 + (20 if p.proto == IPPROTO_TCP else 8) > end):
        return -1
    coff = l4_csum_off(p)
    l4sum = 0 if later else _U16N.unpack_from(buf, coff)[0]
    ipsum = _U16N.unpack_from(buf, _IP_CSUM_OFF)[0]
    nosum = later or (p.proto == IPPROTO_UDP and l4sum == 0)

    for off, new in ((_IP_SRC_OFF, n.saddr), (_IP_DST_OFF, n.daddr)):
        old = _U32N.unpack_from(buf, off)[0]
        if new != old:
            ipsum = xdp_csum_replace4(ipsum, old, new)
            if not nosum:
                l4sum = xdp_csum_replace4(l4sum, old, new)
            _U32N.pack_into(buf, off, new)
    _U16N.pack_into(buf, _IP_CSUM_OFF, ipsum)
    if later:
        return 0
    for off, new in ((l4, n.sport), (l4 + 2, n.dport)):
        old = _U16N.unpack_from(buf, off)[0]
        if new != old:
            if not nosum:
                l4sum = xdp_csum_replace2(l4sum, old, new)
            _U16N.pack_into(buf, off, new)
    if p.proto == IPPROTO_UDP and not nosum and l4sum == 0:
        l4sum = 0xFFFF
    _U16N.pack_into(buf, coff, l4sum)
    return 0


def _csum_field_ok(buf: bytearray, off: int) -> bool:
    """The checksum helpers' checks: an even offset, within the packet."""
    return off & 1 == 0 and off + 2 <= len(buf)


def bpf_l4_csum_replace(buf: bytearray, off: int, old: int, new: int, mangled_0: bool) -> int:
    """bpf_l4_csum_replace on an skb with ip_summed CHECKSUM_NONE."""
    if not _csum_field_ok(buf, off):
        return -1
    csum = _U16N.unpack_from(buf, off)[0]
    if mangled_0 and csum == 0:
        return 0
    csum = kernel_csum_replace4(csum, old, new)
    if mangled_0 and csum == 0:
        csum = 0xFFFF  # CSUM_MANGLED_0
    _U16N.pack_into(buf, off, csum)
    return 0


def bpf_l3_csum_replace(buf: bytearray, off: int, old: int, new: int) -> int:
    if not _csum_field_ok(buf, off):
        return -1
    _U16N.pack_into(buf, off, kernel_csum_replace4(_U16N.unpack_from(buf, off)[0], old, new))
    return 0


def nat_skb(buf: bytearray, p: Pkt, n: Nat) -> int:
    """lb_nat_skb: bpf_l4_csum_replace, then the IPv4 sum by the kernel's
    csum_replace4 and a direct write, field by field, in the C's order."""
    mangled_0 = p.proto == IPPROTO_UDP
    coff = l4_csum_off(p)
    later = p.frag == FRAG_LATER  # no L4 header: addresses only
    sctp = p.proto == IPPROTO_SCTP  # a CRC32c without addresses; ports never rewritten
    for off, old, new in ((_IP_SRC_OFF, p.saddr, n.saddr), (_IP_DST_OFF, p.daddr, n.daddr)):
        if old == new:
            continue
        if ((not later and not sctp and bpf_l4_csum_replace(buf, coff, old, new, mangled_0))
                or bpf_l3_csum_replace(buf, _IP_CSUM_OFF, old, new)
                or off + 4 > len(buf)):
            return -1
        _U32N.pack_into(buf, off, new)
    if later:
        return 0
    for off, old, new in ((p.l4_off, p.sport, n.sport), (p.l4_off + 2, p.dport, n.dport)):
        if old == new:
            continue
        if sctp or bpf_l4_csum_replace(buf, coff, old, new, mangled_0) or off + 2 > len(buf):
            return -1
        _U16N.pack_into(buf, off, new)
    return 0


# --- bpf/lib/icmp.h -----------------------------------------------------------------

IPPROTO_ICMP = 1
_ICMP_ERRORS = (3, 11, 12)  # destination unreachable, time exceeded, parameter problem


@dataclass(frozen=True)
class IcmpErr:
    """struct lb_icmp_err: where an ICMP error's quote lies, and its flow."""

    inner_off: int
    inner_l4_off: int
    saddr: int
    daddr: int
    sport: int
    dport: int
    proto: int


@dataclass(frozen=True)
class IcmpNat:
    """struct lb_icmp_nat: the outer addresses and the quote, translated."""

    outer_saddr: int
    outer_daddr: int
    saddr: int
    daddr: int
    sport: int
    dport: int


def icmp_parse(frame: bytes | bytearray, p: Pkt) -> IcmpErr | None:
    """lb_icmp_parse."""
    off, end = p.l4_off, len(frame)
    if p.proto != IPPROTO_ICMP or p.frag != FRAG_NONE or off > _MAX_L4_OFF or off + 8 > end:
        return None
    if frame[off] not in _ICMP_ERRORS:
        return None
    inner = off + 8
    if inner + 20 > end or frame[inner] >> 4 != 4 or frame[inner] & 0xF < 5:
        return None
    proto = frame[inner + 9]
    if proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return None
    if _BE16.unpack_from(frame, inner + 6)[0] & _IP_OFFSET:
        return None
    l4 = inner + (frame[inner] & 0xF) * 4
    if l4 + 8 > end:
        return None
    return IcmpErr(inner, l4, _U32N.unpack_from(frame, inner + 12)[0],
                   _U32N.unpack_from(frame, inner + 16)[0], _U16N.unpack_from(frame, l4)[0],
                   _U16N.unpack_from(frame, l4 + 2)[0], proto)


def icmp_nat(buf: bytearray, e: IcmpErr, n: IcmpNat) -> int:
    """lb_icmp_nat: the same direct writes and checksum updates, in order."""
    end, off, l4 = len(buf), e.inner_off, e.inner_l4_off
    if (end < _ETH_LEN + 20 or off > _MAX_L4_OFF + 8 or l4 > _MAX_L4_OFF + 68
            or off + 20 > end or l4 + 8 > end):
        return -1
    icmp_sum_off, in_sum_off = off - 6, off + 10
    l4sum_off = l4 + 6 if e.proto == IPPROTO_UDP else l4 + 16 if l4 + 18 <= end else None
    if (l4sum_off is not None and e.proto == IPPROTO_UDP
            and _U16N.unpack_from(buf, l4sum_off)[0] == 0):
        l4sum_off = None  # a UDP datagram without a checksum is quoted without one

    def get16(o: int) -> int:
        return int(_U16N.unpack_from(buf, o)[0])

    def set16(o: int, v: int) -> None:
        _U16N.pack_into(buf, o, v)

    old = get16(l4sum_off) if l4sum_off is not None else 0
    for o, new in ((off + 12, n.saddr), (off + 16, n.daddr)):
        cur = _U32N.unpack_from(buf, o)[0]
        if new != cur:
            set16(in_sum_off, xdp_csum_replace4(get16(in_sum_off), cur, new))
            if l4sum_off is not None:
                set16(l4sum_off, xdp_csum_replace4(get16(l4sum_off), cur, new))
            _U32N.pack_into(buf, o, new)
    for o, new in ((l4, n.sport), (l4 + 2, n.dport)):
        cur = get16(o)
        if new != cur:
            set16(icmp_sum_off, xdp_csum_replace2(get16(icmp_sum_off), cur, new))
            if l4sum_off is not None:
                set16(l4sum_off, xdp_csum_replace2(get16(l4sum_off), cur, new))
            set16(o, new)
    if l4sum_off is not None:
        if e.proto == IPPROTO_UDP and get16(l4sum_off) == 0:
            set16(l4sum_off, 0xFFFF)
        if get16(l4sum_off) != old:
            set16(icmp_sum_off, xdp_csum_replace2(get16(icmp_sum_off), old, get16(l4sum_off)))
    for o, new in ((_IP_SRC_OFF, n.outer_saddr), (_IP_DST_OFF, n.outer_daddr)):
        cur = _U32N.unpack_from(buf, o)[0]
        if new != cur:
            set16(_IP_CSUM_OFF, xdp_csum_replace4(get16(_IP_CSUM_OFF), cur, new))
            _U32N.pack_into(buf, o, new)
    return 0


# --- bpf/lib/reject.h ----------------------------------------------------------------

_ICMP_HDRS = 28
_QUOTE_UDP, _QUOTE_TCP = 28, 40


def _csum_buf(data: bytes | bytearray) -> int:
    """lb_csum_buf: the Internet checksum of `data`, as stored (native)."""
    s = sum(struct.unpack(f"={len(data) // 2}H", data))
    return ~_fold16(s) & _U16


def _icmp_reply(frame: bytes | bytearray, p: Pkt, qlen: int, mtu: int) -> bytes:
    """lb_icmp_fill: the IPv4 and ICMP headers and quote of a port
    unreachable, or of a fragmentation needed when `mtu` is given."""
    ip = bytearray(struct.pack("!BBHHHBBH", 0x45, 0, _ICMP_HDRS + qlen, 0, 0, 64, 1, 0))
    ip += _U32N.pack(p.daddr) + _U32N.pack(p.saddr)
    icmp = bytearray(struct.pack("!BBHI", 3, 4 if mtu else 3, 0, mtu & _U16))
    icmp += frame[_ETH_LEN:_ETH_LEN + qlen]
    _U16N.pack_into(ip, 10, _csum_buf(ip))
    _U16N.pack_into(icmp, 2, _csum_buf(icmp))
    return bytes(ip + icmp)


def reject(buf: bytearray, p: Pkt, mtu: int = 0) -> int:
    """lb_reject_xdp and lb_reject_skb, which leave the same frame: the
    client's frame turned into an ICMP port unreachable back to it (XDP:
    fragmentation needed, when `mtu` is given), with the MAC addresses
    swapped. -1 (frame untouched) for IP options or a frame too short to
    quote."""
    qlen = _QUOTE_TCP if p.proto == IPPROTO_TCP else _QUOTE_UDP
    if p.l4_off != _ETH_LEN + 20 or _ETH_LEN + qlen > len(buf):
        return -1
    eth = buf[6:12] + buf[0:6] + b"\x08\x00"
    buf[:] = eth + _icmp_reply(buf, p, qlen, mtu)
    return 0


# --- the programs ------------------------------------------------------------------


class Verdict(NamedTuple):
    retval: int  # XDP_* or TC_ACT_*
    data: bytes  # the frame as the program leaves it
    reason: int | None  # the LB_STAT_* counter that moved (tc_lb_to_pod: reverse NAT, drops)


@dataclass(frozen=True)
class Flow:
    """struct lb_flow: a 5-tuple as policy sees it (after translation)."""

    saddr: int
    daddr: int
    sport: int
    dport: int
    proto: int


def _pack(ctype: str, **fields: int) -> bytes:
    return layout.to_bytes(layout.new(ctype, **fields))


def _u32key(i: int) -> bytes:
    return _U32N.pack(i & _U32)


def _ct_reopened(v: Any, p: Pkt) -> bool:
    """lb_ct_reopened: a SYN (without ACK) on a flow that saw FIN or RST."""
    return bool(p.proto == IPPROTO_TCP and p.tcp_flags & (_TCP_SYN | _TCP_ACK) == _TCP_SYN
                and v.flags & (_C["LB_CT_SEEN_FIN"] | _C["LB_CT_SEEN_RST"]))


def _ct_reply_reopened(v: Any, p: Pkt) -> bool:
    """lb_ct_reply_reopened: a SYN-ACK on a reply entry of a closed flow."""
    both = _TCP_SYN | _TCP_ACK
    return bool(p.proto == IPPROTO_TCP and p.tcp_flags & both == both
                and v.flags & (_C["LB_CT_SEEN_FIN"] | _C["LB_CT_SEEN_RST"]))


def _ct_yield(v: Any, now: int) -> None:
    """lb_ct_yield: the reply 5-tuple is now a node's own connection's."""
    v.flags = _C["LB_CT_NODE_SOCKET"] | _C["LB_CT_SEEN_REPLY"]
    v.svc_id = 0
    v.nat_addr = 0
    v.nat_port = 0
    v.last_seen_ns = now


class UserspaceDatapath:
    """The programs of bpf/lb.c over DictMaps. `clock` stands for lb_now
    (bpf/lib/common.h: monotonic nanoseconds as of the last tick), which
    conntrack, affinity and policy read; tests drive it. `route_mtu` stands
    for the kernel's routes as bpf_fib_lookup sees them: the MTU of the
    route from a source to a destination (network order), None where the
    node does not forward. Without it every route takes any packet."""

    def __init__(self, maps: Mapping[str, DictMap], sizes: Sizes,
                 clock: Callable[[], int] = time.monotonic_ns,
                 defines: Mapping[str, str] | None = None,
                 route_mtu: Callable[[int, int], int | None] | None = None) -> None:
        self.maps = maps
        self.sizes = sizes
        self.clock = clock
        self.route_mtu = route_mtu
        self._services = maps["lb_services"]
        self._backends = maps["lb_backends"]
        self._maglev = maps["lb_maglev"]
        self._rev_nat = maps["lb_rev_nat"]
        self._ct = maps["lb_ct"]
        self._affinity = maps["lb_affinity"]
        self._stats = maps["lb_stats"]
        self._config = maps["lb_config"]
        self._vips = maps["lb_vips"]
        self._svc_cidrs = maps["lb_svc_cidrs"]
        self._source_ranges = maps["lb_source_ranges"]
        self._pol_endpoints = maps["lb_pol_endpoints"]
        self._pol_ipcache = maps["lb_pol_ipcache"]
        self._pol_rules = maps["lb_pol_rules"]
        self._pol_portsets = maps["lb_pol_portsets"]
        self._pol_drops = maps["lb_pol_drops"]
        self._frags = maps["lb_frags"]
        self._filter = maps["lb_filter"]
        self._pol_filter = maps["lb_pol_filter"]
        self._filter_words = sizes.filter_words
        d = layout.c_defaults(defines)
        self._tcp_life = d["LB_CT_TCP_LIFETIME_S"] * _NSEC_PER_SEC
        self._tcp_closing = d["LB_CT_TCP_CLOSING_S"] * _NSEC_PER_SEC
        self._tcp_syn = d["LB_CT_TCP_SYN_S"] * _NSEC_PER_SEC
        self._other_life = d["LB_CT_OTHER_LIFETIME_S"] * _NSEC_PER_SEC
        self._scope_ext = _C["LB_SCOPE_EXTERNAL"]
        self._scope_int = _C["LB_SCOPE_INTERNAL"]

    @classmethod
    def new(cls, sizes: Sizes, clock: Callable[[], int] = time.monotonic_ns,
            route_mtu: Callable[[int, int], int | None] | None = None) -> UserspaceDatapath:
        """An empty instance with every map, sized as a kernel instance of `sizes`."""
        return cls(new_userspace_maps(sizes), sizes, clock, route_mtu=route_mtu)

    # --- entry points -----------------------------------------------------------

    def map(self, name: str) -> DictMap:
        return self.maps[name]

    def run(self, program: str, frame: bytes) -> Verdict:
        # Each program of loader/programs.py is the method of its name.
        if program not in PROGRAMS:
            raise ValueError(f"no program {program!r}")
        run: Callable[[bytes], Verdict] = getattr(self, program)
        return run(frame)

    def xdp_lb_external(self, frame: bytes) -> Verdict:
        buf = bytearray(frame)
        p = Pkt()
        cfg = self._cfg()
        reason, n = self._decide(p, buf, self._scope_ext, cfg)
        mtu = 0
        if reason in REWRITES and n is not None:
            mtu = self._path_mtu(p, n, cfg)
            if mtu:
                reason = _STAT["REJECT_FRAG_NEEDED"]
            elif nat_xdp(buf, p, n):
                reason = _STAT["ERROR"]
        if reason == _STAT["PASS_OTHER_PROTO"]:
            icmp = self._icmp_error(buf, p)
            reason = reason if icmp < 0 else icmp
        self._count(reason, p.len)
        if reason in REJECTS and p.frag != FRAG_LATER and reject(buf, p, mtu) == 0:
            return Verdict(XDP_TX, bytes(buf), reason)
        return Verdict(XDP_DROP if reason in DROPS else XDP_PASS, bytes(buf), reason)

    def tc_lb_from_pod(self, frame: bytes) -> Verdict:
        buf = bytearray(frame)
        p = Pkt()
        reason, n = self._decide(p, buf, self._scope_int, self._cfg())
        if reason in REWRITES and n is not None and nat_skb(buf, p, n):
            reason = _STAT["ERROR"]
        if reason == _STAT["PASS_OTHER_PROTO"]:
            icmp = self._icmp_error(buf, p)
            reason = reason if icmp < 0 else icmp
        # Egress policy of the sending pod, on the translated flow; replies
        # (reverse NAT) belong to a connection judged already.
        if reason in POLICED:
            front = Flow(p.saddr, p.daddr, p.sport, p.dport, p.proto)
            dnat = reason in REWRITES and n is not None
            f = Flow(n.saddr, n.daddr, n.sport, n.dport, p.proto) if dnat and n else front
            if self._policy(f, front if dnat else None, p.saddr, _POL_EGRESS, p.tcp_flags,
                            p.len):
                reason = _STAT["DROP_POLICY"]
        self._count(reason, p.len)
        if reason in REJECTS and p.frag != FRAG_LATER and reject(buf, p) == 0:
            # bpf_redirect back out of the device it came in on.
            return Verdict(TC_ACT_REDIRECT, bytes(buf), reason)
        return Verdict(TC_ACT_SHOT if reason in DROPS else TC_ACT_OK, bytes(buf), reason)

    def tc_lb_to_pod(self, frame: bytes) -> Verdict:
        """What is about to enter a local pod: reverse NAT of replies of
        backends on the node's own network, then ingress policy; only those
        two are counted."""
        p = Pkt()
        reason = self._parse_ports(frame, p)
        if reason not in (-1, _STAT["PASS_OTHER_PROTO"]):
            return Verdict(TC_ACT_OK, bytes(frame), None)
        if reason == -1:
            verdict = self._reverse_skb(frame, p)
            if verdict is not None:
                return verdict
        else:
            verdict = self._icmp_skb(bytearray(frame), p)
            if verdict is not None:
                return verdict
        f = Flow(p.saddr, p.daddr, p.sport, p.dport, p.proto)
        if self._policy(f, None, p.daddr, _POL_INGRESS, p.tcp_flags, p.len):
            self._count(_STAT["DROP_POLICY"], p.len)
            return Verdict(TC_ACT_SHOT, bytes(frame), _STAT["DROP_POLICY"])
        return Verdict(TC_ACT_OK, bytes(frame), None)

    def tc_lb_to_external(self, frame: bytes) -> Verdict:
        """What the node sends out of a node-facing device: reverse NAT of
        replies of backends on the node's own address; only that is counted."""
        p = Pkt()
        cfg = self._cfg()
        reason = parse(frame, p)
        if reason == _STAT["PASS_OTHER_PROTO"]:
            verdict = self._icmp_skb(bytearray(frame), p)
            return verdict if verdict is not None else Verdict(TC_ACT_OK, bytes(frame), None)
        if (reason != -1 or cfg is None or p.saddr != cfg.node_ip
                or self._frag_ports(p) != -1):
            return Verdict(TC_ACT_OK, bytes(frame), None)
        verdict = self._reverse_skb(frame, p)
        return verdict if verdict is not None else Verdict(TC_ACT_OK, bytes(frame), None)

    # --- lb.c ----------------------------------------------------------------------

    def _parse_ports(self, frame: bytes | bytearray, p: Pkt) -> int:
        """lb_parse_ports (lib/frag.h)."""
        reason = parse(frame, p)
        return self._frag_ports(p) if reason == -1 else reason

    def _reverse_skb(self, frame: bytes, p: Pkt) -> Verdict | None:
        """lb_reverse_skb: reverse NAT of a reply of a backend on the node's
        own network; None when p is no such reply."""
        if not self._filter_has(_C["LB_FILTER_BACKEND"], p.saddr, p.sport):
            return None
        rev = self._reverse(p, self.clock() & _U64)
        if rev is None:
            return None
        buf = bytearray(frame)
        reason = _STAT["ERROR"] if nat_skb(buf, p, rev[1]) else _STAT["REVNAT"]
        self._count(reason, p.len)
        return Verdict(TC_ACT_SHOT if reason == _STAT["ERROR"] else TC_ACT_OK, bytes(buf), reason)

    def _cfg(self) -> Any | None:
        """lb_config's one entry (a struct lb_config *), None while unset."""
        raw = self._config.ref(_u32key(0))
        return None if raw is None else _ffi.from_buffer("struct lb_config *", raw)

    def _decide(self, p: Pkt, buf: bytearray, scope: int,
                cfg: Any | None) -> tuple[int, Nat | None]:
        """lb_decide, over lb_config as the entry point read it."""
        reason = self._parse_ports(buf, p)
        if reason >= 0:
            return reason, None
        if scope == self._scope_ext and self._martian(p, cfg):
            return _STAT["DROP_MARTIAN"], None
        front = self._filter_has(_C["LB_FILTER_FRONTEND"], p.daddr, p.dport)
        back = self._filter_has(_C["LB_FILTER_BACKEND"], p.saddr, p.sport)
        if not front and not back:
            return self._no_service(p, scope, cfg), None
        now = self.clock() & _U64
        if back:
            rev = self._reverse(p, now)
            if rev is not None:
                return rev
        if not front:
            return self._no_service(p, scope, cfg), None
        return self._forward(p, scope, now, cfg)

    def _icmp_decide(self, p: Pkt, e: IcmpErr, now: int) -> IcmpNat | None:
        """lb_icmp_decide (lib/icmp.h)."""
        q = Pkt(saddr=e.daddr, daddr=e.saddr, sport=e.dport, dport=e.sport, proto=e.proto)
        osrc, odst = p.saddr, p.daddr
        v = self._ct_lookup(q, _C["LB_CT_REPLY"], now)
        if v is not None:
            rn = self._frontend(v.svc_id)
            if rn is None:
                return None
            saddr, sport = e.saddr, e.sport
            if p.saddr == e.daddr:
                osrc = int(rn.addr)
            if v.flags & _C["LB_CT_MASQ"]:
                if p.daddr == e.saddr:
                    odst = int(v.nat_addr)
                saddr, sport = int(v.nat_addr), int(v.nat_port)
            return IcmpNat(osrc, odst, saddr, int(rn.addr), sport, int(rn.port))
        v = self._ct_lookup(q, _C["LB_CT_FORWARD"], now)
        if v is None:
            return None
        b = self._backend(v.backend_id)
        if b is None:
            return None
        daddr, dport = e.daddr, e.dport
        if p.daddr == e.saddr:
            odst = int(b.addr)
        if v.flags & _C["LB_CT_MASQ"]:
            if p.saddr == e.daddr:
                osrc = int(v.nat_addr)
            daddr, dport = int(v.nat_addr), int(v.nat_port)
        return IcmpNat(osrc, odst, int(b.addr), daddr, int(b.port), dport)

    def _icmp_error(self, buf: bytearray, p: Pkt) -> int:
        """lb_icmp_error: the reason, or -1 for no error of a translated flow."""
        e = icmp_parse(buf, p)
        if e is None:
            return -1
        n = self._icmp_decide(p, e, self.clock() & _U64)
        if n is None:
            return -1
        return _STAT["ERROR"] if icmp_nat(buf, e, n) else _STAT["ICMP_ERROR_NAT"]

    def _icmp_skb(self, buf: bytearray, p: Pkt) -> Verdict | None:
        """lb_icmp_skb."""
        reason = self._icmp_error(buf, p)
        if reason < 0:
            return None
        self._count(reason, p.len)
        return Verdict(TC_ACT_SHOT if reason == _STAT["ERROR"] else TC_ACT_OK, bytes(buf),
                       reason)

    def _filter_has(self, kind: int, addr: int, port: int, words: DictMap | None = None
                    ) -> bool:
        """lb_filter_has (lib/filter.h), over a network-order address and
        port; lb_pol_filter_has with `words` lb_pol_filter."""
        bit = filter_bit(kind, socket.ntohl(addr), socket.ntohs(port), self._filter_words)
        raw = (self._filter if words is None else words).ref(_u32key(bit >> 6))
        return raw is not None and bool(int.from_bytes(raw, "little") >> (bit & 63) & 1)

    def _in_svc_cidr(self, addr: int, cfg: Any | None) -> bool:
        """lb_in_svc_cidr (lib/lb.h)."""
        if cfg is None:
            return False
        if cfg.svc_cidrs_spill:
            return self._svc_cidrs.ref(_pack("struct lb_lpm4_key", prefixlen=32,
                                             addr=addr)) is not None
        return any(m and addr & m == net
                   for net, m in zip(cfg.svc_cidr_net, cfg.svc_cidr_mask, strict=True))

    def _path_mtu(self, p: Pkt, n: Nat, cfg: Any | None) -> int:
        """lb_path_mtu_xdp (lib/pmtu.h). A frame here is as it was sent,
        never a GRO aggregate, so the ingress device's MTU is not checked."""
        if not p.df or p.frag != FRAG_NONE or self.route_mtu is None:
            return 0
        tot_len = p.len - p.l3_off
        if cfg is None or not cfg.min_mtu or tot_len <= cfg.min_mtu:
            return 0
        mtu = self.route_mtu(n.saddr, n.daddr)
        return mtu if mtu is not None and tot_len > mtu else 0

    def _martian(self, p: Pkt, cfg: Any | None) -> bool:
        """lb_martian (lib/translate.h)."""
        s, d = socket.ntohl(p.saddr), socket.ntohl(p.daddr)
        if s >> 28 == 0xE or s == 0xFFFFFFFF:
            return True
        if d == 0xFFFFFFFF or (s == 0 and d == 0):
            return False
        if s >> 24 in (0, 127):
            return True
        return cfg is not None and any(ip and ip == p.saddr for ip in cfg.node_ips)

    def _frag_ports(self, p: Pkt) -> int:
        """lb_frag_ports (lib/frag.h)."""
        if p.frag == FRAG_NONE:
            return -1
        k = _pack("struct lb_frag_key", saddr=p.saddr, daddr=p.daddr, id=p.ip_id,
                  proto=p.proto)
        if p.frag == FRAG_FIRST:
            # A full LRU map evicts; the C ignores the update's result.
            self._frags.put(k, _pack("struct lb_frag_val", sport=p.sport, dport=p.dport))
            return -1
        raw = self._frags.ref(k)
        if raw is None:
            return _STAT["PASS_FRAG_NO_FIRST"]
        v = _ffi.from_buffer("struct lb_frag_val *", raw)
        p.sport, p.dport = int(v.sport), int(v.dport)
        return -1

    def _reverse(self, p: Pkt, now: int) -> tuple[int, Nat] | None:
        """lb_reverse."""
        v = self._ct_lookup(p, _C["LB_CT_REPLY"], now)
        if v is None:
            return None
        if _ct_reply_reopened(v, p):
            _ct_yield(v, now)
        if v.flags & _C["LB_CT_NODE_SOCKET"]:
            self._ct_touch(v, p, now)
            return None
        rn = self._frontend(v.svc_id)
        if rn is None:
            return None
        self._ct_touch(v, p, now)
        if not v.flags & _C["LB_CT_SEEN_REPLY"]:
            self._ct_answered(v, rn.addr, rn.port, p.proto)
        daddr, dport = p.daddr, p.dport
        if v.flags & _C["LB_CT_MASQ"]:
            daddr, dport = v.nat_addr, v.nat_port
        return _STAT["REVNAT"], Nat(rn.addr, daddr, rn.port, dport)

    def _masq_addr(self, p: Pkt, svc: Any, b: Any, cfg: Any | None) -> int:
        """lb_masq_addr: 0 for a backend on the node's own address (the
        node's stack keeps the client's source), the node's address for
        external traffic that kube-proxy masquerades, the hairpin address for
        a pod reaching itself, else 0 (the client's own source)."""
        if cfg is None:
            return 0
        if b.addr == cfg.node_ip:
            return 0  # a backend on the node's own address: see the C
        if svc.flags & _C["LB_SVC_MASQUERADE"]:
            return int(cfg.node_ip)
        if b.addr == p.saddr:
            return int(cfg.hairpin_ip)
        return 0

    def _frontend(self, svc_id: int) -> Any | None:
        """lb_frontend (lib/maps.h): the frontend of a reverse-NAT id, None
        once it is gone."""
        raw = self._rev_nat.ref(_u32key(svc_id))
        if raw is None:
            return None
        rn = _ffi.from_buffer("struct lb_rev_nat *", raw)
        return rn if rn.addr else None

    def _established(self, p: Pkt, v: Any | None, scope: int) -> Any | None:
        """lb_established: the backend of an established flow, from its
        forward entry alone."""
        if v is None or _ct_reopened(v, p):
            return None
        if bool(v.flags & _C["LB_CT_EXTERNAL"]) != (scope == self._scope_ext):
            return None
        rn = self._frontend(v.svc_id)
        if rn is None or rn.addr != p.daddr or rn.port != p.dport:
            return None
        b = self._backend(v.backend_id)
        return b if b is not None and b.group_id == v.group_id else None

    def _forward(self, p: Pkt, scope: int, now: int,
                 cfg: Any | None) -> tuple[int, Nat | None]:
        """lb_forward."""
        reason = _STAT["DNAT_ESTABLISHED"]
        masq_addr = masq_port = 0
        v = self._ct_lookup(p, _C["LB_CT_FORWARD"], now)
        b = self._established(p, v, scope)
        if b is not None and v is not None:
            self._ct_touch(v, p, now)
            if v.flags & _C["LB_CT_MASQ"]:
                masq_addr, masq_port = v.nat_addr, v.nat_port
        else:
            # A new flow, or its backend is gone: choose again.
            svc = self._service(p, scope)
            if svc is None:
                return self._no_service(p, scope, cfg), None
            if not self._source_allowed(p, svc):
                return _STAT["DROP_SOURCE_RANGE"], None
            if svc.maglev_size == 0:
                if svc.flags & _C["LB_SVC_LOCAL_ONLY"]:
                    return _STAT["DROP_NO_LOCAL"], None
                return _STAT["REJECT_NO_ENDPOINTS"], None
            bid = self._select_backend(p, svc, now)
            b = self._backend(bid)
            if b is None:
                return _STAT["DROP_BACKEND_GONE"], None
            masq_addr = self._masq_addr(p, svc, b, cfg)
            if masq_addr:
                masq_port = self._masq_port(p, b, masq_addr, self.flow_hash(p), now)
                if not masq_port:
                    return _STAT["ERROR"], None
            if self._ct_create(p, svc, scope, bid, b, masq_addr, masq_port, now):
                return _STAT["ERROR"], None
            reason = _STAT["DNAT_NEW"]
        if masq_addr:
            return reason, Nat(masq_addr, b.addr, masq_port, b.port)
        return reason, Nat(p.saddr, b.addr, p.sport, b.port)

    # --- conntrack.h ----------------------------------------------------------------

    def _ct_key(self, saddr: int, daddr: int, sport: int, dport: int, proto: int,
                direction: int) -> bytes:
        return _pack("struct lb_ct_key", saddr=saddr, daddr=daddr, sport=sport, dport=dport,
                     proto=proto, dir=direction)

    def _lifetime(self, v: Any, proto: int) -> int:
        """lb_ct_lifetime_ns."""
        if proto != IPPROTO_TCP:
            return self._other_life
        if v.flags & (_C["LB_CT_SEEN_FIN"] | _C["LB_CT_SEEN_RST"]):
            return self._tcp_closing
        if not v.flags & _C["LB_CT_SEEN_REPLY"]:
            return self._tcp_syn
        return self._tcp_life

    def _ct_lookup(self, p: Pkt, direction: int, now: int) -> Any | None:
        """lb_ct_lookup: an expired entry counts as a miss."""
        raw = self._ct.ref(self._ct_key(p.saddr, p.daddr, p.sport, p.dport, p.proto, direction))
        if raw is None:
            return None
        v = _ffi.from_buffer("struct lb_ct_val *", raw)
        if (now - v.last_seen_ns) & _U64 > self._lifetime(v, p.proto):
            return None
        return v

    def _ct_touch(self, v: Any, p: Pkt, now: int) -> None:
        """lb_ct_touch."""
        if p.tcp_flags & _TCP_RST:
            v.flags |= _C["LB_CT_SEEN_RST"]
        elif p.tcp_flags & _TCP_FIN:
            v.flags |= _C["LB_CT_SEEN_FIN"]
        if (now - v.last_seen_ns) & _U64 > _NSEC_PER_SEC:
            v.last_seen_ns = now

    def _ct_answered(self, reply: Any, frontend_addr: int, frontend_port: int,
                     proto: int) -> None:
        """lb_ct_answered: the first reply marks both entries of the flow."""
        reply.flags |= _C["LB_CT_SEEN_REPLY"]
        raw = self._ct.ref(self._ct_key(reply.nat_addr, frontend_addr, reply.nat_port,
                                        frontend_port, proto, _C["LB_CT_FORWARD"]))
        if raw is not None:
            _ffi.from_buffer("struct lb_ct_val *", raw).flags |= _C["LB_CT_SEEN_REPLY"]

    def _ct_create(self, p: Pkt, svc: Any, scope: int, backend_id: int, b: Any,
                   masq_addr: int, masq_port: int, now: int) -> int:
        """lb_ct_create: the forward entry, then the reply entry, which also
        remembers the client (for a masqueraded flow's replies)."""
        v = layout.new("struct lb_ct_val", created_ns=now, last_seen_ns=now,
                       svc_id=svc.svc_id, group_id=svc.group_id, backend_id=backend_id)
        if scope == self._scope_ext:
            v.flags = _C["LB_CT_EXTERNAL"]
        if masq_addr:
            v.flags |= _C["LB_CT_MASQ"]
            v.nat_addr = masq_addr
            v.nat_port = masq_port
        k = self._ct_key(p.saddr, p.daddr, p.sport, p.dport, p.proto, _C["LB_CT_FORWARD"])
        if self._ct.put(k, layout.to_bytes(v)):
            return -1
        k = self._ct_key(b.addr, masq_addr or p.saddr, b.port,
                         masq_port if masq_addr else p.sport, p.proto, _C["LB_CT_REPLY"])
        v.backend_id = 0
        v.nat_addr = p.saddr
        v.nat_port = p.sport
        return self._ct.put(k, layout.to_bytes(v))

    def _masq_port(self, p: Pkt, b: Any, masq_addr: int, h: int, now: int) -> int:
        """lb_masq_port: the client's port unless another live flow holds it
        towards b, else up to three ports derived from the flow hash."""
        port = p.sport
        for i in range(4):
            raw = self._ct.ref(self._ct_key(b.addr, masq_addr, b.port, port, p.proto,
                                            _C["LB_CT_REPLY"]))
            if raw is None:
                return port
            v = _ffi.from_buffer("struct lb_ct_val *", raw)
            if ((now - v.last_seen_ns) & _U64 > self._lifetime(v, p.proto)
                    or (v.nat_addr == p.saddr and v.nat_port == p.sport)):
                return port
            if p.proto == IPPROTO_SCTP:
                return 0  # SCTP keeps its ports: see the C
            port = socket.htons(32768 + (h >> (i * 8)) % 28232)
        return port

    # --- lb.h --------------------------------------------------------------------------

    def _no_service(self, p: Pkt, scope: int, cfg: Any | None) -> int:
        """lb_no_service: REJECT at a ClusterIP on a port it lacks, DROP
        elsewhere in the service CIDRs; only pods reach ClusterIPs."""
        if scope != self._scope_int:
            return _STAT["PASS_NOT_SERVICE"]
        if (self._filter_has(_C["LB_FILTER_VIP"], p.daddr, 0)
                and self._vips.ref(_u32key(p.daddr)) is not None):
            return _STAT["REJECT_NO_PORT"]
        if self._in_svc_cidr(p.daddr, cfg):
            return _STAT["DROP_UNKNOWN_VIP"]
        return _STAT["PASS_NOT_SERVICE"]

    def _source_allowed(self, p: Pkt, svc: Any) -> bool:
        """lb_source_allowed: loadBalancerSourceRanges."""
        if not svc.flags & _C["LB_SVC_SOURCE_RANGES"]:
            return True
        k = _pack("struct lb_src_range_key", prefixlen=64, svc_id=socket.htonl(svc.svc_id),
                  addr=p.saddr)
        return self._source_ranges.ref(k) is not None

    def _service(self, p: Pkt, scope: int) -> Any | None:
        raw = self._services.ref(_pack("struct lb_svc_key", addr=p.daddr, port=p.dport,
                                       proto=p.proto, scope=scope))
        return None if raw is None else _ffi.from_buffer("struct lb_svc_val *", raw)

    def _backend_of(self, bid: int, svc: Any) -> Any | None:
        """lb_backend_of: a backend of this service's port."""
        b = self._backend(bid)
        return b if b is not None and b.group_id == svc.group_id else None

    def _backend(self, bid: int) -> Any | None:
        """lb_backend: id 0 and ids without an address are no backend."""
        if bid == 0:
            return None
        raw = self._backends.ref(_u32key(bid))
        if raw is None:
            return None
        b = _ffi.from_buffer("struct lb_backend *", raw)
        return None if b.addr == 0 else b

    @staticmethod
    def flow_hash(p: Pkt) -> int:
        """lb_flow_hash."""
        return jhash_3words(p.saddr, p.daddr, ((p.sport << 16) | p.dport) & _U32, p.proto)

    def _maglev_pick(self, svc: Any, h: int) -> int:
        if svc.maglev_size == 0:
            return 0
        raw = self._maglev.ref(_u32key(svc.maglev_off + h % svc.maglev_size))
        return 0 if raw is None else int(_U32N.unpack_from(raw)[0])

    def _affinity_pick(self, p: Pkt, svc: Any, now: int) -> int:
        """lb_affinity_pick: kube-proxy's `recent` match."""
        subset = _C["LB_AFFINITY_LOCAL_SET"] if svc.flags & _C["LB_SVC_LOCAL_ONLY"] else 0
        k = _pack("struct lb_affinity_key", client=p.saddr, group_id=svc.group_id | subset)
        timeout = svc.affinity_timeout * _NSEC_PER_SEC
        raw = self._affinity.ref(k)
        if raw is not None:
            a = _ffi.from_buffer("struct lb_affinity_val *", raw)
            if (now - a.last_used_ns) & _U64 <= timeout and self._backend_of(a.backend_id, svc):
                a.last_used_ns = now
                return int(a.backend_id)
        bid = self._maglev_pick(svc, self.flow_hash(p))
        if bid:
            # A full map is not an error for the packet: the C ignores it too.
            self._affinity.put(k, _pack("struct lb_affinity_val", backend_id=bid,
                                        last_used_ns=now))
        return bid

    def _select_backend(self, p: Pkt, svc: Any, now: int) -> int:
        if svc.flags & _C["LB_SVC_AFFINITY"]:
            return self._affinity_pick(p, svc, now)
        return self._maglev_pick(svc, self.flow_hash(p))

    # --- policy.h ---------------------------------------------------------------------------

    def _pol_ct_key(self, f: Flow, reverse: bool, direction: int) -> bytes:
        ct_dir = _CT_POLICY_INGRESS if direction == _POL_INGRESS else _CT_POLICY
        if reverse:
            return self._ct_key(f.daddr, f.saddr, f.dport, f.sport, f.proto, ct_dir)
        return self._ct_key(f.saddr, f.daddr, f.sport, f.dport, f.proto, ct_dir)

    def _pol_known(self, f: Flow, direction: int, tcp_flags: int, now: int) -> bool:
        """lb_pol_known: a connection this check passed already, either way."""
        raw = self._ct.ref(self._pol_ct_key(f, False, direction))
        if raw is None:
            return False
        v = _ffi.from_buffer("struct lb_ct_val *", raw)
        if (now - v.last_seen_ns) & _U64 > self._lifetime(v, f.proto):
            return False
        p = Pkt(proto=f.proto, tcp_flags=tcp_flags)
        # A SYN on a closed flow opens a new connection: judged afresh.
        if _ct_reopened(v, p):
            return False
        self._ct_touch(v, p, now)
        return True

    def _pol_remember(self, f: Flow, front: Flow | None, direction: int, now: int) -> None:
        """lb_pol_remember: the flow in this check's key space, its reply in
        the other's (and, after DNAT, the reply as reverse NAT leaves it)."""
        v = layout.to_bytes(layout.new("struct lb_ct_val", created_ns=now, last_seen_ns=now,
                                       flags=_C["LB_CT_SEEN_REPLY"]))
        other = _POL_EGRESS if direction == _POL_INGRESS else _POL_INGRESS
        self._ct.put(self._pol_ct_key(f, False, direction), v)
        self._ct.put(self._pol_ct_key(f, True, other), v)
        if front is not None and (front.daddr != f.daddr or front.dport != f.dport):
            self._ct.put(self._pol_ct_key(front, True, other), v)

    def _pol_ports_allow(self, slot: int, proto: int, port: int) -> bool:
        """lb_pol_ports_allow: the chain of port sets from `slot`."""
        def lookup(at: int) -> Any:
            raw = self._pol_portsets.ref(_u32key(at))
            return None if raw is None else _ffi.from_buffer("struct lb_pol_portset *", raw)

        for _, ps in walk_chain(slot, lookup, lambda ps: int(ps.next)):
            for i in range(_C["LB_POL_PORTS_PER_SET"]):
                if i >= ps.count:
                    break
                r = ps.ranges[i]
                if (r.proto in (_C["LB_POL_PROTO_ANY"], proto)
                        and r.port_lo <= port <= r.port_hi):
                    return True
        return False

    def _pol_judge(self, local: int, remote: int, proto: int, dport: int, direction: int,
                   ep: Any) -> int:
        """lb_pol_judge: 0 allows, else the id of the policy to blame."""
        ingress = direction == _POL_INGRESS
        isolated = _C["LB_POL_ISOLATED_INGRESS"] if ingress else _C["LB_POL_ISOLATED_EGRESS"]
        blame = int(ep.ingress_policy if ingress else ep.egress_policy)
        if not ep.flags & isolated or remote == local:
            return 0
        raw = self._pol_ipcache.ref(_pack("struct lb_lpm4_key", prefixlen=32, addr=remote))
        peer = None if raw is None else _ffi.from_buffer("struct lb_pol_peer *", raw)
        identity = int(peer.identity) if peer is not None else _C["LB_POL_IDENTITY_ANY"]
        if ingress and peer is not None and peer.flags & _C["LB_POL_PEER_HOST"]:
            return 0
        slot = self._pol_rules.ref(_pack("struct lb_pol_rule_key", ep_addr=local,
                                         identity=identity, dir=direction))
        if slot is None and identity != _C["LB_POL_IDENTITY_ANY"]:
            slot = self._pol_rules.ref(_pack("struct lb_pol_rule_key", ep_addr=local,
                                             identity=_C["LB_POL_IDENTITY_ANY"],
                                             dir=direction))
        port = socket.ntohs(dport) if proto in (IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP) else 0
        if slot is not None and self._pol_ports_allow(_U32N.unpack_from(slot)[0], proto, port):
            return 0
        return blame or 1

    def _policy(self, f: Flow, front: Flow | None, local: int, direction: int,
                tcp_flags: int, size: int) -> bool:
        """lb_policy: True to drop. Pods no policy isolates cost one miss."""
        if not self._filter_has(_C["LB_FILTER_POLICED"], local, 0, self._pol_filter):
            return False
        raw = self._pol_endpoints.ref(_u32key(local))
        if raw is None:
            return False
        ep = _ffi.from_buffer("struct lb_pol_endpoint *", raw)
        now = self.clock() & _U64
        if self._pol_known(f, direction, tcp_flags, now):
            return False
        blame = self._pol_judge(local, f.saddr if direction == _POL_INGRESS else f.daddr,
                                f.proto, f.dport, direction, ep)
        if blame:
            drops = self._pol_drops.ref(_u32key(blame))
            if drops is not None:
                s = _ffi.from_buffer("struct lb_stat *", drops)
                s.packets += 1
                s.bytes += size
            return True
        self._pol_remember(f, front, direction, now)
        return False

    # --- stats.h -------------------------------------------------------------------------

    def _count(self, reason: int, size: int) -> None:
        raw = self._stats.ref(_u32key(reason))
        if raw is not None:
            s = _ffi.from_buffer("struct lb_stat *", raw)
            s.packets += 1
            s.bytes += size
