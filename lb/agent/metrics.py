"""The agent's Prometheus metrics, liveness and readiness, served on
--metrics-addr (kube-proxy's port 10249 in the DaemonSet):

  /metrics    Prometheus text format
  /healthz    200 once the datapath is loaded and while the agent loop turns;
              503 when the loop has not turned for `stuck_after` seconds
  /readyz     200 once the maps were synced from the source at least once
  /proxyMode  "xdplb", where kube-proxy names its mode

and kube-proxy's node health on --healthz-addr (its port 10256): /healthz
and /livez, in kube-proxy's shape, for load balancers that probe nodes.

Datapath counters are read from the maps when scraped (a custom collector;
no polling thread): packets and bytes per verdict reason from the per-CPU
`lb_stats`, and the number of conntrack entries. Sync metrics are set by
the agent after each sync. Nothing here names a file, a host or a
credential: labels are verdicts, reasons and resource kinds only."""

from __future__ import annotations

import collections
import errno
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lb.agent.httpserver import http_server
from lb.counters import count
from lb.model import Cluster
from lb.refusal import BOUNDED_MAPS
from lb.service.reconcile import Reconciler, SyncResult
from lb.verdicts import REASONS, reason
from loader import layout, libbpf
from loader.maps import BpfMap

log = logging.getLogger("lbctl.metrics")

# kube-proxy's sync_proxy_rules_duration_seconds buckets: 1 ms to 16 s.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# Finer at the low end than kube-proxy's network_programming_duration_seconds
# (which starts at 0.25 s): a watch-driven sync here takes milliseconds.
PROGRAMMING_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
STUCK_AFTER = 60.0
# What /proxyMode answers (kube-proxy: iptables, ipvs, nftables).
PROXY_MODE = "xdplb"
# Entries fetched per BPF_MAP_LOOKUP_BATCH call when counting conntrack.
CT_BATCH = 4096
# Counting by single-key iteration (kernels without batch lookups on LRU
# hashes) costs a syscall per entry: stop there and say so.
CT_ITERATION_CAP = 65536


# --- reading the maps --------------------------------------------------------------


def count_entries(m: BpfMap, batch: int = CT_BATCH,
                  iteration_cap: int = CT_ITERATION_CAP) -> tuple[int, bool]:
    """How many entries a hash map holds, and whether the count stopped at
    a cap. Batched lookups copy `batch` entries per syscall, so even a full
    map of a few hundred thousand flows costs milliseconds; the walk is
    still O(n) and, the datapath writing meanwhile, approximate."""
    f = libbpf.ffi()
    info = libbpf.map_info(m.fd)
    keys = f.new("char[]", info.key_size * batch)
    values = f.new("char[]", info.value_size * batch)
    # The position token: a bucket index for hash maps.
    token_in = f.new("char[]", 8)
    token_out = f.new("char[]", 8)
    count = f.new("uint32_t *")
    opts = f.new("struct bpf_map_batch_opts *")
    opts.sz = f.sizeof("struct bpf_map_batch_opts")
    total = 0
    first = True
    while True:
        count[0] = batch
        ret = libbpf.lib().bpf_map_lookup_batch(m.fd, f.NULL if first else token_in,
                                                token_out, keys, values, count, opts)
        if ret < 0 and ret != -errno.ENOENT:
            if first and ret in (-errno.EINVAL, -errno.ENOTSUP, -errno.EOPNOTSUPP):
                return _count_by_iteration(m, iteration_cap)
            libbpf.check(ret, f"batch lookup in {m.spec.name}")
        total += int(count[0])
        if ret == -errno.ENOENT or total >= info.max_entries:
            return total, False
        f.memmove(token_in, token_out, 8)
        first = False


def _count_by_iteration(m: BpfMap, cap: int) -> tuple[int, bool]:
    n = 0
    walk = m.keys()  # a BpfMap is not itself iterable
    for _ in walk:
        n += 1
        if n >= cap:
            return n, True
    return n, False


class DatapathCollector(Collector):
    """Reads the instance's maps at scrape time through its own handles."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._lock = threading.Lock()
        self._maps: dict[str, BpfMap] = {}

    def _map(self, name: str) -> BpfMap:
        if name not in self._maps:
            self._maps[name] = BpfMap.open_pinned(self.pin_dir, name)
        return self._maps[name]

    def close(self) -> None:
        with self._lock:
            for m in self._maps.values():
                m.close()
            self._maps.clear()

    def collect(self) -> Iterable[Any]:
        with self._lock:  # scrapes may overlap; the handles are shared
            return list(self._collect())

    def _collect(self) -> Iterator[Any]:
        labels = ["verdict", "reason"]
        packets = CounterMetricFamily(
            "xdplb_packets", "Packets the programs handled, by verdict and reason "
            "(per-CPU counters of lb_stats, summed).", labels=labels)
        octets = CounterMetricFamily(
            "xdplb_bytes", "Bytes of the packets the programs handled, by verdict and reason.",
            labels=labels)
        stats = self._map("lb_stats")
        for i in range(layout.const("LB_STAT_MAX")):
            c = count(stats, i)
            # Every known reason, zero or not (so rates start from zero); a
            # spare slot only when a newer datapath counts something there.
            if i not in REASONS and not c.packets:
                continue
            r = reason(i)
            packets.add_metric([r.verdict, r.name], c.packets)
            octets.add_metric([r.verdict, r.name], c.bytes)
        yield packets
        yield octets
        ct = self._map("lb_ct")
        started = time.monotonic()
        n, capped = count_entries(ct)
        yield GaugeMetricFamily(
            "xdplb_conntrack_entries", "Entries in the conntrack map (both directions), "
            "counted at scrape time with batched lookups; approximate while flows change.",
            value=n)
        yield GaugeMetricFamily(
            "xdplb_conntrack_count_truncated", "1 when the conntrack count stopped at a cap "
            "(kernels without batched lookups on LRU hashes), else 0.", value=int(capped))
        yield GaugeMetricFamily(
            "xdplb_conntrack_capacity", "Maximum entries of the conntrack map (LRU: the "
            "oldest flows are evicted beyond it).", value=libbpf.map_info(ct.fd).max_entries)
        yield GaugeMetricFamily(
            "xdplb_conntrack_count_duration_seconds",
            "How long counting the conntrack entries took during this scrape.",
            value=time.monotonic() - started)


class KubeStats(Protocol):
    """What lb.sources.kube.KubeSource offers to metrics (kept as a protocol so that
    metrics does not import the Kubernetes client)."""

    def stats(self) -> Mapping[str, Any]: ...

    def sizes(self) -> Mapping[str, int]: ...


class SourceCollector(Collector):
    def __init__(self, source: KubeStats) -> None:
        self.source = source

    def collect(self) -> Iterable[Any]:
        relists = CounterMetricFamily(
            "xdplb_kube_relists", "Complete lists of a resource kind, by why: initial, "
            "resync (periodic), expired (410 Gone), error (a watch ERROR event).",
            labels=["resource", "reason"])
        errors = CounterMetricFamily(
            "xdplb_kube_request_errors", "Failed list or watch requests (connection errors, "
            "HTTP errors), each retried with backoff.", labels=["resource"])
        events = CounterMetricFamily(
            "xdplb_kube_watch_events", "Watch events received (bookmarks included).",
            labels=["resource"])
        objects = GaugeMetricFamily(
            "xdplb_kube_objects", "Objects held from the API server.", labels=["resource"])
        for kind, c in sorted(self.source.stats().items()):
            for why, n in sorted(c.relists.items()):
                relists.add_metric([kind, why], n)
            errors.add_metric([kind], c.errors)
            events.add_metric([kind], c.events)
        for kind, n in sorted(self.source.sizes().items()):
            objects.add_metric([kind], n)
        return [relists, errors, events, objects]


# --- health ------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


class Health:
    def __init__(self, stuck_after: float = STUCK_AFTER) -> None:
        self.stuck_after = stuck_after
        self.datapath_loaded = False
        self.last_loop = time.monotonic()
        self.last_loop_wall = time.time()
        self.last_sync_wall: float | None = None
        # False while this node is being deleted (see model.Node.eligible).
        self.node_eligible = True

    def tick(self) -> None:
        self.last_loop = time.monotonic()
        self.last_loop_wall = time.time()

    def _alive(self, stalled: float) -> bool:
        """The datapath is loaded and the loop turns (last turned `stalled`
        seconds ago)."""
        return self.datapath_loaded and stalled <= self.stuck_after

    def healthz(self) -> tuple[int, dict[str, Any]]:
        stalled = time.monotonic() - self.last_loop
        ok = self._alive(stalled)
        return (200 if ok else 503), {
            # kube-proxy's healthz fields: when the rules were last updated,
            # and now.
            "lastUpdated": _iso(self.last_sync_wall),
            "currentTime": _iso(time.time()),
            "datapathLoaded": self.datapath_loaded,
            "loopLastSeen": _iso(self.last_loop_wall),
            "loopStalledSeconds": round(stalled, 3),
        }

    def proxy_health(self, with_node: bool) -> tuple[int, dict[str, Any]]:
        """kube-proxy's answer: healthy while updates are applied (here: the
        datapath is loaded and the loop turns); "lastUpdated" then reads now,
        as kube-proxy keeps it for older probes."""
        healthy = self._alive(time.monotonic() - self.last_loop)
        now = time.time()
        doc: dict[str, Any] = {
            "lastUpdated": _iso(now if healthy else self.last_sync_wall),
            "currentTime": _iso(now),
            "healthy": healthy,
        }
        if with_node:
            doc["nodeEligible"] = self.node_eligible
            healthy = healthy and self.node_eligible
        return (200 if healthy else 503), doc

    def readyz(self) -> tuple[int, dict[str, Any]]:
        ok = self.last_sync_wall is not None
        return (200 if ok else 503), {"lastUpdated": _iso(self.last_sync_wall),
                                      "currentTime": _iso(time.time())}


# --- the metrics the agent sets ----------------------------------------------------


class Metrics:
    def __init__(self, stuck_after: float = STUCK_AFTER) -> None:
        self.registry = CollectorRegistry()
        self.health = Health(stuck_after)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.sync_duration = Histogram(
            "xdplb_sync_duration_seconds", "How long a sync of the maps took (desired state "
            "and map writes), like kubeproxy_sync_proxy_rules_duration_seconds.",
            buckets=SYNC_BUCKETS, registry=r)
        self.last_sync = Gauge(
            "xdplb_sync_last_timestamp_seconds", "When the maps were last synced "
            "successfully (Unix time).", registry=r)
        self.sync_errors = Counter(
            "xdplb_sync_errors", "Sync errors: frontends that could not be programmed "
            "(type=frontend) and syncs that failed outright (type=exception).",
            ["type"], registry=r)
        self.services = Gauge("xdplb_services_programmed",
                              "Services with at least one frontend in the maps.", registry=r)
        self.frontends = Gauge("xdplb_frontends_programmed", "Frontends (address, port, "
                               "protocol, scope) in the service map.", registry=r)
        self.backends = Gauge("xdplb_backends_programmed",
                              "Entries in the backend map.", registry=r)
        self.desired_drift = Counter(
            "xdplb_desired_state_drift", "Frontend entries the incremental desired state "
            "had wrong, found by the periodic full recompute (--incremental-check-period); "
            "anything but 0 is a bug", registry=r)
        self.policy_drift = Counter(
            "xdplb_policy_drift", "Policy map entries a compile that reused the previous "
            "one's rules had wrong, found by the periodic whole compile "
            "(--incremental-check-period); anything but 0 is a bug", registry=r)
        self.frontend_changes = Counter("xdplb_frontend_changes", "Frontends written by "
                                        "syncs, by operation.", ["op"], registry=r)
        self.refused_total = Counter(
            "xdplb_objects_refused", "Objects refused as malformed (each version of an "
            "object counted once); they are logged and skipped.", registry=r)
        self.map_refusals = Gauge(
            "xdplb_map_refusals", "Objects the last sync refused because a map (or its id "
            "space) had no room; each is logged, and what the map held before stays "
            "programmed.", ["map"], registry=r)
        for name in BOUNDED_MAPS:
            self.map_refusals.labels(name)
        self.invalid = Gauge("xdplb_objects_invalid", "Objects skipped as malformed in the "
                             "current state of the source.", registry=r)
        self.failed_closed = Gauge(
            "xdplb_policies_failed_closed", "NetworkPolicies that could not be read: each "
            "isolates what it selects, with no rule, until it is fixed.", registry=r)
        self.programming = Histogram(
            "xdplb_network_programming_duration_seconds", "From an EndpointSlice change "
            "(its endpoints.kubernetes.io/last-change-trigger-time annotation, else the "
            "watch event's arrival) to the maps holding it, like kube-proxy's "
            "network_programming_duration_seconds.", buckets=PROGRAMMING_BUCKETS, registry=r)
        for t in ("frontend", "exception"):
            self.sync_errors.labels(t)
        for op in ("added", "updated", "removed"):
            self.frontend_changes.labels(op)
        self._refused: set[str] = set()
        self._datapath: DatapathCollector | None = None

    # -- hooks --------------------------------------------------------------------

    def datapath_loaded(self, pin_dir: Path) -> None:
        self._datapath = DatapathCollector(pin_dir)
        self.registry.register(self._datapath)
        self.health.datapath_loaded = True
        # A slow compile is not a stuck loop: count from here.
        self.health.tick()

    def watch_source(self, source: KubeStats) -> None:
        self.registry.register(SourceCollector(source))

    def tick(self) -> None:
        self.health.tick()

    def synced(self, seconds: float, res: SyncResult, reconciler: Reconciler) -> None:
        self.sync_duration.observe(seconds)
        if res.refusals:
            self.sync_errors.labels("frontend").inc(len(res.refusals))
        full = collections.Counter(r.map_name for r in res.refusals if r.map_name)
        for name in {*BOUNDED_MAPS, *full}:
            self.map_refusals.labels(name).set(full.get(name, 0))
        applied = reconciler.applied
        self.frontends.set(len(applied))
        self.services.set(len(reconciler.service_users))
        self.backends.set(len(reconciler.backends))
        for op, n in (("added", res.added), ("updated", res.updated),
                      ("removed", res.removed)):
            if n:
                self.frontend_changes.labels(op).inc(n)
        now = time.time()
        self.last_sync.set(now)
        self.health.last_sync_wall = now

    def sync_failed(self, seconds: float) -> None:
        self.sync_duration.observe(seconds)
        self.sync_errors.labels("exception").inc()

    def programmed(self, triggers: Iterable[float], now: float | None = None) -> None:
        """EndpointSlice changes (Unix times) that the maps now hold."""
        now = time.time() if now is None else now
        for t in triggers:
            self.programming.observe(max(0.0, now - t))

    def policies_read(self, cluster: Cluster) -> None:
        self.failed_closed.set(sum(1 for p in cluster.policies.values() if p.broken))

    def refused(self, errors: Sequence[Exception]) -> None:
        current = {str(e) for e in errors}
        self.refused_total.inc(len(current - self._refused))
        self.invalid.set(len(current))
        self._refused = current

    def close(self) -> None:
        if self._datapath is not None:
            self._datapath.close()


# --- the HTTP server -----------------------------------------------------------------


def parse_addr(value: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT or :PORT (all addresses)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


# A route answers (status, body, content type).
Route = Callable[[], tuple[int, bytes, str]]
JSON = "application/json"


def _json(code: int, doc: Mapping[str, Any]) -> tuple[int, bytes, str]:
    return code, json.dumps(doc).encode(), JSON


def metrics_routes(metrics: Metrics) -> dict[str, Route]:
    """The metrics port (kube-proxy's 10249): /metrics, the agent's own
    /healthz and /readyz, and /proxyMode as kube-proxy has it
    (cmd/kube-proxy/app/server.go)."""

    def scrape() -> tuple[int, bytes, str]:
        try:
            return 200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST
        except Exception as e:
            log.error("metrics scrape failed: %s", e)
            return 500, f"scrape failed: {e}\n".encode(), "text/plain"

    return {
        "/metrics": scrape,
        "/healthz": lambda: _json(*metrics.health.healthz()),
        "/readyz": lambda: _json(*metrics.health.readyz()),
        "/proxyMode": lambda: (200, PROXY_MODE.encode(), "text/plain; charset=utf-8"),
    }


def proxy_health_routes(metrics: Metrics) -> dict[str, Route]:
    """kube-proxy's healthz port (10256), which cloud load balancers probe:
    /healthz also fails while the node is being deleted, /livez does not
    (pkg/proxy/healthcheck/proxy_health.go)."""
    return {
        "/healthz": lambda: _json(*metrics.health.proxy_health(with_node=True)),
        "/livez": lambda: _json(*metrics.health.proxy_health(with_node=False)),
    }


class MetricsServer:
    """An HTTP listener over a route table, in a thread of its own."""

    def __init__(self, metrics: Metrics, addr: str,
                 routes: Mapping[str, Route] | None = None) -> None:
        self.metrics = metrics
        self.routes = dict(routes if routes is not None else metrics_routes(metrics))
        host, port = parse_addr(addr)
        self.server = http_server(host, port, self._handler())
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        name=f"http-{self.port}", daemon=True)
        self._thread.start()
        log.info("serving %s on %s:%d", ", ".join(sorted(self.routes)), host, self.port)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        routes = self.routes
        known = ", ".join(sorted(routes))

        class Handler(BaseHTTPRequestHandler):
            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self._send(404, f"not found: try {known}\n".encode(), "text/plain")
                    return
                self._send(*route())

            do_HEAD = do_GET

            def log_message(self, fmt: str, *args: Any) -> None:
                pass  # scrapes and probes every few seconds would flood the log

        return Handler

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
