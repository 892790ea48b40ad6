"""The agent's typed configuration: what `lbctl run` was asked to do, once
its flags are checked (lb/cli/run.py makes it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lb.datapath.attach import OBJECT_CACHE
from lb.model import Node
from lb.service.maglev import TABLE_SIZES
from lb.sources.manifests import Rules
from loader.sizes import Sizes

# --incremental-check-period's default (seconds).
INCREMENTAL_CHECK_PERIOD = 300.0


@dataclass(frozen=True)
class AgentConfig:
    """What `lbctl run` was asked to do, checked: the agent's only input."""

    instance: str
    node: Node
    ifaces: tuple[str, ...]
    min_sync_period: float
    files: tuple[Path, ...]  # the file source; empty with kubernetes
    rules: Rules  # what the file source checks objects against
    kubernetes: bool
    kubeconfig: str | None
    resync_period: float
    metrics_addr: str | None
    healthz_addr: str | None
    netns: str | None
    sizes: Sizes
    conntrack_defines: dict[str, str]
    cgroup: str | None  # a path, or "auto"
    # --nodeport-addresses: None is "primary" (the node's own addresses).
    node_port_cidrs: tuple[str, ...] | None = None
    # --maglev-min-table-size: the smallest Maglev table (lb/service/maglev.py).
    min_table_size: int = TABLE_SIZES[0]
    # --incremental-check-period: how often the desired state kept by the
    # memo, and a policy compile that reused rules, are compared with full
    # ones (0: every sync).
    incremental_check_period: float = INCREMENTAL_CHECK_PERIOD
    # --object-cache: where compiled programs are kept (None: compile every start).
    objects: Path | None = OBJECT_CACHE
