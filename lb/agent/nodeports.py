"""Which of the node's addresses answer NodePorts: kube-proxy's
--nodeport-addresses (cmd/kube-proxy/app/options.go, v1.34). "primary",
the nftables default (server_linux.go), is the node's own address; a list
of CIDRs is every address of the node within them, followed as addresses
come and go."""

from __future__ import annotations

import ipaddress
import socket

from lb.datapath.netns import iproute

PRIMARY = "primary"


def parse_cidrs(values: list[str]) -> tuple[str, ...] | None:
    """The IPv4 CIDRs of the flag's values (comma-separated, repeatable);
    None for "primary". Raises ValueError naming a bad value."""
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if not items or items == [PRIMARY]:
        return None
    if PRIMARY in items:
        raise ValueError("'primary' stands alone, not in a list of CIDRs")
    nets = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError as e:
            raise ValueError(f"{item!r} is not a CIDR") from e
    return tuple(str(n) for n in nets if n.version == 4)


def addresses_in(cidrs: tuple[str, ...], netns: str | None) -> tuple[str, ...]:
    """The node's IPv4 addresses within `cidrs`, loopback left out (no
    device there carries the datapath), sorted."""
    nets = [ipaddress.IPv4Network(c) for c in cidrs]
    with iproute(netns) as ipr:
        found = {str(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr(family=socket.AF_INET)}
    return tuple(sorted(
        a for a in found
        if not ipaddress.IPv4Address(a).is_loopback
        and any(ipaddress.IPv4Address(a) in n for n in nets)))
