"""Packet-level behaviour of the real programs in the real kernel, through
BPF_PROG_TEST_RUN: DNAT, checksums, reverse NAT, connection tracking,
malformed input."""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from lb.datapath.instance import Kind, Sizes, reconciler_for, throwaway
from lb.datapath.interface import PacketDatapath
from lb.encoding import ip_be, port_be
from lb.inspect import packets
from lb.inspect.trace import Tracer
from lb.model import Node
from lb.service import desired
from lb.service.reconcile import Reconciler
from lb.sources.manifests import build_cluster
from loader import layout, libbpf
from loader.build import Datapath
from loader.programs import TC_FROM_POD, TC_TO_EXTERNAL, TC_TO_POD, XDP_EXTERNAL
from tests.conftest import require_root

VIP = "10.96.0.10"
NODE = Node(name="node-a", ips=("192.0.2.1",))
XDP, TC, TO_POD = XDP_EXTERNAL.name, TC_FROM_POD.name, TC_TO_POD.name
TO_EXTERNAL = TC_TO_EXTERNAL.name
XDP_DROP, XDP_PASS = 1, 2
TC_ACT_OK, TC_ACT_SHOT = 0, 2


def service(name: str, vip: str, ports: list[dict[str, Any]], svc_type: str = "ClusterIP",
            **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": svc_type, "clusterIP": vip, "ports": ports, **spec}}


def endpoint_slice(name: str, ips: list[str], ports: list[dict[str, Any]],
                   node: str = "node-a") -> dict[str, Any]:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-x", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4", "ports": ports,
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True},
                           "nodeName": node} for ip in ips]}


def web(backends: list[str]) -> list[dict[str, Any]]:
    ports = [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
              "nodePort": 30080},
             {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}]
    eps = [{"name": "http", "port": 8080, "protocol": "TCP"},
           {"name": "dns", "port": 5353, "protocol": "UDP"}]
    return [service("web", VIP, ports, "NodePort"), endpoint_slice("web", backends, eps)]


def program(dp: PacketDatapath, docs: list[dict[str, Any]], rec: Reconciler | None = None
            ) -> Reconciler:
    result = build_cluster((d, "test") for d in docs)
    assert not result.errors
    rec = rec or reconciler_for(dp)
    res = rec.sync(desired.compute(result.cluster, NODE))
    assert not res.errors
    return rec


def run(dp: Datapath, prog: str, frame: bytes) -> libbpf.TestRun:
    return libbpf.prog_test_run(dp.prog_fd(prog), frame)


def test_clusterip_tcp_rewritten_to_backend_with_valid_checksums(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    seen = set()
    for sport in range(40000, 40064):
        frame = packets.build("10.244.1.5", sport, VIP, 80, "tcp", payload=b"GET / HTTP/1.1\r\n")
        out = run(datapath, TC, frame)
        assert out.retval == TC_ACT_OK
        p = packets.parse(out.data)
        assert p is not None
        assert (p.src, p.sport) == ("10.244.1.5", sport)
        assert p.dst in ("10.244.1.10", "10.244.1.11") and p.dport == 8080
        assert p.ip_csum_ok and p.l4_csum_ok, "checksums must verify after DNAT"
        assert out.data[54:] == frame[54:], "payload untouched"
        seen.add(p.dst)
    assert seen == {"10.244.1.10", "10.244.1.11"}


def test_clusterip_udp_rewritten_with_valid_checksums(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    for sport in range(50000, 50016):
        frame = packets.build("10.244.1.5", sport, VIP, 53, "udp", payload=b"query")
        out = run(datapath, TC, frame)
        p = packets.parse(out.data)
        assert p is not None and p.proto == 17
        assert p.dst in ("10.244.1.10", "10.244.1.11") and p.dport == 5353
        assert p.ip_csum_ok and p.l4_csum_ok


def test_udp_without_checksum_stays_without(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    frame = bytearray(packets.build("10.244.1.5", 5000, VIP, 53, "udp", payload=b"q"))
    frame[40:42] = b"\0\0"  # UDP checksum field: "none"
    out = run(datapath, TC, bytes(frame))
    assert out.data[40:42] == b"\0\0"
    p = packets.parse(out.data)
    assert p is not None and p.dst == "10.244.1.10" and p.ip_csum_ok


def test_reply_is_reverse_translated_to_the_vip(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    fwd = run(datapath, TC, packets.build("10.244.1.5", 41000, VIP, 80, "tcp"))
    p = packets.parse(fwd.data)
    assert p is not None and p.dst == "10.244.1.10"
    # The backend's answer leaves its own veth: tc on the backend pod.
    reply = packets.build("10.244.1.10", 8080, "10.244.1.5", 41000, "tcp", flags="SA")
    out = run(datapath, TC, reply)
    r = packets.parse(out.data)
    assert r is not None
    assert (r.src, r.sport, r.dst, r.dport) == (VIP, 80, "10.244.1.5", 41000)
    assert r.ip_csum_ok and r.l4_csum_ok
    # A remote backend's answer comes in through the node device: XDP.
    out = run(datapath, XDP, reply)
    assert out.retval == XDP_PASS
    r = packets.parse(out.data)
    assert r is not None and (r.src, r.sport) == (VIP, 80) and r.l4_csum_ok and r.ip_csum_ok


def test_reply_of_a_host_network_backend_is_translated_entering_the_pod(
        datapath: Datapath) -> None:
    """The `kubernetes` Service's endpoint is the API server on a node's own
    address: its answer leaves the node's stack straight for the client pod,
    through no pod veth's ingress and no node device. tc_lb_to_pod, on the
    way into the client pod, gives it the ClusterIP back as its source."""
    node_ip = "198.18.0.11"
    program(datapath, web([node_ip]))
    fwd = run(datapath, TC, packets.build("10.244.1.5", 41001, VIP, 80, "tcp"))
    p = packets.parse(fwd.data)
    assert p is not None and (p.dst, p.dport) == (node_ip, 8080)
    reply = packets.build(node_ip, 8080, "10.244.1.5", 41001, "tcp", flags="SA")
    out = run(datapath, TO_POD, reply)
    assert out.retval == TC_ACT_OK
    r = packets.parse(out.data)
    assert r is not None
    assert (r.src, r.sport, r.dst, r.dport) == (VIP, 80, "10.244.1.5", 41001)
    assert r.ip_csum_ok and r.l4_csum_ok
    # A packet of no service flow enters the pod unchanged.
    other = packets.build(node_ip, 8080, "10.244.1.5", 41002, "tcp", flags="SA")
    assert run(datapath, TO_POD, other).data == other


def test_established_flow_keeps_backend_when_a_backend_is_added(datapath: Datapath) -> None:
    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    flows = range(42000, 42200)

    def send_all() -> dict[int, str]:
        out = {}
        for sport in flows:
            p = packets.parse(run(datapath, TC, packets.build("10.244.1.5", sport, VIP, 80)).data)
            assert p is not None
            out[sport] = p.dst
        return out

    before = send_all()
    program(datapath, web(["10.244.1.10", "10.244.1.11", "10.244.1.12"]), rec)
    assert send_all() == before, "conntrack must keep every flow on its backend"
    # Without their conntrack entries the same flows spread over the new
    # table, so it was conntrack (not luck) that kept them.
    ct = datapath.map("lb_ct")
    for k in list(ct.keys()):
        ct.delete(layout.ffi.new("struct lb_ct_key *", k))
    moved = send_all()
    assert "10.244.1.12" in moved.values()
    assert moved != before


def test_flow_moves_on_when_its_backend_is_removed(datapath: Datapath) -> None:
    rec = program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    chosen = {}
    for sport in range(43000, 43040):
        p = packets.parse(run(datapath, TC, packets.build("10.244.1.5", sport, VIP, 53,
                                                          "udp")).data)
        assert p is not None
        chosen[sport] = p.dst
    program(datapath, web(["10.244.1.11"]), rec)
    for sport in chosen:
        p = packets.parse(run(datapath, TC, packets.build("10.244.1.5", sport, VIP, 53,
                                                          "udp")).data)
        assert p is not None and p.dst == "10.244.1.11"


def _forward_entry(dp: PacketDatapath, client: str, sport: int) -> Any:
    for k, v in dp.map("lb_ct").items():
        if (k.dir == layout.const("LB_CT_FORWARD") and k.saddr == ip_be(client)
                and k.sport == port_be(sport)):
            return v
    raise AssertionError(f"no forward entry of {client}:{sport}")


# Ids run out at once: two frontends, service ports and backends fit.
TINY = Sizes(max_services=3, max_backends=3, maglev_slots=1 << 12, ct_size=1024)


def _clusterip(name: str, vip: str, port: int, backend: str, proto: str = "UDP"
               ) -> list[dict[str, Any]]:
    return [service(name, vip, [{"name": "p", "port": port, "targetPort": 5353,
                                 "protocol": proto}]),
            endpoint_slice(name, [backend], [{"name": "p", "port": 5353, "protocol": proto}])]


@pytest.mark.parametrize("kind", ["kernel", "userspace"])
def test_ids_a_gone_frontend_leaves_do_not_carry_its_flows(kind: Kind) -> None:
    """An established flow is judged from its conntrack entry alone. The
    ids it names (frontend, service port, backend) are freed with the
    frontend and, once fresh ones run out, handed out again; a packet of
    the old flow that the pre-filter lets through must then be balanced
    afresh at its own frontend, not follow the ids to whatever took them."""
    if kind == "kernel":
        require_root()
    with throwaway(kind, TINY) as dp:
        keep = _clusterip("keep", "10.96.0.9", 53, "10.244.1.9")
        rec = program(dp, keep + _clusterip("dns", VIP, 53, "10.244.1.10"))
        flow = packets.build("10.244.1.5", 46000, VIP, 53, "udp", payload=b"q")
        p = packets.parse(dp.run(TC, flow).data)
        assert p is not None and (p.dst, p.dport) == ("10.244.1.10", 5353)
        old = _forward_entry(dp, "10.244.1.5", 46000)
        program(dp, keep, rec)  # dns goes: its ids are freed
        program(dp, keep + _clusterip("dns2", "10.96.0.20", 53, "10.244.1.20"), rec)
        # The new frontend took every id the old flow's entry names.
        rn = dp.map("lb_rev_nat").lookup(old.svc_id)
        b = dp.map("lb_backends").lookup(old.backend_id)
        assert rn is not None and rn.addr == ip_be("10.96.0.20"), "frontend id not reused"
        assert b is not None and b.addr == ip_be("10.244.1.20"), "backend id not reused"
        assert b.group_id == old.group_id, "service port id not reused"
        # A pre-filter that answers "maybe" for everything (a false positive).
        for i in range(dp.sizes.filter_words):
            dp.map("lb_filter").update(i, (1 << 64) - 1)
        out = dp.run(TC, flow)
        assert out.data == flow, "the old flow followed reused ids"
        assert _forward_entry(dp, "10.244.1.5", 46000).svc_id == old.svc_id


def test_a_pods_flow_is_not_continued_from_outside(datapath: Datapath) -> None:
    """A conntrack entry a pod's flow created (tc) answers for that way in
    only: the same 5-tuple arriving from outside (XDP, a spoofed source)
    is balanced as outside traffic, and a ClusterIP is none of it."""
    program(datapath, web(["10.244.1.10"]))
    to_vip = packets.build("10.244.1.5", 47000, VIP, 80, "tcp")
    to_node_port = packets.build("10.244.1.5", 47001, "192.0.2.1", 30080, "tcp")
    for frame in (to_vip, to_node_port):
        p = packets.parse(run(datapath, TC, frame).data)
        assert p is not None and p.dst == "10.244.1.10"
    assert run(datapath, XDP, to_vip).data == to_vip, "a ClusterIP is not served outside"
    new = stat_packets(datapath, "DNAT_NEW")
    run(datapath, XDP, to_node_port)
    assert stat_packets(datapath, "DNAT_NEW") == new + 1, "balanced as a new outside flow"
    entry = _forward_entry(datapath, "10.244.1.5", 47001)
    assert entry.flags & layout.const("LB_CT_EXTERNAL")


def test_non_service_traffic_passes_untouched(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    for frame in (packets.build("10.244.1.5", 1234, "10.244.1.7", 80),
                  packets.build("10.244.1.5", 1234, "10.96.0.11", 80),
                  packets.build("10.244.1.5", 1234, "8.8.8.8", 53, "udp")):
        for prog, ok in ((TC, TC_ACT_OK), (XDP, XDP_PASS)):
            out = run(datapath, prog, frame)
            assert out.retval == ok and out.data == frame


def test_nodeport_on_node_ip_through_xdp(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    seen = set()
    for sport in range(44000, 44040):
        frame = packets.build("198.51.100.10", sport, "192.0.2.1", 30080)
        out = run(datapath, XDP, frame)
        assert out.retval == XDP_PASS
        p = packets.parse(out.data)
        assert p is not None and p.dport == 8080 and p.ip_csum_ok and p.l4_csum_ok
        seen.add(p.dst)
    assert seen == {"10.244.1.10", "10.244.1.11"}
    # The ClusterIP is not reachable from outside the node.
    frame = packets.build("198.51.100.10", 1, VIP, 80)
    assert run(datapath, XDP, frame).data == frame


def stat_packets(dp: Datapath, reason: str) -> int:
    return sum(c.packets for c in dp.map("lb_stats").lookup(layout.const(f"LB_STAT_{reason}")))


@pytest.mark.parametrize("src", ["0.1.2.3", "127.0.0.1", "224.0.0.5", "239.1.1.1",
                                 "255.255.255.255", "192.0.2.1"])
def test_martian_sources_from_outside_are_dropped_before_any_lookup(datapath: Datapath,
                                                                    src: str) -> None:
    # 192.0.2.1 is the node's own address.
    program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    before = stat_packets(datapath, "DROP_MARTIAN")
    for proto in ("tcp", "udp"):
        frame = packets.build(src, 44000, "192.0.2.1", 30080, proto, flags="S")
        out = run(datapath, XDP, frame)
        assert out.retval == XDP_DROP and out.data == frame
    assert stat_packets(datapath, "DROP_MARTIAN") == before + 2
    # No flow was made for it.
    ct = datapath.map("lb_ct")
    assert not [k for k, _ in ct.items() if k.saddr == ip_be(src)]


def test_a_dhcp_discover_and_a_real_client_are_no_martians(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    before = stat_packets(datapath, "DROP_MARTIAN")
    frame = packets.build("0.0.0.0", 68, "255.255.255.255", 67, "udp")
    assert run(datapath, XDP, frame).retval == XDP_PASS
    out = run(datapath, XDP, packets.build("198.51.100.10", 44000, "192.0.2.1", 30080))
    p = packets.parse(out.data)
    assert out.retval == XDP_PASS and p is not None and p.dst == "10.244.1.10"
    # Pods are no outside: the check is XDP's only.
    out = run(datapath, TC, packets.build("10.244.1.5", 44001, VIP, 80))
    assert out.retval == TC_ACT_OK
    assert stat_packets(datapath, "DROP_MARTIAN") == before


def test_nodeport_served_by_this_nodes_host_network_backend(datapath: Datapath) -> None:
    """A NodePort (externalTrafficPolicy Cluster, so masqueraded) whose
    backend is a hostNetwork pod of this very node: masqueraded to the
    node's own address, the packet would reach a socket whose reply never
    leaves the node. It keeps the client's source, as with kube-proxy, and
    the reply is reverse-translated leaving the node device."""
    node_ip, client = NODE.ips[0], "198.51.100.10"
    program(datapath, web([node_ip]))
    for proto, nport, bport, flags in (("tcp", 30080, 8080, "S"), ("udp", 30053, 5353, "")):
        if proto == "udp":
            program(datapath, [service("dns", "10.96.0.53", [
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP",
                 "nodePort": 30053}], "NodePort"),
                endpoint_slice("dns", [node_ip], [{"name": "dns", "port": 5353,
                                                   "protocol": "UDP"}])])
        out = run(datapath, XDP, packets.build(client, 45000, node_ip, nport, proto,
                                                flags=flags))
        assert out.retval == XDP_PASS
        p = packets.parse(out.data)
        assert p is not None
        assert (p.src, p.sport, p.dst, p.dport) == (client, 45000, node_ip, bport)
        reply = packets.build(node_ip, bport, client, 45000, proto, flags="SA" if flags else "")
        out = run(datapath, TO_EXTERNAL, reply)
        assert out.retval == TC_ACT_OK
        r = packets.parse(out.data)
        assert r is not None
        assert (r.src, r.sport, r.dst, r.dport) == (node_ip, nport, client, 45000)
        assert r.ip_csum_ok and r.l4_csum_ok
    # What the node sends that answers no service flow leaves unchanged, from
    # its own address or (forwarded) from a pod's.
    for frame in (packets.build(node_ip, 8080, client, 45001, "tcp", flags="SA"),
                  packets.build("10.244.1.10", 8080, client, 45000, "tcp", flags="SA")):
        out = run(datapath, TO_EXTERNAL, frame)
        assert out.retval == TC_ACT_OK and out.data == frame


def test_service_without_endpoints_is_rejected(datapath: Datapath) -> None:
    program(datapath, web([]))
    t = Tracer(datapath)
    from lb.inspect.trace import Probe

    r = t.run(Probe("10.244.1.5", 1000, VIP, 80, "tcp", "pod"))
    assert r.line() == "REJECT no-endpoints"


def _ip_csum_ok(frame: bytes) -> bool:
    return packets.checksum(frame[14:34]) == 0


@pytest.mark.parametrize("prog", [TC, XDP])
def test_every_fragment_of_a_datagram_follows_the_first(datapath: Datapath, prog: str) -> None:
    # A 2000-byte UDP datagram to the service: only the first of its two
    # fragments has the ports; the second must be translated the same way,
    # or the backend never reassembles the datagram.
    program(datapath, web(["10.244.1.10", "10.244.1.11"]))
    dst, dport = (VIP, 53) if prog == TC else ("192.0.2.1", 30053)
    if prog == XDP:
        program(datapath, [service("dns", "10.96.0.53", [
            {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP",
             "nodePort": 30053}], "NodePort"),
            endpoint_slice("dns", ["10.244.1.10", "10.244.1.11"],
                           [{"name": "dns", "port": 5353, "protocol": "UDP"}])])
    passes = {TC: TC_ACT_OK, XDP: XDP_PASS}[prog]
    for ident in range(1, 9):
        whole = packets.build("10.244.1.5", 41000 + ident, dst, dport, "udp",
                              payload=bytes(range(256)) * 8, ident=ident)
        frags = packets.fragment(whole, 1480)
        assert len(frags) == 2
        outs = [run(datapath, prog, f) for f in frags]
        assert [o.retval for o in outs] == [passes, passes]
        first, later = (o.data for o in outs)
        assert first[30:34] == later[30:34], "both fragments to the same backend"
        assert socket.inet_ntoa(later[30:34]) in ("10.244.1.10", "10.244.1.11")
        assert first[26:30] == later[26:30], "and from the same source"
        assert _ip_csum_ok(first) and _ip_csum_ok(later)
        assert later[34:] == frags[1][34:], "a later fragment's payload is never touched"
        p = packets.parse(packets.reassemble([first, later]))
        assert p is not None and p.dport == 5353
        assert p.l4_csum_ok, "the first fragment's UDP checksum covers the whole datagram"
    # Replies come back in fragments too: reverse NAT for each.
    back = packets.build(socket.inet_ntoa(first[30:34]), 5353, socket.inet_ntoa(first[26:30]),
                         p.sport, "udp", payload=b"y" * 3000, ident=77)
    replies = [run(datapath, TC if prog == TC else XDP, f).data
               for f in packets.fragment(back, 1480)]
    r = packets.parse(packets.reassemble(replies))
    assert r is not None and (r.src, r.sport) == (dst, dport) and r.l4_csum_ok
    assert all(f[26:30] == socket.inet_aton(dst) for f in replies)


def test_a_later_fragment_without_its_first_passes_untouched(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    whole = packets.build("10.244.1.5", 42000, VIP, 53, "udp", payload=b"z" * 2000, ident=999)
    later = packets.fragment(whole, 1480)[1]
    before = stat_packets(datapath, "PASS_FRAG_NO_FIRST")
    out = run(datapath, TC, later)
    assert (out.retval, out.data) == (TC_ACT_OK, later)
    assert stat_packets(datapath, "PASS_FRAG_NO_FIRST") == before + 1


def _mangle(frame: bytes) -> list[bytes]:
    """Cut-short and inconsistent variants of a valid frame."""
    out = [frame[:n] for n in range(14, len(frame))]
    ip = 14

    def patch(off: int, fmt: str, value: int) -> bytes:
        b = bytearray(frame)
        struct.pack_into(fmt, b, off, value)
        return bytes(b)

    out += [patch(ip, "!B", v) for v in (0x40, 0x44, 0x46, 0x4F, 0x55, 0x65)]  # ihl, version
    out += [patch(ip + 2, "!H", v) for v in (0, 19, 20, 39, 41, 0xFFFF)]  # total length
    out += [patch(ip + 6, "!H", v) for v in (0x2000, 0x0001, 0x3FFF)]  # fragments
    out += [patch(ip + 9, "!B", v) for v in (0, 1, 47, 132, 255)]  # protocols
    out += [patch(ip + 20 + 12, "!B", v) for v in (0x00, 0x40, 0xF0)]  # tcp data offset
    return out


@pytest.mark.parametrize("prog", [TC, XDP])
def test_malformed_packets_get_a_safe_verdict(datapath: Datapath, prog: str) -> None:
    program(datapath, web(["10.244.1.10"]))
    valid = packets.build("10.244.1.5", 45000, VIP, 80, payload=b"x" * 8)
    drops = {TC: TC_ACT_SHOT, XDP: XDP_DROP}[prog]
    passes = {TC: TC_ACT_OK, XDP: XDP_PASS}[prog]
    # Made SCTP, it is an SCTP packet to a ClusterIP port no service has: REJECT.
    rejects = {TC: 7, XDP: 3}[prog]  # TC_ACT_REDIRECT (back out), XDP_TX
    for frame in _mangle(valid):
        if prog == TC and len(frame) < 34:
            # BPF_PROG_TEST_RUN itself refuses an skb whose IPv4 header is
            # cut short; the same parser meets such frames in the XDP case.
            with pytest.raises(libbpf.BpfError):
                run(datapath, prog, frame)
            continue
        out = run(datapath, prog, frame)
        assert out.retval in (drops, passes, rejects), frame.hex()
        if out.retval == rejects:
            assert frame[23] == 132 and prog == TC, frame.hex()
            continue
        # Still to the VIP (or no IPv4 at all): it was not translated.
        addrs = packets.addresses(out.data)
        if out.retval == passes and (addrs is None or addrs[1] == VIP):
            assert out.data == frame, f"untranslated packet must pass untouched: {frame.hex()}"
    # Non-IPv4 ethertypes pass untouched.
    arp = bytes(12) + b"\x08\x06" + bytes(28)
    assert run(datapath, prog, arp).data == arp


def test_ip_options_are_skipped_correctly(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    base = packets.build("10.244.1.5", 46000, VIP, 80)
    # Insert 4 bytes of IP options (NOPs + EOL) and fix lengths/checksum.
    ip = bytearray(base[14:34])
    ip[0] = 0x46
    struct.pack_into("!H", ip, 2, struct.unpack("!H", ip[2:4])[0] + 4)
    ip[10:12] = b"\0\0"
    hdr = bytes(ip) + b"\x01\x01\x01\x00"
    hdr = hdr[:10] + struct.pack("!H", packets.checksum(hdr)) + hdr[12:]
    frame = base[:14] + hdr + base[34:]
    out = run(datapath, TC, frame)
    p = packets.parse(out.data)
    assert p is not None and p.dst == "10.244.1.10" and p.dport == 8080
    assert p.ip_csum_ok and p.l4_csum_ok


def test_stats_count_each_verdict(datapath: Datapath) -> None:
    program(datapath, web(["10.244.1.10"]))
    run(datapath, TC, packets.build("10.244.1.5", 47000, VIP, 80))
    run(datapath, TC, packets.build("10.244.1.5", 47000, VIP, 80))
    per_cpu = datapath.map("lb_stats").lookup(layout.const("LB_STAT_DNAT_NEW"))
    est = datapath.map("lb_stats").lookup(layout.const("LB_STAT_DNAT_ESTABLISHED"))
    assert sum(s.packets for s in per_cpu) == 1
    assert sum(s.packets for s in est) == 1
    # The service entry the programs read is the one the reconciler wrote.
    key = layout.new("struct lb_svc_key", addr=ip_be(VIP), port=port_be(80), proto=6,
                     scope=layout.const("LB_SCOPE_INTERNAL"))
    val = datapath.map("lb_services").lookup(key)
    assert val is not None and val.backend_count == 1 and val.maglev_size == 251
