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

A sync costs what changed, as kube-proxy's partial syncs do: the desired
state says which frontends changed since the state synced before it, and
every shared resource (frontend ids, service-port ids, backends, ClusterIPs,
source ranges, pre-filter bits) is counted per programmed entry, so that
only the ones a change touched are looked at. A state that cannot say
(the first, or one after a sync that raised) gets a full pass over
everything, which the counts make equal to the incremental one.

The reconciler can rebuild its bookkeeping from the pinned maps, so an
agent restarted over live maps keeps every id and range and disturbs no
established flow."""

from __future__ import annotations

import array
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

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

CLUSTER_IP = layout.const("LB_SVC_CLUSTER_IP")
_LOCAL = layout.const("LB_BACKEND_LOCAL")
_TERMINATING = layout.const("LB_BACKEND_TERMINATING")
# lb_backends' values, packed and unpacked in bulk; the services' keys and
# values and the reverse NAT's, packed for one batch per sync.
_BACKEND = layout.packer("struct lb_backend", ("addr", "port", "proto", "flags", "group_id"))
_SVC_KEY = layout.packer("struct lb_svc_key", ("addr", "port", "proto", "scope"))
_SVC_VAL = layout.packer("struct lb_svc_val", (
    "svc_id", "maglev_off", "maglev_size", "affinity_timeout", "backend_count", "flags",
    "group_id"))
_REV_NAT = layout.packer("struct lb_rev_nat", ("addr", "port", "pad"))
_K = TypeVar("_K")

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


def _svc_key_bytes(f: Frontend) -> bytes:
    return _SVC_KEY.pack(ip_be(f.ip), port_be(f.port), f.proto, f.scope)


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
    # The backends it keeps in lb_backends: its own and its draining ones.
    backend_keys: tuple[BackendKey, ...] = ()

    @property
    def off(self) -> int:
        return self.table.off if self.table else 0

    @property
    def size(self) -> int:
        return self.table.size if self.table else 0


@dataclass
class Staged:
    """One sync's lb_services write, held for the batch: what the entry
    becomes once written, and what it was."""

    frontend: Frontend
    entry: FrontendEntry
    applied: Applied
    old: Applied | None
    key: bytes
    value: bytes


@dataclass
class Touched:
    """What one sync's changes may have left unused or changed: only these
    are looked at by its last steps (everything, on a full pass)."""

    frontends: set[FrontendAddr] = field(default_factory=set)
    groups: set[int] = field(default_factory=set)
    backends: set[BackendKey] = field(default_factory=set)
    vips: set[str] = field(default_factory=set)
    # svc_id -> its frontend; None: an id with ranges and no frontend any more.
    ranges: dict[int, FrontendAddr | None] = field(default_factory=dict)


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
        # to be rewritten in place for it (see _plan_tables), with its users
        # then.
        self._inherit: dict[TableKey, tuple[Table, int]] = {}
        # Per sync: the usable backends _plan_tables worked out, by frontend.
        self._usable_of: dict[Frontend, list[tuple[Backend, int]]] = {}
        self.frontend_ids: dict[FrontendAddr, int] = {}
        self.groups: dict[str, int] = {}
        self.backends: dict[BackendKey, tuple[int, int]] = {}  # -> (id, flags)
        self._recovered_groups: dict[Frontend, int] = {}
        self._quarantine: list[tuple[str, int, int]] = []
        self.vips: set[str] = set()
        self.cidrs: set[str] = set()
        self.ranges: dict[int, set[str]] = {}  # svc_id -> CIDRs
        self._arrive: list[Member] = []
        self._leave: list[Member] = []
        # Per sync: the services' writes and the new frontends' reverse NAT,
        # each written in one batch (services after their tables).
        self._staged: list[Staged] = []
        self._rev_nat: tuple[array.array[int], bytearray] = (array.array("I"), bytearray())
        # Per programmed entry: who uses each shared resource.
        self.by_addr: dict[FrontendAddr, set[Frontend]] = {}
        self.group_users: Counter[int] = Counter()
        self.backend_users: Counter[BackendKey] = Counter()
        self.vip_users: Counter[str] = Counter()
        self.service_users: Counter[str] = Counter()  # namespace/name -> entries
        # Service-port id -> its group; None: adopted from the pins, not named since.
        self._group_names: dict[int, str | None] = {}
        # The state the maps were last synced to, for the next one's delta.
        self._synced: object | None = None
        # Refused last time: looked at again on every sync until they fit.
        self._retry = Touched()
        self._retry_frontends: set[Frontend] = set()
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
            self._group_names.setdefault(v.group_id, None)
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
        # The whole array in one batch: one lookup per slot is 131,072
        # syscalls at the sizes of 10k services.
        raw = self.maps["lb_backends"].read_array(0, self.backend_ids.limit)
        for bid, (addr, port, proto, flags, gid) in enumerate(_BACKEND.iter_unpack(raw)):
            if addr == 0:
                continue
            self.backends[(gid, ip_str(addr), port_host(port), proto)] = (bid, flags)
            self.backend_ids.claim(bid)
        vip_keys, cidr_keys, range_keys = (
            self.maps[m].keys() for m in ("lb_vips", "lb_svc_cidrs", "lb_source_ranges"))
        self.vips = {ip_str(k) for k in vip_keys}
        self.cidrs = {f"{ip_str(k.addr)}/{k.prefixlen}" for k in cidr_keys}
        for k in range_keys:
            cidr = f"{ip_str(k.addr)}/{k.prefixlen - 32}"
            self.ranges.setdefault(socket.ntohl(k.svc_id), set()).add(cidr)
        key_of = {bid: key for key, (bid, _) in self.backends.items()}
        for f, a in self.applied.items():
            a.backend_keys = tuple(key_of[b] for b in a.backend_ids if b in key_of)
            self._count(f, a, 1, Touched())
        self.prefilter.recover(self._members())
        return len(self.applied)

    def _read_table(self, gid: int, off: int, size: int) -> Table:
        slots = array.array("I", self.maps["lb_maglev"].read_array(off, size))
        return Table((gid, tuple(sorted(set(slots)))), off, slots)

    # --- sync -------------------------------------------------------------

    def sync(self, desired: DesiredState) -> SyncResult:
        res = SyncResult()
        self._release_quarantine()
        entries = desired.entries
        delta = desired.changed
        if desired.since is None or desired.since is not self._synced:
            delta = None
        full = delta is None
        # A sync that raises leaves the maps half way: the next is a full pass.
        self._synced = None
        look = (entries.keys() | self.applied.keys() if delta is None
                else delta | self._retry_frontends)
        touched = Touched() if not full else self._everything()
        if not full:
            touched.vips |= self._retry.vips
            touched.ranges |= self._retry.ranges
        self._retry, self._retry_frontends = Touched(), set()
        # Members that come and go with programmed entries, counted at the
        # end in one pass (the pending hold covers the new ones until then).
        self._arrive, self._leave = [], []
        # Most syncs change a handful of entries among thousands. Programmed
        # frontends are written first: they keep the room they have.
        changed = dict(sorted(
            ((f, e) for f in look if (e := entries.get(f)) is not None
             # The desired state's memo hands back the very entry it had.
             and (f not in self.applied or (self.applied[f].entry is not e
                                            and self.applied[f].entry != e))),
            key=lambda item: (item[0] not in self.applied, item[0])))
        # Everything this sync may program passes the pre-filter before it
        # is written; held until the end, when what is programmed holds it.
        pending = list(_members_of(changed.values()))
        self.prefilter.hold(pending)
        self._ensure_groups(changed, touched)
        keys = self._write_backends(changed, res, touched)
        self._plan_tables(changed, keys)
        self._staged, self._rev_nat = [], (array.array("I"), bytearray())
        for f, e in changed.items():
            try:
                self._write_entry(f, e, keys.get(f, ()), res, touched)
            except (Exhausted, BpfError, ValueError) as err:
                self._refuse_entry(res, f, e, err)
        self._write_services(res, touched)
        for f in sorted(f for f in look if f not in entries and f in self.applied):
            self._remove_entry(f, res, touched)
        self._drop_unused(touched, res)
        self._recovered_groups.clear()
        self._write_node(desired, touched, res)
        self._write_source_ranges(touched, res)
        self.prefilter.move(self._arrive, [*self._leave, *pending])
        self._synced = desired.token
        return res

    def _everything(self) -> Touched:
        """A full pass looks at every shared resource there is."""
        ranges: dict[int, FrontendAddr | None] = dict.fromkeys(self.ranges)
        ranges |= {sid: fa for fa, sid in self.frontend_ids.items()}
        return Touched(set(self.frontend_ids), {*self.groups.values(), *self._group_names},
                       set(self.backends), self.vips | set(self.vip_users), ranges)

    def _members(self) -> Iterator[Member]:
        """The pre-filter's members for what the maps hold, one per holder."""
        for f in self.applied:
            yield (FRONTEND, f.ip, f.port)
        for ip in self.vips:
            yield (VIP, ip, 0)
        for _, ip, port, _ in self.backends:
            yield (BACKEND, ip, port)

    def _count(self, f: Frontend, a: Applied, sign: int, touched: Touched) -> None:
        """Count what entry `a` of `f` uses in (sign 1) or out (-1)."""
        fa = (f.ip, f.port, f.proto)
        users = self.by_addr.setdefault(fa, set())
        if sign > 0:
            users.add(f)
        else:
            users.discard(f)
            if not users:
                del self.by_addr[fa]
        touched.frontends.add(fa)
        touched.ranges[a.svc_id] = fa
        _bump(self.group_users, a.group_id, sign)
        touched.groups.add(a.group_id)
        if sign > 0:
            self.backend_users.update(a.backend_keys)  # counted in C
        else:
            for k in a.backend_keys:
                _bump(self.backend_users, k, -1)
        touched.backends.update(a.backend_keys)
        if a.flags & CLUSTER_IP:
            _bump(self.vip_users, f.ip, sign)
            touched.vips.add(f.ip)
        if a.entry is not None:
            _bump(self.service_users, a.entry.service, sign)

    def _refuse_entry(self, res: SyncResult, f: Frontend, e: FrontendEntry,
                      err: Exception) -> None:
        self._retry_frontends.add(f)
        stays = "keeps its previous entry" if f in self.applied else "not programmed"
        self._refuse(res, f"{e.service}: frontend {f} {stays}", err)

    @staticmethod
    def _refuse(res: SyncResult, subject: str, err: Exception) -> None:
        full = err.map_name if isinstance(err, (Exhausted, MapFull)) else ""
        # The caller says what was refused, once and bounded (lb/refusal.py).
        res.refusals.append(Refusal(subject, str(err), full))

    # --- node-wide entries: config, ClusterIP set, service CIDRs ---------

    def _write_node(self, desired: DesiredState, touched: Touched, res: SyncResult) -> None:
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
        vips = self.maps["lb_vips"]
        new: list[str] = []
        for ip in sorted(touched.vips):
            if ip not in self.vip_users and ip in self.vips:
                vips.delete(ip_be(ip))
                self.vips.discard(ip)
                self._leave.append((VIP, ip, 0))
            elif ip in self.vip_users and ip not in self.vips:
                new.append(ip)
        # One batch (a sync from empty writes every ClusterIP); where it
        # stops (a full map), the rest one by one, each refused alone.
        keys = array.array("I", [ip_be(ip) for ip in new])
        written = vips.update_some(keys.tobytes(), array.array("I", [1] * len(new)).tobytes(),
                                   len(new)) if new else 0
        for i, ip in enumerate(new):
            if i >= written:
                try:
                    vips.update(keys[i], 1)
                except BpfError as err:
                    self._refuse(res, f"ClusterIP {ip}", err)
                    self._retry.vips.add(ip)
                    continue
            self.vips.add(ip)
            self._arrive.append((VIP, ip, 0))
        cidrs = self.maps["lb_svc_cidrs"]
        for c in sorted(set(want) - self.cidrs):
            cidrs.update(_lpm4(c), 1)
        for c in sorted(self.cidrs - set(want)):
            cidrs.delete(_lpm4(c))
        self.cidrs = set(want)

    def _write_source_ranges(self, touched: Touched, res: SyncResult) -> None:
        rmap = self.maps["lb_source_ranges"]
        for sid, fa in sorted(touched.ranges.items()):
            need: set[str] = set()
            if fa is not None and self.frontend_ids.get(fa) == sid:
                for f in self.by_addr.get(fa, ()):
                    e = self.applied[f].entry
                    # Adopted from the pins and not written since: what they hold.
                    need |= (self.ranges.get(sid, set()) if e is None else
                             {c for c in e.source_ranges if ipaddress.ip_network(c).version == 4})
            have = self.ranges.get(sid, set())
            for c in sorted(need - have):
                try:
                    rmap.update(_range_key(sid, c), 1)
                except BpfError as err:
                    self._refuse(res, f"source range {c}", err)
                    self._retry.ranges[sid] = fa
                    need = need - {c}
            for c in sorted(have - need):
                rmap.delete(_range_key(sid, c))
            if need:
                self.ranges[sid] = need
            else:
                self.ranges.pop(sid, None)

    def _ensure_groups(self, entries: dict[Frontend, FrontendEntry], touched: Touched) -> None:
        # Sorted for the same ids on every node, but only what has no group
        # yet: a change at 10k services must not sort them all.
        for f, e in sorted((f, e) for f, e in entries.items() if e.group not in self.groups):
            if e.group in self.groups:  # another frontend of the same group came first
                continue
            old = self._recovered_groups.get(f)
            if old is not None and old in self._group_names and self._group_names[old] is None:
                gid = old  # adopted from the pins, and its group is this one
            else:
                # When ids run out its frontends are refused, and reported, one by one.
                try:
                    gid = self.group_ids.alloc()
                except Exhausted:
                    continue
            self.groups[e.group] = gid
            self._group_names[gid] = e.group
            touched.groups.add(gid)

    def _write_backends(self, entries: dict[Frontend, FrontendEntry], res: SyncResult,
                        touched: Touched) -> dict[Frontend, tuple[BackendKey, ...]]:
        """Give every backend of `entries` its id and lb_backends entry; returns, per
        frontend whose group has an id, the keys of its backends then its draining ones."""
        # Collected and written in one batch: a sync from empty writes
        # every backend, and a syscall each would dominate it.
        ids, values = array.array("I"), bytearray()
        new: list[Member] = []  # keys new to lb_backends: each holds its bit
        written: list[BackendKey] = []
        keys_of: dict[Frontend, tuple[BackendKey, ...]] = {}
        # Locals: a sync from empty runs the loop for 100k backends.
        backends, pack, alloc = self.backends, _BACKEND.pack, self.backend_ids.alloc
        for f, e in entries.items():
            gid = self.groups.get(e.group)
            if gid is None:
                continue
            members = e.backends + e.draining if e.draining else e.backends
            keys = keys_of[f] = tuple([(gid, b.ip, b.port, b.proto) for b in members])
            for b, key in zip(members, keys, strict=True):
                flags = _LOCAL * b.local | _TERMINATING * b.terminating
                have = backends.get(key)
                if have is None:
                    try:
                        bid = alloc()
                    except Exhausted:
                        # Its frontends are refused, and reported, in _write_entry.
                        continue
                    new.append((BACKEND, b.ip, b.port))
                elif have[1] == flags:
                    continue
                else:
                    bid = have[0]
                ids.append(bid)
                values += pack(ip_be(b.ip), port_be(b.port), b.proto, flags, gid)
                backends[key] = (bid, flags)
                written.append(key)
        if ids:
            self.maps["lb_backends"].update_batch(ids.tobytes(), bytes(values), len(ids))
            self._arrive += new
        # Unused at the end (its frontend refused): cleared again.
        touched.backends.update(written)
        res.backends_added += len(new)
        return keys_of

    def _usable(self, e: FrontendEntry, keys: tuple[BackendKey, ...]
                ) -> list[tuple[Backend, int]]:
        have_of = self.backends.get
        # `keys` go on with the draining backends, which no new flow may choose.
        named = [(b, have_of(k)) for b, k in zip(e.backends, keys, strict=False)]
        usable = [(b, have[0]) for b, have in named if have]
        if len(usable) < len(named):
            # Half a backend set would overload the half that got in.
            raise Exhausted(f"{len(named) - len(usable)} of {len(named)} backends got no id: "
                            f"all {self.backend_ids.limit - 1} backend ids are in use",
                            "lb_backends")
        return usable

    def _plan_tables(self, changed: dict[Frontend, FrontendEntry],
                     keys: dict[Frontend, tuple[BackendKey, ...]]) -> None:
        """Find the tables whose users all leave for one new backend set: each
        is rewritten in place for that set (when its size holds it)."""
        leaving: dict[Table, set[TableKey]] = {}
        moves: dict[Table, int] = {}
        self._usable_of = {}
        for f, e in changed.items():
            old = self.applied.get(f)
            gid = self.groups.get(e.group)
            if old is None or old.table is None or gid != old.group_id:
                continue
            try:
                usable = self._usable_of[f] = self._usable(e, keys[f])
            except Exhausted:
                continue
            key = (gid, tuple(sorted(bid for _, bid in usable)))
            if key != old.table.key and key[1]:
                leaving.setdefault(old.table, set()).add(key)
                moves[old.table] = moves.get(old.table, 0) + 1
        self._inherit = {next(iter(keys)): (t, t.users) for t, keys in leaving.items()
                         if len(keys) == 1 and moves[t] == t.users}

    def _write_entry(self, f: Frontend, e: FrontendEntry, keys: tuple[BackendKey, ...],
                     res: SyncResult, touched: Touched) -> None:
        """Stage `f`'s lb_services write (or, when the map holds it already,
        recount what it keeps)."""
        gid = self.groups.get(e.group)
        if gid is None:
            raise Exhausted(f"all {self.group_ids.limit - 1} service-port ids are in use",
                            "lb_services")
        fa = (f.ip, f.port, f.proto)
        if fa not in self.frontend_ids:
            sid = self.svc_ids.alloc()
            ids, values = self._rev_nat
            ids.append(sid)
            values += _REV_NAT.pack(ip_be(f.ip), port_be(f.port), 0)
            self.frontend_ids[fa] = sid
            touched.frontends.add(fa)  # unused at the end (refused): freed again
        sid = self.frontend_ids[fa]
        # Worked out already where the entry had a table (_plan_tables).
        usable = self._usable_of.pop(f, None) or self._usable(e, keys)
        bids = tuple(sorted(bid for _, bid in usable))
        old = self.applied.get(f)
        if (old is not None and old.backend_ids == bids and old.group_id == gid
                and old.flags == e.flags and old.svc_id == sid
                and old.affinity_timeout == e.affinity_timeout):
            # The services map holds it already; what it keeps may differ
            # (draining backends, source ranges).
            self._count(f, old, -1, touched)
            old.entry, old.backend_keys = e, keys
            self._count(f, old, 1, touched)
            return
        table = self._table_for((gid, bids), usable, old, res) if usable else None
        if table is not None and table is not (old.table if old else None):
            # Taken now, not at the write: an entry staged after this one
            # sees the table in use, and the releases cannot free it.
            table.users += 1
        new = Applied(sid, gid, table, e.flags, e.affinity_timeout, bids, e, keys)
        self._staged.append(Staged(f, e, new, old, _svc_key_bytes(f), _SVC_VAL.pack(
            sid, new.off, new.size, e.affinity_timeout, len(usable), e.flags, gid)))

    def _write_services(self, res: SyncResult, touched: Touched) -> None:
        """The staged writes in one batch, after the tables and reverse NAT
        they point at; where the batch stops (a full map), the rest one by
        one, each refused alone."""
        ids, values = self._rev_nat
        if ids:
            self.maps["lb_rev_nat"].update_batch(ids.tobytes(), bytes(values), len(ids))
        staged, services = self._staged, self.maps["lb_services"]
        written = services.update_some(b"".join(s.key for s in staged),
                                       b"".join(s.value for s in staged),
                                       len(staged)) if staged else 0
        for i, s in enumerate(staged):
            if i >= written:
                try:
                    services.update(layout.from_bytes("struct lb_svc_key", s.key)[0],
                                    layout.from_bytes("struct lb_svc_val", s.value)[0])
                except BpfError as err:
                    self._refuse_entry(res, s.frontend, s.entry, err)
                    self._untake(s)
                    continue
            self._commit(s, res, touched)
        self._staged = []

    def _untake(self, s: Staged) -> None:
        """A refused write gives back the table it took."""
        t = s.applied.table
        if t is None or t is (s.old.table if s.old else None):
            return
        t.users -= 1
        if t.users == 0:
            # Never pointed at: free at once.
            self._forget(t)
            self.slab.free(t.off, t.size)

    def _commit(self, s: Staged, res: SyncResult, touched: Touched) -> None:
        """Book a written entry: its table's users, what it counts, the result."""
        f, new, old = s.frontend, s.applied, s.old
        old_table = old.table if old else None
        if new.table is not old_table and old_table is not None:
            self._release(old_table)
        if old:
            self._count(f, old, -1, touched)
        self._count(f, new, 1, touched)
        if old:
            res.updated += 1
        else:
            self._arrive.append((FRONTEND, f.ip, f.port))
            res.added += 1
        self.applied[f] = new

    def _table_for(self, key: TableKey, usable: list[tuple[Backend, int]],
                   old: Applied | None, res: SyncResult) -> Table:
        """The table for `key`: the one there is, the planned one rewritten in
        place, or a new range, sized from what the frontend had."""
        have = self.tables.get(key)
        if have is not None:
            return have
        names = [b.name for b, _ in usable]
        ids = [bid for _, bid in usable]
        plan = self._inherit.pop(key, None)
        # In place only while its users are still those that leave: one that
        # an entry of this sync took meanwhile keeps what it holds.
        src = plan[0] if plan is not None and plan[0].users == plan[1] else None
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
            self.maps["lb_maglev"].write_array(off, slots.tobytes())
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

    def _remove_entry(self, f: Frontend, res: SyncResult, touched: Touched) -> None:
        old = self.applied.pop(f)
        self.maps["lb_services"].delete(svc_key(f))
        self._count(f, old, -1, touched)
        self._leave.append((FRONTEND, f.ip, f.port))
        if old.table is not None:
            self._release(old.table)
        res.removed += 1

    def _drop_unused(self, touched: Touched, res: SyncResult) -> None:
        """Free what the sync's changes left without users."""
        # Sorted for the same order on every node, but only what goes (a
        # comprehension over what was touched: a set difference with the
        # counters would walk all of them).
        sids = array.array("I")
        for fa in sorted(fa for fa in touched.frontends
                         if fa in self.frontend_ids and fa not in self.by_addr):
            sids.append(self.frontend_ids.pop(fa))
            self._quarantine.append(("svc", sids[-1], 0))
        bids = array.array("I")
        for key in sorted(k for k in touched.backends
                          if k in self.backends and k not in self.backend_users):
            bids.append(self.backends.pop(key)[0])
            self._quarantine.append(("backend", bids[-1], 0))
            self._leave.append((BACKEND, key[1], key[2]))
        res.backends_removed += len(bids)
        # Zeroed in one batch each (removing 10k services frees 100k backends).
        for m, ids in ((self.maps["lb_rev_nat"], sids), (self.maps["lb_backends"], bids)):
            if ids:
                size = layout.sizeof(m.spec.value_type)
                m.update_batch(ids.tobytes(), bytes(size * len(ids)), len(ids))
        for gid in sorted(g for g in touched.groups
                          if g not in self.group_users and g in self._group_names):
            name = self._group_names.pop(gid)
            if name is not None and self.groups.get(name) == gid:
                del self.groups[name]
            self._quarantine.append(("group", gid, 0))

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


def _members_of(entries: Iterable[FrontendEntry]) -> Iterator[Member]:
    """The pre-filter's members for `entries`."""
    for e in entries:
        yield (FRONTEND, e.frontend.ip, e.frontend.port)
        if e.flags & CLUSTER_IP:
            yield (VIP, e.frontend.ip, 0)
        for b in (*e.backends, *e.draining):
            yield (BACKEND, b.ip, b.port)


def _bump(counter: Counter[_K], key: _K, by: int) -> None:
    """Count `key` up or down; at 0 it is gone."""
    n = counter[key] + by
    if n > 0:
        counter[key] = n
    else:
        del counter[key]
