"""NetworkPolicy (networking.k8s.io/v1) for the datapath: the reference
semantics (`allowed`), the compiler into the maps of bpf/lb_maps.h
(`compile_policy`, `diff`, `encode`), the datapath's decision over those
maps (`lookup`, `check`) and the one view for people (`view`: `rows` of the
kernel's maps, `describe` of a compile)."""

from lb.policy.common import Verdict, combine
from lb.policy.compiler import CompiledPolicy, compile_incremental, compile_policy
from lb.policy.contents import PolicyDiff, PolicyMaps, apply, diff
from lb.policy.encode import decode, encode
from lb.policy.lookup import check, lookup
from lb.policy.reference import allowed
from lb.policy.view import describe

__all__ = [
    "CompiledPolicy",
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
