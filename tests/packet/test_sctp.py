"""SCTP services, as Cilium serves them: ClusterIP DNAT and reverse NAT from
pods where targetPort equals port. The CRC32c covers no IP address, so an
address rewrite leaves the SCTP packet's bytes as they were (and its CRC
right); a port is never rewritten. Kernel and twin alike."""

from __future__ import annotations

import logging
import socket
import struct

import pytest

from lb.datapath.interface import PacketDatapath
from lb.inspect import packets
from lb.service import desired
from lb.sources.manifests import build_cluster
from tests.packet.test_datapath import NODE, TC, XDP, endpoint_slice, program, service

VIP = "10.96.0.30"
POD, BACKEND = "10.244.1.5", "10.244.1.10"
DIAMETER = 3868


def sctp_frame(src: str, sport: int, dst: str, dport: int) -> bytes:
    """An SCTP packet with a DATA chunk; its CRC32c field is an arbitrary
    but fixed value: the datapath must never touch it."""
    common = struct.pack("!HHII", sport, dport, 0x1234ABCD, 0xDEADBEEF)
    chunk = struct.pack("!BBHIHHI", 0, 3, 16 + 4, 1, 0, 0, 46) + b"ping"
    body = common + chunk
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 9, 0x4000, 64, 132, 0, s, d)
    ip = ip[:10] + struct.pack("!H", packets.checksum(ip)) + ip[12:]
    return packets.DST_MAC + packets.SRC_MAC + b"\x08\x00" + ip + body


def addrs(frame: bytes) -> tuple[str, str]:
    assert packets.checksum(frame[14:34]) == 0, "IPv4 checksum"
    return socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])


def diameter(target: int = DIAMETER, svc_type: str = "ClusterIP", **spec: object) -> list[dict]:
    port = {"name": "diameter", "port": DIAMETER, "targetPort": target, "protocol": "SCTP"}
    if svc_type == "NodePort":
        port["nodePort"] = 30868
    return [service("diameter", VIP, [port], svc_type, **spec),
            endpoint_slice("diameter", [BACKEND], [{"name": "diameter", "port": target,
                                                    "protocol": "SCTP"}])]


@pytest.fixture
def dp(kernel_or_twin: PacketDatapath) -> PacketDatapath:
    return kernel_or_twin


def test_a_pod_reaches_an_sctp_clusterip_and_gets_the_reply_from_it(dp: PacketDatapath) -> None:
    program(dp, diameter())  # type: ignore[arg-type]
    frame = sctp_frame(POD, 40000, VIP, DIAMETER)
    out = dp.run(TC, frame)
    assert out.retval == 0
    assert addrs(out.data) == (POD, BACKEND)
    assert out.data[34:] == frame[34:], "SCTP header, CRC32c and chunks unchanged"
    reply = sctp_frame(BACKEND, DIAMETER, POD, 40000)
    back = dp.run(TC, reply)
    assert addrs(back.data) == (VIP, POD)
    assert back.data[34:] == reply[34:]
    # Later packets of the association go the same way.
    assert addrs(dp.run(TC, frame).data) == (POD, BACKEND)


def test_a_pod_reaching_itself_keeps_its_sctp_port(dp: PacketDatapath) -> None:
    docs = diameter()
    docs[1]["endpoints"][0]["addresses"] = [POD]
    program(dp, docs)  # type: ignore[arg-type]
    frame = sctp_frame(POD, 40001, VIP, DIAMETER)
    out = dp.run(TC, frame)
    assert addrs(out.data) == (NODE.hairpin_ip, POD)
    assert out.data[34:] == frame[34:]


def test_sctp_from_outside_is_not_translated(dp: PacketDatapath) -> None:
    program(dp, diameter(svc_type="NodePort", externalIPs=["198.51.100.40"]))  # type: ignore[arg-type]
    for dst, port in (("192.0.2.1", 30868), ("198.51.100.40", DIAMETER)):
        frame = sctp_frame("203.0.113.9", 40002, dst, port)
        assert dp.run(XDP, frame).data == frame


def test_which_sctp_frontends_are_programmed(caplog: pytest.LogCaptureFixture) -> None:
    def entries(docs: list[dict]) -> set[tuple[str, int, int]]:
        cluster = build_cluster((d, "t") for d in docs).cluster
        return {(f.ip, f.port, f.scope) for f in desired.compute(cluster, NODE).entries}

    internal, external = desired.SCOPE_INTERNAL, desired.SCOPE_EXTERNAL
    assert entries(diameter()) == {(VIP, DIAMETER, internal)}
    with caplog.at_level(logging.INFO):
        got = entries(diameter(svc_type="NodePort", externalIPs=["198.51.100.40"]))
    # Pods reach the ClusterIP and the external IP (same port); no NodePort, nothing from outside.
    assert got == {(VIP, DIAMETER, internal), ("198.51.100.40", DIAMETER, internal)}
    assert not any(scope == external for *_, scope in got)
    assert "served to pods only" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert entries(diameter(target=3869)) == set()
    assert "targetPort 3869 differs from the port" in caplog.text
