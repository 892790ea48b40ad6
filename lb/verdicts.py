"""What each datapath stat reason means as a verdict, in the words
`lbctl trace` prints (kube-proxy's: DNAT, REJECT, DROP, PASS)."""

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
}

_PREFIXES = ("PASS_", "DNAT_", "DROP_", "REJECT_")


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
