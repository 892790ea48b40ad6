"""`lbctl trace`: probes through a throwaway instance holding the node's
state for the given objects, in the kernel or its userspace twin."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lb.cli.nodeflags import UsageError, add_node_args, node_from_args
from lb.cli.table import dump_json
from lb.datapath.instance import KINDS
from lb.model import Cluster
from lb.sources.manifests import ManifestError, load


def _load_cluster(files: Sequence[str]) -> Cluster:
    try:
        result = load(Path(f) for f in files)
    except ManifestError as e:
        raise UsageError(str(e)) from e
    for err in result.errors:
        print(f"lbctl: skipped: {err}", file=sys.stderr)
    return result.cluster


def _probes(args: argparse.Namespace) -> list[Any]:
    from lb.inspect.trace import ProbeError, make_probe

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
    from lb.inspect.trace import tracer

    probes = _probes(args)
    with tracer(_load_cluster(args.file), node_from_args(args), args.datapath) as t:
        results = [t.run(p) for p in probes]
    for r in results:
        if args.batch or args.output == "json":
            print(json.dumps(r.as_json()) if args.batch else dump_json(r.as_json()))
        else:
            print(r.line())
    return 0


def add_command(sub: Any) -> None:
    t = sub.add_parser("trace", help="run one packet through the programs and print the verdict")
    t.add_argument("-f", "--file", action="append", required=True, metavar="FILE")
    t.add_argument("--src", help="IP[:PORT]")
    t.add_argument("--dst", help="IP:PORT")
    t.add_argument("--proto", default="tcp")
    t.add_argument("--from", dest="entry", default="pod")
    t.add_argument("--batch", metavar="FILE", help="JSON lines of probes")
    t.add_argument("--datapath", choices=KINDS, default="kernel")
    t.add_argument("-o", "--output", choices=("table", "json"), default="table")
    add_node_args(t)
    t.set_defaults(func=cmd_trace)
