"""What each datapath stat reason means: as a verdict, in the words `lbctl
trace` prints (kube-proxy's: DNAT, REJECT, DROP, PASS), and the classes the
programs act on (bpf/lib/verdict.h; the userspace twin reads them from here,
and a unit test holds the two to the same reasons)."""

from __future__ import annotations

from dataclasses import dataclass

from loader.layout import CONSTS


@dataclass(frozen=True)
class Reason:
    index: int
    verdict: str  # DNAT, REJECT, DROP, PASS
    name: str  # kebab-case, as printed


_VERDICTS = {
    "PASS_NOT_IP": "PASS",
    "PASS_NOT_SERVICE": "PASS",
    "PASS_FRAGMENT": "PASS",
    "PASS_OTHER_PROTO": "PASS",
    "DNAT_NEW": "DNAT",
    "DNAT_ESTABLISHED": "DNAT",
    "REVNAT": "PASS",
    "DROP_MALFORMED": "DROP",
    "REJECT_NO_ENDPOINTS": "REJECT",
    "DROP_BACKEND_GONE": "DROP",
    "DROP_SOURCE_RANGE": "DROP",
    "DROP_NO_LOCAL": "DROP",
    "REJECT_NO_PORT": "REJECT",
    "DROP_UNKNOWN_VIP": "DROP",
    "DROP_POLICY": "DROP",
    "PASS_POLICY": "PASS",
    "ERROR": "DROP",
    "DROP_MARTIAN": "DROP",
    "ICMP_ERROR_NAT": "PASS",
    "PASS_FRAG_NO_FIRST": "PASS",
    "REJECT_FRAG_NEEDED": "REJECT",
}

_PREFIXES = ("PASS_", "DNAT_", "DROP_", "REJECT_")


def _stats(*names: str) -> frozenset[int]:
    return frozenset(CONSTS[f"LB_STAT_{n}"] for n in names)


# lb_rewrites: the packet is translated.
REWRITES = _stats("DNAT_NEW", "DNAT_ESTABLISHED", "REVNAT")
# lb_policed: what the sending pod's egress policy looks at.
POLICED = _stats("DNAT_NEW", "DNAT_ESTABLISHED", "PASS_NOT_SERVICE", "PASS_OTHER_PROTO")
# lb_rejects: answered with an ICMP port unreachable (or fragmentation needed).
REJECTS = _stats("REJECT_NO_ENDPOINTS", "REJECT_NO_PORT", "REJECT_FRAG_NEEDED")
# lb_drops: dropped; a rejected packet too, when no ICMP answer can be made.
DROPS = REJECTS | _stats("DROP_MALFORMED", "DROP_BACKEND_GONE", "DROP_SOURCE_RANGE",
                         "DROP_NO_LOCAL", "DROP_UNKNOWN_VIP", "DROP_POLICY", "ERROR",
                         "DROP_MARTIAN")


def _name(const: str) -> str:
    short = const
    for p in _PREFIXES:
        if const.startswith(p):
            short = const[len(p):]
            break
    return short.lower().replace("_", "-")


REASONS: dict[int, Reason] = {
    CONSTS[f"LB_STAT_{k}"]: Reason(CONSTS[f"LB_STAT_{k}"], v, _name(k) if k != "REVNAT"
                                   else "reverse-nat")
    for k, v in _VERDICTS.items()
}


def reason(index: int) -> Reason:
    return REASONS.get(index, Reason(index, "DROP", f"reason-{index}"))
