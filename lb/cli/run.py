"""`lbctl run` and `lbctl down`: the node agent's flags, checked into an
AgentConfig, and taking an instance down.

down: detach every program the agent attached and remove the pins."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from lb.agent.config import INCREMENTAL_CHECK_PERIOD, AgentConfig
from lb.agent.loop import Agent, StartError
from lb.agent.nodeports import PRIMARY, parse_cidrs
from lb.cli.nodeflags import UsageError, add_node_args, node_from_args, rules_from_args
from lb.cli.sizeflags import add_size_args, sizes_from_args
from lb.datapath.attach import OBJECT_CACHE, Attachments, detach_all
from lb.datapath.instance import DEFAULT_INSTANCE, pin_dir_of
from lb.datapath.lock import InstanceBusy, lock_instance, release
from lb.service.maglev import TABLE_SIZES
from lb.sources.kube import DEFAULT_RESYNC_PERIOD, ConfigError, kubeconfig_path
from loader import layout
from loader.build import BpffsMissing, LayoutMismatch, remove_pins
from loader.sizes import Sizes

log = logging.getLogger("lbctl.agent")

# kube-proxy's flags for the same settings, mapped to the datapath's defines.
CONNTRACK_FLAGS = {
    "conntrack_tcp_timeout_established": "LB_CT_TCP_LIFETIME_S",
    "conntrack_tcp_timeout_syn": "LB_CT_TCP_SYN_S",
    "conntrack_tcp_timeout_close": "LB_CT_TCP_CLOSING_S",
    "conntrack_udp_timeout": "LB_CT_OTHER_LIFETIME_S",
}


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """Raises UsageError for flags that contradict each other or do not parse."""
    problem = _flag_problem(args)
    if problem:
        raise UsageError(f"run: {problem}")
    return AgentConfig(
        instance=args.instance, node=node_from_args(args), ifaces=tuple(args.iface or ()),
        min_sync_period=float(args.min_sync_period),
        files=tuple(Path(f) for f in args.file), rules=rules_from_args(args),
        kubernetes=bool(args.kubernetes),
        kubeconfig=args.kubeconfig, resync_period=float(args.resync_period),
        metrics_addr=args.metrics_addr, healthz_addr=args.healthz_addr, netns=args.netns,
        sizes=sizes_from_args(args, Sizes()), conntrack_defines=conntrack_defines(args),
        cgroup=args.cgroup, node_port_cidrs=node_port_cidrs(args),
        min_table_size=args.maglev_min_table_size,
        incremental_check_period=float(args.incremental_check_period),
        objects=Path(args.object_cache) if args.object_cache else None)


def node_port_cidrs(args: argparse.Namespace) -> tuple[str, ...] | None:
    try:
        return parse_cidrs(args.nodeport_addresses or [PRIMARY])
    except ValueError as e:
        raise UsageError(f"run: --nodeport-addresses: {e}") from e


def conntrack_defines(args: argparse.Namespace) -> dict[str, str]:
    """Compile-time conntrack lifetimes; changing one loads a changed program
    over the same pinned maps."""
    return {define: str(int(getattr(args, flag))) for flag, define in CONNTRACK_FLAGS.items()
            if getattr(args, flag, None) is not None}




def _flag_problem(args: argparse.Namespace) -> str | None:
    if args.kubernetes and args.file:
        return "--file and --kubernetes are alternatives: give one"
    if not args.kubernetes and not args.file:
        return "give the objects with --file, or --kubernetes to watch the API server"
    if args.kubeconfig and not args.kubernetes:
        return "--kubeconfig: only with --kubernetes"
    if args.resync_period < 0:
        return "--resync-period: must be >= 0 (0: never)"
    if args.incremental_check_period < 0:
        return "--incremental-check-period: must be >= 0 (0: every sync)"
    from lb.agent.metrics import parse_addr  # prometheus_client: not for every lbctl command

    for flag, value in (("--metrics-addr", args.metrics_addr),
                        ("--healthz-addr", args.healthz_addr)):
        if value:
            try:
                parse_addr(value)
            except ValueError as e:
                return f"{flag}: {e}"
    if not args.iface:
        # Without them every veth would look like a pod's, a node uplink
        # that is a veth (kind, namespaces) included.
        return "--iface: give the node-facing devices (repeatable)"
    return None




def cmd_run(args: argparse.Namespace) -> int:
    try:
        agent = Agent(agent_config(args))
    except ConfigError as e:
        print(f"lbctl: run: --kubernetes: {e}", file=sys.stderr)
        return 2
    try:
        return agent.run()
    except (LayoutMismatch, InstanceBusy, StartError, BpffsMissing) as e:
        # Pins of another layout or size, another agent on them, a busy port,
        # a missing device or no bpffs: one line, naming the remedy.
        print(f"lbctl: run: {e}", file=sys.stderr)
        return 1


def cmd_down(args: argparse.Namespace) -> int:
    try:
        lock = lock_instance(args.instance)
    except InstanceBusy as e:
        print(f"lbctl: down: {e} (lbctl run): stop it first", file=sys.stderr)
        return 1
    state = Attachments.load(args.instance)
    pins = pin_dir_of(args.instance)
    if state is None and not pins.exists():
        release(args.instance, lock)
        print(f"lbctl: down: no instance {args.instance}: nothing to remove", file=sys.stderr)
        return 0
    problems: list[str] = []
    if state:
        problems = detach_all(state)
        Attachments.path(args.instance).unlink(missing_ok=True)
    remove_pins(pins)
    release(args.instance, lock)
    for p in problems:
        log.warning("down: %s", p)
    log.info("removed instance %s", args.instance)
    return 0


def positive_seconds(value: str) -> int:
    if not value.isdigit() or int(value) <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive number of seconds")
    return int(value)


def add_commands(sub: Any) -> None:
    r = sub.add_parser("run", help="run the node agent")
    r.add_argument("-f", "--file", action="append", default=[], metavar="FILE",
                   help="manifest file to watch (repeatable); or --kubernetes")
    r.add_argument("--iface", action="append", metavar="DEV",
                   help="node-facing device for XDP (repeatable; required)")
    r.add_argument("--netns", help="network namespace of the node (for labs and tests)")
    r.add_argument("--instance", default=DEFAULT_INSTANCE,
                   help="pin directory name under /sys/fs/bpf (default %(default)s)")
    r.add_argument("--object-cache", default=str(OBJECT_CACHE), metavar="DIR",
                   help="where compiled programs are kept, so that a restart with the same "
                        "programs, defines, kernel and BCC loads them without compiling "
                        "('' compiles every start; default %(default)s)")
    r.add_argument("--min-sync-period", default=0.2, type=float, metavar="SECONDS",
                   help="at most one sync this often, as kube-proxy's minSyncPeriod "
                        "(default %(default)s)")
    r.add_argument("--nodeport-addresses", action="append", metavar="CIDRS|primary",
                   help="the node addresses NodePorts answer on: 'primary' (the --node-ip "
                        "addresses, or the Node's), or comma-separated CIDRs (every address "
                        "of the node within them), as kube-proxy's flag (default primary)")
    r.add_argument("--cgroup", metavar="PATH",
                   help="cgroup v2 directory for the socket-level load balancer (the node's "
                        "processes and hostNetwork pods; e.g. the cgroup2 mount), or 'auto' "
                        "in a pod: the directory above kubelet's kubepods level")
    lifetimes = layout.c_defaults()
    for flag, define in CONNTRACK_FLAGS.items():
        r.add_argument("--" + flag.replace("_", "-"), type=positive_seconds, metavar="SECONDS",
                       help=f"kube-proxy's flag of that name (default {lifetimes[define]})")
    add_size_args(r, Sizes())
    r.add_argument("--maglev-min-table-size", type=int, choices=TABLE_SIZES,
                   default=TABLE_SIZES[0], metavar="SLOTS",
                   help="the smallest Maglev table, one of " + ", ".join(map(str, TABLE_SIZES))
                        + ": a backend added or removed moves about 1/N of new flows; larger "
                        "tables move fewer besides, at 4 bytes a slot per service port "
                        "(default %(default)s)")
    r.add_argument("--incremental-check-period", type=float,
                   default=INCREMENTAL_CHECK_PERIOD,
                   metavar="SECONDS",
                   help="a sync recomputes only the services whose objects changed, and "
                        "compiles policy only for the pods whose rules changed; this often "
                        "one also does both in full and counts what differs in "
                        "xdplb_desired_state_drift_total and xdplb_policy_drift_total, which "
                        "must stay 0 (0: every sync; default %(default)s)")
    r.add_argument("--kubernetes", action="store_true",
                   help="watch the API server (in-cluster, or --kubeconfig / $KUBECONFIG); "
                        "--node-name defaults to the hostname, --node-ip to the Node's "
                        "InternalIPs")
    r.add_argument("--kubeconfig", type=kubeconfig_path, metavar="PATH")
    r.add_argument("--resync-period", type=float, default=DEFAULT_RESYNC_PERIOD,
                   metavar="SECONDS",
                   help="list everything afresh this often (0: never; default %(default)s)")
    r.add_argument("--metrics-addr", metavar="HOST:PORT",
                   help="serve /metrics, /healthz, /readyz and /proxyMode here")
    r.add_argument("--healthz-addr", metavar="HOST:PORT",
                   help="serve kube-proxy's node health (/healthz, /livez) here")
    add_node_args(r)
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("down", help="detach the programs and remove the pinned maps")
    d.add_argument("--instance", default=DEFAULT_INSTANCE,
                   help="pin directory name under /sys/fs/bpf (default %(default)s)")
    d.set_defaults(func=cmd_down)
