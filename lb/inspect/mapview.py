"""Read the pinned maps of a running instance into rows for `lbctl maps`.
Works from any process: maps are opened by their pins."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from lb.counters import count
from lb.encoding import ip_str, port_host
from lb.model import PROTO_NAMES
from lb.policy import view as policy_view
from lb.verdicts import reason
from loader import layout
from loader.clock import DatapathClock
from loader.maps import BpfMap

SVC_FLAGS = {
    "LB_SVC_CLUSTER_IP": "ClusterIP",
    "LB_SVC_NODE_PORT": "NodePort",
    "LB_SVC_EXTERNAL_IP": "ExternalIP",
    "LB_SVC_LOAD_BALANCER": "LoadBalancer",
    "LB_SVC_AFFINITY": "affinity",
    "LB_SVC_SOURCE_RANGES": "source-ranges",
    "LB_SVC_MASQUERADE": "masquerade",
    "LB_SVC_LOCAL_ONLY": "local-only",
}
BACKEND_FLAGS = {"LB_BACKEND_LOCAL": "local", "LB_BACKEND_TERMINATING": "terminating"}
CT_FLAGS = {"LB_CT_MASQ": "masq", "LB_CT_SEEN_FIN": "fin", "LB_CT_SEEN_RST": "rst",
            "LB_CT_SEEN_REPLY": "reply", "LB_CT_EXTERNAL": "external",
            "LB_CT_NODE_SOCKET": "node-socket"}
CT_DIRECTIONS = {layout.const("LB_CT_FORWARD"): "forward", layout.const("LB_CT_REPLY"): "reply",
                 layout.const("LB_CT_POLICY"): "policy-egress",
                 layout.const("LB_CT_POLICY_INGRESS"): "policy-ingress"}
VIEWS = ("services", "backends", "maglev", "conntrack", "stats", "policy")


def _flags(value: int, names: Mapping[str, str]) -> str:
    return ",".join(n for c, n in names.items() if value & layout.const(c)) or "-"


def _proto(p: int) -> str:
    return PROTO_NAMES.get(p, str(p))


def _scope(s: int) -> str:
    return "internal" if s == layout.const("LB_SCOPE_INTERNAL") else "external"


def services(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    rows = []
    for k, v in maps["lb_services"].items():
        rows.append({
            "frontend": f"{ip_str(k.addr)}:{port_host(k.port)}",
            "protocol": _proto(k.proto),
            "scope": _scope(k.scope),
            "svc_id": v.svc_id,
            "group_id": v.group_id,
            "backends": v.backend_count,
            "maglev_offset": v.maglev_off,
            "maglev_size": v.maglev_size,
            "affinity_timeout": v.affinity_timeout,
            "flags": _flags(v.flags, SVC_FLAGS),
        })
    return sorted(rows, key=lambda r: (r["frontend"], r["protocol"], r["scope"]))


def backends(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    rows = []
    for bid, b in maps["lb_backends"].items():
        if b.addr == 0:
            continue
        rows.append({
            "id": int(bid),
            "address": f"{ip_str(b.addr)}:{port_host(b.port)}",
            "protocol": _proto(b.proto),
            "group_id": b.group_id,
            "flags": _flags(b.flags, BACKEND_FLAGS),
        })
    return sorted(rows, key=lambda r: r["id"])


def maglev(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    """Per service entry: how its table's slots spread over backends."""
    addr = {r["id"]: r["address"] for r in backends(maps)}
    mag = maps["lb_maglev"]
    rows = []
    for svc in services(maps):
        off, size = svc["maglev_offset"], svc["maglev_size"]
        counts = Counter(mag.lookup(i) for i in range(off, off + size))
        rows.append({
            "frontend": svc["frontend"],
            "protocol": svc["protocol"],
            "scope": svc["scope"],
            "size": size,
            "slots": {addr.get(b, f"id {b}"): n for b, n in sorted(counts.items())},
        })
    return rows


def conntrack(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    now = DatapathClock.of_kernel().now_ns()
    rows = []
    for k, v in maps["lb_ct"].items():
        rows.append({
            "direction": CT_DIRECTIONS.get(k.dir, str(k.dir)),
            "source": f"{ip_str(k.saddr)}:{port_host(k.sport)}",
            "destination": f"{ip_str(k.daddr)}:{port_host(k.dport)}",
            "protocol": _proto(k.proto),
            "backend_id": v.backend_id,
            "svc_id": v.svc_id,
            "group_id": v.group_id,
            "age_s": round(max(0, now - v.created_ns) / 1e9, 1),
            "idle_s": round(max(0, now - v.last_seen_ns) / 1e9, 1),
            "flags": _flags(v.flags, CT_FLAGS),
        })
    return sorted(rows, key=lambda r: (r["direction"], r["source"], r["destination"]))


def stats(maps: Mapping[str, BpfMap]) -> list[dict[str, Any]]:
    rows = []
    for i in range(layout.const("LB_STAT_MAX")):
        c = count(maps["lb_stats"], i)
        if not c.packets:
            continue
        r = reason(i)
        rows.append({"verdict": r.verdict, "reason": r.name, "packets": c.packets,
                     "bytes": c.bytes})
    return rows


def table(view: str, rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Headers and cells of a view, as `lbctl maps` prints them."""
    if view == "maglev":
        headers = ["FRONTEND", "PROTOCOL", "SCOPE", "SIZE", "SLOTS PER BACKEND"]
        cells = [[r["frontend"], r["protocol"], r["scope"], r["size"],
                  " ".join(f"{b}={n}" for b, n in r["slots"].items()) or "<none>"]
                 for r in rows]
        return headers, cells
    if not rows:
        return ["<no entries>"], []
    keys = list(rows[0])
    return [k.upper().replace("_", "-") for k in keys], [[r[k] for k in keys] for r in rows]


READERS = {"services": services, "backends": backends, "maglev": maglev,
           "conntrack": conntrack, "stats": stats, "policy": policy_view.rows}
