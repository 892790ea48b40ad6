"""ICMP errors of translated flows (bpf/lib/icmp.h): the quoted packet and
the outer addresses translated like the flow, with every checksum right, in
the kernel and in the userspace twin alike (byte for byte)."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from lb.datapath.interface import PacketDatapath
from lb.datapath.userspace.programs import UserspaceDatapath
from lb.inspect import packets
from lb.verdicts import REASONS
from loader import layout
from loader.build import Datapath
from tests.conftest import SMALL
from tests.packet.test_datapath import (
    TC,
    TO_EXTERNAL,
    TO_POD,
    VIP,
    XDP,
    XDP_PASS,
    endpoint_slice,
    program,
    service,
    web,
)

NODE_IP = "192.0.2.1"
CLIENT_POD = "10.244.1.5"
BACKEND = "10.244.1.10"
OUTSIDE = "198.51.100.10"
ROUTER = "203.0.113.254"
ICMP_ERROR_NAT = layout.const("LB_STAT_ICMP_ERROR_NAT")
PASS_OTHER_PROTO = layout.const("LB_STAT_PASS_OTHER_PROTO")


def icmp_error(src: str, dst: str, quoted: bytes, icmp_type: int = 3, code: int = 4,
               mtu: int = 1400) -> bytes:
    """An ICMP error from `src` to `dst` quoting the IPv4 packet of the frame
    `quoted` whole (so its L4 checksum can be checked after translation)."""
    body = quoted[14:]
    msg = struct.pack("!BBHHH", icmp_type, code, 0, 0, mtu if code == 4 else 0) + body
    msg = msg[:2] + struct.pack("!H", packets.checksum(msg)) + msg[4:]
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0xC0, 20 + len(msg), 7, 0, 64, 1, 0, s, d)
    ip = ip[:10] + struct.pack("!H", packets.checksum(ip)) + ip[12:]
    return quoted[:14] + ip + msg


def read_error(frame: bytes) -> tuple[str, str, packets.Parsed]:
    """The outer addresses and the quote of an ICMP error, every checksum
    verified (outer IPv4, ICMP, and the quote's IPv4 and L4 through parse)."""
    assert packets.checksum(frame[14:34]) == 0, "outer IPv4 checksum"
    assert packets.checksum(frame[34:]) == 0, "ICMP checksum"
    quote = packets.parse(frame[:14] + frame[42:])
    assert quote is not None and quote.ip_csum_ok and quote.l4_csum_ok, quote
    return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34]), quote


@pytest.fixture
def dp(kernel_or_twin: PacketDatapath) -> PacketDatapath:
    return kernel_or_twin


def run(dp: PacketDatapath, prog: str, frame: bytes) -> Any:
    return dp.run(prog, frame)


def stat(dp: PacketDatapath, reason: int) -> int:
    return sum(c.packets for c in dp.map("lb_stats").lookup(reason))


def test_the_reason_is_named() -> None:
    assert REASONS[ICMP_ERROR_NAT].name == "icmp-error-nat"
    assert REASONS[ICMP_ERROR_NAT].verdict == "PASS"


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_frag_needed_about_a_pod_clients_request_names_the_clusterip(
        dp: PacketDatapath, proto: str) -> None:
    program(dp, web([BACKEND]))  # type: ignore[arg-type]
    vport, bport = (80, 8080) if proto == "tcp" else (53, 5353)
    sent = run(dp, TC, packets.build(CLIENT_POD, 40000, VIP, vport, proto, payload=b"x" * 64))
    translated = sent.data
    assert packets.parse(translated).dst == BACKEND  # type: ignore[union-attr]
    before = stat(dp, ICMP_ERROR_NAT)
    # The node's stack could not forward it on: fragmentation needed, to the client.
    err = icmp_error(NODE_IP, CLIENT_POD, translated)
    out = run(dp, TO_POD, err)
    assert out.retval == 0
    outer_src, outer_dst, quote = read_error(out.data)
    assert (outer_src, outer_dst) == (NODE_IP, CLIENT_POD)  # a router's address stays
    assert (quote.src, quote.sport, quote.dst, quote.dport) == (CLIENT_POD, 40000, VIP, vport)
    assert stat(dp, ICMP_ERROR_NAT) == before + 1
    # The backend itself answers (port unreachable) as it leaves its veth:
    # the error comes from the ClusterIP.
    err = icmp_error(BACKEND, CLIENT_POD, translated, code=3)
    out = run(dp, TC, err)
    assert out.retval == 0
    outer_src, outer_dst, quote = read_error(out.data)
    assert (outer_src, outer_dst) == (VIP, CLIENT_POD)
    assert (quote.src, quote.dst, quote.dport) == (CLIENT_POD, VIP, vport)
    assert bport != vport


def test_a_clients_error_about_a_reply_goes_to_the_backend(dp: PacketDatapath) -> None:
    program(dp, web([BACKEND]))  # type: ignore[arg-type]
    run(dp, TC, packets.build(CLIENT_POD, 40001, VIP, 53, "udp", payload=b"q"))
    reply = run(dp, TC, packets.build(BACKEND, 5353, CLIENT_POD, 40001, "udp", payload=b"a"))
    got = packets.parse(reply.data)
    assert got is not None and (got.src, got.sport) == (VIP, 53)
    # The client's socket is gone: port unreachable, about the reply it got.
    err = icmp_error(CLIENT_POD, VIP, reply.data, code=3)
    out = run(dp, TC, err)
    outer_src, outer_dst, quote = read_error(out.data)
    assert (outer_src, outer_dst) == (CLIENT_POD, BACKEND)
    assert (quote.src, quote.sport, quote.dst, quote.dport) == (BACKEND, 5353, CLIENT_POD,
                                                                40001)


def test_a_masqueraded_nodeports_errors_both_ways(dp: PacketDatapath) -> None:
    program(dp, web([BACKEND]))  # type: ignore[arg-type]
    sent = run(dp, XDP, packets.build(OUTSIDE, 41000, NODE_IP, 30080, payload=b"y" * 32))
    assert sent.retval == XDP_PASS
    fwd = packets.parse(sent.data)
    assert fwd is not None and (fwd.src, fwd.dst) == (NODE_IP, BACKEND)
    masq_port = fwd.sport
    # A router on the way to the backend: time exceeded, to the masquerade address.
    out = run(dp, XDP, icmp_error(ROUTER, NODE_IP, sent.data, icmp_type=11, code=0))
    assert out.retval == XDP_PASS
    outer_src, outer_dst, quote = read_error(out.data)
    assert (outer_src, outer_dst) == (ROUTER, OUTSIDE)
    assert (quote.src, quote.sport, quote.dst, quote.dport) == (OUTSIDE, 41000, NODE_IP,
                                                                30080)
    # The backend's reply, reverse-translated, and the client's error about it.
    reply = run(dp, XDP, packets.build(BACKEND, 8080, NODE_IP, masq_port, flags="SA"))
    got = packets.parse(reply.data)
    assert got is not None and (got.src, got.sport, got.dst) == (NODE_IP, 30080, OUTSIDE)
    out = run(dp, XDP, icmp_error(OUTSIDE, NODE_IP, reply.data))
    outer_src, outer_dst, quote = read_error(out.data)
    assert (outer_src, outer_dst) == (NODE_IP, BACKEND)
    assert (quote.src, quote.sport, quote.dst, quote.dport) == (BACKEND, 8080, NODE_IP,
                                                                masq_port)


def test_an_error_of_a_local_backends_nodeport_flow_leaves_translated(
        dp: PacketDatapath) -> None:
    # externalTrafficPolicy Local: the client's own source, no masquerade.
    program(dp, [service("np", "10.96.0.20", [{"name": "http", "port": 80, "targetPort": 8080,
                                               "protocol": "TCP", "nodePort": 30090}],
                         "NodePort", externalTrafficPolicy="Local"),
                 endpoint_slice("np", [BACKEND], [{"name": "http", "port": 8080,
                                                   "protocol": "TCP"}])])  # type: ignore[arg-type]
    sent = run(dp, XDP, packets.build(OUTSIDE, 41001, NODE_IP, 30090))
    out = run(dp, TO_EXTERNAL, icmp_error(NODE_IP, OUTSIDE, sent.data))
    assert out.retval == 0
    outer_src, outer_dst, quote = read_error(out.data)
    assert (outer_src, outer_dst) == (NODE_IP, OUTSIDE)
    assert (quote.src, quote.dst, quote.dport) == (OUTSIDE, NODE_IP, 30090)


def test_an_error_about_no_translated_flow_passes_untouched(dp: PacketDatapath) -> None:
    program(dp, web([BACKEND]))  # type: ignore[arg-type]
    quoted = packets.build(CLIENT_POD, 40002, "10.244.2.9", 80)
    for prog in (TC, XDP, TO_POD, TO_EXTERNAL):
        err = icmp_error(ROUTER, CLIENT_POD, quoted)
        out = run(dp, prog, err)
        assert out.data == err, prog
    # An echo request is no error, even quoting nothing.
    before = stat(dp, ICMP_ERROR_NAT)
    echo = icmp_error(ROUTER, CLIENT_POD, quoted, icmp_type=8, code=0)
    assert run(dp, TC, echo).data == echo
    assert stat(dp, ICMP_ERROR_NAT) == before


def test_a_udp_quote_without_checksum_keeps_none(dp: PacketDatapath) -> None:
    program(dp, web([BACKEND]))  # type: ignore[arg-type]
    frame = bytearray(packets.build(CLIENT_POD, 40003, VIP, 53, "udp", payload=b"q"))
    frame[40:42] = b"\0\0"  # UDP checksum: none
    sent = run(dp, TC, bytes(frame))
    assert sent.data[40:42] == b"\0\0"
    out = run(dp, TO_POD, icmp_error(NODE_IP, CLIENT_POD, sent.data))
    _, _, quote = read_error(out.data)
    assert out.data[42 + 20 + 6:42 + 20 + 8] == b"\0\0"
    assert (quote.dst, quote.dport) == (VIP, 53)


def test_kernel_and_twin_write_the_same_bytes(datapath: Datapath) -> None:
    results: dict[str, list[bytes]] = {}
    for name, d in (("kernel", datapath), ("twin", UserspaceDatapath.new(SMALL))):
        program(d, web([BACKEND]))  # type: ignore[arg-type]
        sent = run(d, TC, packets.build(CLIENT_POD, 40100, VIP, 80, payload=b"z" * 10))
        out = [run(d, TO_POD, icmp_error(NODE_IP, CLIENT_POD, sent.data)).data]
        sent = run(d, XDP, packets.build(OUTSIDE, 41100, NODE_IP, 30080))
        out.append(run(d, XDP, icmp_error(ROUTER, NODE_IP, sent.data)).data)
        results[name] = out
    assert results["kernel"] == results["twin"]
