"""The node agent (`lbctl run`): compile and load the programs (reusing
pinned maps, so established flows survive a restart), program the maps from
the source, attach XDP to the node devices and tc to every pod veth
(following pods as they come and go), then keep the maps in step with the
source. Bursts of changes are coalesced: at most one sync per
min_sync_period, like kube-proxy's minSyncPeriod. On SIGTERM it exits and
leaves programs and pins in place: the datapath keeps forwarding with the
last state until the next agent takes over."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from lb import collector
from lb.agent.config import AgentConfig
from lb.agent.healthcheck import HealthCheckTracker, HealthServers
from lb.agent.links import LINK_RESCAN_PERIOD, LinkWatcher, min_mtu
from lb.agent.nodeports import addresses_in
from lb.datapath import socklb
from lb.datapath.attach import CLSACT_EGRESS, Attachments, attach_tc, attach_xdp
from lb.datapath.instance import pin_dir_of, policy_writer_for, reconciler_for
from lb.datapath.lock import lock_instance
from lb.datapath.netns import iproute, write_sysctl
from lb.model import Cluster, Node
from lb.refusal import bounded
from lb.service import desired
from lb.sources.files import FileSource
from lb.sources.kube import KubeSource
from loader.build import BuildOptions, Datapath
from loader.programs import (
    PACKET_PROGRAMS,
    SOCK_PROGRAMS,
    TC_FROM_POD,
    TC_TO_EXTERNAL,
    TC_TO_POD,
    XDP_EXTERNAL,
)

if TYPE_CHECKING:
    from lb.agent.metrics import Metrics, MetricsServer

log = logging.getLogger("lbctl.agent")

POD_PROGRAM = TC_FROM_POD.name
TO_POD_PROGRAM = TC_TO_POD.name
NODE_PROGRAM = XDP_EXTERNAL.name
NODE_EGRESS_PROGRAM = TC_TO_EXTERNAL.name
# A sync that raised is retried with the same cluster after this long.
SYNC_RETRY_DELAY = 1.0
# How long a start waits for the API's first complete lists before it
# attaches the programs anyway, over the maps as a previous agent left them.
FIRST_LIST_WAIT = 10.0
LOOP_TICK = 0.1


class StartError(RuntimeError):
    """The agent cannot start as configured; the message names the remedy."""


def allow_local_source(netns: str | None) -> None:
    """A NodePort reply is reverse-translated at tc ingress on the backend's
    veth, so it enters routing with the node's own address as its source;
    the kernel drops such packets as martians unless accept_local is set
    ("all" counts for every device, bridges included). kube-proxy likewise
    sets route_localnet for its NodePorts."""
    write_sysctl(netns, "net/ipv4/conf/all/accept_local", "1")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # The node as programmed: run() adds the namespace cookie.
        self.node = config.node
        self.source: FileSource | KubeSource = (
            KubeSource.connect(config.kubeconfig, config.node.name, config.resync_period)
            if config.kubernetes else FileSource(list(config.files), config.rules))
        from lb.agent.metrics import Metrics  # prometheus_client: not for every lbctl command

        self.metrics: Metrics = Metrics()
        self._retry: Cluster | None = None
        self.memo = desired.Memo()
        self._full_checked = time.monotonic()
        self._last_cluster: Cluster | None = None
        self._node_port_ips: tuple[str, ...] = ()
        self._min_mtu = 0
        self._links_read = False
        self._links_checked = 0.0
        self.cgroup: Path | None = socklb.resolve_cgroup(config.cgroup) if config.cgroup else None
        self.stopping = threading.Event()
        self.attachments = Attachments(netns=config.netns)
        self.health = HealthServers(netns=config.netns)
        self._health_checks = HealthCheckTracker()
        # Whether the connected UDP sockets were checked since the start.
        self._udp_checked = False
        self._tc_lock = threading.Lock()

    def _attach_veths(self, devs: set[str]) -> None:
        """Attach to the pod devices not attached yet; forget the ones gone."""
        from pyroute2.netlink.exceptions import NetlinkError

        # A link event: the next loop turn reads the devices' MTUs and addresses.
        self._links_checked = 0.0
        with self._tc_lock:
            known = set(self.attachments.tc)
            if known == devs:
                return
            attached = [d for d in self.attachments.tc if d in devs]
            new = sorted(devs - known)
            if new:
                # One netlink socket for the whole burst of new pods.
                with iproute(self.config.netns) as ipr:
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
            self.attachments.save(self.config.instance)

    def sync(self, cluster: Cluster) -> bool:
        """Program the maps for `cluster`; False (counted, logged) if it raised."""
        with collector.paused():
            return self._sync(cluster)

    def _sync(self, cluster: Cluster) -> bool:
        kube = self.source if isinstance(self.source, KubeSource) else None
        start = time.monotonic()
        try:
            node = self._with_links(kube.node(self.node) if kube else self.node)
            self._last_cluster = cluster
            self.metrics.health.node_eligible = node.eligible
            self.metrics.policies_read(cluster)
            check = self._check_due()
            state = self._desired(cluster, node, check)
            res = self.reconciler.sync(state)
            for line in bounded(res.errors):
                log.error("refused %s", line)
            res.refusals += self.policy.sync(cluster, node, check)
            self.metrics.policy_drift.inc(self.policy.drifted)
            self.health.update(self._health_checks.update(cluster, state, self.memo))
            # A socket can only have gone stale when a backend left the maps.
            if self.cgroup and (res.backends_removed or not self._udp_checked):
                self._udp_checked = False  # until a pass succeeds
                try:
                    self._close_stale_udp(state)
                    self._udp_checked = True
                except OSError as e:  # the maps are programmed; sockets wait a sync
                    log.warning("closing UDP sockets of gone backends: %s", e)
        except Exception:
            log.exception("sync failed; retrying in %.0f s", SYNC_RETRY_DELAY)
            self.metrics.sync_failed(time.monotonic() - start)
            return False
        took = time.monotonic() - start
        self.metrics.synced(took, res, self.reconciler)
        self.metrics.refused(self.source.errors)
        if kube:
            self.metrics.programmed(kube.programmed())
        # What the maps hold, not what was asked: a refused frontend is not synced.
        log.info("synced %d of %d frontends in %.1f ms: %d added, %d updated, %d removed, "
                 "%d backends added, %d removed, %d refused", len(self.reconciler.applied),
                 len(state.entries), took * 1000, res.added, res.updated, res.removed,
                 res.backends_added, res.backends_removed, len(res.refusals))
        return True

    def _check_due(self) -> bool:
        """Whether this sync proves the incremental work right (the desired
        state's memo, the policy compile's reuse) against a full one."""
        if time.monotonic() - self._full_checked < self.config.incremental_check_period:
            return False
        self._full_checked = time.monotonic()
        return True

    def _desired(self, cluster: Cluster, node: Node, check: bool) -> desired.DesiredState:
        """The desired state, recomputed for the services whose objects
        changed; when `check`, also in full, to prove the memo right."""
        state = desired.compute(cluster, node, self.memo)
        if not check:
            return state
        full = desired.compute(cluster, node)
        differ = desired.drift(state, full)
        if not differ:
            return state
        log.error("desired state: %d entries computed incrementally differ from a full "
                  "recompute; programming the full one", differ)
        self.metrics.desired_drift.inc(differ)
        self.memo = desired.Memo()
        return full

    def _with_links(self, node: Node) -> Node:
        """`node` as its devices say: their smallest MTU and, with
        --nodeport-addresses CIDRs, the node's addresses there. Read once,
        then kept up to date by _links_moved: a netlink dump per sync would
        cost more than the sync itself."""
        if not self._links_read:
            self._read_links()
        node = replace(node, min_mtu=self._min_mtu)
        if self.config.node_port_cidrs is None:
            return node
        return replace(node, node_port_ips=self._node_port_ips)

    def _read_links(self) -> bool:
        """Read what _with_links uses; whether it changed."""
        self._links_read = True
        self._links_checked = time.monotonic()
        mtu = min_mtu(self.config.netns)
        cidrs = self.config.node_port_cidrs
        ips = addresses_in(cidrs, self.config.netns) if cidrs is not None else ()
        moved = (mtu, ips) != (self._min_mtu, self._node_port_ips)
        self._min_mtu, self._node_port_ips = mtu, ips
        return moved

    def _links_moved(self) -> bool:
        """Whether what _with_links uses changed since the last sync: read
        every LINK_RESCAN_PERIOD, and on the loop turn after a link event."""
        if time.monotonic() - self._links_checked < LINK_RESCAN_PERIOD:
            return False
        return self._read_links()

    def _close_stale_udp(self, state: desired.DesiredState) -> None:
        live = {(b.ip, b.port) for e in state.entries.values()
                if e.frontend.proto == socket.IPPROTO_UDP for b in (*e.backends, *e.draining)}
        closed = socklb.terminate_stale(self.dp.map("lb_sock_rev"), live, self.config.netns)
        if closed:
            log.info("closed %d connected UDP sockets of gone backends", closed)

    def _servers(self) -> list[MetricsServer]:
        from lb.agent.metrics import MetricsServer, proxy_health_routes

        c = self.config
        servers = []
        for flag, addr, routes in (("--metrics-addr", c.metrics_addr, None),
                                   ("--healthz-addr", c.healthz_addr,
                                    proxy_health_routes(self.metrics))):
            if not addr:
                continue
            try:
                servers.append(MetricsServer(self.metrics, addr, routes))
            except OSError as e:
                for server in servers:
                    server.close()
                raise StartError(f"{flag} {addr}: {e.strerror or e}: choose a free address "
                                 "(is another agent or kube-proxy listening there?)") from e
        return servers

    def _load(self) -> None:
        """Compile and load the programs over the pinned maps, and take up the
        state a previous agent left in them."""
        c = self.config
        allow_local_source(c.netns)
        self.dp = Datapath(BuildOptions(pin_dir_of(c.instance), c.sizes, c.conntrack_defines,
                                        objects=c.objects))
        log.info("%s", "loaded the kept programs" if self.dp.kept else "compiled the programs")
        if self.cgroup:
            # Socket hooks act only on sockets of the node's namespace.
            self.node = replace(self.node, netns_cookie=socklb.netns_cookie(c.netns))
        self.reconciler = reconciler_for(self.dp, c.min_table_size)
        found = self.reconciler.recover()
        self.policy = policy_writer_for(self.dp)
        self.policy.recover()
        log.info("loaded the datapath; pinned maps in %s held %d service entries",
                 self.dp.opts.pin_dir, found)
        self.metrics.datapath_loaded(self.dp.opts.pin_dir)

    def _verify(self) -> None:
        """Load every program the agent attaches. One the verifier refuses
        is left for the attach, which loads it again and reports why."""
        # Every program a packet runs through is attached (node and pod
        # devices), the socket hooks when there is a cgroup.
        attached = PACKET_PROGRAMS + (SOCK_PROGRAMS if self.cgroup else ())
        for name in (prog.name for prog in attached):
            try:
                self.dp.prog_fd(name)
            except Exception as e:  # raised again where it is attached
                log.debug("loading %s ahead of its attach: %s", name, e)

    def _check_devices(self) -> None:
        with iproute(self.config.netns) as ipr:
            for dev in self.config.ifaces:
                if not ipr.link_lookup(ifname=dev):
                    where = f"namespace {self.config.netns}" if self.config.netns else "this node"
                    raise StartError(f"--iface {dev}: no such device in {where} "
                                     "(ip link lists them)")

    def _attach_node(self) -> None:
        """XDP and tc egress on the node devices; the socket hooks on the cgroup."""
        with iproute(self.config.netns) as ipr:
            for dev in self.config.ifaces:
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
        self.attachments.save(self.config.instance)

    def _loop(self) -> None:
        """Sync as soon as the source changed, at most once per min_sync_period:
        a change after a quiet spell is synced at once, one during the period
        when it ends (kube-proxy's BoundedFrequencyRunner,
        pkg/util/async/bounded_frequency_runner.go). The loop also turns every
        LOOP_TICK for retries, moved links and the health clock."""
        last_sync = time.monotonic()
        woken = self.source.changed if isinstance(self.source, KubeSource) else None
        pending = False  # the source says changed, but has nothing to take yet
        while not self.stopping.is_set():
            due = last_sync + self.config.min_sync_period - time.monotonic()
            if due > 0:
                self.stopping.wait(min(due, LOOP_TICK))
            elif woken is not None and not pending:
                woken.wait(LOOP_TICK)
            else:
                self.stopping.wait(LOOP_TICK)
            if self.stopping.is_set():
                break
            self.metrics.tick()
            if time.monotonic() - last_sync < self.config.min_sync_period:
                continue
            cluster = self.source.poll()
            pending = cluster is None and woken is not None and woken.is_set()
            if cluster is None:
                cluster = self._retry
            if cluster is None and self._last_cluster is not None and self._links_moved():
                cluster = self._last_cluster
            if cluster is not None:
                ok = self.sync(cluster)
                self._retry = None if ok else cluster
                last_sync = time.monotonic() + (0 if ok else SYNC_RETRY_DELAY)

    def _first_cluster(self) -> Cluster | None:
        """The source's first snapshot, waited for (up to FIRST_LIST_WAIT) so
        that the first sync comes before the programs are verified and
        attached: the maps serve sooner, and a previous agent's programs
        keep serving meanwhile (kube-proxy likewise syncs nothing before its
        informers have synced, pkg/proxy/nftables/proxier.go isInitialized)."""
        if isinstance(self.source, KubeSource):
            deadline = time.monotonic() + FIRST_LIST_WAIT
            while not self.source.wait_listed(LOOP_TICK):
                if self.stopping.is_set():
                    return None
                if time.monotonic() > deadline:
                    log.warning("the API server has not answered every list in %.0f s: "
                                "attaching over the maps as they are, to be programmed "
                                "once it has", FIRST_LIST_WAIT)
                    break
        return self.source.poll()

    def run(self) -> int:
        # The process stays in its own namespace (its API and metrics sockets
        # live there); only netlink, sysctls and node-facing listeners are
        # made inside the node's namespace.
        # One writer per instance's maps: a second agent refuses here.
        self._lock = lock_instance(self.config.instance)
        self._check_devices()
        servers = self._servers()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        if isinstance(self.source, KubeSource):
            self.metrics.watch_source(self.source)
            self.source.start()  # the first lists run while the programs compile
        self._load()
        # The verifier runs in the kernel, outside the GIL: while it checks
        # the programs, this thread parses the lists and programs the maps.
        verify = threading.Thread(target=self._verify, name="verify", daemon=True)
        verify.start()
        cluster = self._first_cluster()
        # Nothing yet (the API source before every kind is listed, files that
        # do not parse): syncing an empty cluster would wipe the maps a
        # previous agent left, so they keep serving until there is one.
        if cluster is not None and not self.stopping.is_set():
            self._retry = None if self.sync(cluster) else cluster
        verify.join()
        if not self.stopping.is_set():
            self._attach_node()
            watcher = LinkWatcher(set(self.config.ifaces) | {"lo"}, self._attach_veths,
                                  self.config.netns, frozenset(self.config.node.ips))
            watcher.existing()
            watcher.start()
            log.info("ready")
            self._loop()
            watcher.stop.set()
        self.health.close()
        if isinstance(self.source, KubeSource):
            self.source.stop()
        for server in servers:
            server.close()
        self.metrics.close()
        log.info("stopping; programs and pinned maps stay in place for the next start")
        return 0
