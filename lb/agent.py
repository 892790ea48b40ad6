"""`lbctl run` and `lbctl down`: the node agent.

run: compile and load the programs (reusing pinned maps, so established
flows survive a restart), program the maps from the source, attach XDP to
the node devices and tc to every pod veth (following pods as they come and
go), then keep the maps in step with the source. Bursts of changes are
coalesced: at most one sync per --min-sync-period, like kube-proxy's
minSyncPeriod. On SIGTERM it exits and leaves programs and pins in place:
the datapath keeps forwarding with the last state until the next agent
takes over.

down: detach every program it attached and remove the pins."""

from __future__ import annotations

import argparse
import logging
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lb import desired
from lb.attach import Attachments, attach_tc, attach_xdp, detach_all
from lb.healthcheck import HealthServers, health_checks
from lb.instance import DEFAULT_INSTANCE, Sizes, pin_dir_of, reconciler_for
from lb.manifests import ManifestError, load
from lb.model import Cluster
from loader.build import Datapath, remove_pins

log = logging.getLogger("lbctl.agent")

POD_PROGRAM = "tc_lb_from_pod"
NODE_PROGRAM = "xdp_lb_external"


@dataclass
class FileSource:
    """Manifest files, re-read when any of them changes on disk."""

    paths: list[Path]
    _stamp: tuple[tuple[int, int, int], ...] | None = None
    last_good: Cluster = field(default_factory=Cluster)

    def _current(self) -> tuple[tuple[int, int, int], ...]:
        # The inode too: an editor's or kubectl's atomic replace within one
        # mtime tick, keeping the size, is still a change.
        out = []
        for p in self.paths:
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append((0, 0, -1))
        return tuple(out)

    def poll(self) -> Cluster | None:
        """The cluster when the files changed since the last call, else None.
        A file that does not parse keeps the last good state (fail static)."""
        stamp = self._current()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            result = load(self.paths)
        except ManifestError as e:
            log.error("keeping the last good state: %s", e)
            return None
        for err in result.errors:
            log.error("skipped: %s", err)
        self.last_good = result.cluster
        return result.cluster


class LinkWatcher(threading.Thread):
    """Calls `on_veth(name)` for each veth that exists or appears."""

    def __init__(self, ignore: set[str], on_veth: Callable[[str], None]) -> None:
        super().__init__(name="link-watcher", daemon=True)
        self.ignore = ignore
        self.on_veth = on_veth
        self.stop = threading.Event()

    @staticmethod
    def _veth_name(msg: Any) -> str | None:
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        name = msg.get_attr("IFLA_IFNAME")
        return name if kind == "veth" and isinstance(name, str) else None

    def existing(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for msg in ipr.get_links():
                name = self._veth_name(msg)
                if name and name not in self.ignore:
                    self.on_veth(name)

    def run(self) -> None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            ipr.bind()
            while not self.stop.is_set():
                ready, _, _ = select.select([ipr], [], [], 0.5)
                if not ready:
                    continue
                for msg in ipr.get():
                    if msg.get("event") != "RTM_NEWLINK":
                        continue
                    name = self._veth_name(msg)
                    if name and name not in self.ignore:
                        self.on_veth(name)


def allow_local_source() -> None:
    """A NodePort reply is reverse-translated at tc ingress on the backend's
    veth, so it enters routing with the node's own address as its source;
    the kernel drops such packets as martians unless accept_local is set
    ("all" counts for every device, bridges included). kube-proxy likewise
    sets route_localnet for its NodePorts."""
    Path("/proc/sys/net/ipv4/conf/all/accept_local").write_text("1")


class Agent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.instance: str = args.instance
        from lb.cli import node_from_args

        self.node = node_from_args(args)
        self.ifaces: list[str] = list(args.iface or [])
        self.min_sync = float(args.min_sync_period)
        self.source = FileSource([Path(f) for f in args.file])
        self.netns: str | None = args.netns
        self.sizes = Sizes()
        self.stopping = threading.Event()
        self.attachments = Attachments(netns=self.netns)
        self.health = HealthServers()
        self._tc_lock = threading.Lock()

    def _attach_veth(self, dev: str) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with self._tc_lock:
            if dev in self.attachments.tc:
                return
            try:
                with IPRoute() as ipr:
                    attach_tc(ipr, dev, self.dp.prog_fd(POD_PROGRAM), POD_PROGRAM)
            except (LookupError, NetlinkError) as e:
                log.warning("pod device %s: not attached: %s", dev, e)
                return
            self.attachments.tc.append(dev)
            self.attachments.save(self.instance)
            log.info("attached %s to pod device %s", POD_PROGRAM, dev)

    def sync(self, cluster: Cluster) -> None:
        start = time.monotonic()
        state = desired.compute(cluster, self.node)
        res = self.reconciler.sync(state)
        self.health.update(health_checks(cluster, state))
        took = (time.monotonic() - start) * 1000
        log.info("synced %d frontends in %.1f ms: %d added, %d updated, %d removed, "
                 "%d backends added, %d removed, %d errors", len(state.entries), took,
                 res.added, res.updated, res.removed, res.backends_added,
                 res.backends_removed, len(res.errors))

    def run(self) -> int:
        if self.netns:
            from pyroute2 import netns

            netns.setns(self.netns)  # before any thread: they inherit it
        allow_local_source()
        self.dp = Datapath(self.sizes.options(pin_dir_of(self.instance)))
        self.reconciler = reconciler_for(self.dp)
        found = self.reconciler.recover()
        log.info("loaded the datapath; pinned maps in %s held %d service entries",
                 self.dp.opts.pin_dir, found)
        cluster = self.source.poll()
        self.sync(cluster if cluster is not None else Cluster())
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for dev in self.ifaces:
                mode = attach_xdp(ipr, dev, self.dp.prog_fd(NODE_PROGRAM))
                self.attachments.xdp[dev] = mode
                log.info("attached %s to node device %s (%s)", NODE_PROGRAM, dev, mode)
        self.attachments.save(self.instance)
        watcher = LinkWatcher(set(self.ifaces) | {"lo"}, self._attach_veth)
        watcher.existing()
        watcher.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("ready")
        last_sync = time.monotonic()
        while not self.stopping.wait(0.1):
            if time.monotonic() - last_sync < self.min_sync:
                continue
            cluster = self.source.poll()
            if cluster is not None:
                self.sync(cluster)
                last_sync = time.monotonic()
        watcher.stop.set()
        self.health.close()
        log.info("stopping; programs and pinned maps stay in place for the next start")
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    if not args.file:
        print("lbctl: run: --file is required (a Kubernetes source comes with --kubernetes)")
        return 2
    return Agent(args).run()


def cmd_down(args: argparse.Namespace) -> int:
    state = Attachments.load(args.instance)
    problems: list[str] = []
    if state:
        problems = detach_all(state)
        Attachments.path(args.instance).unlink(missing_ok=True)
    remove_pins(pin_dir_of(args.instance))
    for p in problems:
        log.warning("down: %s", p)
    log.info("removed instance %s", args.instance)
    return 0


def add_agent_commands(sub: Any, add_node_args: Callable[[argparse.ArgumentParser], None]) -> None:
    r = sub.add_parser("run", help="run the node agent")
    r.add_argument("-f", "--file", action="append", default=[], metavar="FILE")
    r.add_argument("--iface", action="append", metavar="DEV",
                   help="node-facing device for XDP (repeatable)")
    r.add_argument("--netns", help="network namespace of the node (for labs and tests)")
    r.add_argument("--instance", default=DEFAULT_INSTANCE)
    r.add_argument("--min-sync-period", default=0.2, type=float, metavar="SECONDS")
    add_node_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("down", help="detach the programs and remove the pinned maps")
    d.add_argument("--instance", default=DEFAULT_INSTANCE)
    d.set_defaults(func=cmd_down)
