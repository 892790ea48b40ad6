"""lbctl: the command line of the load balancer.

Exit status: 0 on success (whatever verdict a trace prints), 1 when the
machine refuses (no BPF, no pins), 2 for bad arguments or input files, with
a message naming the bad field."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib import metadata

from lb.cli import maps, run, trace
from lb.cli.nodeflags import UsageError
from loader.build import BpffsMissing

log = logging.getLogger("lbctl")


def _version() -> str:
    try:
        return metadata.version("xdplb")
    except metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lbctl", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    maps.add_command(sub)
    trace.add_command(sub)
    run.add_commands(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = parser()
    try:
        args = ap.parse_args(argv)
    except SystemExit as e:  # argparse already printed why
        return 2 if e.code else 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        code: int = args.func(args)
        return code
    except UsageError as e:
        print(f"lbctl: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"lbctl: {e} (the datapath needs root and BPF)", file=sys.stderr)
        return 1
    except BpffsMissing as e:
        print(f"lbctl: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
