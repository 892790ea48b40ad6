"""Build and read Ethernet/IPv4/TCP/UDP frames: what `lbctl trace` sends
through the programs and what tests check the output with."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

ETH_P_IP = 0x0800
TCP_FLAGS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10}
# Fixed MACs: the programs never look at them.
SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int(w) for w in struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    return src + dst + struct.pack("!BBH", 0, proto, length)


def build(
    src: str, sport: int, dst: str, dport: int, proto: str = "tcp", *,
    flags: str = "S", payload: bytes = b"", ttl: int = 64, ident: int = 1, df: bool = False,
) -> bytes:
    """A frame with correct IPv4 and L4 checksums (`df`: don't fragment)."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    if proto == "tcp":
        bits = sum(TCP_FLAGS[c] for c in flags)
        hdr = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, bits, 65535, 0, 0)
        l4 = hdr + payload
        csum = checksum(_pseudo(s, d, 6, len(l4)) + l4)
        l4 = l4[:16] + struct.pack("!H", csum) + l4[18:]
        pnum = 6
    elif proto == "udp":
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        csum = checksum(_pseudo(s, d, 17, len(l4)) + l4) or 0xFFFF
        l4 = l4[:6] + struct.pack("!H", csum) + l4[8:]
        pnum = 17
    else:
        raise ValueError(f"unknown protocol {proto!r}")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, 0x4000 if df else 0, ttl,
                     pnum, 0, s, d)
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    return DST_MAC + SRC_MAC + struct.pack("!H", ETH_P_IP) + ip + l4


def fragment(frame: bytes, payload_per_fragment: int) -> list[bytes]:
    """Split an IPv4 frame (no options) into fragments carrying at most
    `payload_per_fragment` bytes of IP payload each (a multiple of 8)."""
    if payload_per_fragment % 8 or payload_per_fragment <= 0:
        raise ValueError("fragment payloads are multiples of 8 bytes")
    eth, ip, body = frame[:14], frame[14:34], frame[34:]
    out = []
    for off in range(0, len(body), payload_per_fragment):
        part = body[off:off + payload_per_fragment]
        more = 0x2000 if off + payload_per_fragment < len(body) else 0
        hdr = bytearray(ip)
        struct.pack_into("!H", hdr, 2, 20 + len(part))
        struct.pack_into("!H", hdr, 6, more | off // 8)
        struct.pack_into("!H", hdr, 10, 0)
        struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
        out.append(eth + bytes(hdr) + part)
    return out


def reassemble(fragments: list[bytes]) -> bytes:
    """The frame the fragments make, as the receiver would rebuild it (in
    offset order), with the first fragment's Ethernet and IPv4 headers."""
    parts = sorted(fragments, key=lambda f: struct.unpack("!H", f[20:22])[0] & 0x1FFF)
    body = b"".join(f[34:14 + struct.unpack("!H", f[16:18])[0]] for f in parts)
    hdr = bytearray(parts[0][14:34])
    struct.pack_into("!H", hdr, 2, 20 + len(body))
    struct.pack_into("!H", hdr, 6, 0)
    struct.pack_into("!H", hdr, 10, 0)
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return parts[0][:14] + bytes(hdr) + body


@dataclass(frozen=True)
class Parsed:
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    ip_csum_ok: bool
    l4_csum_ok: bool
    tcp_flags: int = 0


def addresses(frame: bytes) -> tuple[str, str] | None:
    """The source and destination of an IPv4 frame; None when it is none."""
    if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
        return None
    if frame[14] >> 4 != 4:
        return None
    return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])


def parse(frame: bytes) -> Parsed | None:
    """The 5-tuple of a well-formed IPv4 TCP/UDP frame, with whether its
    checksums verify; None for anything else (a later fragment included:
    it carries no ports)."""
    if addresses(frame) is None:
        return None
    ihl = (frame[14] & 0x0F) * 4
    tot = struct.unpack("!H", frame[16:18])[0]
    if ihl < 20 or tot < ihl or len(frame) < 14 + tot:
        return None
    if struct.unpack("!H", frame[20:22])[0] & 0x1FFF:
        return None
    ip = frame[14 : 14 + ihl]
    l4 = frame[14 + ihl : 14 + tot]
    proto = frame[23]
    if proto not in (6, 17) or len(l4) < 8:
        return None
    sport, dport = struct.unpack("!HH", l4[:4])
    pseudo = _pseudo(ip[12:16], ip[16:20], proto, len(l4))
    # A UDP checksum of zero means "none".
    l4_ok = (proto == 17 and l4[6:8] == b"\0\0") or checksum(pseudo + l4) == 0
    return Parsed(
        src=socket.inet_ntoa(ip[12:16]),
        dst=socket.inet_ntoa(ip[16:20]),
        proto=proto,
        sport=sport,
        dport=dport,
        ip_csum_ok=checksum(ip) == 0,
        l4_csum_ok=l4_ok,
        tcp_flags=l4[13] if proto == 6 and len(l4) >= 20 else 0,
    )
