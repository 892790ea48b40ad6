"""The decision the datapath makes, over the map contents, step for step as
the BPF programs do it (see `check`). Tests hold it against the reference
evaluator; the programs are held against it."""

from __future__ import annotations

from lb.encoding import ip_int
from lb.policy.common import (
    ALLOWED,
    DENIED,
    DIRECTION_NAMES,
    EGRESS,
    INGRESS,
    NODE,
    NOT_ISOLATED,
    PROTO_ANY,
    SELF,
    Verdict,
    combine,
    proto_number,
)
from lb.policy.compiler import CompiledPolicy
from lb.policy.contents import (
    IDENTITY_ANY,
    ISOLATED,
    PEER_HOST,
    PeerEntry,
    PolicyMaps,
    mask,
)


def lpm(maps: PolicyMaps, addr: int) -> PeerEntry | None:
    """lb_pol_ipcache's longest-prefix match."""
    for plen in maps.ipcache_lengths:
        hit = maps.ipcache.get((addr & mask(plen), plen))
        if hit is not None:
            return hit
    return None


def policy_name(maps: PolicyMaps, pid: int) -> str:
    return maps.policies.get(pid, f"policy#{pid}")


def check(compiled: PolicyMaps | CompiledPolicy, direction: int, local_ip: str | int,
          remote_ip: str | int, proto: int | str, dport: int) -> Verdict:
    """One direction for one local pod, as the datapath does it:

    1. ep = lb_pol_endpoints[local]; none, or not isolated this way: allow.
    2. remote == local (a pod reaching itself): allow.
    3. peer = lb_pol_ipcache LPM (remote, /32); identity = peer ? peer.identity : 0.
    4. ingress and peer has LB_POL_PEER_HOST: allow (the pod's node).
    5. slot = lb_pol_rules[(local, identity, dir)], else lb_pol_rules[(local, 0, dir)].
    6. walk the port set from slot (at most MAX_CHAIN slots): the first range
       with proto ANY or == proto, and lo <= dport <= hi, allows; its policy
       is credited.
    7. otherwise drop, blaming ep's policy for this direction.
    """
    maps = compiled.maps if isinstance(compiled, CompiledPolicy) else compiled
    dname = DIRECTION_NAMES[direction]
    local, remote, pnum = ip_int(local_ip), ip_int(remote_ip), proto_number(proto)
    ep = maps.endpoints.get(local)
    if ep is None or not ep.flags & ISOLATED[direction]:
        return Verdict(True, None, dname, NOT_ISOLATED)
    if remote == local:
        return Verdict(True, None, dname, SELF)
    peer = lpm(maps, remote)
    identity = peer.identity if peer else IDENTITY_ANY
    if direction == INGRESS and peer is not None and peer.flags & PEER_HOST:
        return Verdict(True, None, dname, NODE)
    slot = maps.rules.get((local, identity, direction))
    if slot is None and identity != IDENTITY_ANY:
        slot = maps.rules.get((local, IDENTITY_ANY, direction))
    for r in maps.chain(slot or 0):
        if (r.proto == PROTO_ANY or r.proto == pnum) and r.lo <= dport <= r.hi:
            return Verdict(True, policy_name(maps, r.policy), dname, ALLOWED)
    return Verdict(False, policy_name(maps, ep.policy(direction)), dname, DENIED)


def lookup(compiled: PolicyMaps | CompiledPolicy, src_ip: str | int, dst_ip: str | int,
           proto: int | str, dport: int) -> Verdict:
    """What this node decides for a new connection: the sender's egress if
    it is a local pod, then the receiver's ingress if it is a local pod.
    Across nodes, combine `check` of the sender's node (egress) with that
    of the receiver's node (ingress)."""
    return combine(check(compiled, EGRESS, src_ip, dst_ip, proto, dport),
                   check(compiled, INGRESS, dst_ip, src_ip, proto, dport))
