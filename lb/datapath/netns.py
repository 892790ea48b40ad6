"""Work inside a named network namespace without moving the process.

setns(2) with CLONE_NEWNET changes only the calling thread, and a socket
stays in the namespace it was created in. So a short-lived thread that
enters the namespace can create sockets (netlink, listeners) or open
/proc/sys/net files there, while the rest of the process, its API and
metrics connections included, stays where it was started."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")


def _path(netns: str) -> str:
    return netns if netns.startswith("/") else str(NETNS_RUN_DIR / netns)


def _enter(netns: str) -> None:
    fd = os.open(_path(netns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def call_in(netns: str | None, fn: Callable[[], T]) -> T:
    """fn() called in `netns` (None: here, in the calling thread)."""
    if not netns:
        return fn()
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            _enter(netns)
            result.append(fn())
        except BaseException as e:
            errors.append(e)

    # The thread ends right after fn, so nothing else ever runs in it.
    t = threading.Thread(target=run, name=f"netns-{netns}")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result[0]


def write_sysctl(netns: str | None, name: str, value: str) -> None:
    """Set a sysctl in `netns`, named by its path under /proc/sys (slashes:
    device names may hold dots). /proc/sys/net resolves against the
    namespace of the thread that opens the file."""
    path = Path("/proc/sys") / name
    call_in(netns, lambda: path.write_text(value))


def iproute(netns: str | None) -> Any:
    """A pyroute2 IPRoute bound to `netns` (or to this namespace), to be used by the
    calling thread (pyroute2 opens a socket per thread; given one, it wraps that)."""
    from pyroute2 import IPRoute

    if not netns:
        return IPRoute()
    # Not IPRoute(netns=...): pyroute2 0.9 opens that socket in a child it forks
    # (config.child_process_mode "fork"), and a fork of the multithreaded agent can
    # hang in the child on a lock another thread held; such a child outlived the
    # agent once, holding its instance lock. A thread in the namespace opens it here.
    sock = call_in(netns, lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM,
                                                socket.NETLINK_ROUTE))
    return IPRoute(fileno=sock.detach())
