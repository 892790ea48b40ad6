"""The command-line flags that describe this node (--node-name, --node-ip,
--service-cidr), shared by `lbctl trace` and `lbctl run`, and the error every
lbctl command raises for bad arguments."""

from __future__ import annotations

import argparse
import ipaddress

from lb.model import Node


class UsageError(Exception):
    """Bad arguments or input: exit 2."""


def add_node_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--node-name", help="this node's name (endpoints on it are local)")
    p.add_argument("--node-ip", action="append", metavar="IP",
                   help="an address NodePorts answer on (repeatable); the first one is the "
                        "masquerade source")
    p.add_argument("--service-cidr", action="append", metavar="CIDR",
                   help="where ClusterIPs are allocated: unused addresses there are dropped")


def node_from_args(args: argparse.Namespace) -> Node:
    for value, flag in [(ip, "--node-ip") for ip in args.node_ip or ()] + \
            [(c, "--service-cidr") for c in args.service_cidr or ()]:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as e:
            raise UsageError(f"{flag}: {e}") from e
    return Node(name=args.node_name, ips=tuple(args.node_ip or ()),
                service_cidrs=tuple(str(ipaddress.ip_network(c, strict=False))
                                    for c in args.service_cidr or ()))
