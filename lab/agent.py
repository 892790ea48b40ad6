"""Run `lbctl run` inside a lab node and tear it down again."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from lb.datapath.attach import OBJECT_CACHE
from lb.datapath.instance import pin_dir_of
from loader import layout
from loader.maps import BpfMap

from . import processes
from .topology import LabError, Node, Topology

# What the agent logs when its incremental desired state, or a policy compile that
# reused the previous one's rules, was wrong (lb/agent/loop.py, lb/policy/kernel.py).
DRIFT = "computed incrementally differ from a full recompute"


@contextlib.contextmanager
def object_cache_kept_as_found(cache: Path = OBJECT_CACHE) -> Iterator[None]:
    """Lab agents and `lbctl trace` keep their compiled programs where a
    node's agent does (loader/objects.py): what the block adds there goes
    again at its end, and the directory too if the block made it."""
    existed = cache.exists()
    before = set(cache.iterdir()) if existed else set()
    try:
        yield
    finally:
        if cache.exists():
            for path in set(cache.iterdir()) - before:
                path.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):  # something else wrote there meanwhile
                    cache.rmdir()


class LabAgent:
    """The agent of one lab node, with its own instance (pin directory).
    Its log lines are kept in `.lines` for tests and the demo."""

    def __init__(self, topo: Topology, node: Node, files: Sequence[Path], *,
                 extra: Sequence[str] = (), instance: str | None = None) -> None:
        self.topo = topo
        self.node = node
        self.instance = instance or f"lblab-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.argv = [sys.executable, "-m", "lb.cli", "run", "--netns", node.ns,
                     "--node-name", node.name, "--node-ip", node.ip,
                     "--instance", self.instance, "--min-sync-period", "0.1",
                     # Every sync proves the incremental desired state right.
                     "--incremental-check-period", "0", *extra]
        for dev in node.ifaces or [node.iface]:
            self.argv += ["--iface", dev]
        for f in files:
            self.argv += ["-f", str(f)]
        self.lines: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> LabAgent:
        # The agent enters the node namespace itself (--netns): run it here.
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stderr,),
                                        daemon=True)
        self._reader.start()
        self.wait_for("ready", timeout)
        return self

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip())

    def wait_for(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        """The first log line (from index `after`) containing `text`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if text in line:
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError("agent exited:\n" + "\n".join(self.lines[-20:]))
            time.sleep(0.05)
        raise LabError(f"agent did not log {text!r} within {timeout}s:\n"
                       + "\n".join(self.lines[-20:]))

    def stop(self) -> int | None:
        """SIGTERM, as the kubelet does; the programs and pins stay."""
        return None if self.proc is None else processes.stop(self.proc)

    def down(self) -> None:
        """Stop, then remove every program and pin (`lbctl down`)."""
        self.stop()
        subprocess.run([sys.executable, "-m", "lb.cli", "down", "--instance", self.instance],
                       capture_output=True, check=False, timeout=60)

    def stat(self, *reasons: str) -> int:
        """Packets the node's programs counted under LB_STAT_<reason>, summed."""
        with BpfMap.open_pinned(pin_dir_of(self.instance), "lb_stats") as m:
            return sum(c.packets for r in reasons
                       for c in m.lookup(layout.const(f"LB_STAT_{r}")) or ())

    def __enter__(self) -> LabAgent:
        return self.start()

    def drift(self) -> list[str]:
        """Log lines of syncs whose incremental desired state or policy was wrong."""
        return [line for line in self.lines if DRIFT in line]

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()
        if t is None:
            check_drift([self])


@contextlib.contextmanager
def agents_on(topo: Topology, files: Sequence[Path], *, extra: Sequence[str] = (),
              synced: bool = True) -> Iterator[list[LabAgent]]:
    """An agent on every node of `topo` (each synced first, unless told not to
    wait); every one brought down afterwards."""
    agents: list[LabAgent] = []
    try:
        for node in topo.nodes:
            agents.append(LabAgent(topo, node, files, extra=extra).start())
        if synced:
            for agent in agents:
                agent.wait_for("synced", timeout=10)
        yield agents
    finally:
        for agent in agents:
            agent.down()
    check_drift(agents)


def check_drift(agents: Sequence[LabAgent]) -> None:
    """Raise when any agent's incremental desired state or policy was ever wrong."""
    drift = [line for agent in agents for line in agent.drift()]
    if drift:
        raise LabError("incremental state differed from a full recompute:\n"
                       + "\n".join(drift))
