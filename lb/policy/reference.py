"""NetworkPolicy semantics read straight off the objects, one packet at a
time: the oracle the compiled maps are tested against. Simple rather than
fast: it shares with the compiler only the model and which pods count.

networking.k8s.io/v1, as the API reference and the upstream e2e tests have
it: a pod is isolated for a direction when a policy with that direction in
its policyTypes selects it; an isolated pod takes only what some selecting
policy's rule allows (union over policies, rules, peers and ports); a pod
no policy isolates takes everything. ipBlock matches any address, pod
addresses included (upstream e2e relies on it; some implementations do not
match pods by ipBlock, and addresses rewritten by masquerade are matched as
rewritten: the API leaves that open). A named port is looked up in the
destination pod's container ports, for ingress and egress alike."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from lb.encoding import ip_int
from lb.model import Cluster, NetworkPolicy, Node, Pod, PolicyRule
from lb.policy.common import (
    ALLOWED,
    DENIED,
    DIRECTION_NAMES,
    EGRESS,
    INGRESS,
    NODE,
    NOT_ISOLATED,
    POLICY_TYPES,
    SELF,
    Verdict,
    combine,
    namespace_labels,
    pods_by_ip,
    proto_number,
)


def allowed(cluster: Cluster, src_ip: str | int, dst_ip: str | int, proto: int | str,
            dport: int, nodes: Iterable[Node] = ()) -> Verdict:
    """Whether a new connection from src_ip to dst_ip:dport is allowed,
    addresses as the policy sees them (after service DNAT). `nodes` give
    the addresses of each pod's node, whose ingress is always allowed."""
    src, dst, pnum = ip_int(src_ip), ip_int(dst_ip), proto_number(proto)
    by_ip = pods_by_ip(cluster.pods.values())
    src_pod, dst_pod = by_ip.get(src), by_ip.get(dst)
    policies = sorted(cluster.policies.values(), key=lambda p: (p.namespace, p.name))
    node_ips = {n.name: {ip_int(ip) for ip in n.ips} for n in nodes}

    def check(pod: Pod, direction: int, remote: int, remote_pod: Pod | None) -> Verdict:
        dname = DIRECTION_NAMES[direction]
        ptype = POLICY_TYPES[direction]
        labels = pod.label_map
        selecting = [p for p in policies if p.namespace == pod.namespace
                     and ptype in p.policy_types and p.pod_selector.matches(labels)]
        if not selecting:
            return Verdict(True, None, dname, NOT_ISOLATED)
        if remote == ip_int(pod.ip or 0):
            return Verdict(True, None, dname, SELF)
        if direction == INGRESS and remote in node_ips.get(pod.node_name or "", set()):
            return Verdict(True, None, dname, NODE)
        for pol in selecting:
            for rule in pol.rules(ptype):
                if (_peer_ok(cluster, pol, rule, remote, remote_pod)
                        and _port_ok(rule, dst_pod, pnum, dport)):
                    return Verdict(True, pol.key, dname, ALLOWED)
        return Verdict(False, selecting[0].key, dname, DENIED)

    egress = check(src_pod, EGRESS, dst, dst_pod) if src_pod else None
    ingress = check(dst_pod, INGRESS, src, src_pod) if dst_pod else None
    return combine(egress, ingress)


def _peer_ok(cluster: Cluster, pol: NetworkPolicy, rule: PolicyRule, remote: int,
             remote_pod: Pod | None) -> bool:
    if not rule.peers:
        return True
    addr = ipaddress.IPv4Address(remote)
    for peer in rule.peers:
        if peer.ip_block is not None:
            net = ipaddress.ip_network(peer.ip_block.cidr)
            if net.version == 4 and addr in net and not any(
                    addr in ipaddress.ip_network(e) for e in peer.ip_block.excepts):
                return True
            continue
        if remote_pod is None:
            continue
        if peer.namespace_selector is None:
            ns_ok = remote_pod.namespace == pol.namespace
        else:
            ns_ok = peer.namespace_selector.matches(namespace_labels(cluster, remote_pod.namespace))
        if ns_ok and (peer.pod_selector is None
                      or peer.pod_selector.matches(remote_pod.label_map)):
            return True
    return False


def _port_ok(rule: PolicyRule, dst_pod: Pod | None, proto: int, dport: int) -> bool:
    if not rule.ports:
        return True
    for p in rule.ports:
        if proto_number(p.protocol) != proto:
            continue
        if p.port is None:
            return True
        if isinstance(p.port, int):
            if p.port <= dport <= (p.end_port or p.port):
                return True
        elif dst_pod is not None and any(
                c.name == p.port and c.protocol == p.protocol and c.port == dport
                for c in dst_pod.ports):
            return True
    return False
