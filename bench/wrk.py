"""Run wrk inside a lab namespace and read its summary."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import BenchError
from lab.topology import NsRef, Topology

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}

# One backend per wrk thread, for the direct row: the same spread over the same two pods
# that a service gives, without any translation.
_SPLIT_LUA = """
local hosts = {%s}
local port = "%d"
local n = 0
function setup(thread)
  local addrs = wrk.lookup(hosts[n %% #hosts + 1], port)
  thread.addr = addrs[1]
  n = n + 1
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests_per_s: float
    requests: int
    p50_ms: float
    p99_ms: float
    socket_errors: int
    non_2xx: int
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    if not m:
        raise BenchError(f"wrk printed no {pct}% latency:\n{text}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse(text: str) -> WrkResult:
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", text, re.M)
    if not rate or not total:
        raise BenchError(f"unexpected wrk output:\n{text}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests_per_s=float(rate.group(1)),
        requests=int(total.group(1)),
        p50_ms=_latency(text, "50"),
        p99_ms=_latency(text, "99"),
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        seconds=float(total.group(2)) * _UNITS[total.group(3)] / 1000,
    )


def run(topo: Topology, ns: NsRef, url: str, *, seconds: float, threads: int = 2,
        connections: int = 32, close: bool = False,
        split: Sequence[str] = ()) -> WrkResult:
    """wrk -t<threads> -c<connections> -d<seconds>s --latency [-H 'Connection: close'] url.

    `split`: hosts to spread the threads over (one each, round robin) instead of url's host.
    """
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    with tempfile.TemporaryDirectory(prefix="lbbench-wrk-") as tmp:
        if split:
            port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
            script = Path(tmp) / "split.lua"
            script.write_text(_SPLIT_LUA % (", ".join(f'"{h}"' for h in split), port))
            argv += ["-s", str(script)]
        res = topo.exec(ns, [*argv, url], timeout=seconds + 30, check=False)
    if res.returncode != 0:
        raise BenchError(f"wrk failed (exit {res.returncode}): {res.stderr.strip()[:500]}")
    return parse(res.stdout)
