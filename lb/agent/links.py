"""Which pod devices exist: the agent attaches its tc programs to each veth
of the node's namespace as pods come and go. And the smallest MTU there,
below which no translated packet needs its route's MTU looked up."""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from pyroute2.netlink.rtnl import RTMGRP_LINK
from pyroute2.netlink.rtnl.ifinfmsg import IFF_LOOPBACK, IFF_UP

from lb.datapath.netns import call_in, iproute

log = logging.getLogger("lbctl.agent")

# How often the devices are listed even when no link event arrived.
LINK_RESCAN_PERIOD = 2.0


def min_mtu(netns: str | None) -> int:
    """The smallest MTU of the devices that are up in `netns`, loopback left
    out (nothing is forwarded there); 0 when there are none."""
    with iproute(netns) as ipr:
        mtus = [msg.get_attr("IFLA_MTU") for msg in ipr.get_links()
                if msg["flags"] & IFF_UP and not msg["flags"] & IFF_LOOPBACK]
    return min((m for m in mtus if isinstance(m, int)), default=0)


class LinkWatcher(threading.Thread):
    """Calls `on_veths(names)` with every veth in `netns` at start, on every
    link event and every LINK_RESCAN_PERIOD. An event is only a wake-up: the
    devices come from a fresh dump each time, so an event missed, coalesced
    or lost to a full socket buffer loses nothing (pyroute2's own event
    reader buffers messages behind select, and pod veths then went
    unnoticed)."""

    def __init__(self, ignore: set[str], on_veths: Callable[[set[str]], None],
                 netns: str | None = None, node_ips: frozenset[str] = frozenset()) -> None:
        super().__init__(name="link-watcher", daemon=True)
        self.ignore = ignore
        # A device holding a node address faces the node's network, never a
        # pod, whatever its kind (a kind node's uplink is a veth).
        self.node_ips = node_ips
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
            links = {msg["index"]: self._veth_name(msg) for msg in ipr.get_links()}
            node_devs = {links.get(msg["index"]) for msg in ipr.get_addr(family=socket.AF_INET)
                         if msg.get_attr("IFA_ADDRESS") in self.node_ips}
        self.on_veths({n for n in links.values()
                       if n and n not in self.ignore and n not in node_devs})

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
