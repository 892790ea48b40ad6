"""The programs of bpf/lb.c: each one's name, BPF program type and where it
is attached. The one table that the loader, the agent, the tracer, the
userspace twin, the benchmarks and the tests read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["xdp", "tc", "cgroup_sock_addr"]
# uapi/linux/bpf.h's bpf_prog_type of each kind.
PROG_TYPE: dict[Kind, int] = {"xdp": 6, "tc": 3, "cgroup_sock_addr": 18}


@dataclass(frozen=True)
class Program:
    name: str
    kind: Kind
    attached: str  # where, in words
    # Socket hooks only: the bpf_attach_type they are verified and attached
    # for, and bpftool's name of it.
    attach_type: int | None = None
    bpftool_hook: str | None = None


XDP_EXTERNAL = Program("xdp_lb_external", "xdp", "XDP on a node-facing device")
TC_FROM_POD = Program("tc_lb_from_pod", "tc", "tc ingress of a pod's host-side veth")
TC_TO_POD = Program("tc_lb_to_pod", "tc", "tc egress of a pod's host-side veth")
TC_TO_EXTERNAL = Program("tc_lb_to_external", "tc", "tc egress of a node-facing device")
SOCK_CONNECT4 = Program("sock_connect4", "cgroup_sock_addr", "cgroup connect4",
                        attach_type=10, bpftool_hook="connect4")  # BPF_CGROUP_INET4_CONNECT
SOCK_SENDMSG4 = Program("sock_sendmsg4", "cgroup_sock_addr", "cgroup sendmsg4",
                        attach_type=14, bpftool_hook="sendmsg4")  # BPF_CGROUP_UDP4_SENDMSG
SOCK_RECVMSG4 = Program("sock_recvmsg4", "cgroup_sock_addr", "cgroup recvmsg4",
                        attach_type=19, bpftool_hook="recvmsg4")  # BPF_CGROUP_UDP4_RECVMSG

# The programs a packet runs through (BPF_PROG_TEST_RUN takes them).
PACKET_PROGRAMS = (XDP_EXTERNAL, TC_FROM_POD, TC_TO_POD, TC_TO_EXTERNAL)
SOCK_PROGRAMS = (SOCK_CONNECT4, SOCK_SENDMSG4, SOCK_RECVMSG4)
PROGRAMS = {p.name: p for p in PACKET_PROGRAMS + SOCK_PROGRAMS}
