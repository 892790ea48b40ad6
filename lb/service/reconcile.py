"""Make the datapath's maps match a desired state, changing only what
differs.

Order matters to packets in flight: backends are written before the
services that point at them, deletions come last. Ranges and ids given up
in one sync are reused only from the next sync on, once no packet can still
be reading them.

Frontends of one service port with the same backends share one Maglev
table. A table keeps its size while its backends change (maglev.kept_size),
and then only the slots whose backend changed are written, in place, as
Katran does (every slot names a live backend throughout, so a packet that
reads some old and some new slots is still served). A table that must grow
or shrink is filled anew in a fresh range, and its frontends are switched
to it with one map update each.

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
from lb.prefilter import BACKEND, FRONTEND, VIP, Member, Prefilter
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
TableKey = tuple[int, tuple[int, ...]]  # group id, backend ids


@dataclass(eq=False)
class Table:
    """One Maglev range of lb_maglev and what it holds."""

    key: TableKey
    off: int
    slots: array.array[int]  # backend id per slot
    users: int = 0  # frontends pointing at it

    @property
    def size(self) -> int:
        return len(self.slots)


def svc_key(f: Frontend) -> object:
    return layout.new(
        "struct lb_svc_key", addr=ip_be(f.ip), port=port_be(f.port), proto=f.proto, scope=f.scope
    )


@dataclass
class Applied:
    """What the maps hold for one frontend entry."""

    svc_id: int
    group_id: int
    table: Table | None
    flags: int
    affinity_timeout: int
    backend_ids: tuple[int, ...]
    # What was written, to skip it next time it is wanted unchanged; None
    # when adopted from pinned maps (written again on the first sync).
    entry: FrontendEntry | None = None

    @property
    def off(self) -> int:
        return self.table.off if self.table else 0

    @property
    def size(self) -> int:
        return self.table.size if self.table else 0


@dataclass
class SyncResult:
    added: int = 0
    updated: int = 0
    removed: int = 0
    backends_added: int = 0
    # Maglev slots written: whole new tables, and single slots changed in place.
    slots_written: int = 0
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
        maglev_slots: int, filter_words: int, min_table_size: int = maglev.TABLE_SIZES[0],
    ) -> None:
        self.maps = maps
        maglev.table_size(1, min_table_size)  # a size of the ladder, or ValueError
        self.min_table_size = min_table_size
        self.slab = SlabAllocator(maglev_slots, "lb_maglev")
        self.svc_ids = IdAllocator(max_services, "frontend ids", "lb_services")
        self.group_ids = IdAllocator(max_services, "service-port ids", "lb_services")
        self.backend_ids = IdAllocator(max_backends, "backend ids", "lb_backends")
        self.applied: dict[Frontend, Applied] = {}
        self.tables: dict[TableKey, Table] = {}
        # Per sync: the table whose users all move to one new backend set,
        # to be rewritten in place for it (see _plan_tables).
        self._inherit: dict[TableKey, Table] = {}
        self.frontend_ids: dict[FrontendAddr, int] = {}
        self.groups: dict[str, int] = {}
        self.backends: dict[BackendKey, tuple[int, int]] = {}  # -> (id, flags)
        self._recovered_groups: dict[Frontend, int] = {}
        self._quarantine: list[tuple[str, int, int]] = []
        self.vips: set[str] = set()
        self.cidrs: set[str] = set()
        self.ranges: dict[int, set[str]] = {}  # svc_id -> CIDRs
        self.config: tuple[str | None, str | None, int, tuple[str, ...],
                           tuple[str, ...], int] | None = None
        self.prefilter = Prefilter(maps["lb_filter"], filter_words)

    # --- restart ---------------------------------------------------------

    def recover(self) -> int:
        """Adopt what the pinned maps hold; returns the entries found."""
        by_range: dict[tuple[int, int], Table] = {}
        for k, v in self.maps["lb_services"].items():
            f = Frontend(ip_str(k.addr), port_host(k.port), k.proto, k.scope)
            table = None
            if v.maglev_size:
                rng = (v.maglev_off, v.maglev_size)
                if rng not in by_range:
                    by_range[rng] = self._read_table(v.group_id, *rng)
                table = by_range[rng]
                table.users += 1
            self.applied[f] = Applied(v.svc_id, v.group_id, table, v.flags,
                                      v.affinity_timeout, table.key[1] if table else ())
            self._recovered_groups[f] = v.group_id
            fa = (f.ip, f.port, f.proto)
            if fa not in self.frontend_ids:
                self.frontend_ids[fa] = v.svc_id
                self.svc_ids.claim(v.svc_id)
            if not self.group_ids.in_use(v.group_id):
                self.group_ids.claim(v.group_id)
        self.slab.rebuild(list(by_range))
        for t in by_range.values():
            # Tables of one key in separate ranges (written apart before) stay
            # apart; one of them is found by key.
            self.tables.setdefault(t.key, t)
        for bid, b in self.maps["lb_backends"].items():
            if b.addr == 0:
                continue
            key = (b.group_id, ip_str(b.addr), port_host(b.port), b.proto)
            self.backends[key] = (bid, b.flags)
            self.backend_ids.claim(bid)
        vip_keys, cidr_keys, range_keys = (
            self.maps[m].keys() for m in ("lb_vips", "lb_svc_cidrs", "lb_source_ranges"))
        self.vips = {ip_str(k) for k in vip_keys}
        self.cidrs = {f"{ip_str(k.addr)}/{k.prefixlen}" for k in cidr_keys}
        for k in range_keys:
            cidr = f"{ip_str(k.addr)}/{k.prefixlen - 32}"
            self.ranges.setdefault(socket.ntohl(k.svc_id), set()).add(cidr)
        self.prefilter.recover(self._members())
        return len(self.applied)

    def _read_table(self, gid: int, off: int, size: int) -> Table:
        slots = array.array("I", self.maps["lb_maglev"].read_array(off, size))
        return Table((gid, tuple(sorted(set(slots)))), off, slots)

    # --- sync -------------------------------------------------------------

    def sync(self, desired: DesiredState) -> SyncResult:
        res = SyncResult()
        self._release_quarantine()
        # Everything this sync may program passes the pre-filter before it
        # is written; what is not programmed after all is cleared at the end.
        self.prefilter.admit(_desired_members(desired))
        entries = dict(desired.entries)
        kept: set[Frontend] = set()
        self._ensure_groups(entries)
        # Most syncs change a handful of entries among thousands. Programmed
        # frontends are written first: they keep the room they have.
        changed = dict(sorted(
            ((f, e) for f, e in entries.items()
             # The desired state's memo hands back the very entry it had.
             if f not in self.applied or (self.applied[f].entry is not e
                                          and self.applied[f].entry != e)),
            key=lambda item: (item[0] not in self.applied, item[0])))
        self._write_backends(changed, res)
        self._plan_tables(changed)
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
        self.prefilter.settle(self._members())
        return res

    def _members(self) -> set[Member]:
        """The pre-filter's members for what the maps hold."""
        return ({(FRONTEND, f.ip, f.port) for f in self.applied}
                | {(VIP, ip, 0) for ip in self.vips}
                | {(BACKEND, ip, port) for _, ip, port, _ in self.backends})

    @staticmethod
    def _refuse(res: SyncResult, subject: str, err: Exception) -> None:
        full = err.map_name if isinstance(err, (Exhausted, MapFull)) else ""
        # The caller says what was refused, once and bounded (lb/refusal.py).
        res.refusals.append(Refusal(subject, str(err), full))

    # --- node-wide entries: config, ClusterIP set, service CIDRs ---------

    def _write_node(self, desired: DesiredState, entries: dict[Frontend, FrontendEntry],
                    kept: set[Frontend], res: SyncResult) -> None:
        want = tuple(sorted(c for c in desired.service_cidrs
                            if ipaddress.ip_network(c).version == 4))
        config = (desired.node_ip, desired.hairpin_ip, desired.netns_cookie, desired.node_ips,
                  want, desired.min_mtu)
        if config != self.config:
            val = layout.new(
                "struct lb_config",
                node_ip=ip_be(desired.node_ip) if desired.node_ip else 0,
                hairpin_ip=ip_be(desired.hairpin_ip) if desired.hairpin_ip else 0,
                netns_cookie=desired.netns_cookie, min_mtu=desired.min_mtu)
            # The node's first LB_MAX_NODE_IPS addresses (--node-ip's first);
            # a source among any further ones is not caught here.
            own = desired.node_ips[:layout.const("LB_MAX_NODE_IPS")]
            for i, ip in enumerate(own):
                val.node_ips[i] = ip_be(ip)
            # The service CIDRs for the fast path, or all from the trie.
            if len(want) > layout.const("LB_MAX_SVC_CIDRS"):
                val.svc_cidrs_spill = 1
            else:
                for i, c in enumerate(want):
                    net = ipaddress.IPv4Network(c)
                    val.svc_cidr_net[i] = ip_be(str(net.network_address))
                    val.svc_cidr_mask[i] = ip_be(str(net.netmask))
            self.maps["lb_config"].update(0, val[0])
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
        for c in sorted(set(want) - self.cidrs):
            cidrs.update(_lpm4(c), 1)
        for c in sorted(self.cidrs - set(want)):
            cidrs.delete(_lpm4(c))
        self.cidrs = set(want)

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
        # Sorted for the same ids on every node, but only what has no group
        # yet: a change at 10k services must not sort them all.
        for f, e in sorted((f, e) for f, e in entries.items() if e.group not in self.groups):
            if e.group in self.groups:  # another frontend of the same group came first
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

    def _usable(self, e: FrontendEntry, gid: int) -> list[tuple[Backend, int]]:
        named = [(b, self.backends.get((gid, b.ip, b.port, b.proto))) for b in e.backends]
        usable = [(b, have[0]) for b, have in named if have]
        if len(usable) < len(named):
            # Half a backend set would overload the half that got in.
            raise Exhausted(f"{len(named) - len(usable)} of {len(named)} backends got no id: "
                            f"all {self.backend_ids.limit - 1} backend ids are in use",
                            "lb_backends")
        return usable

    def _plan_tables(self, changed: dict[Frontend, FrontendEntry]) -> None:
        """Find the tables whose users all leave for one new backend set: each
        is rewritten in place for that set (when its size holds it)."""
        leaving: dict[Table, set[TableKey]] = {}
        moves: dict[Table, int] = {}
        for f, e in changed.items():
            old = self.applied.get(f)
            gid = self.groups.get(e.group)
            if old is None or old.table is None or gid != old.group_id:
                continue
            try:
                key = (gid, tuple(sorted(bid for _, bid in self._usable(e, gid))))
            except Exhausted:
                continue
            if key != old.table.key and key[1]:
                leaving.setdefault(old.table, set()).add(key)
                moves[old.table] = moves.get(old.table, 0) + 1
        self._inherit = {next(iter(keys)): t for t, keys in leaving.items()
                         if len(keys) == 1 and moves[t] == t.users}

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
        usable = self._usable(e, gid)
        bids = tuple(sorted(bid for _, bid in usable))
        old = self.applied.get(f)
        if (old is not None and old.backend_ids == bids and old.group_id == gid
                and old.flags == e.flags and old.svc_id == sid
                and old.affinity_timeout == e.affinity_timeout):
            old.entry = e
            return
        table = self._table_for((gid, bids), usable, old, res) if usable else None
        val = layout.new(
            "struct lb_svc_val", svc_id=sid, maglev_off=table.off if table else 0,
            maglev_size=table.size if table else 0, affinity_timeout=e.affinity_timeout,
            backend_count=len(usable), flags=e.flags, group_id=gid)
        try:
            self.maps["lb_services"].update(svc_key(f), val[0])
        except BpfError:
            if table is not None and table.users == 0:
                # Never pointed at: free at once.
                self._forget(table)
                self.slab.free(table.off, table.size)
            raise
        old_table = old.table if old else None
        if table is not old_table:
            if table is not None:
                table.users += 1
            if old_table is not None:
                self._release(old_table)
        self.applied[f] = Applied(sid, gid, table, e.flags, e.affinity_timeout, bids, e)
        if old:
            res.updated += 1
        else:
            res.added += 1

    def _table_for(self, key: TableKey, usable: list[tuple[Backend, int]],
                   old: Applied | None, res: SyncResult) -> Table:
        """The table for `key`: the one there is, the planned one rewritten in
        place, or a new range, sized from what the frontend had."""
        have = self.tables.get(key)
        if have is not None:
            return have
        names = [b.name for b, _ in usable]
        ids = [bid for _, bid in usable]
        src = self._inherit.pop(key, None)
        floor = self.min_table_size
        if src is not None and maglev.kept_size(src.size, len(usable), floor) == src.size:
            self._rewrite(src, maglev.populate_array(names, src.size, labels=ids), res)
            if self.tables.get(src.key) is src:
                del self.tables[src.key]
            src.key = key
            self.tables[key] = src
            return src
        carried = src or (old.table if old and old.table and old.group_id == key[0] else None)
        size = maglev.kept_size(carried.size if carried else 0, len(usable), floor)
        off = self.slab.alloc(size)
        slots = maglev.populate_array(names, size, labels=ids)
        try:
            self.maps["lb_maglev"].update_batch(
                array.array("I", range(off, off + size)).tobytes(), slots.tobytes(), size)
        except BpfError:
            self.slab.free(off, size)
            raise
        res.slots_written += size
        table = Table(key, off, slots)
        self.tables[key] = table
        return table

    def _rewrite(self, t: Table, new: array.array[int], res: SyncResult) -> None:
        """Katran's delta: write only the slots whose backend changed."""
        changed = [i for i, (a, b) in enumerate(zip(t.slots, new, strict=True)) if a != b]
        if changed:
            keys = array.array("I", (t.off + i for i in changed))
            vals = array.array("I", (new[i] for i in changed))
            self.maps["lb_maglev"].update_batch(keys.tobytes(), vals.tobytes(), len(changed))
        t.slots = new
        res.slots_written += len(changed)

    def _release(self, t: Table) -> None:
        t.users -= 1
        if t.users == 0:
            self._forget(t)
            # Packets may still be reading it until the next sync.
            self._quarantine.append(("slab", t.off, t.size))

    def _forget(self, t: Table) -> None:
        if self.tables.get(t.key) is t:
            del self.tables[t.key]

    def _remove_entry(self, f: Frontend, res: SyncResult) -> None:
        old = self.applied.pop(f)
        self.maps["lb_services"].delete(svc_key(f))
        if old.table is not None:
            self._release(old.table)
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


def _desired_members(desired: DesiredState) -> set[Member]:
    return ({(FRONTEND, f.ip, f.port) for f in desired.entries}
            | {(VIP, ip, 0) for ip in desired.vips}
            | {(BACKEND, b.ip, b.port) for e in desired.entries.values() for b in e.backends})
