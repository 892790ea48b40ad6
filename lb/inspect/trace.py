"""`lbctl trace`: send one crafted packet (or a batch) through the real
programs with BPF_PROG_TEST_RUN (or through their userspace twin) and say
what the datapath did with it.

The verdict is read from the datapath's own per-reason counters (the one
that moved during the run), so trace needs no trace-only code path in the
programs: it observes exactly what production packets get."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lb.counters import count
from lb.datapath.instance import Kind, program, sizes_for, throwaway
from lb.datapath.interface import PacketDatapath, Run
from lb.inspect import packets
from lb.model import Cluster, Node
from lb.service import desired
from lb.verdicts import reason
from loader import layout
from loader.programs import TC_FROM_POD, TC_TO_POD, XDP_EXTERNAL
from loader.sizes import Sizes

ENTRIES = {"pod": TC_FROM_POD.name, "external": XDP_EXTERNAL.name}
TO_POD = TC_TO_POD.name
TC_ACT_SHOT = 2
EPHEMERAL = (32768, 60999)


class ProbeError(ValueError):
    """A probe that cannot be built; `field` names the bad argument."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


@dataclass(frozen=True)
class Probe:
    src: str
    sport: int
    dst: str
    dport: int
    proto: str = "tcp"
    entry: str = "pod"


def _addr(value: Any, field: str, need_port: bool) -> tuple[str, int | None]:
    if not isinstance(value, str) or not value:
        raise ProbeError(field, f"expected IP{':PORT' if need_port else '[:PORT]'}")
    host, sep, port_s = value.rpartition(":")
    if not sep:
        host, port_s = value, ""
    try:
        ip = str(ipaddress.IPv4Address(host))
    except ValueError as e:
        raise ProbeError(field, f"not an IPv4 address: {host!r}") from e
    if not port_s:
        if need_port:
            raise ProbeError(field, "a port is required (IP:PORT)")
        return ip, None
    if not port_s.isdigit() or not 0 < int(port_s) < 65536:
        raise ProbeError(field, f"port {port_s!r} is not in 1-65535")
    return ip, int(port_s)


def make_probe(src: Any, dst: Any, proto: Any = "tcp", entry: Any = "pod",
               rng: random.Random | None = None) -> Probe:
    """A probe from user input; a missing source port gets an ephemeral one."""
    sip, sport = _addr(src, "src", need_port=False)
    dip, dport = _addr(dst, "dst", need_port=True)
    if proto not in ("tcp", "udp"):
        raise ProbeError("proto", f"expected tcp or udp, got {proto!r}")
    if entry not in ENTRIES:
        raise ProbeError("from", f"expected pod or external, got {entry!r}")
    if sport is None:
        sport = (rng or random).randint(*EPHEMERAL)
    assert dport is not None
    return Probe(sip, sport, dip, dport, str(proto), str(entry))


@dataclass(frozen=True)
class TraceResult:
    verdict: str
    backend: str | None
    masquerade: bool
    reason: str | None
    entry: str
    out_packet: str

    def line(self) -> str:
        if self.verdict == "DNAT":
            return f"DNAT {self.backend}" + (" masq" if self.masquerade else "")
        return f"{self.verdict} {self.reason}" if self.reason else self.verdict

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "backend": self.backend,
            "masquerade": self.masquerade,
            "reason": self.reason,
            "entry": self.entry,
            "out_packet": self.out_packet,
        }


class Tracer:
    """A throwaway datapath instance holding one node's state. A packet
    crosses every hook it would on the node: the sender's (the pod's veth,
    or the node device), then, when it is bound for a local pod, that pod's
    own (its ingress policy)."""

    def __init__(self, dp: PacketDatapath, local_pods: set[str] | None = None,
                 policy_names: dict[int, str] | None = None) -> None:
        self.dp = dp
        self.stats = dp.map("lb_stats")
        self.drops = dp.map("lb_pol_drops")
        self.local_pods = local_pods or set()
        self.policy_names = policy_names or {}
        self.refused: list[str] = []

    def _counts(self) -> list[int]:
        return [count(self.stats, i).packets for i in range(layout.const("LB_STAT_MAX"))]

    def _drop_counts(self) -> dict[int, int]:
        return {i: count(self.drops, i).packets for i in self.policy_names}

    def _hop(self, prog: str, frame: bytes) -> tuple[Run, int | None, str | None]:
        """Run one program: its result, the stat reason that moved, and the
        policy blamed when it dropped for policy."""
        before, pol_before = self._counts(), self._drop_counts()
        run = self.dp.run(prog, frame)
        after, pol_after = self._counts(), self._drop_counts()
        moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if b > a]
        blamed = [self.policy_names[i] for i in pol_after if pol_after[i] > pol_before[i]]
        return run, (moved[0] if moved else None), (blamed[0] if blamed else None)

    def run(self, probe: Probe) -> TraceResult:
        run, index, blamed = self._hop(ENTRIES[probe.entry], probe_frame(probe))
        result = trace_result(probe, index, run.data, blamed)
        parsed = packets.parse(run.data)
        if result.verdict in ("DNAT", "PASS") and parsed and parsed.dst in self.local_pods:
            hop, index, blamed = self._hop(TO_POD, run.data)
            if hop.retval == TC_ACT_SHOT:
                return trace_result(probe, index, run.data, blamed)
        return result


def probe_frame(probe: Probe) -> bytes:
    """The frame a probe sends."""
    return packets.build(probe.src, probe.sport, probe.dst, probe.dport, probe.proto)


def trace_result(probe: Probe, reason_index: int | None, out: bytes,
                 blamed: str | None = None) -> TraceResult:
    """What a datapath did with a probe's frame, from the stat reason that
    moved and the frame it left (and, for a policy drop, the policy blamed);
    shared by the kernel and userspace runs."""
    r = reason(reason_index) if reason_index is not None else None
    why = r.name if r else None
    if r is not None and r.index == layout.const("LB_STAT_DROP_POLICY"):
        why = f"policy {blamed}" if blamed else "policy"
    parsed = packets.parse(out)
    verdict = r.verdict if r else "PASS"
    backend = None
    masq = False
    if verdict == "DNAT" and parsed:
        backend = f"{parsed.dst}:{parsed.dport}"
        masq = parsed.src != probe.src or parsed.sport != probe.sport
    return TraceResult(
        verdict=verdict,
        backend=backend,
        masquerade=masq,
        reason=why,
        entry=probe.entry,
        out_packet=out.hex(),
    )


@contextmanager
def tracer(cluster: Cluster, node: Node, kind: Kind = "kernel",
           sizes: Sizes | None = None) -> Iterator[Tracer]:
    """A throwaway instance of `kind` holding the node's state for `cluster`,
    of `sizes` (by default, room for all of it). What the maps refused is
    in the tracer's `refused`."""
    state = desired.compute(cluster, node)
    with throwaway(kind, sizes or sizes_for(state)) as dp:
        got = program(dp, cluster, node, state)
        t = Tracer(dp, got.local_pods, got.policy_names)
        t.refused = got.refused
        yield t
