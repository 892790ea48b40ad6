"""lbctl: the command line of the load balancer.

Exit status: 0 on success (whatever verdict a trace prints), 1 when the
machine refuses (no BPF, no pins), 2 for bad arguments or input files, with
a message naming the bad field."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lb import mapview
from lb.instance import DEFAULT_INSTANCE, pin_dir_of
from lb.manifests import ManifestError, load
from lb.model import Node
from lb.nodeflags import UsageError, add_node_args, node_from_args
from lb.table import dump_json, render

log = logging.getLogger("lbctl")


def _node(args: argparse.Namespace) -> Node:
    return node_from_args(args)


def _load_cluster(files: Sequence[str]) -> Any:
    try:
        result = load(Path(f) for f in files)
    except ManifestError as e:
        raise UsageError(str(e)) from e
    for err in result.errors:
        print(f"lbctl: skipped: {err}", file=sys.stderr)
    return result.cluster


# --- maps -------------------------------------------------------------------


def cmd_maps(args: argparse.Namespace) -> int:
    from loader.libbpf import BpfError
    from loader.maps import open_all

    pin_dir = pin_dir_of(args.instance)
    if not pin_dir.is_dir():
        print(f"lbctl: no datapath instance at {pin_dir} (is the agent running?)",
              file=sys.stderr)
        return 1
    try:
        maps = open_all(pin_dir)
    except BpfError as e:
        print(f"lbctl: cannot open the maps in {pin_dir}: {e}", file=sys.stderr)
        return 1
    try:
        views = [args.view] if args.view else list(mapview.VIEWS)
        data = {v: mapview.READERS[v](maps) for v in views}
    finally:
        for m in maps.values():
            m.close()
    if args.output == "json":
        print(dump_json(data[args.view] if args.view else data))
        return 0
    for i, v in enumerate(views):
        if len(views) > 1:
            print(("\n" if i else "") + f"== {v} ==")
        headers, cells = mapview.table(v, data[v])
        print(render(headers, cells))
    return 0


# --- trace ------------------------------------------------------------------


def _probes(args: argparse.Namespace) -> list[Any]:
    from lb.trace import ProbeError, make_probe

    if args.batch:
        if args.src or args.dst:
            raise UsageError("--batch: give probes either in the file or with --src/--dst")
        probes = []
        try:
            lines = Path(args.batch).read_text().splitlines()
        except OSError as e:
            raise UsageError(f"--batch: {e.strerror}: {args.batch}") from e
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ProbeError("line", "expected a JSON object")
                probes.append(make_probe(obj.get("src"), obj.get("dst"),
                                         obj.get("proto", "tcp"), obj.get("from", "pod")))
            except json.JSONDecodeError as e:
                raise UsageError(f"--batch line {n}: not JSON: {e.msg}") from e
            except ProbeError as e:
                raise UsageError(f"--batch line {n}: {e.field}: {e}") from e
        return probes
    if not args.src or not args.dst:
        raise UsageError("--src and --dst are required (or --batch FILE)")
    try:
        return [make_probe(args.src, args.dst, args.proto, args.entry)]
    except ProbeError as e:
        raise UsageError(f"--{e.field}: {e}") from e


def cmd_trace(args: argparse.Namespace) -> int:
    from lb.trace import tracer

    probes = _probes(args)
    with tracer(_load_cluster(args.file), _node(args), args.datapath) as t:
        results = [t.run(p) for p in probes]
    for r in results:
        if args.batch or args.output == "json":
            print(json.dumps(r.as_json()) if args.batch else dump_json(r.as_json()))
        else:
            print(r.line())
    return 0


# --- parser -----------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lbctl", description=__doc__.splitlines()[0])
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("maps", help="show the datapath's maps")
    m.add_argument("view", nargs="?", choices=mapview.VIEWS)
    m.add_argument("-o", "--output", choices=("table", "json"), default="table")
    m.add_argument("--instance", default=DEFAULT_INSTANCE,
                   help="pin directory name under /sys/fs/bpf")
    m.set_defaults(func=cmd_maps)

    t = sub.add_parser("trace", help="run one packet through the programs and print the verdict")
    t.add_argument("-f", "--file", action="append", required=True, metavar="FILE")
    t.add_argument("--src", help="IP[:PORT]")
    t.add_argument("--dst", help="IP:PORT")
    t.add_argument("--proto", default="tcp")
    t.add_argument("--from", dest="entry", default="pod")
    t.add_argument("--batch", metavar="FILE", help="JSON lines of probes")
    t.add_argument("--datapath", choices=("kernel", "userspace"), default="kernel")
    t.add_argument("-o", "--output", choices=("table", "json"), default="table")
    add_node_args(t)
    t.set_defaults(func=cmd_trace)

    from lb.agent import add_agent_commands

    add_agent_commands(sub)
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


if __name__ == "__main__":
    sys.exit(main())
