"""Attach the socket-level load balancer (cgroup connect4/sendmsg4/recvmsg4)
to a cgroup v2 directory: the node's own processes and hostNetwork pods then
reach ClusterIPs with no per-packet NAT at all."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any

from lb.datapath import sockdiag
from lb.datapath.attach import detach_cgroup
from lb.datapath.netns import call_in
from lb.encoding import ip_str, port_host
from loader import layout, libbpf
from loader.build import Datapath
from loader.programs import SOCK_PROGRAMS

log = logging.getLogger(__name__)

SO_NETNS_COOKIE = 71
BPF_F_ALLOW_MULTI = 2


def cgroup2_root() -> Path:
    """Where the unified hierarchy is mounted (/sys/fs/cgroup on most hosts,
    /sys/fs/cgroup/unified on hybrid ones)."""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise FileNotFoundError("no cgroup2 mount: socket load balancing needs cgroup v2")


def node_cgroup(proc_cgroup: str, root: Path) -> Path:
    """The cgroup v2 directory that holds the node's pods, for `--cgroup auto`
    in a DaemonSet pod: the parent of the `kubepods` level in this process's
    own cgroup (kubelet's cgroupRoot), or the hierarchy's root when this
    process does not sit under one (a private cgroup namespace shows "/").
    `proc_cgroup` is the text of /proc/self/cgroup."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, path = line.partition("::")
        if hierarchy != "0":
            continue
        parts = [p for p in path.split("/") if p]
        for i, part in enumerate(parts):
            if part == "kubepods" or part.startswith("kubepods."):
                return root.joinpath(*parts[:i])
    return root


def resolve_cgroup(value: str) -> Path:
    """--cgroup: a path as given, or `auto` (see node_cgroup)."""
    if value != "auto":
        return Path(value)
    return node_cgroup(Path("/proc/self/cgroup").read_text(), cgroup2_root())


def netns_cookie(netns: str | None = None) -> int:
    """The cookie of a named network namespace (or this process's own), read
    from a socket opened there."""
    def probe() -> int:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            return int.from_bytes(s.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8), "little")

    return call_in(netns, probe)


def prog_id(fd: int) -> int:
    """The kernel's id of the program behind our descriptor `fd`."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("prog_id:"):
            return int(line.split()[1])
    raise ValueError(f"fd {fd} is not a BPF program")


def attach(dp: Datapath, cgroup: Path) -> None:
    """Attach the hooks, then detach the ones an earlier agent left there:
    a cgroup attachment outlives the process that made it, so each restart
    would stack one more generation on every connect. New first, old after,
    so that no connect goes untranslated in between."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in SOCK_PROGRAMS:
            libbpf.check(libbpf.lib().bpf_prog_attach(dp.prog_fd(prog.name), fd,
                                                      prog.attach_type, BPF_F_ALLOW_MULTI),
                         f"attach {prog.name} to {cgroup}")
    finally:
        os.close(fd)
    ours = {prog_id(dp.prog_fd(prog.name)) for prog in SOCK_PROGRAMS}
    for problem in detach_cgroup(cgroup, keep=ours):
        log.warning("an earlier agent's socket hook stays attached: %s", problem)


def detach(dp: Datapath, cgroup: Path) -> None:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for prog in SOCK_PROGRAMS:
            libbpf.lib().bpf_prog_detach2(dp.prog_fd(prog.name), fd, prog.attach_type)
    finally:
        os.close(fd)


def terminate_stale(rev: Any, live: set[tuple[str, int]], netns: str | None) -> int:
    """Destroy the node's connected UDP sockets the hooks sent to a backend
    that is not in `live` (address, port) any more, and forget them in
    lb_sock_rev (`rev`). Returns how many sockets were destroyed."""
    stale: dict[int, set[tuple[str, int]]] = {}
    keys = []
    for raw, _ in rev.raw_items():
        key = layout.ffi.from_buffer("struct lb_sock_rev_key *", raw)
        peer = (ip_str(key.addr), port_host(key.port))
        if peer not in live:
            stale.setdefault(int(key.cookie), set()).add(peer)
            keys.append(raw)
    if not stale:
        return 0
    doomed = [s for s in sockdiag.connected_udp(netns)
              if (s.dst, s.dport) in stale.get(s.cookie, ())]
    for problem in sockdiag.destroy(doomed, netns):
        log.warning("could not close a UDP socket of a gone backend: %s", problem)
    for key in keys:
        rev.delete(key)
    return len(doomed)
