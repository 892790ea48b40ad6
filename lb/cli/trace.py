"""`lbctl trace`: probes through a throwaway instance holding the node's
state for the given objects, in the kernel or its userspace twin."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lb.cli.nodeflags import UsageError, add_node_args, node_from_args, rules_from_args
from lb.cli.sizeflags import add_size_args, given_sizes
from lb.cli.table import dump_json, render
from lb.datapath.instance import KINDS, SMALL
from lb.inspect.trace import Frame, Probe
from lb.model import Cluster, Node
from lb.refusal import bounded
from lb.sources.manifests import ManifestError, Rules, load


def _load_cluster(files: Sequence[str], rules: Rules) -> Cluster:
    try:
        result = load((Path(f) for f in files), rules)
    except ManifestError as e:
        raise UsageError(str(e)) from e
    for err in result.errors:
        print(f"lbctl: skipped: {err}", file=sys.stderr)
    for err in result.warnings:
        print(f"lbctl: warning: {err}", file=sys.stderr)
    return result.cluster


def _json_lines(flag: str, path: str) -> list[tuple[int, Any]]:
    """The objects of a JSON-lines file, with their line numbers."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UsageError(f"{flag}: {e.strerror}: {path}") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise UsageError(f"{flag} line {n}: not JSON: {e.msg}") from e
    return out


def _probes(args: argparse.Namespace) -> list[Any]:
    from lb.inspect.trace import ProbeError, make_frame, make_probe

    given = [f for f, v in (("--batch", args.batch), ("--frames", args.frames)) if v]
    if len(given) > 1 or (given and (args.src or args.dst)):
        raise UsageError("give packets one way: --src/--dst, --batch FILE or --frames FILE")
    if args.frames:
        frames = []
        for n, obj in _json_lines("--frames", args.frames):
            try:
                frames.append(make_frame(obj))
            except ProbeError as e:
                raise UsageError(f"--frames line {n}: {e.field}: {e}") from e
        return frames
    if args.batch:
        probes = []
        for n, obj in _json_lines("--batch", args.batch):
            try:
                if not isinstance(obj, dict):
                    raise ProbeError("line", "expected a JSON object")
                probes.append(make_probe(obj.get("src"), obj.get("dst"),
                                         obj.get("proto", "tcp"), obj.get("from", "pod")))
            except ProbeError as e:
                raise UsageError(f"--batch line {n}: {e.field}: {e}") from e
        return probes
    if not args.src or not args.dst:
        raise UsageError("--src and --dst are required (or --batch FILE, or --frames FILE)")
    try:
        return [make_probe(args.src, args.dst, args.proto, args.entry)]
    except ProbeError as e:
        raise UsageError(f"--{e.field}: {e}") from e


def _warnings(sent: list[Any], cluster: Cluster, node: Node) -> list[str]:
    """Probes whose answer depends on a node flag that was not given."""
    out = []
    probes = [p for p in sent if isinstance(p, Probe)]
    node_ports = {p.node_port for s in cluster.services.values() for p in s.ports
                  if p.node_port}
    local = any(s.external_traffic_local or s.internal_traffic_local
                for s in cluster.services.values())
    if not node.ips and any(p.entry == "external" and p.dport in node_ports for p in probes):
        out.append("a probe is to a NodePort, but no --node-ip says where NodePorts answer")
    if node.name is None and local:
        out.append("a service has a Local traffic policy, but no --node-name says which "
                   "endpoints are this node's")
    return out


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the throwaway instance's pins go too."""
    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def cmd_trace(args: argparse.Namespace) -> int:
    from lb.inspect.trace import tracer

    probes = _probes(args)
    cluster, node = _load_cluster(args.file, rules_from_args(args)), node_from_args(args)
    for w in _warnings(probes, cluster, node):
        print(f"lbctl: warning: {w}", file=sys.stderr)
    given = given_sizes(args)
    sizes = replace(SMALL, **given) if given else None
    _stop_on_sigterm()
    with tracer(cluster, node, args.datapath, sizes) as t:
        for line in bounded(t.refused):
            print(f"lbctl: refused: {line}", file=sys.stderr)
        results = [t.replay(p) if isinstance(p, Frame) else t.run(p) for p in probes]
    if args.frames:
        if args.output == "json":
            print("\n".join(json.dumps(r.as_json()) for r in results))
        else:
            print(render(("FRAME", "FROM", "VERDICT", "BACKEND", "REASON"),
                         [(n, r.entry, r.verdict, r.backend, r.reason)
                          for n, r in enumerate(results, 1)]))
        return 0
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
    t.add_argument("--proto", default="tcp", choices=("tcp", "udp"),
                   help="(default %(default)s)")
    t.add_argument("--from", dest="entry", default="pod", choices=("pod", "external"),
                   help="where the packet enters: a pod's veth, or a node device "
                        "(default %(default)s)")
    t.add_argument("--batch", metavar="FILE", help="JSON lines of probes")
    t.add_argument("--frames", metavar="FILE",
                   help='JSON lines {"from": "pod|external|to-pod", "frame": HEX}: whole '
                        "Ethernet frames replayed in order on one load, conntrack and "
                        "fragment state carried from frame to frame")
    t.add_argument("--datapath", choices=KINDS, default="kernel",
                   help="the kernel's programs (root, BPF) or their userspace twin "
                        "(default %(default)s)")
    t.add_argument("-o", "--output", choices=("table", "json"), default="table")
    add_node_args(t)
    add_size_args(t, None)
    t.set_defaults(func=cmd_trace)
