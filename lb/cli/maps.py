"""`lbctl maps`: what a running instance holds, read from its pinned maps."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lb.cli.table import dump_json, render
from lb.datapath.instance import DEFAULT_INSTANCE, pin_dir_of
from lb.inspect import mapview


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


def add_command(sub: Any) -> None:
    m = sub.add_parser("maps", help="show the datapath's maps")
    m.add_argument("view", nargs="?", choices=mapview.VIEWS)
    m.add_argument("-o", "--output", choices=("table", "json"), default="table")
    m.add_argument("--instance", default=DEFAULT_INSTANCE,
                   help="pin directory name under /sys/fs/bpf")
    m.set_defaults(func=cmd_maps)
