"""Attach the programs with netlink (pyroute2): XDP (and a tc egress filter)
on node-facing devices, tc clsact direct-action filters on pods' host-side
veths.

What was attached is written to a small state file, so `lbctl down` (or the
next agent) knows what to remove even after the agent is gone."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lb.datapath.netns import iproute
from loader.programs import SOCK_PROGRAMS

log = logging.getLogger(__name__)

XDP_FLAGS_SKB_MODE = 1 << 1
XDP_FLAGS_DRV_MODE = 1 << 2
CLSACT_INGRESS = "ffff:fff2"
CLSACT_EGRESS = "ffff:fff3"
STATE_DIR = Path("/run/xdplb")
# Compiled programs kept between starts (loader/objects.py); on the node in the DaemonSet,
# so a restarted agent loads what the last one compiled.
OBJECT_CACHE = STATE_DIR / "objects"


@dataclass
class Attachments:
    netns: str | None = None
    xdp: dict[str, str] = field(default_factory=dict)  # device -> "native" | "generic"
    tc: list[str] = field(default_factory=list)  # pod devices
    node_tc: list[str] = field(default_factory=list)  # node devices' egress
    cgroup: str | None = None  # socket hooks

    @staticmethod
    def path(instance: str) -> Path:
        return STATE_DIR / f"{instance}.json"

    def save(self, instance: str) -> None:
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path(instance).with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        os.replace(tmp, self.path(instance))

    @classmethod
    def load(cls, instance: str) -> Attachments | None:
        try:
            data = json.loads(cls.path(instance).read_text())
        except FileNotFoundError:
            return None
        return cls(netns=data.get("netns"), xdp=dict(data.get("xdp", {})),
                   tc=list(data.get("tc", [])), node_tc=list(data.get("node_tc", [])),
                   cgroup=data.get("cgroup"))


def _index(ipr: Any, dev: str) -> int:
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise LookupError(f"no device {dev!r}")
    return int(found[0])


def attach_xdp(ipr: Any, dev: str, fd: int) -> str:
    """Native mode where the driver has it, generic (with a warning) where not."""
    from pyroute2.netlink.exceptions import NetlinkError

    idx = _index(ipr, dev)
    try:
        ipr.link("set", index=idx, xdp_fd=fd, xdp_flags=XDP_FLAGS_DRV_MODE)
        return "native"
    except NetlinkError as e:
        log.warning("%s: native XDP refused (%s); using generic XDP, which is slower", dev, e)
    ipr.link("set", index=idx, xdp_fd=fd, xdp_flags=XDP_FLAGS_SKB_MODE)
    return "generic"


def detach_xdp(ipr: Any, dev: str, mode: str) -> None:
    flags = XDP_FLAGS_DRV_MODE if mode == "native" else XDP_FLAGS_SKB_MODE
    ipr.link("set", index=_index(ipr, dev), xdp_fd=-1, xdp_flags=flags)


def attach_tc(ipr: Any, dev: str, fd: int, name: str, parent: str = CLSACT_INGRESS) -> None:
    """A direct-action filter; replaces ours if one is there already."""
    from pyroute2.netlink.exceptions import NetlinkError

    idx = _index(ipr, dev)
    try:
        ipr.tc("add", "clsact", idx)
    except NetlinkError as e:
        if e.code != 17:  # EEXIST: the qdisc is there from an earlier run
            raise
    ipr.tc("replace-filter", "bpf", idx, ":1", fd=fd, name=name, parent=parent, classid=1,
           direct_action=True)


def detach_tc(ipr: Any, dev: str) -> None:
    ipr.tc("del", "clsact", _index(ipr, dev))


def detach_all(state: Attachments) -> list[str]:
    """Remove everything `state` lists; returns what could not be removed."""
    from pyroute2.netlink.exceptions import NetlinkError

    problems = []
    with iproute(state.netns) as ipr:
        for dev, mode in state.xdp.items():
            try:
                detach_xdp(ipr, dev, mode)
            except (LookupError, NetlinkError) as e:
                problems.append(f"xdp on {dev}: {e}")
        for dev in state.node_tc:
            try:
                detach_tc(ipr, dev)
            except (LookupError, NetlinkError) as e:
                problems.append(f"tc on {dev}: {e}")
        for dev in state.tc:
            try:
                detach_tc(ipr, dev)
            except LookupError:
                pass  # the pod and its veth are gone already
            except NetlinkError as e:
                problems.append(f"tc on {dev}: {e}")
    if state.cgroup:
        problems += detach_cgroup(Path(state.cgroup))
    return problems


# bpftool's names for the socket hooks' attach types, by program.
SOCK_ATTACH = {p.name: p.bpftool_hook for p in SOCK_PROGRAMS}


def detach_cgroup(cgroup: Path, keep: Collection[int] = ()) -> list[str]:
    """Detach the socket hooks attached to `cgroup` (the agent that held their
    fds is gone), except the program ids in `keep`. By the ids attached
    there, not by name: every agent on the machine (a node per namespace, a
    test instance) loads programs of the same names, and bpftool refuses a
    name that matches several."""
    shown = subprocess.run(["bpftool", "-j", "cgroup", "show", str(cgroup)],
                           capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        return [f"socket hooks on {cgroup}: {shown.stderr.strip()}"]
    problems = []
    for entry in json.loads(shown.stdout or "[]"):
        hook = SOCK_ATTACH.get(entry.get("name", ""))
        if hook is None or entry["id"] in keep:
            continue
        out = subprocess.run(["bpftool", "cgroup", "detach", str(cgroup), hook,
                              "id", str(entry["id"])],
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            problems.append(f"{hook} on {cgroup}: {out.stderr.strip()}")
    return problems
