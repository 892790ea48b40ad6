"""Path MTU at XDP (bpf/lib/pmtu.h): a translated packet too big for its
route, sent with DF, is answered "fragmentation needed" with the route's MTU,
quoting what the sender sent, from the address it sent to. The kernel's
programs run in a namespace of their own whose routes say the MTU (the XDP
test run looks routes up there); the twin is given the same routes."""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from lab.topology import Topology, TopologySpec
from lb.datapath.instance import reconciler_for
from lb.datapath.netns import call_in
from lb.datapath.userspace.programs import UserspaceDatapath
from lb.inspect import packets
from lb.model import Node
from lb.service import desired
from lb.sources.manifests import build_cluster
from loader import layout
from loader.build import Datapath
from tests.conftest import SMALL, require_root
from tests.packet.test_datapath import XDP, XDP_PASS, web

NODE_IP = "192.0.2.1"
BACKEND = "10.244.2.10"  # on another node, behind the narrow link
NARROW = ("10.244.2.0/24", "203.0.113.0/24")
SMALL_MTU = 1400
FAR_CLIENT = "203.0.113.50"  # also behind the narrow link
NEAR_CLIENT = "198.51.100.10"
XDP_TX = 3
FRAG_NEEDED = layout.const("LB_STAT_REJECT_FRAG_NEEDED")


def program(dp: Any, min_mtu: int) -> None:
    cluster = build_cluster((d, "test") for d in web([BACKEND])).cluster
    node = Node(name="node-a", ips=(NODE_IP,), min_mtu=min_mtu)
    assert not reconciler_for(dp).sync(desired.compute(cluster, node)).errors


def route_mtu(_src: int, dst: int) -> int:
    addr = ipaddress.IPv4Address(socket.inet_ntoa(struct.pack("=I", dst)))
    return SMALL_MTU if any(addr in ipaddress.IPv4Network(n) for n in NARROW) else 1500


@pytest.fixture(scope="module")
def node_ns() -> Iterator[str]:
    """A node namespace whose routes to NARROW go through a device of
    SMALL_MTU (one end of a veth pair there: nothing is sent, only looked
    up)."""
    require_root()
    with Topology.build(TopologySpec.single(pods=0)) as topo:
        for cmd in (["ip", "link", "add", "narrow0", "mtu", str(SMALL_MTU), "type", "veth",
                     "peer", "name", "narrow1", "mtu", str(SMALL_MTU)],
                    ["ip", "link", "set", "narrow0", "up"], ["ip", "link", "set", "narrow1", "up"],
                    *(["ip", "route", "add", n, "dev", "narrow0"] for n in NARROW)):
            topo.exec(topo.node, cmd)
        yield topo.node.ns


@pytest.fixture
def both(datapath: Datapath, node_ns: str) -> list[Any]:
    """The kernel's programs (run in node_ns) and the twin, programmed alike:
    a NodePort served by BACKEND, the node's smallest MTU SMALL_MTU."""
    twin = UserspaceDatapath.new(SMALL, route_mtu=route_mtu)
    for dp in (datapath, twin):
        program(dp, SMALL_MTU)

    class InNs:
        def run(self, prog: str, frame: bytes) -> Any:
            return call_in(node_ns, lambda: datapath.run(prog, frame))

        def map(self, name: str) -> Any:
            return datapath.map(name)

    return [InNs(), twin]


def segment(src: str, sport: int, dst: str, dport: int, size: int, df: bool = True,
            flags: str = "A") -> bytes:
    """A TCP frame whose IPv4 packet is `size` bytes long."""
    return packets.build(src, sport, dst, dport, flags=flags, payload=b"x" * (size - 40), df=df)


def frag_needed(dp: Any) -> int:
    return sum(c.packets for c in dp.map("lb_stats").lookup(FRAG_NEEDED))


def check_answer(out: Any, sent: bytes, src: str, dst: str) -> None:
    """XDP_TX of "fragmentation needed" from `src` to `dst`, quoting the IP
    header and TCP header of `sent` as sent."""
    assert out.retval == XDP_TX
    frame = out.data
    ip, icmp = frame[14:34], frame[34:]
    assert packets.checksum(ip) == 0 and packets.checksum(icmp) == 0
    assert (socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])) == (src, dst)
    assert icmp[:2] == b"\x03\x04"
    assert struct.unpack("!H", icmp[6:8])[0] == SMALL_MTU
    assert icmp[8:] == sent[14:54]
    assert frame[:6] == sent[6:12] and frame[6:12] == sent[:6], "back where it came from"


def test_a_request_too_big_for_the_backends_route_is_answered(both: list[Any]) -> None:
    for dp in both:
        before = frag_needed(dp)
        sent = segment(NEAR_CLIENT, 40000, NODE_IP, 30080, 1500)
        check_answer(dp.run(XDP, sent), sent, NODE_IP, NEAR_CLIENT)
        assert frag_needed(dp) == before + 1
    # Kernel and twin leave the same bytes.
    sent = segment(NEAR_CLIENT, 40001, NODE_IP, 30080, 1500)
    assert both[0].run(XDP, sent).data == both[1].run(XDP, sent).data


@pytest.mark.parametrize("size, df", [(SMALL_MTU, True), (1500, False), (SMALL_MTU - 100, True)],
                         ids=["fits", "may-fragment", "small"])
def test_what_fits_or_may_be_fragmented_is_translated(both: list[Any], size: int,
                                                      df: bool) -> None:
    outs = []
    for dp in both:
        out = dp.run(XDP, segment(NEAR_CLIENT, 40002, NODE_IP, 30080, size, df=df))
        assert out.retval == XDP_PASS
        p = packets.parse(out.data)
        assert p is not None and (p.dst, p.dport) == (BACKEND, 8080) and p.src == NODE_IP
        outs.append(out.data)
    assert outs[0] == outs[1]


def test_a_reply_too_big_for_the_clients_route_is_answered_to_the_backend(
        both: list[Any]) -> None:
    outs = []
    for dp in both:
        syn = dp.run(XDP, segment(FAR_CLIENT, 40003, NODE_IP, 30080, 60, flags="S"))
        p = packets.parse(syn.data)
        assert p is not None and p.dst == BACKEND and p.src == NODE_IP, "masqueraded"
        reply = segment(BACKEND, 8080, NODE_IP, p.sport, 1500)
        out = dp.run(XDP, reply)
        check_answer(out, reply, NODE_IP, BACKEND)
        outs.append(out.data)
    assert outs[0] == outs[1]


def test_without_the_nodes_smallest_mtu_nothing_is_looked_up(datapath: Datapath,
                                                             node_ns: str) -> None:
    program(datapath, 0)
    out = call_in(node_ns, lambda: datapath.run(XDP, segment(NEAR_CLIENT, 40004, NODE_IP,
                                                             30080, 1500)))
    assert out.retval == XDP_PASS
