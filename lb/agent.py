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
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lb import desired, socklb
from lb.attach import CLSACT_EGRESS, Attachments, attach_tc, attach_xdp, detach_all
from lb.healthcheck import HealthServers, health_checks
from lb.instance import (
    DEFAULT_INSTANCE,
    pin_dir_of,
    policy_writer_for,
    reconciler_for,
)
from lb.kube import DEFAULT_RESYNC_PERIOD, ConfigError, KubeSource, kubeconfig_path
from lb.manifests import ManifestError, load
from lb.model import Cluster, Node
from lb.netns import call_in, iproute, write_sysctl
from lb.nodeflags import UsageError, add_node_args, node_from_args
from loader.build import BuildOptions, Datapath, LayoutMismatch, remove_pins
from loader.programs import TC_FROM_POD, TC_TO_EXTERNAL, TC_TO_POD, XDP_EXTERNAL
from loader.sizes import SIZE_FLAGS, Sizes

if TYPE_CHECKING:
    from lb.metrics import Metrics

log = logging.getLogger("lbctl.agent")

POD_PROGRAM = TC_FROM_POD.name
TO_POD_PROGRAM = TC_TO_POD.name
NODE_PROGRAM = XDP_EXTERNAL.name
NODE_EGRESS_PROGRAM = TC_TO_EXTERNAL.name
# A sync that raised is retried with the same cluster after this long.
SYNC_RETRY_DELAY = 1.0


@dataclass
class FileSource:
    """Manifest files, re-read when any of them changes on disk."""

    paths: list[Path]
    _stamp: tuple[tuple[int, int, int], ...] | None = None
    last_good: Cluster = field(default_factory=Cluster)
    errors: tuple[ManifestError, ...] = ()

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
        self.errors = result.errors
        self.last_good = result.cluster
        return result.cluster


# How often the devices are listed even when no link event arrived.
LINK_RESCAN_PERIOD = 2.0
RTMGRP_LINK = 1


class LinkWatcher(threading.Thread):
    """Calls `on_veths(names)` with every veth in `netns` at start, on every
    link event and every LINK_RESCAN_PERIOD. An event is only a wake-up: the
    devices come from a fresh dump each time, so an event missed, coalesced
    or lost to a full socket buffer loses nothing (pyroute2's own event
    reader buffers messages behind select, and pod veths then went
    unnoticed)."""

    def __init__(self, ignore: set[str], on_veths: Callable[[set[str]], None],
                 netns: str | None = None) -> None:
        super().__init__(name="link-watcher", daemon=True)
        self.ignore = ignore
        self.netns = netns
        self.on_veths = on_veths
        self.stop = threading.Event()

    @staticmethod
    def _veth_name(msg: Any) -> str | None:
        info = msg.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        name = msg.get_attr("IFLA_IFNAME")
        return name if kind == "veth" and isinstance(name, str) else None

    def existing(self) -> None:
        with iproute(self.netns) as ipr:
            names = {self._veth_name(msg) for msg in ipr.get_links()}
        self.on_veths({n for n in names if n and n not in self.ignore})

    def _events(self) -> socket.socket:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_LINK))
            return sock

        return call_in(self.netns, open_socket)

    def run(self) -> None:
        with self._events() as sock:
            while not self.stop.is_set():
                select.select([sock], [], [], LINK_RESCAN_PERIOD)
                try:
                    while sock.recv(65536):
                        pass
                except BlockingIOError:
                    pass
                except OSError as e:  # ENOBUFS: events were lost; the dump has them
                    log.debug("link events: %s", e)
                try:
                    self.existing()
                except Exception:
                    log.exception("listing the devices failed; trying again")


def allow_local_source(netns: str | None) -> None:
    """A NodePort reply is reverse-translated at tc ingress on the backend's
    veth, so it enters routing with the node's own address as its source;
    the kernel drops such packets as martians unless accept_local is set
    ("all" counts for every device, bridges included). kube-proxy likewise
    sets route_localnet for its NodePorts."""
    write_sysctl(netns, "net/ipv4/conf/all/accept_local", "1")


# kube-proxy's flags for the same settings, mapped to the datapath's defines.
CONNTRACK_FLAGS = {
    "conntrack_tcp_timeout_established": "LB_CT_TCP_LIFETIME_S",
    "conntrack_tcp_timeout_syn": "LB_CT_TCP_SYN_S",
    "conntrack_tcp_timeout_close": "LB_CT_TCP_CLOSING_S",
    "conntrack_udp_timeout": "LB_CT_OTHER_LIFETIME_S",
}


def conntrack_defines(args: argparse.Namespace) -> dict[str, str]:
    """Compile-time conntrack lifetimes; changing one loads a changed program
    over the same pinned maps."""
    return {define: str(int(getattr(args, flag))) for flag, define in CONNTRACK_FLAGS.items()
            if getattr(args, flag, None) is not None}


@dataclass(frozen=True)
class AgentConfig:
    """What `lbctl run` was asked to do, checked: the agent's only input."""

    instance: str
    node: Node
    ifaces: tuple[str, ...]
    min_sync_period: float
    files: tuple[Path, ...]  # the file source; empty with kubernetes
    kubernetes: bool
    kubeconfig: str | None
    resync_period: float
    metrics_addr: str | None
    healthz_addr: str | None
    netns: str | None
    sizes: Sizes
    conntrack_defines: dict[str, str]
    cgroup: str | None  # a path, or "auto"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentConfig:
        """Raises UsageError for flags that contradict each other or do not parse."""
        problem = _flag_problem(args)
        if problem:
            raise UsageError(f"run: {problem}")
        return cls(
            instance=args.instance, node=node_from_args(args), ifaces=tuple(args.iface or ()),
            min_sync_period=float(args.min_sync_period),
            files=tuple(Path(f) for f in args.file), kubernetes=bool(args.kubernetes),
            kubeconfig=args.kubeconfig, resync_period=float(args.resync_period),
            metrics_addr=args.metrics_addr, healthz_addr=args.healthz_addr, netns=args.netns,
            sizes=sizes_from_args(args), conntrack_defines=conntrack_defines(args),
            cgroup=args.cgroup)


def _flag_problem(args: argparse.Namespace) -> str | None:
    if args.kubernetes and args.file:
        return "--file and --kubernetes are alternatives: give one"
    if not args.kubernetes and not args.file:
        return "give the objects with --file, or --kubernetes to watch the API server"
    if args.kubeconfig and not args.kubernetes:
        return "--kubeconfig: only with --kubernetes"
    if args.resync_period < 0:
        return "--resync-period: must be >= 0 (0: never)"
    from lb.metrics import parse_addr  # prometheus_client: not for every lbctl command

    for flag, value in (("--metrics-addr", args.metrics_addr),
                        ("--healthz-addr", args.healthz_addr)):
        if value:
            try:
                parse_addr(value)
            except ValueError as e:
                return f"{flag}: {e}"
    return None


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.instance = config.instance
        self.node = config.node
        self.ifaces = list(config.ifaces)
        self.min_sync = config.min_sync_period
        self.source: FileSource | KubeSource = (
            KubeSource.connect(config.kubeconfig, config.node.name, config.resync_period)
            if config.kubernetes else FileSource(list(config.files)))
        from lb.metrics import Metrics  # prometheus_client: not for every lbctl command

        self.metrics: Metrics = Metrics()
        self.metrics_addr = config.metrics_addr
        self.healthz_addr = config.healthz_addr
        self._retry: Cluster | None = None
        self.netns = config.netns
        self.sizes = config.sizes
        self.defines = config.conntrack_defines
        self.cgroup: Path | None = socklb.resolve_cgroup(config.cgroup) if config.cgroup else None
        self.stopping = threading.Event()
        self.attachments = Attachments(netns=self.netns)
        self.health = HealthServers(netns=self.netns)
        self._tc_lock = threading.Lock()

    def _attach_veths(self, devs: set[str]) -> None:
        """Attach to the pod devices not attached yet; forget the ones gone."""
        from pyroute2.netlink.exceptions import NetlinkError

        with self._tc_lock:
            known = set(self.attachments.tc)
            if known == devs:
                return
            attached = [d for d in self.attachments.tc if d in devs]
            new = sorted(devs - known)
            if new:
                # One netlink socket for the whole burst of new pods.
                with iproute(self.netns) as ipr:
                    for dev in new:
                        try:
                            attach_tc(ipr, dev, self.dp.prog_fd(POD_PROGRAM), POD_PROGRAM)
                            # Egress of the host-side veth is what enters the pod.
                            attach_tc(ipr, dev, self.dp.prog_fd(TO_POD_PROGRAM),
                                      TO_POD_PROGRAM, CLSACT_EGRESS)
                        except (LookupError, NetlinkError) as e:
                            # Gone already (a short-lived pod), or not ready: the
                            # next listing tries again if it is still there.
                            log.debug("pod device %s: not attached: %s", dev, e)
                            continue
                        attached.append(dev)
                        log.info("attached %s to pod device %s", POD_PROGRAM, dev)
            self.attachments.tc = attached
            self.attachments.save(self.instance)

    def sync(self, cluster: Cluster) -> bool:
        """Program the maps for `cluster`; False (counted, logged) if it raised."""
        kube = self.source if isinstance(self.source, KubeSource) else None
        start = time.monotonic()
        try:
            node = kube.node(self.node) if kube else self.node
            self.metrics.health.node_eligible = node.eligible
            state = desired.compute(cluster, node)
            res = self.reconciler.sync(state)
            res.refusals += self.policy.sync(cluster, node)
            self.health.update(health_checks(cluster, state))
        except Exception:
            log.exception("sync failed; retrying in %.0f s", SYNC_RETRY_DELAY)
            self.metrics.sync_failed(time.monotonic() - start)
            return False
        took = time.monotonic() - start
        self.metrics.synced(took, res, state, self.reconciler)
        self.metrics.refused(self.source.errors)
        if kube:
            self.metrics.programmed(kube.programmed())
        log.info("synced %d frontends in %.1f ms: %d added, %d updated, %d removed, "
                 "%d backends added, %d removed, %d errors", len(state.entries), took * 1000,
                 res.added, res.updated, res.removed, res.backends_added,
                 res.backends_removed, len(res.errors))
        return True

    def run(self) -> int:
        # The process stays in its own namespace (its API and metrics sockets
        # live there); only netlink, sysctls and node-facing listeners are
        # made inside the node's namespace.
        from lb.metrics import MetricsServer, proxy_health_routes

        servers = [MetricsServer(self.metrics, self.metrics_addr)] if self.metrics_addr else []
        if self.healthz_addr:
            servers.append(MetricsServer(self.metrics, self.healthz_addr,
                                         proxy_health_routes(self.metrics)))
        if isinstance(self.source, KubeSource):
            self.metrics.watch_source(self.source)
            self.source.start()  # the first lists run while the programs compile
        allow_local_source(self.netns)
        self.dp = Datapath(BuildOptions(pin_dir_of(self.instance), self.sizes, self.defines))
        if self.cgroup:
            # Socket hooks act only on sockets of the node's namespace.
            self.node = replace(self.node, netns_cookie=socklb.netns_cookie(self.netns))
        self.reconciler = reconciler_for(self.dp)
        found = self.reconciler.recover()
        self.policy = policy_writer_for(self.dp)
        self.policy.recover()
        log.info("loaded the datapath; pinned maps in %s held %d service entries",
                 self.dp.opts.pin_dir, found)
        self.metrics.datapath_loaded(self.dp.opts.pin_dir)
        cluster = self.source.poll()
        # The API source offers nothing before every kind is listed: syncing
        # an empty cluster then would wipe the maps a previous agent left.
        if cluster is not None or isinstance(self.source, FileSource):
            cluster = cluster if cluster is not None else Cluster()
            self._retry = None if self.sync(cluster) else cluster
        with iproute(self.netns) as ipr:
            for dev in self.ifaces:
                mode = attach_xdp(ipr, dev, self.dp.prog_fd(NODE_PROGRAM))
                self.attachments.xdp[dev] = mode
                log.info("attached %s to node device %s (%s)", NODE_PROGRAM, dev, mode)
                # Replies of hostNetwork backends leave by the node device.
                attach_tc(ipr, dev, self.dp.prog_fd(NODE_EGRESS_PROGRAM), NODE_EGRESS_PROGRAM,
                          CLSACT_EGRESS)
                if dev not in self.attachments.node_tc:
                    self.attachments.node_tc.append(dev)
        if self.cgroup:
            socklb.attach(self.dp, self.cgroup)
            self.attachments.cgroup = str(self.cgroup)
            log.info("attached the socket hooks to cgroup %s", self.cgroup)
        self.attachments.save(self.instance)
        watcher = LinkWatcher(set(self.ifaces) | {"lo"}, self._attach_veths, self.netns)
        watcher.existing()
        watcher.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        log.info("ready")
        last_sync = time.monotonic()
        while not self.stopping.wait(0.1):
            self.metrics.tick()
            if time.monotonic() - last_sync < self.min_sync:
                continue
            cluster = self.source.poll()
            if cluster is None:
                cluster = self._retry
            if cluster is not None:
                ok = self.sync(cluster)
                self._retry = None if ok else cluster
                last_sync = time.monotonic() + (0 if ok else SYNC_RETRY_DELAY)
        watcher.stop.set()
        self.health.close()
        if isinstance(self.source, KubeSource):
            self.source.stop()
        for server in servers:
            server.close()
        self.metrics.close()
        log.info("stopping; programs and pinned maps stay in place for the next start")
        return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        agent = Agent(AgentConfig.from_args(args))
    except ConfigError as e:
        print(f"lbctl: run: --kubernetes: {e}", file=sys.stderr)
        return 2
    try:
        return agent.run()
    except LayoutMismatch as e:
        # Pins of another layout or size: nothing was changed.
        print(f"lbctl: run: {e}", file=sys.stderr)
        return 1


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


def sizes_from_args(args: argparse.Namespace) -> Sizes:
    given = {f.field: getattr(args, f.flag.replace("-", "_")) for f in SIZE_FLAGS
             if getattr(args, f.flag.replace("-", "_"), None) is not None}
    return replace(Sizes(), **given)


def map_size(value: str) -> int:
    if not value.isdigit() or not 2 <= int(value) <= 1 << 26:
        raise argparse.ArgumentTypeError(f"{value!r} is not a map size in [2, {1 << 26}]")
    return int(value)


def positive_seconds(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return int(value)


def add_agent_commands(sub: Any) -> None:
    r = sub.add_parser("run", help="run the node agent")
    r.add_argument("-f", "--file", action="append", default=[], metavar="FILE")
    r.add_argument("--iface", action="append", metavar="DEV",
                   help="node-facing device for XDP (repeatable)")
    r.add_argument("--netns", help="network namespace of the node (for labs and tests)")
    r.add_argument("--instance", default=DEFAULT_INSTANCE)
    r.add_argument("--min-sync-period", default=0.2, type=float, metavar="SECONDS")
    r.add_argument("--cgroup", metavar="PATH",
                   help="cgroup v2 directory for the socket-level load balancer (the node's "
                        "processes and hostNetwork pods; e.g. the cgroup2 mount), or 'auto' "
                        "in a pod: the directory above kubelet's kubepods level")
    for flag in CONNTRACK_FLAGS:
        r.add_argument("--" + flag.replace("_", "-"), type=positive_seconds, metavar="SECONDS")
    defaults = Sizes()
    for f in SIZE_FLAGS:
        r.add_argument("--" + f.flag, type=map_size, metavar="N",
                       help=f"room for this many {f.what} (default {getattr(defaults, f.field)})")
    r.add_argument("--kubernetes", action="store_true",
                   help="watch the API server (in-cluster, or --kubeconfig / $KUBECONFIG); "
                        "--node-name defaults to the hostname, --node-ip to the Node's "
                        "InternalIPs")
    r.add_argument("--kubeconfig", type=kubeconfig_path, metavar="PATH")
    r.add_argument("--resync-period", type=float, default=DEFAULT_RESYNC_PERIOD,
                   metavar="SECONDS", help="list everything afresh this often (0: never)")
    r.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve /metrics, /healthz, /readyz and /proxyMode here")
    r.add_argument("--healthz-addr", metavar="HOST:PORT",
                   help="serve kube-proxy's node health (/healthz, /livez) here")
    add_node_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("down", help="detach the programs and remove the pinned maps")
    d.add_argument("--instance", default=DEFAULT_INSTANCE)
    d.set_defaults(func=cmd_down)
