"""Network programming latency end to end, next to the real kube-proxy binary.

A real API server (etcd and kube-apiserver of tools/k8s-build.sh, on loopback) holds N
ClusterIP services with 10 endpoints each (`bench.workload`'s fillers as Service and
EndpointSlice objects, the slices written here as a controller would write them). One
proxy at a time watches it from a fresh lab node, each at its defaults: this project's
agent (`lbctl run --kubernetes`), then kube-proxy of the same Kubernetes release in
nftables mode and in iptables mode (iptables-nft, Debian's iptables). Each proxy first
programs everything (timed from its start to the last service's last endpoint being
served; ours programs its maps before it attaches its programs, so its time also runs to
its log saying "ready", everything attached), then takes CHANGES changes, one at a time:
one endpoint of one service replaced by a fresh address, as one merge patch of the
service's EndpointSlice that also sets
`endpoints.kubernetes.io/last-change-trigger-time` to the moment of writing (what the
EndpointSlice controller sets, and what both proxies' network-programming histograms
start from). A change is timed from just before the write to the middle of the first
poll that shows the datapath serving the new endpoint:

- ours: the service's Maglev slots, read from the pinned maps every millisecond, name a
  backend with the new address;
- kube-proxy nftables: `nft list chain ip kube-proxy service-<hash>-<ns>/<name>/tcp/<port>`
  jumps to the endpoint's chain;
- kube-proxy iptables: `iptables -t nat -S KUBE-SVC-<hash>` jumps to the endpoint's
  KUBE-SEP chain.

Chain names follow kube-proxy's own (pkg/proxy/nftables/proxier.go hashAndTruncate and
servicePortChainNameBase; pkg/proxy/iptables/proxier.go portProtoHash). A listing costs
tens of milliseconds or more (reported with each row); a pause between listings leaves
kube-proxy a core of its own. Each change is written GAP seconds after the previous one
was served: longer than kube-proxy's default minSyncPeriod (1 s, counted from the end of
a sync: pkg/proxy/runner/bounded_frequency_runner.go), so no change waits for a rate
limit and every row measures one change alone. The proxies' own histograms (kube-proxy's
kubeproxy_network_programming_duration_seconds and kubeproxy_sync_proxy_rules_duration_seconds,
ours xdplb_network_programming_duration_seconds and xdplb_sync_duration_seconds) are
scraped after every change: the programming histogram's sum moved by exactly what the
proxy observed for that change.

Our agent starts with an empty object cache (`--object-cache`, loader/objects.py), so its
first sync includes BCC's compile, as on a node's first start. After its changes it is
started once more, as a restarted agent is: a new instance (no pinned maps) with the
programs the first start kept; only that start's first sync is timed ("restart").
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import workload
from bench.common import REPO, BenchError, Mode, log, write_result
from lab import processes

NAME = "programming"
SIZES = (1_000, 10_000)
QUICK_SIZES = (100,)
ENDPOINTS = 10
CHANGES = 200
QUICK_CHANGES = 5
# kube-proxy's default minSyncPeriod is 1 s (pkg/proxy/apis/config/v1alpha1/defaults.go).
GAP = 1.1
CHANGE_TIMEOUT = 30.0
# kube-proxy's iptables mode on iptables-nft takes minutes at 10k services
# (bench/NOTES.md: iptables-restore of 3k services took about 190 s).
FIRST_TIMEOUT = 240.0
# Changes stop being written after this long per proxy (kube-proxy's syncs at 10k take
# seconds each): the row says how many it took.
CHANGE_BUDGET = 300.0
LISTING_TIMEOUT = 30.0
PROXIES = ("xdplb", "kube-proxy nftables", "kube-proxy iptables")
TRIGGER = "endpoints.kubernetes.io/last-change-trigger-time"
WRITERS = 8
KUBE_PROXY_METRICS = 10249


# -- the API server ------------------------------------------------------------------------

class Api:
    """Raw JSON over one keep-alive HTTPS connection per thread (bearer token)."""

    def __init__(self, port: int, token: str, ca_file: Path) -> None:
        self.port = port
        self._auth = f"Bearer {token}"
        self._ctx = ssl.create_default_context(cafile=str(ca_file))
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self._ctx,
                                               timeout=60)
            self._local.conn = conn
        return conn

    def call(self, method: str, path: str, body: Any = None,
             content_type: str = "application/json") -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": self._auth, "Accept": "application/json",
                   "Content-Type": content_type}
        for attempt in (1, 2):
            conn = self._conn()
            try:
                conn.request(method, path, data, headers)
                resp = conn.getresponse()
                text = resp.read()
                break
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
        if resp.status >= 300 and not (resp.status == 409 and method == "POST"):
            raise BenchError(f"{method} {path}: {resp.status} {text[:300]!r}")
        return json.loads(text) if text else None


def rfc3339(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(
        timespec="microseconds").replace("+00:00", "Z")


def set_node(api: Api, node: str, node_ip: str) -> None:
    """The Node object kube-proxy reads its addresses from (no kubelet behind it)."""
    api.call("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                       "metadata": {"name": node}})
    api.call("PATCH", f"/api/v1/nodes/{node}/status",
             {"status": {"addresses": [{"type": "InternalIP", "address": node_ip},
                                       {"type": "Hostname", "address": node}]}},
             "application/merge-patch+json")


def populate(api: Api, specs: Sequence[workload.SvcSpec]) -> float:
    """The namespace and every Service and EndpointSlice; returns the seconds taken."""
    started = time.perf_counter()
    api.call("POST", "/api/v1/namespaces",
             {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": workload.NAMESPACE}})
    ns = workload.NAMESPACE

    def write(spec: workload.SvcSpec) -> None:
        api.call("POST", f"/api/v1/namespaces/{ns}/services", workload.service_object(spec))
        api.call("POST", f"/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices",
                 workload.slice_object(spec))

    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in pool.map(write, specs):
            pass
    return time.perf_counter() - started


def change(api: Api, spec: workload.SvcSpec) -> float:
    """Write the service's endpoints as `spec` has them; returns when the write began
    (monotonic)."""
    written = time.time()
    began = time.monotonic()
    api.call("PATCH", f"/apis/discovery.k8s.io/v1/namespaces/{spec.namespace}/endpointslices/"
             f"{spec.name}-1",
             {"metadata": {"annotations": {TRIGGER: rfc3339(written)}},
              "endpoints": workload.slice_endpoints(spec)},
             "application/merge-patch+json")
    return began


class Forward:
    """127.0.0.1:<port> inside a node namespace, forwarded to the API server on the
    machine's loopback: kube-proxy runs in the node namespace and knows the API server
    by one address only. The listener is made by a thread inside the namespace
    (lb.datapath.netns); every other socket lives here."""

    def __init__(self, netns: str, target: int) -> None:
        from lb.datapath.netns import call_in

        self.target = target
        self._listener = call_in(netns, self._listen)
        self.port = int(self._listener.getsockname()[1])
        # The sockets of connections still open; a pair leaves once both ways ended.
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="forward").start()

    @staticmethod
    def _listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        return s

    def _accept(self) -> None:
        while not self._stop:
            try:
                inner, _ = self._listener.accept()
            except OSError:
                return
            try:
                outer = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                inner.close()
                continue
            with self._lock:
                self._open |= {inner, outer}
            ended = [0]  # directions of this pair that have ended
            for a, b in ((inner, outer), (outer, inner)):
                threading.Thread(target=self._pump, args=(a, b, ended), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, ended: list[int]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            ended[0] += 1
            if ended[0] == 2:
                for s in (src, dst):
                    s.close()
                    self._open.discard(s)

    def close(self) -> None:
        self._stop = True
        self._listener.close()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.close()
            self._open.clear()


# -- what each proxy programmed ------------------------------------------------------------

def _kube_hash(text: str, length: int) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:length]


def nft_service_chain(spec: workload.SvcSpec) -> str:
    """kube-proxy nftables: servicePortChainNameBase with its hashAndTruncate."""
    base = f"{spec.namespace}/{spec.name}/{spec.protocol.lower()}/{spec.port_name}"
    return f"service-{_kube_hash(base, 8)}-{base}"


def iptables_service_chain(spec: workload.SvcSpec) -> str:
    """kube-proxy iptables: KUBE-SVC- and portProtoHash(ServicePortName, protocol)."""
    return "KUBE-SVC-" + _kube_hash(spec.port_key + spec.protocol.lower(), 16)


def iptables_endpoint_chain(spec: workload.SvcSpec, ip: str) -> str:
    return "KUBE-SEP-" + _kube_hash(f"{spec.port_key}{spec.protocol.lower()}"
                                    f"{ip}:{spec.target_port}", 16)


class Probe:
    """Whether a proxy serves `ip` as an endpoint of `spec`, and what a look costs."""

    interval = 0.0

    def serves(self, spec: workload.SvcSpec, ip: str) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        pass


class MapsProbe(Probe):
    """The pinned maps: frontend -> Maglev range -> backend ids -> addresses."""

    interval = 0.001

    def __init__(self, instance: str) -> None:
        from lb.datapath.instance import pin_dir_of
        from loader.maps import BpfMap

        pins = pin_dir_of(instance)
        self._maps = {n: BpfMap.open_pinned(pins, n)
                      for n in ("lb_services", "lb_maglev", "lb_backends")}

    def serves(self, spec: workload.SvcSpec, ip: str) -> bool:
        from lb.encoding import ip_be, port_be
        from lb.service.desired import SCOPE_INTERNAL, Frontend
        from lb.service.reconcile import svc_key

        v = self._maps["lb_services"].lookup(
            svc_key(Frontend(spec.cluster_ip, spec.port, socket.IPPROTO_TCP, SCOPE_INTERNAL)))
        if v is None or not v.maglev_size:
            return False
        slots = array("I", self._maps["lb_maglev"].read_array(v.maglev_off, v.maglev_size))
        want = (ip_be(ip), port_be(spec.target_port))
        for bid in set(slots):
            b = self._maps["lb_backends"].lookup(bid)
            if b is not None and (b.addr, b.port) == want:
                return True
        return False

    def close(self) -> None:
        for m in self._maps.values():
            m.close()


class RulesProbe(Probe):
    """A listing of one chain, in the node's namespace. A pause between listings
    leaves kube-proxy a core of its own on two."""

    interval = 0.05

    def __init__(self, netns: str, mode: str) -> None:
        self.netns = netns
        self.mode = mode

    def _listing(self, spec: workload.SvcSpec) -> list[str]:
        if self.mode == "nftables":
            return ["nft", "list", "chain", "ip", "kube-proxy", nft_service_chain(spec)]
        return ["iptables", "-w", "-t", "nat", "-S", iptables_service_chain(spec)]

    def _needle(self, spec: workload.SvcSpec, ip: str) -> str:
        if self.mode == "nftables":
            return f"__{ip}/{spec.target_port}"
        return iptables_endpoint_chain(spec, ip)

    def serves(self, spec: workload.SvcSpec, ip: str) -> bool:
        try:
            res = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", "--",
                                  *self._listing(spec)], capture_output=True, text=True,
                                 timeout=LISTING_TIMEOUT,
                                 env={**os.environ, "XTABLES_LOCKFILE": _LOCK})
        except subprocess.TimeoutExpired:
            return False  # kube-proxy's first transaction at 10k holds listings for minutes
        return res.returncode == 0 and self._needle(spec, ip) in res.stdout


_LOCK = str(Path(tempfile.gettempdir()) / f"xdplb-bench-xtables-{os.getpid()}.lock")


def wait_served(probe: Probe, spec: workload.SvcSpec, ip: str, timeout: float,
                polls: list[float], alive: Callable[[], None]) -> float | None:
    """When (monotonic) the first poll showing `ip` served looked, or None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        began = time.monotonic()
        seen = probe.serves(spec, ip)
        ended = time.monotonic()
        polls.append(ended - began)
        if seen:
            return (began + ended) / 2
        if ended > deadline:
            return None
        alive()
        if probe.interval:
            time.sleep(probe.interval)


# -- metrics --------------------------------------------------------------------------------

def histograms(text: str, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """name -> {le bound or "count"/"sum" -> value}, summed over labels."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for fam in text_string_to_metric_families(text):
        if fam.name not in out:
            continue
        h = out[fam.name]
        for s in fam.samples:
            if s.name.endswith("_bucket"):
                key = s.labels["le"]
            elif s.name.endswith("_count"):
                key = "count"
            elif s.name.endswith("_sum"):
                key = "sum"
            else:
                continue
            h[key] = h.get(key, 0.0) + s.value
    return out


def histogram_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Observations between two scrapes: count, mean, and the bucket bounds holding the
    median and the 99th percentile."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = diff.get("count", 0.0)
    bounds = sorted((float(k), v) for k, v in diff.items() if k not in ("count", "sum"))

    def bound(q: float) -> float | None:
        for le, cum in bounds:
            if cum >= q * count:
                return le
        return None

    return {"count": int(count),
            "mean_ms": diff.get("sum", 0.0) / count * 1000 if count else None,
            "p50_le_ms": (b * 1000 if (b := bound(0.5)) is not None else None) if count else None,
            "p99_le_ms": (b * 1000 if (b := bound(0.99)) is not None else None) if count else None}


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- the proxies ---------------------------------------------------------------------------

@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    probe: Probe
    scrape: Callable[[], str]
    metrics: tuple[str, str]  # network programming, sync duration
    log: Path
    # Whether the maps being right means being served: our agent programs
    # its maps before it attaches its programs (kube-proxy's rules act
    # once written).
    attaches: bool = False

    def alive(self) -> None:
        _alive(self.proc, self.log)

    def served_from(self, seen: float) -> float:
        """When (monotonic) the datapath served what the maps showed at
        `seen`: for our agent, not before it logged that everything is
        attached ("ready")."""
        if not self.attaches:
            return seen
        deadline = time.monotonic() + FIRST_TIMEOUT
        while (ready := _logged(self.log, READY)) is None:
            if time.monotonic() > deadline:
                raise BenchError(f"the agent served its maps but never logged {READY!r}")
            self.alive()
            time.sleep(0.01)
        return max(seen, ready)


READY = "INFO ready"


def _logged(path: Path, line: str) -> float | None:
    """When (monotonic) the agent logged `line` (its log's local time, to the ms)."""
    for text in path.read_text(errors="replace").splitlines():
        if text.endswith(line):
            stamp = dt.datetime.strptime(text[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return stamp - (time.time() - time.monotonic())
    return None


def _alive(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Raise, with the end of its log, if the proxy has exited."""
    if proc.poll() is not None:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise BenchError(f"the proxy exited ({proc.returncode}):\n" + "\n".join(tail))


def _maps_sizes(services: int) -> list[str]:
    from lb.service.maglev import table_size

    def pow2(n: float, floor: int) -> int:
        return 1 << max(floor, (int(n) - 1).bit_length())

    needed = (services + CHANGES) * table_size(ENDPOINTS)
    return ["--max-services", str(pow2(services * 1.2, 12)),
            "--max-backends", str(pow2((services * ENDPOINTS + CHANGES) * 1.2, 14)),
            "--maglev-slots", str(pow2(needed, 20)), "--conntrack-size", "65536"]


@contextlib.contextmanager
def run_ours(topo: Any, node_name: str, kubeconfig: Path, services: int,
             workdir: Path, objects: Path) -> Iterator[Running]:
    import urllib.request

    from bench.common import unique
    from tests.cluster.controlplane import free_ports

    node = topo.node
    instance = unique("prog")
    port = free_ports(1)[0]
    log_path = workdir / "xdplb.log"
    argv = [sys.executable, "-m", "lb.cli", "run", "--kubernetes", "--kubeconfig",
            str(kubeconfig), "--netns", node.ns, "--node-name", node_name, "--node-ip", node.ip,
            "--iface", node.iface, "--instance", instance, "--service-cidr",
            workload.SERVICE_CIDR, "--metrics-addr", f"127.0.0.1:{port}",
            "--object-cache", str(objects), *_maps_sizes(services)]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                cwd=REPO)
    probe: Probe | None = None
    try:
        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                return str(r.read().decode())

        # The maps exist once the programs are loaded and pinned.
        deadline = time.monotonic() + 120
        while probe is None:
            _alive(proc, log_path)
            try:
                probe = MapsProbe(instance)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield Running(proc, probe, scrape, ("xdplb_network_programming_duration_seconds",
                                            "xdplb_sync_duration_seconds"), log_path,
                      attaches=True)
    finally:
        if probe is not None:
            probe.close()
        processes.stop(proc, 20)
        subprocess.run([sys.executable, "-m", "lb.cli", "down", "--instance", instance],
                       capture_output=True, check=False, timeout=60, cwd=REPO)


@contextlib.contextmanager
def run_kube_proxy(topo: Any, node_name: str, mode: str, kubeconfig: Path, bin_dir: Path,
                   workdir: Path) -> Iterator[Running]:
    from lb.datapath.netns import call_in

    node = topo.node
    config = workdir / f"kube-proxy-{mode}.yaml"
    # The conntrack sysctls are the machine's (nf_conntrack_max is global): leave them.
    config.write_text(f"""apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: {mode}
hostnameOverride: {node_name}
clientConnection: {{kubeconfig: {kubeconfig}}}
metricsBindAddress: 127.0.0.1:{KUBE_PROXY_METRICS}
healthzBindAddress: 127.0.0.1:10256
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
""")
    log_path = workdir / f"kube-proxy-{mode}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(["nsenter", f"--net=/run/netns/{node.ns}", "--",
                                 str(bin_dir / "kube-proxy"), f"--config={config}", "--v=1"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env={**os.environ, "XTABLES_LOCKFILE": _LOCK})
    try:
        def scrape() -> str:
            import urllib.request

            def get() -> str:
                url = f"http://127.0.0.1:{KUBE_PROXY_METRICS}/metrics"
                with urllib.request.urlopen(url, timeout=10) as r:
                    return str(r.read().decode())

            return call_in(node.ns, get)

        yield Running(proc, RulesProbe(node.ns, mode), scrape,
                      ("kubeproxy_network_programming_duration_seconds",
                       "kubeproxy_sync_proxy_rules_duration_seconds"), log_path)
    finally:
        processes.stop(proc, 20)


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(running: Running, api: Api, specs: list[workload.SvcSpec], changes: int,
            started: float) -> dict[str, Any]:
    """First programming, then `changes` changes; `specs` is updated as they are made."""
    polls: list[float] = []
    last = specs[-1]
    first = wait_served(running.probe, last, last.endpoints[-1], FIRST_TIMEOUT, polls,
                        running.alive)
    if first is None:
        return {"first_sync_seconds": None, "changes": 0, "missed": 0, "latency_ms": None,
                "poll_ms": statistics.median(polls) * 1000 if polls else None,
                "own_ms": None, "own_programming": None, "own_sync": None,
                "cpu_seconds_per_change": None, "rss_mib": _proc_rss_mib(running.proc.pid),
                "skipped": f"not programmed within {FIRST_TIMEOUT:.0f} s"}
    first_seconds = running.served_from(first) - started
    time.sleep(GAP)
    names = running.metrics
    before = histograms(running.scrape(), names)
    cpu_before = _proc_cpu(running.proc.pid)
    polls.clear()
    latencies: list[float] = []
    own: list[float] = []  # each change as the proxy's own histogram saw it
    mark = before[names[0]]
    missed = 0
    n = len(specs)
    budget_ends = time.monotonic() + CHANGE_BUDGET
    done = 0
    for k in range(changes):
        if time.monotonic() > budget_ends:
            break
        done += 1
        i = (k * 7919) % n
        specs[i] = workload.with_endpoint_replaced(specs[i], k % ENDPOINTS, k + 1)
        fresh = specs[i].endpoints[k % ENDPOINTS]
        began = change(api, specs[i])
        seen = wait_served(running.probe, specs[i], fresh, CHANGE_TIMEOUT, polls, running.alive)
        if seen is None:
            missed += 1
        else:
            latencies.append(max(0.0, seen - began))
        time.sleep(GAP)
        # The change's sync is over: the histogram's sum moved by what it observed.
        now = histograms(running.scrape(), names[:1])[names[0]]
        count = now.get("count", 0.0) - mark.get("count", 0.0)
        if count:
            own.append((now.get("sum", 0.0) - mark.get("sum", 0.0)) / count * 1000)
        mark = now
    cpu = _proc_cpu(running.proc.pid) - cpu_before
    after = histograms(running.scrape(), names)
    ms = [v * 1000 for v in latencies]
    return {
        "first_sync_seconds": first_seconds,
        "changes": done, "missed": missed,
        "latency_ms": {"p50": _quantile(ms, 0.5), "p90": _quantile(ms, 0.9),
                       "p99": _quantile(ms, 0.99), "max": max(ms),
                       "mean": statistics.fmean(ms)} if ms else None,
        "poll_ms": statistics.median(polls) * 1000 if polls else None,
        "own_programming": histogram_summary(before[names[0]], after[names[0]]),
        "own_ms": {"p50": _quantile(own, 0.5), "p99": _quantile(own, 0.99),
                   "changes": len(own)} if own else None,
        "own_sync": histogram_summary(before[names[1]], after[names[1]]),
        "cpu_seconds_per_change": cpu / done if done else None,
        "rss_mib": _proc_rss_mib(running.proc.pid),
    }


def restart(topo: Any, node_name: str, kubeconfig: Path, services: int, workdir: Path,
            objects: Path, specs: list[workload.SvcSpec]) -> float | None:
    """Our agent started again with the programs its first start kept: seconds from
    its start to serving what the API holds (`specs`, as changed)."""
    started = time.monotonic()
    with run_ours(topo, node_name, kubeconfig, services, workdir, objects) as running:
        last = specs[-1]
        seen = wait_served(running.probe, last, last.endpoints[-1], FIRST_TIMEOUT, [],
                           running.alive)
        if "loaded the kept programs" not in running.log.read_text():
            raise BenchError("the restarted agent compiled: no programs were kept")
        return None if seen is None else running.served_from(seen) - started


def run(mode: Mode, sizes: Sequence[int] | None = None, changes: int | None = None,
        proxies: Sequence[str] = PROXIES) -> dict[str, Any]:
    from lab.topology import Topology, TopologySpec
    from tests.cluster.controlplane import ControlPlane

    sizes = tuple(sizes or (QUICK_SIZES if mode.quick else SIZES))
    changes = changes if changes is not None else (QUICK_CHANGES if mode.quick else CHANGES)
    rows: list[dict[str, Any]] = []
    for services in sizes:
        specs0 = workload.fillers(services, ENDPOINTS)
        # Only what kube-proxy and the agent need: no controller writes these objects.
        with ControlPlane(controllers=("serviceaccount-controller",)) as cp, \
                tempfile.TemporaryDirectory(prefix="xdplb-prog-") as tmp:
            api = Api(cp.apiserver_port, cp.token, cp.ca_file)
            node_name = "bench-node"
            wrote = None
            for proxy in proxies:
                with Topology.build(TopologySpec.single(pods=1)) as topo:
                    if wrote is None:
                        wrote = populate(api, specs0)
                        log(f"{NAME}: {services:,} services written in {wrote:.1f} s")
                    set_node(api, node_name, topo.node.ip)
                    specs = list(specs0)
                    workdir = Path(tmp)
                    started = time.monotonic()
                    objects = workdir / "objects"  # empty: the first start compiles
                    if proxy == "xdplb":
                        ctx = run_ours(topo, node_name, cp.kubeconfig, services, workdir,
                                       objects)
                    else:
                        fwd = Forward(topo.node.ns, cp.apiserver_port)
                        kubeconfig = workdir / "kube-proxy.kubeconfig"
                        kubeconfig.write_text(cp.kubeconfig.read_text().replace(
                            f":{cp.apiserver_port}", f":{fwd.port}"))
                        ctx = run_kube_proxy(topo, node_name, proxy.split()[-1], kubeconfig,
                                             cp.bin_dir, workdir)
                    try:
                        with ctx as running:
                            row = {"proxy": proxy, "services": services,
                                   **measure(running, api, specs, changes, started)}
                        if proxy == "xdplb":
                            try:
                                row["restart_first_sync_seconds"] = restart(
                                    topo, node_name, cp.kubeconfig, services, workdir,
                                    objects, specs)
                            except (BenchError, OSError, subprocess.SubprocessError) as e:
                                # The first start's row stands without it.
                                log(f"{NAME}: xdplb restart at {services:,} failed: {e}")
                    except (BenchError, OSError, subprocess.SubprocessError) as e:
                        # One proxy's failure is its row; the others still run.
                        row = {"proxy": proxy, "services": services, "changes": 0,
                               "missed": 0, "latency_ms": None, "skipped": f"failed: {e}"}
                    finally:
                        if proxy != "xdplb":
                            fwd.close()
                    lat = row["latency_ms"]
                    again = row.get("restart_first_sync_seconds")
                    log(f"{NAME}: {proxy} at {services:,}: " + (row.get("skipped") or
                        f"first sync {row['first_sync_seconds']:.2f} s"
                        + (f" (restart {again:.2f} s)" if again is not None else "")
                        + ", change p50/p99 "
                        f"{lat['p50']:.1f}/{lat['p99']:.1f} ms, missed {row['missed']}"))
                    rows.append(row)
                    # Back to the objects as written, for the next proxy.
                    for k in range(changes):
                        i = (k * 7919) % services
                        if specs[i] != specs0[i]:
                            change(api, specs0[i])
                            specs[i] = specs0[i]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_LOCK)
    return {"endpoints_per_service": ENDPOINTS, "changes": changes, "gap_seconds": GAP,
            "budget_seconds": CHANGE_BUDGET, "rows": rows}


def main(mode: Mode) -> dict[str, Any]:
    started = time.time()
    load = os.getloadavg()[0]
    if shutil.which("nft") is None or shutil.which("iptables") is None:
        raise BenchError("nft and iptables are needed for kube-proxy's modes")
    data = run(mode)
    write_result(NAME, mode, data, started, load)
    return data


# -- report ---------------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.1f}")


def markdown(doc: dict[str, Any]) -> list[str]:
    budget = doc.get("budget_seconds", CHANGE_BUDGET)
    out = ["## Network programming latency against the real kube-proxy", "",
           f"A real API server; one proxy at a time on a fresh lab node, each at its "
           f"defaults. {doc['changes']} changes, one at a time ({doc['gap_seconds']} s "
           f"apart; none begun after {budget:.0f} s of changes): one endpoint of one "
           f"service replaced by a merge patch of its EndpointSlice, timed from the write "
           f"to the datapath serving the new endpoint: our pinned maps read every "
           f"{MapsProbe.interval * 1000:.0f} ms, kube-proxy's chain listed with `nft` / "
           f"`iptables -S` with {RulesProbe.interval * 1000:.0f} ms between listings "
           f"(`poll`: what one look costs). `own metric`: each change as the proxy's own "
           f"network-programming histogram observed it (from the trigger-time annotation to "
           f"the end of its sync: the histogram's sum, scraped after every change); `sync`: "
           f"its sync-duration histogram over the changes (bucket bounds). `CPU/change`: the "
           f"proxy process's CPU time over the changes, per change. Our first sync "
           f"runs until the maps serve and the programs are attached, and "
           f"compiles the programs; `restart`: the first sync of a second start, with the "
           f"programs the first one kept.",
           "",
           "| services | proxy | first sync | p50 | p90 | p99 | max | changes (missed) | poll | "
           "own metric p50 / p99 | sync p50 / p99 | CPU/change | RSS |",
           "|" + "---|" * 13]
    for r in doc["rows"]:
        if r.get("skipped"):
            out.append(f"| {r['services']:,} | {r['proxy']} | {r['skipped']} |"
                       + " |" * 10)
            continue
        lat = r["latency_ms"] or {}
        own, sync = r.get("own_ms") or {}, r["own_sync"] or {}
        again = r.get("restart_first_sync_seconds")
        first = f"{r['first_sync_seconds']:.2f} s" + (
            f" (restart {again:.2f} s)" if again is not None else "")
        out.append(
            f"| {r['services']:,} | {r['proxy']} | {first} | "
            f"{_ms(lat.get('p50'))} ms | {_ms(lat.get('p90'))} ms | {_ms(lat.get('p99'))} ms | "
            f"{_ms(lat.get('max'))} ms | {r['changes']} ({r['missed']}) | {_ms(r['poll_ms'])} ms | "
            f"{_ms(own.get('p50'))} / {_ms(own.get('p99'))} ms | "
            f"<= {_ms(sync.get('p50_le_ms'))} / <= {_ms(sync.get('p99_le_ms'))} ms | "
            f"{_ms((r['cpu_seconds_per_change'] or 0) * 1000)} ms | {r['rss_mib']:.0f} MiB |")
    return out


P99_GOAL_MS = 100.0


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of the target table (report.Target's fields)."""
    out: list[dict[str, Any]] = []
    ours = {r["services"]: r for r in doc["rows"] if r["proxy"] == "xdplb"}
    r10 = ours.get(10_000)
    if r10 and r10["latency_ms"]:
        p99 = r10["latency_ms"]["p99"]
        out.append({"name": "network programming p99 at 10k services (API write -> maps)",
                    "goal": f"under {P99_GOAL_MS:.0f} ms", "measured": f"{_ms(p99)} ms",
                    "met": p99 < P99_GOAL_MS and not r10["missed"]})
    lost, total = [], 0
    for r in doc["rows"]:
        mine = ours.get(r["services"])
        if r["proxy"] == "xdplb" or not mine or not mine["latency_ms"]:
            continue
        if r.get("skipped"):
            total += 1  # it did not program them at all: ours did
            continue
        for key in ("p50", "p99"):
            total += 1
            if mine["latency_ms"][key] >= r["latency_ms"][key]:
                lost.append(f"{key} vs {r['proxy']} at {r['services']:,}")
        total += 1
        if mine["first_sync_seconds"] >= r["first_sync_seconds"]:
            lost.append(f"first sync vs {r['proxy']} at {r['services']:,}")
        again = mine.get("restart_first_sync_seconds")
        if again is not None:
            total += 1
            if again >= r["first_sync_seconds"]:
                lost.append(f"restart vs {r['proxy']} at {r['services']:,}")
    if total:
        out.append({"name": "network programming against the real kube-proxy",
                    "goal": "ahead on every row",
                    "measured": f"{total - len(lost)} of {total} rows"
                                + (f"; behind: {', '.join(lost)}" if lost else ""),
                    "met": not lost})
    return out


if __name__ == "__main__":
    print(json.dumps(main(Mode(quick="--quick" in sys.argv)), indent=1))
