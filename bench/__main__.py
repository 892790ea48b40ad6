"""python -m bench [--quick] [--only NAME ...] [--report-only]

Runs the benchmarks (packet_cost, control_plane, programming, requests, tail_latency), writes
bench/results/<date>-<name>[-quick].json for each and rebuilds bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from bench import report
from bench.common import Mode, log, require_root

BENCHMARKS = ("packet_cost", "control_plane", "programming", "requests", "tail_latency")
TOOLS = ("ip", "wrk", "curl", "ethtool", "sysctl", "tc", "iptables-restore",
         "iptables-legacy-restore", "nft")


def _entry(name: str) -> Callable[[Mode], dict[str, Any]]:
    if name == "packet_cost":
        from bench import packet_cost

        return packet_cost.main
    if name == "control_plane":
        from bench import control_plane

        return control_plane.main
    if name == "programming":
        from bench import programming

        return programming.main
    if name == "tail_latency":
        from bench import tail_latency

        return tail_latency.run
    from bench import requests_rate

    return requests_rate.main


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="every row at the smallest scale, short runs (under 5 minutes)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, metavar="NAME",
                   help=f"run only these ({', '.join(BENCHMARKS)})")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild RESULTS.md from the stored results, run nothing")
    args = p.parse_args(argv)
    # SIGTERM unwinds like an exception, so topologies, namespaces and pins are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed: list[str] = []
    if not args.report_only:
        require_root()
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if missing:
            print(f"bench: missing tools: {', '.join(missing)}", file=sys.stderr)
            return 2
        from lab.agent import object_cache_kept_as_found

        mode = Mode(quick=args.quick)
        started = time.time()
        with object_cache_kept_as_found():  # the lab agents' compiled programs
            for name in args.only or BENCHMARKS:
                log(f"{name}: starting ({mode.label}), load average {os.getloadavg()[0]:.1f}")
                try:
                    _entry(name)(mode)
                except Exception:
                    traceback.print_exc()
                    failed.append(name)
        log(f"all done in {(time.time() - started) / 60:.1f} min"
            + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    path = report.write()
    log(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
