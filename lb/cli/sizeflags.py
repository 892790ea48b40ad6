"""The map-size flags (loader/sizes.py SIZE_FLAGS), shared by `lbctl run`
(the node's maps) and `lbctl trace` (a throwaway instance: by default sized
to the objects traced, with the flags exactly as a node has them)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from loader.sizes import SIZE_FLAGS, Sizes

MAX_MAP_SIZE = 1 << 26


def map_size(value: str) -> int:
    if not value.isdigit() or not 2 <= int(value) <= MAX_MAP_SIZE:
        raise argparse.ArgumentTypeError(f"{value!r} is not a map size in [2, {MAX_MAP_SIZE}]")
    return int(value)


def add_size_args(p: argparse.ArgumentParser, defaults: Sizes | None) -> None:
    """`defaults` None: the default is computed from the input."""
    for f in SIZE_FLAGS:
        default = getattr(defaults, f.field) if defaults else "sized to the input"
        p.add_argument("--" + f.flag, type=map_size, metavar="N",
                       help=f"room for this many {f.what} (default {default})")


def given_sizes(args: argparse.Namespace) -> dict[str, int]:
    return {f.field: getattr(args, f.flag.replace("-", "_")) for f in SIZE_FLAGS
            if getattr(args, f.flag.replace("-", "_"), None) is not None}


def sizes_from_args(args: argparse.Namespace, base: Sizes) -> Sizes:
    return replace(base, **given_sizes(args))
