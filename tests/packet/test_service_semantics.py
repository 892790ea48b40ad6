"""Kubernetes Service behaviours, one test each, through the real programs.
Each verdict is the one kube-proxy gives for the same set-up."""

from __future__ import annotations

import struct
import time
from typing import Any

from lab import objects
from lb.datapath.instance import reconciler_for
from lb.inspect import packets
from lb.inspect.trace import Probe, Tracer
from lb.model import Node
from lb.service import desired
from lb.service.reconcile import Reconciler
from lb.sources.manifests import build_cluster
from loader import libbpf
from loader.build import Datapath

NODE = Node(name="node-a", ips=("192.0.2.1",), service_cidrs=("10.96.0.0/12",))
VIP = "10.96.0.10"
LB_IP = "203.0.113.10"
POD = "10.244.1.5"
OUTSIDE = "198.51.100.10"
HTTP = objects.Port("http", 80, 8080, "TCP", 30080)
DNS_UDP = objects.Port("dns", 53, 5353, "UDP")
DNS_TCP = objects.Port("dns-tcp", 53, 5354, "TCP")
XDP_TX, TC_ACT_REDIRECT = 3, 7


def program(dp: Datapath, docs: list[dict[str, Any]], rec: Reconciler | None = None,
            node: Node = NODE) -> Reconciler:
    res = build_cluster((d, "t") for d in docs)
    assert not res.errors, res.errors
    rec = rec or reconciler_for(dp)
    out = rec.sync(desired.compute(res.cluster, node))
    assert not out.errors, out.errors
    return rec


def web(eps: list[tuple[str, str]], ports: tuple[objects.Port, ...] = (HTTP,),
        svc_type: str = "LoadBalancer", terminating: tuple[str, ...] = (),
        **spec: Any) -> list[dict[str, Any]]:
    return [objects.service("web", VIP, list(ports), svc_type=svc_type, lb_ips=[LB_IP], **spec),
            objects.endpoint_slice("web", list(ports), eps, terminating=terminating)]


def trace(dp: Datapath, src: str, sport: int, dst: str, dport: int, proto: str = "tcp",
          entry: str = "pod") -> str:
    return Tracer(dp).run(Probe(src, sport, dst, dport, proto, entry)).line()


def spread(dp: Datapath, src: str, dst: str, dport: int, entry: str = "pod",
           n: int = 40) -> set[str]:
    return {trace(dp, src, 20000 + i, dst, dport, entry=entry) for i in range(n)}


def test_ports_and_protocols(datapath: Datapath) -> None:
    # Several ports, one named target port, TCP and UDP on the same number.
    ports = (objects.Port("http", 80, 8080), DNS_UDP, DNS_TCP)
    docs = web([("10.244.1.10", "node-a")], ports, svc_type="ClusterIP")
    docs[0]["spec"]["ports"][0]["targetPort"] = "web"
    docs[1]["ports"][0]["name"] = "http"
    docs[1]["ports"][0]["port"] = 8081  # what the pods call "web"
    program(datapath, docs)
    assert trace(datapath, POD, 1000, VIP, 80) == "DNAT 10.244.1.10:8081"
    assert trace(datapath, POD, 1001, VIP, 53, "udp") == "DNAT 10.244.1.10:5353"
    assert trace(datapath, POD, 1002, VIP, 53, "tcp") == "DNAT 10.244.1.10:5354"
    # A port or protocol the ClusterIP does not have: REJECT.
    assert trace(datapath, POD, 1003, VIP, 81) == "REJECT no-port"
    assert trace(datapath, POD, 1004, VIP, 80, "udp") == "REJECT no-port"


def _icmp_unreachable(frame: bytes, client: str, vip: str, quoted_dport: int) -> None:
    # The quote: the IP header and 8 bytes of UDP, or the whole TCP header.
    quote = 20 + (20 if frame[34 + 8 + 9] == 6 else 8)
    assert len(frame) == 14 + 28 + quote and frame[12:14] == b"\x08\x00"
    ip, icmp = frame[14:34], frame[34:]
    assert ip[9] == 1 and packets.checksum(ip) == 0
    assert ip[12:16] == bytes(map(int, vip.split("."))), "from the address the client used"
    assert ip[16:20] == bytes(map(int, client.split(".")))
    assert icmp[0] == 3 and icmp[1] == 3 and packets.checksum(icmp) == 0
    assert struct.unpack("!H", icmp[8 + 20 + 2: 8 + 20 + 4])[0] == quoted_dport


def test_no_endpoints_rejects_with_icmp_port_unreachable(datapath: Datapath) -> None:
    program(datapath, web([], (HTTP, DNS_UDP)))
    for proto, port in (("tcp", 80), ("udp", 53)):
        assert trace(datapath, POD, 1000, VIP, port, proto) == "REJECT no-endpoints"
        out = libbpf.prog_test_run(datapath.prog_fd("tc_lb_from_pod"),
                                   packets.build(POD, 1000, VIP, port, proto))
        assert out.retval == TC_ACT_REDIRECT, "sent back out to the pod"
        _icmp_unreachable(out.data, POD, VIP, port)
    out = libbpf.prog_test_run(datapath.prog_fd("xdp_lb_external"),
                               packets.build(OUTSIDE, 1000, LB_IP, 80))
    assert out.retval == XDP_TX
    _icmp_unreachable(out.data, OUTSIDE, LB_IP, 80)


def test_unknown_address_in_service_cidr_is_dropped(datapath: Datapath) -> None:
    program(datapath, web([("10.244.1.10", "node-a")]))
    assert trace(datapath, POD, 1000, "10.96.0.99", 80) == "DROP unknown-vip"
    assert trace(datapath, POD, 1000, "10.244.1.99", 80) == "PASS not-service"


def test_service_cidrs_beyond_the_fast_paths_copies_are_still_dropped_in(
        datapath: Datapath) -> None:
    """Up to LB_MAX_SVC_CIDRS service CIDRs are checked from lb_config, more
    through the trie: the answer is the same either way, and moving between
    the two loses none."""
    many = tuple(f"10.{96 + i}.0.0/16" for i in range(6))
    rec = None
    for cidrs in (many[:1], many[:4], many, many[:2]):
        node = Node(name="node-a", ips=("192.0.2.1",), service_cidrs=cidrs)
        rec = program(datapath, web([("10.244.1.10", "node-a")]), rec, node=node)
        for i in range(6):
            want = "DROP unknown-vip" if i < len(cidrs) else "PASS not-service"
            assert trace(datapath, POD, 1000, f"10.{96 + i}.7.7", 80) == want, (cidrs, i)
        assert trace(datapath, POD, 1001, VIP, 80) == "DNAT 10.244.1.10:8080"


def test_hairpin_pod_reaches_itself_through_its_service(datapath: Datapath) -> None:
    # The source becomes the hairpin address, so the pod's reply leaves it
    # (a reply to its own address would never reach its veth) and is
    # translated back on the way in.
    program(datapath, web([(POD, "node-a")]))
    t = Tracer(datapath).run(Probe(POD, 40000, VIP, 80, "tcp", "pod"))
    assert t.line() == f"DNAT {POD}:8080 masq"
    fwd = packets.parse(bytes.fromhex(t.out_packet))
    assert fwd is not None and fwd.src == "169.254.42.1" and fwd.l4_csum_ok
    reply = packets.build(POD, 8080, "169.254.42.1", fwd.sport, flags="SA")
    back = packets.parse(libbpf.prog_test_run(datapath.prog_fd("tc_lb_from_pod"), reply).data)
    assert back is not None
    assert (back.src, back.sport, back.dst, back.dport) == (VIP, 80, POD, 40000)
    assert back.ip_csum_ok and back.l4_csum_ok


def test_external_traffic_is_masqueraded_to_the_node_ip(datapath: Datapath) -> None:
    program(datapath, web([("10.244.2.10", "node-b")]))
    for dst, port in (("192.0.2.1", 30080), (LB_IP, 80)):
        t = Tracer(datapath).run(Probe(OUTSIDE, 41000, dst, port, "tcp", "external"))
        assert t.line() == "DNAT 10.244.2.10:8080 masq"
        fwd = packets.parse(bytes.fromhex(t.out_packet))
        assert fwd is not None and fwd.src == "192.0.2.1" and fwd.ip_csum_ok and fwd.l4_csum_ok
        # The remote backend answers the node; XDP turns it back.
        reply = packets.build("10.244.2.10", 8080, "192.0.2.1", fwd.sport, flags="SA")
        out = libbpf.prog_test_run(datapath.prog_fd("xdp_lb_external"), reply)
        back = packets.parse(out.data)
        assert back is not None
        assert (back.src, back.sport, back.dst, back.dport) == (dst, port, OUTSIDE, 41000)
        assert back.ip_csum_ok and back.l4_csum_ok
    # Pod clients keep their source, also towards a LoadBalancer IP.
    assert trace(datapath, POD, 1000, LB_IP, 80) == "DNAT 10.244.2.10:8080"


def test_masquerade_ports_do_not_collide(datapath: Datapath) -> None:
    # Two clients using the same source port to the same backend must get
    # different masquerade ports, or replies would go to the wrong one.
    program(datapath, web([("10.244.2.10", "node-b")]))
    seen = set()
    for client in ("198.51.100.10", "198.51.100.11", "198.51.100.12"):
        t = Tracer(datapath).run(Probe(client, 42000, "192.0.2.1", 30080, "tcp", "external"))
        fwd = packets.parse(bytes.fromhex(t.out_packet))
        assert fwd is not None
        seen.add(fwd.sport)
    assert len(seen) == 3


def test_external_traffic_policy_local(datapath: Datapath) -> None:
    eps = [("10.244.1.10", "node-a"), ("10.244.2.10", "node-b")]
    rec = program(datapath, web(eps, externalTrafficPolicy="Local"))
    assert spread(datapath, OUTSIDE, "192.0.2.1", 30080, "external") == {"DNAT 10.244.1.10:8080"}
    # Pod clients still get every endpoint.
    assert spread(datapath, POD, "192.0.2.1", 30080) == {
        "DNAT 10.244.1.10:8080", "DNAT 10.244.2.10:8080"}
    program(datapath, web([("10.244.2.10", "node-b")], externalTrafficPolicy="Local"), rec)
    assert trace(datapath, OUTSIDE, 1000, "192.0.2.1", 30080, entry="external") == \
        "DROP no-local"
    assert trace(datapath, POD, 1000, VIP, 80) == "DNAT 10.244.2.10:8080"


def test_internal_traffic_policy_local(datapath: Datapath) -> None:
    eps = [("10.244.1.10", "node-a"), ("10.244.2.10", "node-b")]
    rec = program(datapath, web(eps, internalTrafficPolicy="Local"))
    assert spread(datapath, POD, VIP, 80) == {"DNAT 10.244.1.10:8080"}
    program(datapath, web([("10.244.2.10", "node-b")], internalTrafficPolicy="Local"), rec)
    assert trace(datapath, POD, 1000, VIP, 80) == "DROP no-local"


def test_terminating_endpoints(datapath: Datapath) -> None:
    eps = [("10.244.1.10", "node-a"), ("10.244.1.11", "node-a")]
    rec = program(datapath, web(eps, terminating=("10.244.1.11",)))
    assert spread(datapath, POD, VIP, 80) == {"DNAT 10.244.1.10:8080"}
    # None ready: the serving-and-terminating one still gets traffic.
    program(datapath, web([("10.244.1.11", "node-a")], terminating=("10.244.1.11",)), rec)
    assert spread(datapath, POD, VIP, 80) == {"DNAT 10.244.1.11:8080"}
    # Not serving: never.
    docs = web([("10.244.1.11", "node-a")], terminating=("10.244.1.11",))
    docs[1]["endpoints"][0]["conditions"]["serving"] = False
    program(datapath, docs, rec)
    assert trace(datapath, POD, 1000, VIP, 80) == "REJECT no-endpoints"


def test_publish_not_ready_addresses(datapath: Datapath) -> None:
    docs = web([("10.244.1.12", "node-a")], publishNotReadyAddresses=True)
    docs[1]["endpoints"][0]["conditions"] = {"ready": False, "serving": False}
    program(datapath, docs)
    assert trace(datapath, POD, 1000, VIP, 80) == "DNAT 10.244.1.12:8080"


def test_session_affinity_client_ip(datapath: Datapath) -> None:
    eps = [("10.244.1.10", "node-a"), ("10.244.1.11", "node-a"), ("10.244.1.12", "node-a")]
    cfg = {"clientIP": {"timeoutSeconds": 1}}
    rec = program(datapath, web(eps[:1], sessionAffinity="ClientIP",
                                sessionAffinityConfig=cfg))
    clients = [f"10.244.5.{i}" for i in range(1, 41)]
    for c in clients:
        assert trace(datapath, c, 30000, VIP, 80) == "DNAT 10.244.1.10:8080"
    program(datapath, web(eps, sessionAffinity="ClientIP", sessionAffinityConfig=cfg), rec)
    # Within the timeout every client keeps its backend, on every connection.
    for c in clients:
        assert {trace(datapath, c, 31000 + i, VIP, 80) for i in range(3)} == \
            {"DNAT 10.244.1.10:8080"}
    time.sleep(2.1)
    # After it, clients spread over the new backends, each still sticky.
    after = {}
    for c in clients:
        got = {trace(datapath, c, 32000 + i, VIP, 80) for i in range(3)}
        assert len(got) == 1
        after[c] = got.pop()
    assert len(set(after.values())) == 3
    # Each time its affinity expires, a client's next connection is placed
    # afresh (the upstream "session affinity timeout" test needs it to move).
    c, seen = clients[0], {after[clients[0]]}
    for i in range(8):
        time.sleep(1.1)
        seen.add(trace(datapath, c, 33000 + i, VIP, 80))
        if len(seen) > 1:
            break
    assert len(seen) > 1, "the same backend after every expiry"
    # Affinity off: one client spreads over the backends again.
    program(datapath, web(eps), rec)
    assert len(spread(datapath, clients[0], VIP, 80)) == 3


def test_load_balancer_source_ranges(datapath: Datapath) -> None:
    program(datapath, web([("10.244.1.10", "node-a")],
                          loadBalancerSourceRanges=["198.51.100.0/28"]))
    assert trace(datapath, "198.51.100.10", 1000, LB_IP, 80, entry="external") == \
        "DNAT 10.244.1.10:8080 masq"
    assert trace(datapath, "198.51.100.99", 1000, LB_IP, 80, entry="external") == \
        "DROP source-range"
    # Pod clients outside the ranges are refused too.
    assert trace(datapath, POD, 1000, LB_IP, 80) == "DROP source-range"
    # The NodePort ignores the ranges.
    assert trace(datapath, "198.51.100.99", 1000, "192.0.2.1", 30080, entry="external") == \
        "DNAT 10.244.1.10:8080 masq"


def test_services_not_for_us_are_not_programmed(datapath: Datapath) -> None:
    headless = web([("10.244.1.10", "node-a")], svc_type="ClusterIP")
    headless[0]["spec"]["clusterIP"] = "None"
    headless[0]["spec"]["clusterIPs"] = ["None"]
    other = web([("10.244.1.11", "node-a")], svc_type="ClusterIP")
    other[0]["metadata"]["name"] = "other"
    other[0]["spec"]["clusterIP"] = other[0]["spec"]["clusterIPs"][0] = "10.96.0.11"
    other[0]["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "x"}
    other[1]["metadata"]["labels"]["kubernetes.io/service-name"] = "other"
    other[1]["metadata"]["name"] = "other-1"
    ext = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": "ext", "namespace": "default"},
           "spec": {"type": "ExternalName", "externalName": "example.com"}}
    rec = program(datapath, [*headless, *other, ext])
    assert rec.applied == {}
    # Their addresses fall in the service CIDR but hold nothing: dropped.
    assert trace(datapath, POD, 1000, "10.96.0.11", 80) == "DROP unknown-vip"
