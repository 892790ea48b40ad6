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
# A replayed frame may also enter at a local pod's veth, where its ingress
# policy runs.
FRAME_ENTRIES = {**ENTRIES, "to-pod": TO_POD}
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
class Frame:
    """A whole Ethernet frame and the hook it enters at."""

    data: bytes
    entry: str = "pod"


def make_frame(obj: Any) -> Frame:
    """A replayed frame from one `--frames` line's object."""
    if not isinstance(obj, dict):
        raise ProbeError("line", "expected a JSON object")
    entry = obj.get("from", "pod")
    if entry not in FRAME_ENTRIES:
        raise ProbeError("from", f"expected pod, external or to-pod, got {entry!r}")
    hexed = obj.get("frame")
    if not isinstance(hexed, str):
        raise ProbeError("frame", "expected the hex of an Ethernet frame")
    try:
        data = bytes.fromhex(hexed)
    except ValueError as e:
        raise ProbeError("frame", f"not hex: {e}") from e
    # The programs take anything from an Ethernet header up; less than one
    # is no frame a device could deliver.
    if len(data) < 14:
        raise ProbeError("frame", f"{len(data)} bytes is shorter than an Ethernet header")
    return Frame(data, str(entry))


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
        return self.replay(Frame(probe_frame(probe), probe.entry))

    def replay(self, frame: Frame) -> TraceResult:
        """One frame through its hook, then, when it is bound for a local
        pod, through that pod's ingress policy; state (conntrack, fragments)
        stays for the next."""
        run, index, blamed = self._hop(FRAME_ENTRIES[frame.entry], frame.data)
        result = trace_result(frame, index, run.data, blamed)
        if frame.entry == "to-pod" or result.verdict not in ("DNAT", "PASS"):
            return result
        addrs = packets.addresses(run.data)
        if addrs and addrs[1] in self.local_pods:
            hop, index, blamed = self._hop(TO_POD, run.data)
            if hop.retval == TC_ACT_SHOT:
                return trace_result(frame, index, run.data, blamed)
        return result


def probe_frame(probe: Probe) -> bytes:
    """The frame a probe sends."""
    return packets.build(probe.src, probe.sport, probe.dst, probe.dport, probe.proto)


def trace_result(sent: Frame, reason_index: int | None, out: bytes,
                 blamed: str | None = None) -> TraceResult:
    """What a datapath did with a frame, from the stat reason that moved and
    the frame it left (and, for a policy drop, the policy blamed); shared by
    the kernel and userspace runs. A frame without ports (a later fragment)
    names its backend by address alone."""
    r = reason(reason_index) if reason_index is not None else None
    why = r.name if r else None
    if r is not None and r.index == layout.const("LB_STAT_DROP_POLICY"):
        why = f"policy {blamed}" if blamed else "policy"
    verdict = r.verdict if r else "PASS"
    backend = None
    masq = False
    if verdict == "DNAT":
        before, after = packets.parse(sent.data), packets.parse(out)
        if after and before:
            backend = f"{after.dst}:{after.dport}"
            masq = (after.src, after.sport) != (before.src, before.sport)
        elif (addrs := packets.addresses(out)) and (was := packets.addresses(sent.data)):
            backend = addrs[1]
            masq = addrs[0] != was[0]
    return TraceResult(
        verdict=verdict,
        backend=backend,
        masquerade=masq,
        reason=why,
        entry=sent.entry,
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
