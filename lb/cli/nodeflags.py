"""The command-line flags that describe this node and the objects' rules
(--node-name, --node-ip, --service-cidr, --service-node-port-range), shared
by `lbctl trace` and `lbctl run`, and the error every lbctl command raises
for bad arguments."""

from __future__ import annotations

import argparse
import ipaddress
import logging

from lb.model import Node
from lb.sources.manifests import DEFAULT_NODE_PORT_RANGE, FILE_RULES, Rules

log = logging.getLogger("lbctl")


class UsageError(Exception):
    """Bad arguments or input: exit 2."""


def add_node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-name", help="this node's name (endpoints on it are local)")
    p.add_argument("--node-ip", action="append", metavar="IP",
                   help="an address NodePorts answer on (repeatable); the first IPv4 one is "
                        "the masquerade source; IPv6 ones are not served yet")
    p.add_argument("--node-zone", metavar="ZONE",
                   help="this node's topology.kubernetes.io/zone, for EndpointSlice zone "
                        "hints (with --kubernetes: the Node's label)")
    p.add_argument("--service-cidr", action="append", metavar="CIDR",
                   help="where ClusterIPs are allocated: unused addresses there are dropped")
    lo, hi = DEFAULT_NODE_PORT_RANGE
    p.add_argument("--service-node-port-range", default=f"{lo}-{hi}", metavar="LO-HI",
                   help="the NodePorts a file may use, as kube-apiserver's flag of that name "
                        "(default %(default)s)")


def _node_ips(values: list[str]) -> tuple[str, ...]:
    """The IPv4 addresses of --node-ip; IPv6 ones are said once and left out."""
    v4: list[str] = []
    v6: list[str] = []
    for value in values:
        try:
            addr = ipaddress.ip_address(value)
        except ValueError as e:
            hint = " (an address, not a CIDR)" if "/" in value else ""
            raise UsageError(f"--node-ip: {value!r} is not an IP address{hint}") from e
        (v4 if addr.version == 4 else v6).append(str(addr))
    if v6:
        log.warning("--node-ip %s: IPv6 is not programmed yet; serving IPv4 only",
                    ", ".join(v6))
    if values and not v4:
        raise UsageError("--node-ip: give at least one IPv4 address (the datapath serves IPv4)")
    return tuple(v4)


def node_port_range(value: str) -> tuple[int, int]:
    lo, sep, hi = value.partition("-")
    if not (sep and lo.isdigit() and hi.isdigit() and 1 <= int(lo) <= int(hi) <= 65535):
        raise UsageError(f"--service-node-port-range: {value!r} is not LO-HI within 1-65535")
    return int(lo), int(hi)


def rules_from_args(args: argparse.Namespace) -> Rules:
    """What a file's objects are checked against."""
    return Rules(node_port_range=node_port_range(args.service_node_port_range),
                 strict_addresses=FILE_RULES.strict_addresses)


def node_from_args(args: argparse.Namespace) -> Node:
    cidrs: list[str] = []
    v6: list[str] = []
    for c in args.service_cidr or ():
        try:
            net = ipaddress.ip_network(c, strict=False)
        except ValueError as e:
            raise UsageError(f"--service-cidr: {e}") from e
        (cidrs if net.version == 4 else v6).append(str(net))
    if v6:
        log.warning("--service-cidr %s: IPv6 is not programmed yet", ", ".join(v6))
    return Node(name=args.node_name, ips=_node_ips(args.node_ip or []), zone=args.node_zone,
                service_cidrs=tuple(cidrs))
