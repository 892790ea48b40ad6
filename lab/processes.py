"""Stopping the processes the lab, the tests and the benchmarks start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Any


def stop(proc: subprocess.Popen[Any], grace: float = 15.0, *, group: bool = False,
         first: int = signal.SIGTERM) -> int:
    """Stop a child: `first` (SIGTERM, so that it cleans up), then SIGKILL once `grace`
    seconds have passed; its return code. With `group`, both go to its process group
    (started with start_new_session), so forked workers are stopped too, even after
    the leader is gone."""
    if proc.poll() is not None and not group:
        return proc.returncode
    send(proc, first, group)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        send(proc, signal.SIGKILL, group)
        return proc.wait(timeout=grace)


def send(proc: subprocess.Popen[Any], sig: int, group: bool = False) -> None:
    """`sig` to the child (or its process group); nothing if it is gone."""
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
