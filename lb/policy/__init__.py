"""NetworkPolicy (networking.k8s.io/v1) for the datapath: the reference
semantics (`allowed`), the compiler into the maps of bpf/lb_maps.h
(`compile_policy`, `diff`, `encode`), the datapath's decision over those
maps (`lookup`, `check`) and a view for people (`describe`)."""

from lb.policy.common import Verdict, combine
from lb.policy.compiler import CompiledPolicy, Limits, compile_incremental, compile_policy
from lb.policy.contents import PolicyDiff, PolicyMaps, apply, diff
from lb.policy.describe import describe
from lb.policy.encode import decode, encode
from lb.policy.lookup import check, lookup
from lb.policy.reference import allowed

__all__ = [
    "CompiledPolicy",
    "Limits",
    "PolicyDiff",
    "PolicyMaps",
    "Verdict",
    "allowed",
    "apply",
    "check",
    "combine",
    "compile_incremental",
    "compile_policy",
    "decode",
    "describe",
    "diff",
    "encode",
    "lookup",
]
