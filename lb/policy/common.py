"""What the reference evaluator and the compiler share: the verdict, the
direction and protocol numbers, and which pods NetworkPolicy sees.

Which pods count: a pod with an IPv4 address, not on the host network, not
in a terminal phase. hostNetwork pods are neither selected by a policy nor
matched by a selector peer (the API leaves their behaviour undefined; their
address is the node's, so ipBlock peers still match it, and ingress from a
pod's own node is allowed anyway). Succeeded and Failed pods have given
their address back, possibly to another pod."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lb.encoding import ip_int
from lb.model import (
    NAMESPACE_NAME_LABEL,
    POLICY_EGRESS,
    POLICY_INGRESS,
    PROTO_NUMBERS,
    TERMINAL_POD_PHASES,
    Cluster,
    Pod,
)
from loader.layout import const

INGRESS = const("LB_POL_INGRESS")
EGRESS = const("LB_POL_EGRESS")
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}
POLICY_TYPES = {INGRESS: POLICY_INGRESS, EGRESS: POLICY_EGRESS}
PROTO_ANY = const("LB_POL_PROTO_ANY")

# Verdict.reason
NOT_ISOLATED = "not-isolated"  # no policy selects the pod for that direction
SELF = "self"  # a pod reaching itself (through a service): never filtered
NODE = "node"  # ingress from the pod's own node: always allowed by the API
ALLOWED = "allowed"  # a rule of `policy` allows it
DENIED = "denied"  # isolated and no rule allows it; `policy` is blamed


@dataclass(frozen=True)
class Verdict:
    """The outcome for the first packet of a connection.

    `policy` ("namespace/name"): when allowed by a rule, the first policy in
    (namespace, name) order among those whose rules allow it; when denied,
    the first policy in that order among those that select the pod for the
    direction that denied (every drop has one: a drop needs an isolating
    policy). None otherwise. `direction` is the one that decided."""

    allowed: bool
    policy: str | None = None
    direction: str | None = None
    reason: str = NOT_ISOLATED

    def __str__(self) -> str:
        if not self.allowed:
            return f"DROP policy {self.policy}"
        if self.reason == ALLOWED:
            return f"ALLOW policy {self.policy}"
        return f"ALLOW {self.reason}"


def combine(egress: Verdict | None, ingress: Verdict | None) -> Verdict:
    """One verdict from the sender's egress check and the receiver's ingress
    check (None: that end is not a pod checked here). Egress is checked
    first, as the packet meets it first; an allowed packet is described by
    its ingress check unless only egress isolated it; a packet neither end
    isolates is Verdict(True) with no direction."""
    if egress is not None and not egress.allowed:
        return egress
    if ingress is not None and ingress.reason != NOT_ISOLATED:
        return ingress
    if egress is not None and egress.reason != NOT_ISOLATED:
        return egress
    # Neither end isolated (or not a pod): the same whoever asks.
    return Verdict(True)


def proto_number(proto: int | str) -> int:
    if isinstance(proto, int):
        return proto
    return PROTO_NUMBERS[proto.upper()]


def policy_pod(pod: Pod) -> bool:
    """Whether NetworkPolicy selects and matches this pod at all."""
    return pod.ip is not None and not pod.host_network and pod.phase not in TERMINAL_POD_PHASES


def pods_by_ip(pods: Iterable[Pod]) -> dict[int, Pod]:
    """The pod that holds each address. Two live pods never share one; if
    the objects say so anyway (a stale copy), the first by key wins."""
    out: dict[int, Pod] = {}
    for pod in sorted(pods, key=lambda p: p.key):
        if policy_pod(pod):
            assert pod.ip is not None
            out.setdefault(ip_int(pod.ip), pod)
    return out


def namespace_labels(cluster: Cluster, name: str) -> dict[str, str]:
    """A namespace's labels. One the objects do not include still has the
    label the API server puts on every namespace."""
    ns = cluster.namespaces.get(name)
    labels = dict(ns.labels) if ns else {}
    labels[NAMESPACE_NAME_LABEL] = name
    return labels
