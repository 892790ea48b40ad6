"""One agent per instance: `lbctl run` holds an exclusive lock on the
instance for as long as it lives (the kernel drops it when the process
ends, however it ends), and `lbctl down` refuses while it is held."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from lb.datapath.attach import STATE_DIR


class InstanceBusy(RuntimeError):
    """Another process holds the instance."""


def lock_path(instance: str) -> Path:
    return STATE_DIR / f"{instance}.lock"


def lock_instance(instance: str) -> int:
    """Take the instance's lock, or raise InstanceBusy naming the holder's
    pid. Returns the descriptor that holds it (held until it is closed or
    the process exits)."""
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(lock_path(instance), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise InstanceBusy(f"instance {instance} is in use by pid {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release(instance: str, fd: int) -> None:
    """Drop the lock and its file (for `down`: the instance is gone)."""
    lock_path(instance).unlink(missing_ok=True)
    os.close(fd)
