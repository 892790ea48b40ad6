"""Build a fake Kubernetes node with pods and an outside client out of network namespaces.

Layout of a one-node topology (names carry a unique per-topology prefix ``lb-<pid>-<n>-<hex>``)::

    external ns                    node ns                              pod ns (one per pod)
    eth0 198.51.100.10/24  <-veth->  eth0 192.0.2.1/24
                                     lxc<pod> (ptp: /32 route)  <-veth->  eth0 10.244.1.N
                                     cni0 10.244.1.1/24 (bridge wiring, lxc* enslaved)

With more nodes, node A gets ``eth<i>`` towards node ``i`` (whose own device is ``eth0``),
routes to each node IP and pod CIDR, and every other node routes by default via node A.

Choices that matter for a BPF datapath:

* node namespaces: ``ip_forward=1``, ``rp_filter=0`` on all/default/every device (reverse NAT at
  tc ingress runs before routing), ``send_redirects=0`` (a pod DNATed to a pod behind the same
  device must not be told to go direct), bridge netfilter off where the kernel exposes it;
* pods reach their gateway through a PERMANENT neighbour entry, so a pod never ARPs for
  anything but peers on its own bridge, and never for a service VIP;
* TX checksum offload is off on both ends of every node-facing veth, so frames reaching an
  XDP program carry complete checksums it can update incrementally;
* GRO is on at the outside client's veth: XDP_TX into a veth needs NAPI at its peer;
* no device, address or route is ever created in the root namespace: veths are created from
  inside one namespace with the peer placed directly in the other;
* IPv6 is disabled in lab namespaces by default to keep router/neighbour solicitations out of
  packet counts.
"""

from __future__ import annotations

import atexit
import hashlib
import ipaddress
import itertools
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Protocol

from lab import processes

Wiring = Literal["ptp", "bridge"]
WIRINGS: tuple[Wiring, ...] = ("ptp", "bridge")

PTP_GATEWAY = "169.254.1.1"
DEFAULT_NODE_IP = "192.0.2.1"
DEFAULT_EXTERNAL_IP = "198.51.100.10"
DEFAULT_LB_RANGE = "203.0.113.0/24"
BRIDGE_NAME = "cni0"
POD_IFNAME = "eth0"

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_COUNTER = itertools.count()
# The repository root (parent of ``lb`` and ``lab``): lets ``python -m lab.servers`` import
# inside any namespace.
_SOURCE_ROOT = Path(__file__).resolve().parents[1]


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


class Place(Protocol):
    """Anything living in one namespace: a Node, a Pod or the External client."""

    @property
    def name(self) -> str: ...

    @property
    def ns(self) -> str: ...


NsRef = str | Place


# -- specs ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeSpec:
    """One node: its name, its IP on the node network, its pod CIDR and initial pod count."""

    name: str = "node"
    ip: str = DEFAULT_NODE_IP
    pod_cidr: str = "10.244.1.0/24"
    pods: int = 2


@dataclass(frozen=True)
class TopologySpec:
    """What to build. The first node is the one the external client is attached to."""

    nodes: tuple[NodeSpec, ...] = (NodeSpec(),)
    wiring: Wiring = "ptp"
    external_ip: str = DEFAULT_EXTERNAL_IP
    external_prefix: int = 24
    node_prefix: int = 24
    # Destinations the external client routes via the first node (LoadBalancer / external IPs).
    external_routes: tuple[str, ...] = (DEFAULT_LB_RANGE,)
    tx_checksum_off: bool = True
    ipv6: bool = False

    def __post_init__(self) -> None:
        if self.wiring not in WIRINGS:
            raise ValueError(f"wiring must be one of {WIRINGS}, not {self.wiring!r}")
        if not self.nodes:
            raise ValueError("at least one node is needed")
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique: {names}")
        node_net = ipaddress.ip_interface(f"{self.nodes[0].ip}/{self.node_prefix}").network
        ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for n in self.nodes:
            _check_name(n.name)
            if n.name == "external":
                raise ValueError("'external' is reserved for the outside client")
            ip = ipaddress.ip_address(n.ip)
            if ip not in node_net or ip in ips:
                raise ValueError(f"node IP {n.ip} must be unique and inside {node_net}")
            ips.add(ip)
            cidr = ipaddress.ip_network(n.pod_cidr)
            if cidr.prefixlen > 30 or cidr.overlaps(node_net) or \
                    any(cidr.overlaps(c) for c in cidrs):
                raise ValueError(f"pod CIDR {n.pod_cidr} too small or overlapping")
            cidrs.append(cidr)
            if n.pods < 0:
                raise ValueError("pod count must be >= 0")
        ext = ipaddress.ip_address(self.external_ip)
        if ext in node_net or any(ext in c for c in cidrs):
            raise ValueError(f"external IP {self.external_ip} overlaps node or pod networks")
        for r in self.external_routes:
            ipaddress.ip_network(r)

    # Other fields: dataclasses.replace(TopologySpec.single(...), external_ip=...).
    @classmethod
    def single(cls, pods: int = 2, wiring: Wiring = "ptp", node_ip: str = DEFAULT_NODE_IP,
               pod_cidr: str = "10.244.1.0/24") -> TopologySpec:
        """One node named ``node`` with ``pods`` pods."""
        return cls(nodes=(NodeSpec("node", node_ip, pod_cidr, pods),), wiring=wiring)

    @classmethod
    def two_nodes(cls, pods_per_node: int = 2, wiring: Wiring = "ptp") -> TopologySpec:
        """``node-a`` (192.0.2.1, 10.244.1.0/24) and ``node-b`` (192.0.2.2, 10.244.2.0/24)."""
        return cls(nodes=(NodeSpec("node-a", "192.0.2.1", "10.244.1.0/24", pods_per_node),
                          NodeSpec("node-b", "192.0.2.2", "10.244.2.0/24", pods_per_node)),
                   wiring=wiring)


# -- live objects --------------------------------------------------------------------------------

@dataclass(eq=False)
class Node:
    """A node namespace. ``ifaces`` are its node-facing devices (where XDP goes)."""

    name: str
    ns: str
    ip: str
    pod_cidr: str
    iface: str = "eth0"
    ifaces: list[str] = field(default_factory=list)
    bridge: str | None = None
    bridge_mac: str | None = None
    pods: list[Pod] = field(default_factory=list)
    _next_host: int = field(default=2, repr=False)


@dataclass(frozen=True, eq=False)
class Pod:
    """A pod namespace joined to ``node`` by the veth ``host_veth`` <-> ``eth0``."""

    name: str
    ns: str
    ip: str
    host_veth: str
    node: Node
    mac: str
    host_mac: str
    gateway: str
    gateway_mac: str
    ifname: str = POD_IFNAME


@dataclass(frozen=True)
class External:
    """The outside client namespace; ``gateway`` is the first node's IP."""

    name: str
    ns: str
    ip: str
    iface: str
    gateway: str


def _check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ValueError(f"invalid lab name {name!r}: use [a-z0-9-], at most 31 characters")


def _random_mac() -> str:
    # Locally administered, unicast.
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return ":".join(f"{b:02x}" for b in raw)


def _host_veth_name(pod_name: str) -> str:
    name = f"lxc{pod_name}"
    if len(name) <= 15:
        return name
    return "lxc" + hashlib.sha1(pod_name.encode()).hexdigest()[:12]


def _ns_name(ref: NsRef) -> str:
    return ref if isinstance(ref, str) else ref.ns


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    if extra:
        env.update(extra)
    return env


def _read_line(stream: IO[bytes], deadline: float) -> bytes:
    """Read one line from a pipe without blocking past ``deadline`` (b"" on EOF)."""
    fd = stream.fileno()
    buf = b""
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no ready line")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


# -- topology ------------------------------------------------------------------------------------

class Topology:
    """A set of namespaces built from a TopologySpec; a context manager that removes them all.

    Build it with ``Topology.build(spec)``; leaving the ``with`` block (or ``close()``) kills
    every process started through ``spawn``/``start_*`` and deletes every namespace created.
    """

    def __init__(self, spec: TopologySpec) -> None:
        self.spec = spec
        self.prefix = f"lb-{os.getpid()}-{next(_COUNTER)}-{secrets.token_hex(2)}"
        self.nodes: list[Node] = []
        self._pods: list[Pod] = []
        self._namespaces: list[str] = []
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._pod_counter = itertools.count()
        self._closed = False
        self.external = External(name="external", ns=f"{self.prefix}-external",
                                 ip=spec.external_ip, iface="eth0", gateway=spec.nodes[0].ip)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def build(cls, spec: TopologySpec | None = None) -> Topology:
        """Create everything; on any failure remove what was already made and re-raise."""
        topo = cls(spec or TopologySpec())
        atexit.register(topo.close)
        try:
            topo._build()
        except BaseException:
            topo.close()
            raise
        return topo

    def _build(self) -> None:
        spec = self.spec
        self._add_ns(self.external.ns)
        for i, ns_spec in enumerate(spec.nodes):
            node = Node(name=ns_spec.name, ns=f"{self.prefix}-{ns_spec.name}", ip=ns_spec.ip,
                        pod_cidr=ns_spec.pod_cidr)
            node.ifaces.append("eth0")
            if i == 0:
                node.ifaces += [f"eth{j}" for j in range(1, len(spec.nodes))]
            self._add_ns(node.ns)
            self.nodes.append(node)
            self._node_sysctls(node)

        first = self.nodes[0]
        ext = self.external
        ext_net = ipaddress.ip_interface(f"{ext.ip}/{spec.external_prefix}").network
        node_net = ipaddress.ip_interface(f"{first.ip}/{spec.node_prefix}").network

        # External client: its veth is born here with the peer placed straight into node A.
        lines = ["link set lo up",
                 f"link add eth0 address {_random_mac()} type veth peer name eth0 "
                 f"address {_random_mac()} netns {first.ns}",
                 "link set eth0 up",
                 f"addr add {ext.ip}/{spec.external_prefix} dev eth0",
                 f"route add {node_net} dev eth0"]
        lines += [f"route add {n.ip}/32 via {first.ip} dev eth0" for n in self.nodes[1:]]
        lines += [f"route add {r} via {first.ip} dev eth0" for r in spec.external_routes]
        self._ns_sysctls(ext.ns, {})
        self._ip_batch(ext.ns, lines)

        # Other nodes: eth0 there <-> eth<i> on node A.
        for i, node in enumerate(self.nodes[1:], start=1):
            self._ip_batch(node.ns, [
                f"link add eth0 address {_random_mac()} type veth peer name eth{i} "
                f"address {_random_mac()} netns {first.ns}",
            ])

        lines = ["link set lo up", "link set eth0 up",
                 f"addr add {first.ip}/{spec.node_prefix} dev eth0",
                 f"route add {ext_net} dev eth0"]
        for i, node in enumerate(self.nodes[1:], start=1):
            lines += [f"link set eth{i} up",
                      f"route add {node.ip}/32 dev eth{i}",
                      f"route add {node.pod_cidr} via {node.ip} dev eth{i}"]
        self._ip_batch(first.ns, lines)
        for node in self.nodes[1:]:
            lines = ["link set lo up", "link set eth0 up",
                     f"addr add {node.ip}/{spec.node_prefix} dev eth0",
                     f"route add default via {first.ip} dev eth0"]
            lines += [f"route add {o.ip}/32 via {first.ip} dev eth0"
                      for o in self.nodes[1:] if o is not node]
            self._ip_batch(node.ns, lines)

        if spec.wiring == "bridge":
            for node in self.nodes:
                self._make_bridge(node)

        for node in self.nodes:
            self._device_sysctls(node, node.ifaces + ([node.bridge] if node.bridge else []))

        # What XDP sends back (XDP_TX) enters the peer veth's NAPI queue, which exists
        # only with GRO on or an XDP program there: without either, the outside
        # client would never receive an XDP answer. Node devices get their programs.
        self.exec(ext.ns, ["ethtool", "-K", "eth0", "gro", "on"])
        if spec.tx_checksum_off:
            self._ethtool_tx_off(ext.ns, "eth0")
            for node in self.nodes:
                for dev in node.ifaces:
                    self._ethtool_tx_off(node.ns, dev)

        for node, ns_spec in zip(self.nodes, spec.nodes, strict=True):
            for _ in range(ns_spec.pods):
                self.add_pod(node)

    def _make_bridge(self, node: Node) -> None:
        net = ipaddress.ip_network(node.pod_cidr)
        node.bridge = BRIDGE_NAME
        # A bridge without an explicit MAC takes the lowest MAC among its ports, which would
        # break the pods' static gateway neighbour entries whenever a pod comes or goes.
        node.bridge_mac = _random_mac()
        self._ip_batch(node.ns, [
            f"link add {BRIDGE_NAME} address {node.bridge_mac} type bridge",
            f"addr add {net.network_address + 1}/{net.prefixlen} dev {BRIDGE_NAME}",
            f"link set {BRIDGE_NAME} up",
        ])

    def _add_ns(self, name: str) -> None:
        self._run(["ip", "netns", "add", name])
        self._namespaces.append(name)

    def _ns_sysctls(self, ns: str, settings: Mapping[str, str]) -> None:
        values = dict(settings)
        if not self.spec.ipv6:
            values["net.ipv6.conf.all.disable_ipv6"] = "1"
            values["net.ipv6.conf.default.disable_ipv6"] = "1"
        if values:
            self.exec(ns, ["sysctl", "-q", "-e", "-w",
                           *(f"{k}={v}" for k, v in values.items())])

    def _node_sysctls(self, node: Node) -> None:
        self._ns_sysctls(node.ns, {
            "net.ipv4.ip_forward": "1",
            "net.ipv4.conf.all.rp_filter": "0",
            "net.ipv4.conf.default.rp_filter": "0",
            "net.ipv4.conf.all.send_redirects": "0",
            "net.ipv4.conf.default.send_redirects": "0",
            # Per-namespace since 5.3 and present only with br_netfilter loaded (-e skips).
            "net.bridge.bridge-nf-call-iptables": "0",
            "net.bridge.bridge-nf-call-ip6tables": "0",
            "net.bridge.bridge-nf-call-arptables": "0",
        })

    def _device_sysctls(self, node: Node, devices: Iterable[str]) -> None:
        settings: dict[str, str] = {}
        for dev in devices:
            settings[f"net.ipv4.conf.{dev}.rp_filter"] = "0"
            settings[f"net.ipv4.conf.{dev}.send_redirects"] = "0"
        if settings:
            self.exec(node.ns, ["sysctl", "-q", "-w",
                                *(f"{k}={v}" for k, v in settings.items())])

    def _ethtool_tx_off(self, ns: str, dev: str) -> None:
        self.exec(ns, ["ethtool", "-K", dev, "tx", "off"])

    # -- pods ----------------------------------------------------------------------------------
    def add_pod(self, node: Node | None = None, name: str | None = None,
                ip: str | None = None) -> Pod:
        """Create a pod on ``node`` (default: the first node) and wire it up; returns it."""
        self._check_open()
        node = node or self.nodes[0]
        if name is None:
            taken = {p.name for p in self._pods}
            name = next(n for n in (f"pod{i}" for i in self._pod_counter) if n not in taken)
        _check_name(name)
        # Pod, node and external namespaces share the prefix: their names must not collide.
        if name in {p.name for p in self._pods} | {n.name for n in self.nodes} | {"external"}:
            raise ValueError(f"name {name!r} is taken already")
        net = ipaddress.ip_network(node.pod_cidr)
        if ip is None:
            if node._next_host >= net.num_addresses - 1:
                raise LabError(f"pod CIDR {node.pod_cidr} of {node.name} is exhausted")
            ip = str(net.network_address + node._next_host)
            node._next_host += 1
        elif ipaddress.ip_address(ip) not in net:
            raise ValueError(f"{ip} is outside {node.pod_cidr}")

        bridged = node.bridge is not None
        host_mac, mac = _random_mac(), _random_mac()
        if bridged:
            assert node.bridge_mac is not None
            gateway, gateway_mac = str(net.network_address + 1), node.bridge_mac
        else:
            gateway, gateway_mac = PTP_GATEWAY, host_mac
        pod = Pod(name=name, ns=f"{self.prefix}-{name}", ip=ip, host_veth=_host_veth_name(name),
                  node=node, mac=mac, host_mac=host_mac, gateway=gateway, gateway_mac=gateway_mac)

        self._add_ns(pod.ns)
        # Before the veth exists, so that eth0 inherits the defaults.
        self._ns_sysctls(pod.ns, {"net.ipv4.conf.all.accept_redirects": "0",
                                  "net.ipv4.conf.default.accept_redirects": "0"})
        lines = [f"link add {pod.host_veth} address {host_mac} type veth peer name "
                 f"{POD_IFNAME} address {mac} netns {pod.ns}"]
        if bridged:
            lines += [f"link set {pod.host_veth} master {node.bridge}",
                      f"link set {pod.host_veth} up",
                      f"neigh replace {ip} lladdr {mac} nud permanent dev {node.bridge}"]
        else:
            lines += [f"link set {pod.host_veth} up",
                      f"route add {ip}/32 dev {pod.host_veth}",
                      f"neigh replace {ip} lladdr {mac} nud permanent dev {pod.host_veth}"]
        self._ip_batch(node.ns, lines)
        self._device_sysctls(node, [pod.host_veth])

        prefixlen = net.prefixlen if bridged else 32
        pod_lines = ["link set lo up",
                     f"addr add {ip}/{prefixlen} dev {POD_IFNAME}",
                     f"link set {POD_IFNAME} up"]
        if not bridged:
            pod_lines.append(f"route add {gateway} dev {POD_IFNAME} scope link")
        pod_lines += [f"neigh replace {gateway} lladdr {gateway_mac} nud permanent "
                      f"dev {POD_IFNAME}",
                      f"route add default via {gateway} dev {POD_IFNAME}"]
        self._ip_batch(pod.ns, pod_lines)
        node.pods.append(pod)
        self._pods.append(pod)
        return pod

    def remove_pod(self, pod: Pod) -> None:
        """Stop the pod's processes, delete its veth (synchronously) and its namespace."""
        self._check_open()
        if pod not in self._pods:
            raise ValueError(f"pod {pod.name} is not part of this topology")
        self._stop([p for ns, p in self._procs if ns == pod.ns])
        self._procs = [(ns, p) for ns, p in self._procs if ns != pod.ns]
        # Deleting the namespace alone would free the veth later, from a kernel workqueue;
        # deleting the link first makes the host side vanish before this call returns.
        self._run(["ip", "-n", pod.node.ns, "link", "del", pod.host_veth])
        self._run(["ip", "netns", "del", pod.ns])
        self._namespaces.remove(pod.ns)
        self._pods.remove(pod)
        pod.node.pods.remove(pod)

    # -- accessors -----------------------------------------------------------------------------
    @property
    def node(self) -> Node:
        return self.nodes[0]

    @property
    def node_ip(self) -> str:
        return self.nodes[0].ip

    @property
    def pods(self) -> list[Pod]:
        return list(self._pods)

    @property
    def namespaces(self) -> list[str]:
        return list(self._namespaces)

    def pod(self, name: str) -> Pod:
        for p in self._pods:
            if p.name == name:
                return p
        raise KeyError(name)

    def summary(self) -> str:
        """Human-readable description (for the demo and for failing tests)."""
        out = [f"topology {self.prefix} ({self.spec.wiring})",
               f"  external {self.external.ns} {self.external.ip} via {self.external.gateway}"]
        for n in self.nodes:
            bridge = f" bridge {n.bridge}" if n.bridge else ""
            out.append(f"  node {n.name} {n.ns} {n.ip} ifaces {','.join(n.ifaces)}"
                       f" pods {n.pod_cidr}{bridge}")
            out += [f"    pod {p.name} {p.ns} {p.ip} host {p.host_veth}" for p in n.pods]
        return "\n".join(out)

    # -- commands ------------------------------------------------------------------------------
    def exec(self, ns: NsRef, argv: Sequence[str], *, check: bool = True,
             timeout: float = 30.0, input: str | None = None,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in namespace ``ns`` to completion; raise LabError on failure if check."""
        return self._run(["ip", "netns", "exec", _ns_name(ns), *argv], check=check,
                         timeout=timeout, input=input, env=_clean_env(env))

    def spawn(self, ns: NsRef, argv: Sequence[str], *, stdout: int | IO[bytes] | None = None,
              stderr: int | IO[bytes] | None = None,
              env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``argv`` in ``ns`` in its own process group; it is stopped on close()."""
        self._check_open()
        name = _ns_name(ns)
        proc = subprocess.Popen(["ip", "netns", "exec", name, *argv], stdin=subprocess.DEVNULL,
                                stdout=stdout, stderr=stderr, env=_clean_env(env),
                                start_new_session=True)
        self._procs.append((name, proc))
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one process started by spawn() (its whole process group)."""
        self._stop([proc])
        self._procs = [(ns, p) for ns, p in self._procs if p is not proc]

    def start_server(self, where: Place, mode: str, ports: Sequence[int], *,
                     name: str | None = None, extra: Sequence[str] = (),
                     timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Run ``lab.servers`` in ``where``'s namespace and wait for its ready line."""
        argv = [sys.executable, "-m", "lab.servers", mode, "--name", name or where.name]
        for port in ports:
            argv += ["--port", str(port)]
        pythonpath = os.pathsep.join(
            p for p in (str(_SOURCE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        proc = self.spawn(where, [*argv, *extra], stdout=subprocess.PIPE,
                          env={"PYTHONPATH": pythonpath})
        assert proc.stdout is not None
        try:
            line = _read_line(proc.stdout, time.monotonic() + timeout)
        except TimeoutError:
            self.kill(proc)
            raise LabError(f"{mode} server in {where.ns} not ready after {timeout}s") from None
        if not line.startswith(b"READY"):
            self.kill(proc)
            raise LabError(f"{mode} server in {where.ns} failed to start "
                           f"(exit {proc.returncode}): {line!r}")
        return proc

    def start_http(self, where: Place, port: int = 80, *more_ports: int,
                   name: str | None = None, workers: int = 1) -> subprocess.Popen[bytes]:
        """HTTP backend answering ``f"{name} {client_ip}\\n"`` (name defaults to where.name)."""
        return self.start_server(where, "http", (port, *more_ports), name=name,
                                 extra=("--workers", str(workers)))

    def start_udp(self, where: Place, port: int, *more_ports: int,
                  name: str | None = None) -> subprocess.Popen[bytes]:
        """UDP backend replying ``f"{name} {client_ip}\\n"`` to every datagram."""
        return self.start_server(where, "udp", (port, *more_ports), name=name)

    def start_tcp_echo(self, where: Place, port: int, *, name: str | None = None,
                       greet: bool = False) -> subprocess.Popen[bytes]:
        """TCP echo backend for long-lived connections (``greet``: name line on connect)."""
        return self.start_server(where, "tcp-echo", (port,), name=name,
                                 extra=("--greet",) if greet else ())

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill every process started here, then delete every namespace created. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self._stop([p for _, p in self._procs])
        self._procs.clear()
        if self._namespaces:
            # One ip process for all; -force keeps going past a namespace already gone.
            script = "".join(f"netns del {ns}\n" for ns in reversed(self._namespaces))
            self._run(["ip", "-force", "-batch", "-"], input=script, check=False)
            leftover = set(self._namespaces) & set(list_namespaces())
            for ns in leftover:
                self._run(["ip", "netns", "del", ns], check=False)
            self._namespaces.clear()
        self._pods.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise LabError("topology is closed")

    @staticmethod
    def _stop(procs: Sequence[subprocess.Popen[bytes]], grace: float = 3.0) -> None:
        """SIGTERM each live process group, SIGKILL what is left after ``grace`` seconds."""
        live = [p for p in procs if p.poll() is None]
        for p in live:
            # The group id is the pid (start_new_session); signalling it reaches forked workers.
            processes.send(p, signal.SIGTERM, group=True)
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                processes.send(p, signal.SIGKILL, group=True)
                p.wait()
        for p in procs:
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()

    def _ip_batch(self, ns: str, lines: Sequence[str]) -> None:
        self._run(["ip", "-n", ns, "-batch", "-"], input="".join(f"{ln}\n" for ln in lines))

    @staticmethod
    def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0,
             input: str | None = None,
             env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        try:
            res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                                 input=input, env=env)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from e
        if check and res.returncode != 0:
            detail = (res.stderr or res.stdout).strip()
            script = f"\ninput:\n{input}" if input and "-batch" in argv else ""
            raise LabError(f"exit {res.returncode}: {' '.join(argv)}: {detail}{script}")
        return res

    def __repr__(self) -> str:
        return f"Topology({self.prefix!r}, nodes={[n.name for n in self.nodes]}, " \
               f"pods={[p.name for p in self._pods]})"


def list_namespaces() -> list[str]:
    """Names of all named network namespaces on the machine (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]
