"""What every benchmark shares: the machine description, result files, throwaway
namespaces and datapath instances that are removed even when a run fails."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


class BenchError(RuntimeError):
    """A benchmark could not measure what it meant to measure."""


@dataclass(frozen=True)
class Mode:
    """How big a run is: `quick` runs every row at the smallest scale."""

    quick: bool

    @property
    def label(self) -> str:
        return "quick" if self.quick else "full"


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (BPF programs, network namespaces)")


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """Keep the measuring thread on one CPU: fewer migrations, steadier runs."""
    before = os.sched_getaffinity(0)
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {max(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _first_line(argv: Sequence[str]) -> str:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (res.stdout or res.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def machine() -> dict[str, Any]:
    """Cores, kernel, CPU model and tool versions: printed with every result."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    iptables = shutil.which("iptables")
    return {
        "cores": int(_first_line(["nproc"]) or 0),
        "kernel": _first_line(["uname", "-r"]),
        "cpu": model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "iptables": _first_line(["iptables", "--version"]) if iptables else "unavailable",
        "iptables_legacy": _first_line(["iptables-legacy", "--version"]),
        "nft": _first_line(["nft", "--version"]),
        "wrk": _first_line(["wrk", "--version"]).split(" Copyright")[0],
    }


def today() -> str:
    return dt.date.today().isoformat()


def write_result(name: str, mode: Mode, data: dict[str, Any], started: float,
                 load_start: float) -> Path:
    """bench/results/<date>-<name>.json (a quick run gets a -quick suffix, so it never
    replaces the full results the report is built from)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if mode.quick else ""
    path = RESULTS_DIR / f"{today()}-{name}{suffix}.json"
    doc = {
        "benchmark": name,
        "mode": mode.label,
        "date": today(),
        "started": dt.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 1),
        # Other work on the machine shows up here: the runs share its cores.
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "machine": machine(),
        **data,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def unique(tag: str) -> str:
    """A name no other process uses: lbbench-<tag>-<pid>-<hex>."""
    return f"lbbench-{tag}-{os.getpid()}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def throwaway_netns(tag: str) -> Iterator[str]:
    """A bare network namespace for loading rule sets, deleted afterwards."""
    name = unique(tag)
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def in_netns(ns: str, argv: Sequence[str], *, input: str | None = None,
             timeout: float = 600.0, check: bool = True) -> tuple[float, str]:
    """Run `argv` inside `ns`; returns (wall seconds, stderr). Raises BenchError on failure."""
    start = time.perf_counter()
    try:
        res = subprocess.run(["ip", "netns", "exec", ns, *argv], input=input, text=True,
                             capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} in {ns}: no result within {timeout:.0f} s") from e
    took = time.perf_counter() - start
    if check and res.returncode != 0:
        raise BenchError(f"{' '.join(argv)} in {ns} failed (exit {res.returncode}): "
                         f"{res.stderr.strip()[:800]}")
    return took, res.stderr


@contextlib.contextmanager
def datapath(sizes: Any, tag: str) -> Iterator[Any]:
    """A freshly compiled datapath in its own pin directory, unpinned afterwards."""
    from loader.build import BPFFS, BuildOptions, Datapath, remove_pins

    pin_dir = BPFFS / unique(tag)
    try:
        with Datapath(BuildOptions(pin_dir, sizes)) as dp:
            yield dp
    finally:
        remove_pins(pin_dir)


def clear_map(m: Any) -> int:
    """Delete every entry of a hash map (conntrack between runs); returns how many."""
    from loader import layout

    keys = list(m.keys())
    for k in keys:
        m.delete(layout.ffi.new(f"{m.spec.key_type} *", k))
    return len(keys)


def stat_counts(dp: Any) -> list[int]:
    """Packets per stat reason, summed over CPUs."""
    from loader import layout

    stats = dp.map("lb_stats")
    out = []
    for i in range(layout.const("LB_STAT_MAX")):
        per_cpu = stats.lookup(i) or []
        out.append(sum(s.packets for s in per_cpu))
    return out
