"""How addresses and ports are written, in one place. The maps hold IPv4
addresses and ports in network order, in __u32/__u16 fields that the
machine reads in its own order: ip_be and port_be give those field values.
The policy compiler works on addresses as plain ints (host order, as
ipaddress gives them): ip_int and ip_text."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from loader import layout


def ip_be(ip: str | int) -> int:
    """An IPv4 address (text, or a host-order int) as the u32 field that
    holds it in network order."""
    if isinstance(ip, int):
        return socket.htonl(ip)
    return int.from_bytes(socket.inet_aton(ip), "little")


def ip_str(value: int) -> str:
    """The text of an address held by a u32 field in network order."""
    return str(ipaddress.IPv4Address(value.to_bytes(4, "little")))


def port_be(port: int) -> int:
    return socket.htons(port)


def port_host(value: int) -> int:
    return socket.ntohs(value)


def ip_int(ip: str | int) -> int:
    """An address as a host-order int."""
    if isinstance(ip, int):
        return ip
    try:  # the C parser: ipaddress costs ten times as much per address
        return int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        return int(ipaddress.IPv4Address(ip))  # its ValueError names what is wrong


def ip_text(ip: int) -> str:
    """The text of a host-order int address."""
    return str(ipaddress.IPv4Address(ip))


def lpm4_key(addr: str | int, prefixlen: int) -> Any:
    """struct lb_lpm4_key of a prefix (its network address as text or a
    host-order int): the service CIDRs and the policy ipcache."""
    return layout.new("struct lb_lpm4_key", prefixlen=prefixlen, addr=ip_be(addr))


def source_range_key(svc_id: int, addr: str | int, prefixlen: int) -> Any:
    """struct lb_src_range_key: the service id (network order, so that the
    trie's prefix covers it whole) then the source prefix."""
    return layout.new("struct lb_src_range_key", prefixlen=32 + prefixlen,
                      svc_id=socket.htonl(svc_id), addr=ip_be(addr))


_M32 = 0xFFFFFFFF


def filter_bit(kind: int, addr: int, port: int, words: int) -> int:
    """The bit of a pre-filter of `words` words for (kind, address, port),
    all host order: lb_filter_bit of bpf/lib/filter.h, for the agent and
    the twin."""
    x = (addr * 0x9E3779B1 + ((port << 2) | kind) * 0x85EBCA77) & _M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _M32
    x ^= x >> 12
    return x & (words * 64 - 1)
