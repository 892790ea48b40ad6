"""Make the datapath's maps match a desired state, changing only what
differs.

Order matters to packets in flight: backends are written before the
services that point at them; a service whose backends change gets a fresh
Maglev range, filled completely, and is then switched to it with one map
update (so a packet sees the old table or the new one, never a mix);
deletions come last. Ranges and ids given up in one sync are reused only
from the next sync on, once no packet can still be reading them.

When a map or an id space is full, the frontends that do not fit are
refused (logged, reported per map) and the maps keep what they held for
them: a frontend already programmed keeps its previous backends rather than
losing them, a new one waits. Frontends already programmed are written
first, so a new service never takes the room an existing one needs.

The reconciler can rebuild its bookkeeping from the pinned maps, so an
agent restarted over live maps keeps every id and range and disturbs no
established flow."""

from __future__ import annotations

import array
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from lb.encoding import ip_be, ip_str, lpm4_key, port_be, port_host, source_range_key
from lb.refusal import Refusal
from lb.service import maglev
from lb.service.allocators import Exhausted, IdAllocator, SlabAllocator
from lb.service.desired import Backend, DesiredState, Frontend, FrontendEntry
from loader import layout
from loader.libbpf import BpfError, MapFull
from loader.maps import BpfMap

log = logging.getLogger(__name__)

BackendKey = tuple[int, str, int, int]  # group id, ip, port, proto
FrontendAddr = tuple[str, int, int]  # ip, port, proto


def svc_key(f: Frontend) -> object:
    return layout.new(
        "struct lb_svc_key", addr=ip_be(f.ip), port=port_be(f.port), proto=f.proto, scope=f.scope
    )


@dataclass
class Applied:
    """What the maps hold for one frontend entry."""

    svc_id: int
    group_id: int
    off: int
    size: int
    flags: int
    affinity_timeout: int
    backend_ids: tuple[int, ...]
    # What was written, to skip it next time it is wanted unchanged; None
    # when adopted from pinned maps (written again on the first sync).
    entry: FrontendEntry | None = None


@dataclass
class SyncResult:
    added: int = 0
    updated: int = 0
    removed: int = 0
    backends_added: int = 0
    backends_removed: int = 0
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return [str(r) for r in self.refusals]

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed or self.backends_added
                    or self.backends_removed)


class Reconciler:
    def __init__(
        self, maps: Mapping[str, BpfMap], *, max_services: int, max_backends: int,
        maglev_slots: int,
    ) -> None:
        self.maps = maps
        self.slab = SlabAllocator(maglev_slots, "lb_maglev")
        self.svc_ids = IdAllocator(max_services, "frontend ids", "lb_services")
        self.group_ids = IdAllocator(max_services, "service-port ids", "lb_services")
        self.backend_ids = IdAllocator(max_backends, "backend ids", "lb_backends")
        self.applied: dict[Frontend, Applied] = {}
        self.frontend_ids: dict[FrontendAddr, int] = {}
        self.groups: dict[str, int] = {}
        self.backends: dict[BackendKey, tuple[int, int]] = {}  # -> (id, flags)
        self._recovered_groups: dict[Frontend, int] = {}
        self._quarantine: list[tuple[str, int, int]] = []
        self.vips: set[str] = set()
        self.cidrs: set[str] = set()
        self.ranges: dict[int, set[str]] = {}  # svc_id -> CIDRs
        self.config: tuple[str | None, str | None, int] | None = None

    # --- restart ---------------------------------------------------------

    def recover(self) -> int:
        """Adopt what the pinned maps hold; returns the entries found."""
        ranges = []
        for k, v in self.maps["lb_services"].items():
            f = Frontend(ip_str(k.addr), port_host(k.port), k.proto, k.scope)
            self.applied[f] = Applied(v.svc_id, v.group_id, v.maglev_off, v.maglev_size,
                                      v.flags, v.affinity_timeout, ())
            self._recovered_groups[f] = v.group_id
            if v.maglev_size:
                ranges.append((v.maglev_off, v.maglev_size))
            fa = (f.ip, f.port, f.proto)
            if fa not in self.frontend_ids:
                self.frontend_ids[fa] = v.svc_id
                self.svc_ids.claim(v.svc_id)
            if not self.group_ids.in_use(v.group_id):
                self.group_ids.claim(v.group_id)
        self.slab.rebuild(ranges)
        by_group: dict[int, list[int]] = {}
        for bid, b in self.maps["lb_backends"].items():
            if b.addr == 0:
                continue
            key = (b.group_id, ip_str(b.addr), port_host(b.port), b.proto)
            self.backends[key] = (bid, b.flags)
            self.backend_ids.claim(bid)
            by_group.setdefault(b.group_id, []).append(bid)
        for a in self.applied.values():
            a.backend_ids = tuple(sorted(by_group.get(a.group_id, [])))
        vip_keys, cidr_keys, range_keys = (
            self.maps[m].keys() for m in ("lb_vips", "lb_svc_cidrs", "lb_source_ranges"))
        self.vips = {ip_str(k) for k in vip_keys}
        self.cidrs = {f"{ip_str(k.addr)}/{k.prefixlen}" for k in cidr_keys}
        for k in range_keys:
            cidr = f"{ip_str(k.addr)}/{k.prefixlen - 32}"
            self.ranges.setdefault(socket.ntohl(k.svc_id), set()).add(cidr)
        return len(self.applied)

    # --- sync -------------------------------------------------------------

    def sync(self, desired: DesiredState) -> SyncResult:
        res = SyncResult()
        self._release_quarantine()
        entries = dict(desired.entries)
        kept: set[Frontend] = set()
        self._ensure_groups(entries)
        # Most syncs change a handful of entries among thousands. Programmed
        # frontends are written first: they keep the room they have.
        changed = dict(sorted(
            ((f, e) for f, e in entries.items()
             if f not in self.applied or self.applied[f].entry != e),
            key=lambda item: (item[0] not in self.applied, item[0])))
        self._write_backends(changed, res)
        for f, e in changed.items():
            try:
                self._write_entry(f, e, res)
            except (Exhausted, BpfError, ValueError) as err:
                entries.pop(f)
                if f in self.applied:
                    kept.add(f)
                stays = "keeps its previous entry" if f in kept else "not programmed"
                self._refuse(res, f"{e.service}: frontend {f} {stays}", err)
        for f in sorted(set(self.applied) - set(entries) - kept):
            self._remove_entry(f, res)
        self._drop_unused(entries, kept, res)
        self._recovered_groups.clear()
        self._write_node(desired, entries, kept, res)
        self._write_source_ranges(entries, kept, res)
        return res

    @staticmethod
    def _refuse(res: SyncResult, subject: str, err: Exception) -> None:
        full = err.map_name if isinstance(err, (Exhausted, MapFull)) else ""
        # The caller says what was refused, once and bounded (lb/refusal.py).
        res.refusals.append(Refusal(subject, str(err), full))

    # --- node-wide entries: config, ClusterIP set, service CIDRs ---------

    def _write_node(self, desired: DesiredState, entries: dict[Frontend, FrontendEntry],
                    kept: set[Frontend], res: SyncResult) -> None:
        config = (desired.node_ip, desired.hairpin_ip, desired.netns_cookie)
        if config != self.config:
            self.maps["lb_config"].update(0, layout.new(
                "struct lb_config",
                node_ip=ip_be(desired.node_ip) if desired.node_ip else 0,
                hairpin_ip=ip_be(desired.hairpin_ip) if desired.hairpin_ip else 0,
                netns_cookie=desired.netns_cookie)[0])
            self.config = config
        # Only ClusterIPs actually programmed: a refused service must not
        # turn into REJECTs for its clients.
        want_vips = ({f.ip for f in entries if f.ip in desired.vips}
                     | {f.ip for f in kept if f.ip in self.vips})
        vips = self.maps["lb_vips"]
        for ip in sorted(self.vips - want_vips):
            vips.delete(ip_be(ip))
            self.vips.discard(ip)
        for ip in sorted(want_vips - self.vips):
            try:
                vips.update(ip_be(ip), 1)
                self.vips.add(ip)
            except BpfError as err:
                self._refuse(res, f"ClusterIP {ip}", err)
        cidrs = self.maps["lb_svc_cidrs"]
        want = {c for c in desired.service_cidrs if ipaddress.ip_network(c).version == 4}
        for c in sorted(want - self.cidrs):
            cidrs.update(_lpm4(c), 1)
        for c in sorted(self.cidrs - want):
            cidrs.delete(_lpm4(c))
        self.cidrs = want

    def _write_source_ranges(self, entries: dict[Frontend, FrontendEntry],
                             kept: set[Frontend], res: SyncResult) -> None:
        want: dict[int, set[str]] = {}
        for f in kept:
            sid = self.applied[f].svc_id
            want.setdefault(sid, set()).update(self.ranges.get(sid, set()))
        for f, e in entries.items():
            if e.source_ranges and (f.ip, f.port, f.proto) in self.frontend_ids:
                sid = self.frontend_ids[(f.ip, f.port, f.proto)]
                want.setdefault(sid, set()).update(
                    c for c in e.source_ranges if ipaddress.ip_network(c).version == 4)
        rmap = self.maps["lb_source_ranges"]
        for sid in sorted(set(want) | set(self.ranges)):
            have, need = self.ranges.get(sid, set()), want.get(sid, set())
            for c in sorted(need - have):
                try:
                    rmap.update(_range_key(sid, c), 1)
                except BpfError as err:
                    self._refuse(res, f"source range {c}", err)
                    need = need - {c}
            for c in sorted(have - need):
                rmap.delete(_range_key(sid, c))
            if need:
                self.ranges[sid] = need
            else:
                self.ranges.pop(sid, None)

    def _ensure_groups(self, entries: dict[Frontend, FrontendEntry]) -> None:
        for f, e in sorted(entries.items()):
            if e.group in self.groups:
                continue
            old = self._recovered_groups.get(f)
            if old is not None and old not in self.groups.values():
                self.groups[e.group] = old
                continue
            # When ids run out its frontends are refused, and reported, one by one.
            with contextlib.suppress(Exhausted):
                self.groups[e.group] = self.group_ids.alloc()

    def _write_backends(self, entries: dict[Frontend, FrontendEntry], res: SyncResult) -> None:
        # Collected and written in one batch: a sync from empty writes
        # every backend, and a syscall each would dominate it.
        writes: list[tuple[int, Backend, int, int]] = []
        for e in entries.values():
            gid = self.groups.get(e.group)
            if gid is None:
                continue
            for b in (*e.backends, *e.draining):
                key = (gid, b.ip, b.port, b.proto)
                flags = _backend_flags(b)
                have = self.backends.get(key)
                if have and have[1] == flags:
                    continue
                try:
                    bid = have[0] if have else self.backend_ids.alloc()
                except Exhausted:
                    # Its frontends are refused, and reported, in _write_entry.
                    continue
                writes.append((bid, b, flags, gid))
                self.backends[key] = (bid, flags)
                res.backends_added += not have
        if not writes:
            return
        values = layout.ffi.new("struct lb_backend[]", len(writes))
        for v, (_, b, flags, gid) in zip(values, writes, strict=True):
            v.addr, v.port, v.proto = ip_be(b.ip), port_be(b.port), b.proto
            v.flags, v.group_id = flags, gid
        keys = array.array("I", (w[0] for w in writes))
        self.maps["lb_backends"].update_batch(keys.tobytes(), bytes(layout.ffi.buffer(values)),
                                              len(writes))

    def _write_entry(self, f: Frontend, e: FrontendEntry, res: SyncResult) -> None:
        gid = self.groups.get(e.group)
        if gid is None:
            raise Exhausted(f"all {self.group_ids.limit - 1} service-port ids are in use",
                            "lb_services")
        fa = (f.ip, f.port, f.proto)
        if fa not in self.frontend_ids:
            sid = self.svc_ids.alloc()
            self.maps["lb_rev_nat"].update(sid, layout.new(
                "struct lb_rev_nat", addr=ip_be(f.ip), port=port_be(f.port))[0])
            self.frontend_ids[fa] = sid
        sid = self.frontend_ids[fa]
        named = [(b, self.backends.get((gid, b.ip, b.port, b.proto))) for b in e.backends]
        usable = [(b, have[0]) for b, have in named if have]
        if len(usable) < len(named):
            # Half a backend set would overload the half that got in.
            raise Exhausted(f"{len(named) - len(usable)} of {len(named)} backends got no id: "
                            f"all {self.backend_ids.limit - 1} backend ids are in use",
                            "lb_backends")
        bids = tuple(sorted(bid for _, bid in usable))
        old = self.applied.get(f)
        same_backends = old is not None and old.backend_ids == bids and old.group_id == gid
        if (same_backends and old is not None and old.flags == e.flags and old.svc_id == sid
                and old.affinity_timeout == e.affinity_timeout):
            old.entry = e
            return
        if same_backends and old is not None:
            off, size = old.off, old.size
        elif usable:
            size = maglev.table_size(len(usable))
            off = self.slab.alloc(size)
            try:
                self._write_table(off, size, usable)
            except BpfError:
                self.slab.free(off, size)
                raise
        else:
            off = size = 0
        val = layout.new(
            "struct lb_svc_val", svc_id=sid, maglev_off=off, maglev_size=size,
            affinity_timeout=e.affinity_timeout, backend_count=len(usable), flags=e.flags,
            group_id=gid)
        try:
            self.maps["lb_services"].update(svc_key(f), val[0])
        except BpfError:
            if size and (old is None or off != old.off):
                self.slab.free(off, size)
            raise
        if old and old.size and old.off != off:
            self._quarantine.append(("slab", old.off, old.size))
        self.applied[f] = Applied(sid, gid, off, size, e.flags, e.affinity_timeout, bids, e)
        if old:
            res.updated += 1
        else:
            res.added += 1

    def _write_table(self, off: int, size: int, usable: list[tuple[Backend, int]]) -> None:
        ids = maglev.populate([b.name for b, _ in usable], size,
                              labels=[bid for _, bid in usable])
        keys = array.array("I", range(off, off + size))
        self.maps["lb_maglev"].update_batch(keys.tobytes(), array.array("I", ids).tobytes(),
                                            size)

    def _remove_entry(self, f: Frontend, res: SyncResult) -> None:
        old = self.applied.pop(f)
        self.maps["lb_services"].delete(svc_key(f))
        if old.size:
            self._quarantine.append(("slab", old.off, old.size))
        res.removed += 1

    def _drop_unused(self, entries: dict[Frontend, FrontendEntry], kept: set[Frontend],
                     res: SyncResult) -> None:
        live_frontends = {(f.ip, f.port, f.proto) for f in self.applied}
        for fa in sorted(set(self.frontend_ids) - live_frontends):
            sid = self.frontend_ids.pop(fa)
            self.maps["lb_rev_nat"].update(sid, layout.new("struct lb_rev_nat")[0])
            self._quarantine.append(("svc", sid, 0))
        live_groups = {self.groups[e.group] for e in entries.values() if e.group in self.groups}
        live_groups |= {self.applied[f].group_id for f in kept}
        kept_ids = {bid for f in kept for bid in self.applied[f].backend_ids}
        wanted: set[BackendKey] = set()
        for e in entries.values():
            gid = self.groups.get(e.group)
            if gid is not None:
                wanted.update((gid, b.ip, b.port, b.proto) for b in (*e.backends, *e.draining))
        wanted |= {key for key, (bid, _) in self.backends.items() if bid in kept_ids}
        for key in sorted(set(self.backends) - wanted):
            bid, _ = self.backends.pop(key)
            self.maps["lb_backends"].update(bid, layout.new("struct lb_backend")[0])
            self._quarantine.append(("backend", bid, 0))
            res.backends_removed += 1
        for name in sorted(g for g, gid in self.groups.items() if gid not in live_groups):
            self._quarantine.append(("group", self.groups.pop(name), 0))

    def _release_quarantine(self) -> None:
        for kind, a, b in self._quarantine:
            if kind == "slab":
                self.slab.free(a, b)
            elif kind == "svc":
                self.svc_ids.free(a)
            elif kind == "backend":
                self.backend_ids.free(a)
            else:
                self.group_ids.free(a)
        self._quarantine.clear()


def _lpm4(cidr: str) -> object:
    net = ipaddress.IPv4Network(cidr)
    return lpm4_key(str(net.network_address), net.prefixlen)


def _range_key(svc_id: int, cidr: str) -> object:
    net = ipaddress.IPv4Network(cidr)
    return source_range_key(svc_id, str(net.network_address), net.prefixlen)


def _backend_flags(b: Backend) -> int:
    flags = layout.const("LB_BACKEND_LOCAL") if b.local else 0
    if b.terminating:
        flags |= layout.const("LB_BACKEND_TERMINATING")
    return flags
