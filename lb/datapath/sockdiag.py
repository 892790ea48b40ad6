"""Connected UDP sockets of the node whose backend went away: destroyed
through sock_diag (SOCK_DESTROY, CONFIG_INET_DIAG_DESTROY): the socket is
disconnected with ECONNABORTED pending, so the application's next call
fails (a send with EDESTADDRREQ) and it connects again, to a live backend. A
connected UDP socket otherwise keeps sending to the address the socket
hook chose at connect time, long after that pod is gone; Cilium destroys
such sockets likewise (its socket-LB "terminate" of stale backends). Only
sockets the hooks translated are touched: their cookies are in lb_sock_rev.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from lb.datapath.netns import call_in

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_ESTABLISHED = 1  # what a connected UDP socket reports

_NLMSG = struct.Struct("=IHHII")
# struct inet_diag_sockid: sport, dport (network order), src[4], dst[4], if, cookie[2].
_SOCKID = struct.Struct("!HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")
_REQ_HEAD = struct.Struct("=BBBxI")  # family, protocol, ext, states
_MSG_HEAD = struct.Struct("=BBBB")  # family, state, timer, retrans


@dataclass(frozen=True)
class UdpSocket:
    src: str
    sport: int
    dst: str
    dport: int
    ifindex: int
    cookie: int

    def sockid(self) -> bytes:
        return _SOCKID.pack(self.sport, self.dport, socket.inet_aton(self.src) + bytes(12),
                            socket.inet_aton(self.dst) + bytes(12)) + _SOCKID_TAIL.pack(
            self.ifindex, self.cookie & 0xFFFFFFFF, self.cookie >> 32)


def _request(kind: int, flags: int, states: int, sockid: bytes) -> bytes:
    body = _REQ_HEAD.pack(socket.AF_INET, socket.IPPROTO_UDP, 0, states) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST | flags, 1, 0) + body


def _messages(sock: socket.socket) -> Iterator[tuple[int, bytes]]:
    """(type, payload) until NLMSG_DONE or an error reply."""
    while True:
        data = sock.recv(1 << 16)
        off = 0
        while off < len(data):
            length, kind, _, _, _ = _NLMSG.unpack_from(data, off)
            payload = data[off + _NLMSG.size:off + length]
            off += (length + 3) & ~3
            if kind == NLMSG_DONE:
                return
            yield kind, payload
            if kind == NLMSG_ERROR:
                return


def _parse(payload: bytes) -> UdpSocket:
    o = _MSG_HEAD.size
    sport, dport, src, dst = _SOCKID.unpack_from(payload, o)
    ifindex, lo, hi = _SOCKID_TAIL.unpack_from(payload, o + _SOCKID.size)
    return UdpSocket(socket.inet_ntoa(src[:4]), sport, socket.inet_ntoa(dst[:4]), dport,
                     ifindex, lo | hi << 32)


def connected_udp(netns: str | None) -> list[UdpSocket]:
    """Every connected IPv4 UDP socket of the namespace."""
    def dump() -> list[UdpSocket]:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
            s.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, 1 << TCP_ESTABLISHED,
                            bytes(_SOCKID.size + _SOCKID_TAIL.size)))
            return [_parse(p) for kind, p in _messages(s) if kind == SOCK_DIAG_BY_FAMILY]

    return call_in(netns, dump)


def destroy(sockets: list[UdpSocket], netns: str | None) -> list[str]:
    """SOCK_DESTROY each socket; returns the problems (a socket closed in
    the meantime is none)."""
    def run() -> list[str]:
        problems = []
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as s:
            for sk in sockets:
                s.send(_request(SOCK_DESTROY, NLM_F_ACK, 0xFFFFFFFF, sk.sockid()))
                for kind, p in _messages(s):
                    err = -struct.unpack_from("=i", p)[0] if kind == NLMSG_ERROR else 0
                    if err and err != errno.ENOENT:  # ENOENT: closed meanwhile
                        problems.append(f"{sk.dst}:{sk.dport} from {sk.src}:{sk.sport}: "
                                        f"{errno.errorcode.get(err, str(err))}")
        return problems

    return call_in(netns, run)
