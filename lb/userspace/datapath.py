"""bpf/lb.c in Python: the same parse, decisions, map accesses, rewrite and
counters, step by step, so that a frame comes out bit for bit as the kernel
programs leave it. Each function names the C function it follows; keep the
two in step.

Values read from a frame are native-endian integers of its bytes, as a BPF
program loads them, which is also how the maps store them; the checksum
arithmetic runs on those same integers, as the C and the kernel helpers do.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from lb.userspace.maps import DictMap
from loader import layout

XDP_DROP, XDP_PASS = 1, 2
TC_ACT_OK, TC_ACT_SHOT = 0, 2
PROGRAMS = ("xdp_lb_external", "tc_lb_from_pod")

_ffi = layout.ffi
_C = layout.CONSTS

IPPROTO_TCP, IPPROTO_UDP = 6, 17
_ETH_LEN = 14
_ETH_P_IP = b"\x08\x00"
_IP_MF_OFFSET = 0x3FFF
_TCP_FIN, _TCP_RST = 0x01, 0x04
_MAX_L4_OFF = _ETH_LEN + 60
_IP_CSUM_OFF, _IP_SRC_OFF, _IP_DST_OFF = _ETH_LEN + 10, _ETH_LEN + 12, _ETH_LEN + 16
_NSEC_PER_SEC = 1_000_000_000
_U16, _U32, _U64 = 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1
_JHASH_INITVAL = 0xDEADBEEF

_U16N = struct.Struct("=H")
_U32N = struct.Struct("=I")
_BE16 = struct.Struct("!H")

_STAT = {name[len("LB_STAT_"):]: v for name, v in _C.items() if name.startswith("LB_STAT_")}
_DROPS = frozenset(_STAT[k] for k in (
    "DROP_MALFORMED", "REJECT_NO_ENDPOINTS", "DROP_BACKEND_GONE", "DROP_SOURCE_RANGE",
    "DROP_NO_LOCAL", "REJECT_NO_PORT", "DROP_UNKNOWN_VIP", "DROP_POLICY", "ERROR"))
_REWRITES = frozenset(_STAT[k] for k in ("DNAT_NEW", "DNAT_ESTABLISHED", "REVNAT"))


def c_defaults(overrides: Mapping[str, str] | None = None) -> dict[str, int]:
    """The integer defaults of bpf/lib/common.h (lifetimes and sizes), with
    -D style overrides, so the lifetimes are written in one place only."""
    text = (layout.BPF_DIR / "lib" / "common.h").read_text()
    found = {m.group(1): int(m.group(2), 0) for m in
             re.finditer(r"^#define\s+(LB_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", text, re.M)}
    for k, v in (overrides or {}).items():
        found[k] = int(v, 0)
    return found


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

    if p.proto not in (IPPROTO_TCP, IPPROTO_UDP):
        return _STAT["PASS_OTHER_PROTO"]
    if _BE16.unpack_from(frame, _ETH_LEN + 6)[0] & _IP_MF_OFFSET:
        return _STAT["PASS_FRAGMENT"]

    if p.proto == IPPROTO_TCP:
        if l4 + 20 > end:
            return _STAT["DROP_MALFORMED"]
        doff = frame[l4 + 12] >> 4
        if doff < 5 or doff * 4 > tot_len - ihl_len:
            return _STAT["DROP_MALFORMED"]
        p.tcp_flags = frame[l4 + 13]
    else:
        if l4 + 8 > end:
            return _STAT["DROP_MALFORMED"]
        ulen = _BE16.unpack_from(frame, l4 + 4)[0]
        if ulen < 8 or ulen > tot_len - ihl_len:
            return _STAT["DROP_MALFORMED"]
    p.sport = _U16N.unpack_from(frame, l4)[0]
    p.dport = _U16N.unpack_from(frame, l4 + 2)[0]
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
    zero stays zero and a computed zero becomes 0xffff."""
    end = len(buf)
    l4 = p.l4_off
    if end < _ETH_LEN + 20 or l4 > _MAX_L4_OFF:
        return -1
    if l4 + (20 if p.proto == IPPROTO_TCP else 8) > end:
        return -1
    coff = l4_csum_off(p)
    l4sum = _U16N.unpack_from(buf, coff)[0]
    ipsum = _U16N.unpack_from(buf, _IP_CSUM_OFF)[0]
    nosum = p.proto == IPPROTO_UDP and l4sum == 0

    for off, new in ((_IP_SRC_OFF, n.saddr), (_IP_DST_OFF, n.daddr)):
        old = _U32N.unpack_from(buf, off)[0]
        if new != old:
            ipsum = xdp_csum_replace4(ipsum, old, new)
            if not nosum:
                l4sum = xdp_csum_replace4(l4sum, old, new)
            _U32N.pack_into(buf, off, new)
    for off, new in ((l4, n.sport), (l4 + 2, n.dport)):
        old = _U16N.unpack_from(buf, off)[0]
        if new != old:
            if not nosum:
                l4sum = xdp_csum_replace2(l4sum, old, new)
            _U16N.pack_into(buf, off, new)
    if p.proto == IPPROTO_UDP and not nosum and l4sum == 0:
        l4sum = 0xFFFF
    _U16N.pack_into(buf, _IP_CSUM_OFF, ipsum)
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
    """lb_nat_skb: bpf_l4/l3_csum_replace, then bpf_skb_store_bytes, field
    by field, in the C's order."""
    mangled_0 = p.proto == IPPROTO_UDP
    coff = l4_csum_off(p)
    for off, old, new in ((_IP_SRC_OFF, p.saddr, n.saddr), (_IP_DST_OFF, p.daddr, n.daddr)):
        if old == new:
            continue
        if (bpf_l4_csum_replace(buf, coff, old, new, mangled_0)
                or bpf_l3_csum_replace(buf, _IP_CSUM_OFF, old, new)
                or off + 4 > len(buf)):
            return -1
        _U32N.pack_into(buf, off, new)
    for off, old, new in ((p.l4_off, p.sport, n.sport), (p.l4_off + 2, p.dport, n.dport)):
        if old == new:
            continue
        if bpf_l4_csum_replace(buf, coff, old, new, mangled_0) or off + 2 > len(buf):
            return -1
        _U16N.pack_into(buf, off, new)
    return 0


# --- the programs ------------------------------------------------------------------


class Verdict(NamedTuple):
    retval: int  # XDP_DROP/XDP_PASS, or TC_ACT_OK/TC_ACT_SHOT
    data: bytes  # the frame as the program leaves it
    reason: int  # the LB_STAT_* counter that moved


def _pack(ctype: str, **fields: int) -> bytes:
    return layout.to_bytes(layout.new(ctype, **fields))


def _u32key(i: int) -> bytes:
    return _U32N.pack(i & _U32)


class UserspaceDatapath:
    """The programs of bpf/lb.c over DictMaps. `clock` stands for
    bpf_ktime_get_ns (monotonic nanoseconds); tests drive it."""

    def __init__(self, maps: Mapping[str, DictMap], clock: Callable[[], int] = time.monotonic_ns,
                 defines: Mapping[str, str] | None = None) -> None:
        self.maps = maps
        self.clock = clock
        self._services = maps["lb_services"]
        self._backends = maps["lb_backends"]
        self._maglev = maps["lb_maglev"]
        self._rev_nat = maps["lb_rev_nat"]
        self._ct = maps["lb_ct"]
        self._affinity = maps["lb_affinity"]
        self._stats = maps["lb_stats"]
        d = c_defaults(defines)
        self._tcp_life = d["LB_CT_TCP_LIFETIME_S"] * _NSEC_PER_SEC
        self._tcp_closing = d["LB_CT_TCP_CLOSING_S"] * _NSEC_PER_SEC
        self._other_life = d["LB_CT_OTHER_LIFETIME_S"] * _NSEC_PER_SEC
        self._scope_ext = _C["LB_SCOPE_EXTERNAL"]
        self._scope_int = _C["LB_SCOPE_INTERNAL"]

    # --- entry points -----------------------------------------------------------

    def run(self, program: str, frame: bytes) -> Verdict:
        if program == "xdp_lb_external":
            return self.xdp_lb_external(frame)
        if program == "tc_lb_from_pod":
            return self.tc_lb_from_pod(frame)
        raise ValueError(f"no program {program!r}")

    def xdp_lb_external(self, frame: bytes) -> Verdict:
        buf = bytearray(frame)
        p = Pkt()
        reason, n = self._decide(p, buf, self._scope_ext)
        if reason in _REWRITES and n is not None and nat_xdp(buf, p, n):
            reason = _STAT["ERROR"]
        self._count(reason, p.len)
        return Verdict(XDP_DROP if reason in _DROPS else XDP_PASS, bytes(buf), reason)

    def tc_lb_from_pod(self, frame: bytes) -> Verdict:
        buf = bytearray(frame)
        p = Pkt()
        reason, n = self._decide(p, buf, self._scope_int)
        if reason in _REWRITES and n is not None and nat_skb(buf, p, n):
            reason = _STAT["ERROR"]
        self._count(reason, p.len)
        return Verdict(TC_ACT_SHOT if reason in _DROPS else TC_ACT_OK, bytes(buf), reason)

    # --- lb.c ----------------------------------------------------------------------

    def _decide(self, p: Pkt, buf: bytearray, scope: int) -> tuple[int, Nat | None]:
        """lb_decide."""
        reason = parse(buf, p)
        if reason >= 0:
            return reason, None
        now = self.clock() & _U64
        rev = self._reverse(p, now)
        if rev is not None:
            return rev
        return self._forward(p, scope, now)

    def _reverse(self, p: Pkt, now: int) -> tuple[int, Nat] | None:
        """lb_reverse."""
        v = self._ct_lookup(p, _C["LB_CT_REPLY"], now)
        if v is None:
            return None
        raw = self._rev_nat.ref(_u32key(v.svc_id))
        if raw is None:
            return None
        rn = _ffi.from_buffer("struct lb_rev_nat *", raw)
        if rn.addr == 0:
            return None
        self._ct_touch(v, p, now)
        daddr, dport = p.daddr, p.dport
        if v.flags & _C["LB_CT_MASQ"]:
            daddr, dport = v.nat_addr, v.nat_port
        return _STAT["REVNAT"], Nat(rn.addr, daddr, rn.port, dport)

    def _forward(self, p: Pkt, scope: int, now: int) -> tuple[int, Nat | None]:
        """lb_forward."""
        svc = self._service(p, scope)
        if svc is None:
            return _STAT["PASS_NOT_SERVICE"], None
        reason = _STAT["DNAT_ESTABLISHED"]
        b = None
        v = self._ct_lookup(p, _C["LB_CT_FORWARD"], now)
        if v is not None and v.svc_id == svc.svc_id:
            b = self._backend(v.backend_id)
        if b is not None and v is not None:
            self._ct_touch(v, p, now)
        else:
            # A new flow, or its backend is gone: choose again.
            if svc.maglev_size == 0:
                if svc.flags & _C["LB_SVC_LOCAL_ONLY"]:
                    return _STAT["DROP_NO_LOCAL"], None
                return _STAT["REJECT_NO_ENDPOINTS"], None
            bid = self._select_backend(p, svc, now)
            b = self._backend(bid)
            if b is None:
                return _STAT["DROP_BACKEND_GONE"], None
            if self._ct_create(p, svc.svc_id, bid, b, now):
                return _STAT["ERROR"], None
            reason = _STAT["DNAT_NEW"]
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

    def _ct_create(self, p: Pkt, svc_id: int, backend_id: int, b: Any, now: int) -> int:
        """lb_ct_create: the forward entry, then the reply entry."""
        v = layout.new("struct lb_ct_val", created_ns=now, last_seen_ns=now, svc_id=svc_id,
                       backend_id=backend_id)
        k = self._ct_key(p.saddr, p.daddr, p.sport, p.dport, p.proto, _C["LB_CT_FORWARD"])
        if self._ct.put(k, layout.to_bytes(v)):
            return -1
        v.backend_id = 0
        k = self._ct_key(b.addr, p.saddr, b.port, p.sport, p.proto, _C["LB_CT_REPLY"])
        return self._ct.put(k, layout.to_bytes(v))

    # --- lb.h --------------------------------------------------------------------------

    def _service(self, p: Pkt, scope: int) -> Any | None:
        raw = self._services.ref(_pack("struct lb_svc_key", addr=p.daddr, port=p.dport,
                                       proto=p.proto, scope=scope))
        return None if raw is None else _ffi.from_buffer("struct lb_svc_val *", raw)

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
    def flow_hash(p: Pkt, client_only: bool) -> int:
        """lb_flow_hash."""
        if client_only:
            return jhash_3words(p.saddr, 0, 0, 0)
        return jhash_3words(p.saddr, p.daddr, ((p.sport << 16) | p.dport) & _U32, p.proto)

    def _maglev_pick(self, svc: Any, h: int) -> int:
        if svc.maglev_size == 0:
            return 0
        raw = self._maglev.ref(_u32key(svc.maglev_off + h % svc.maglev_size))
        return 0 if raw is None else int(_U32N.unpack_from(raw)[0])

    def _affinity_pick(self, p: Pkt, svc: Any, now: int) -> int:
        """lb_affinity_pick: kube-proxy's `recent` match."""
        k = _pack("struct lb_affinity_key", client=p.saddr, group_id=svc.group_id)
        timeout = svc.affinity_timeout * _NSEC_PER_SEC
        raw = self._affinity.ref(k)
        if raw is not None:
            a = _ffi.from_buffer("struct lb_affinity_val *", raw)
            if (now - a.last_used_ns) & _U64 <= timeout and self._backend(a.backend_id):
                a.last_used_ns = now
                return int(a.backend_id)
        bid = self._maglev_pick(svc, self.flow_hash(p, True))
        if bid:
            # A full map is not an error for the packet: the C ignores it too.
            self._affinity.put(k, _pack("struct lb_affinity_val", backend_id=bid,
                                        last_used_ns=now))
        return bid

    def _select_backend(self, p: Pkt, svc: Any, now: int) -> int:
        if svc.flags & _C["LB_SVC_AFFINITY"]:
            return self._affinity_pick(p, svc, now)
        return self._maglev_pick(svc, self.flow_hash(p, False))

    # --- stats.h -------------------------------------------------------------------------

    def _count(self, reason: int, size: int) -> None:
        raw = self._stats.ref(_u32key(reason))
        if raw is not None:
            s = _ffi.from_buffer("struct lb_stat *", raw)
            s.packets += 1
            s.bytes += size
