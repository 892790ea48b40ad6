"""The Kubernetes API as the agent's source: list and watch, per resource.

One thread per resource kind (a reflector, as client-go calls it) lists the
objects, then watches from the list's resourceVersion with bookmarks on, so
a reconnect resumes where it stopped instead of listing again. A watch the
server no longer has history for (410 Gone, as an HTTP status or as an
ERROR event) is answered by a fresh list. Connection errors are retried
with capped, jittered exponential backoff; every --resync-period the kind is
listed afresh anyway, to heal anything a watch could have missed.

Objects are kept as the API serves them (plain JSON dicts: the generated
client's models cost far more to build and are not needed), so a snapshot
is exactly what a manifest file would hold and goes through the same
lb.sources.manifests.build_cluster (object by object, see ParsedObjects): bad
objects are logged and skipped alike.

Fail static: a kind's objects are replaced only by a complete, successful
list, and no snapshot is offered before every kind has listed once, so an
unreachable API server never empties the maps: they keep the last state."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import yaml

from lb.model import Changes, Cluster, EndpointSlice, Node
from lb.sources.manifests import API_RULES, LoadResult, ManifestError, build_cluster

log = logging.getLogger("lbctl.kube")

DEFAULT_RESYNC_PERIOD = 300.0
PAGE_SIZE = 500
# client-go picks each watch's server-side timeout in [5, 10) minutes, so
# that many clients do not reconnect at once.
WATCH_TIMEOUT = (300, 600)
CONNECT_TIMEOUT = 10.0
LIST_READ_TIMEOUT = 60.0
# Bookmarks arrive about once a minute: a watch silent for longer than this
# is on a dead connection. Reconnecting from the same resourceVersion is free.
WATCH_READ_TIMEOUT = 150.0
BACKOFF_INITIAL = 0.5
BACKOFF_CAP = 30.0
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
LAST_APPLIED_ANNOTATION = "kubectl.kubernetes.io/last-applied-configuration"
SOURCE = "kube-apiserver"


@dataclass(frozen=True)
class Resource:
    kind: str
    api_version: str
    plural: str
    # Served from some release on: an API server that answers 404 has none,
    # which counts as listed and empty (asked again every NOT_SERVED_RETRY).
    optional: bool = False

    @property
    def path(self) -> str:
        """Every object of the kind, all namespaces included."""
        group = "/apis" if "/" in self.api_version else "/api"
        return f"{group}/{self.api_version}/{self.plural}"


SERVICES = Resource("Service", "v1", "services")
ENDPOINT_SLICES = Resource("EndpointSlice", "discovery.k8s.io/v1", "endpointslices")
POLICIES = Resource("NetworkPolicy", "networking.k8s.io/v1", "networkpolicies")
PODS = Resource("Pod", "v1", "pods")
NAMESPACES = Resource("Namespace", "v1", "namespaces")
NODES = Resource("Node", "v1", "nodes")
# networking.k8s.io/v1 since 1.33; kube-proxy follows them for the drop of
# unallocated service addresses (pkg/proxy/config/config.go ServiceCIDRConfig).
SERVICE_CIDRS = Resource("ServiceCIDR", "networking.k8s.io/v1", "servicecidrs",
                         optional=True)
RESOURCES = (SERVICES, ENDPOINT_SLICES, POLICIES, PODS, NAMESPACES, NODES, SERVICE_CIDRS)
NOT_SERVED_RETRY = 300.0
ZONE_LABEL = "topology.kubernetes.io/zone"


class NotServed(Exception):
    """An optional kind this API server does not serve."""


class ConfigError(Exception):
    """No usable client configuration (kubeconfig or in-cluster)."""


class Expired(Exception):
    """The server has no history for our resourceVersion (410 Gone): list again."""


class WatchError(Exception):
    """An ERROR event other than 410."""


class ApiError(Exception):
    """The API server answered with an error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status} {reason}".strip())
        self.status = status
        self.reason = reason


class ApiHttp:
    """GETs to the API server with the client library's configuration (host,
    TLS, credentials and their refresh) and connection pool, but not its
    generated API classes: importing those builds some 250 pydantic models,
    half a second of every start before the first list, for objects that
    are kept here as the JSON the server sends."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def get(self, path: str, params: Mapping[str, str | int | bool],
            timeout: tuple[float, float]) -> Any:
        """The response, unread (a list is read whole, a watch streamed);
        ApiError for an error status."""
        import urllib3

        cfg = self.client.configuration
        headers = {**self.client.default_headers, "Accept": "application/json"}
        for auth in cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[auth["key"]] = auth["value"]
        query = urlencode({k: str(v).lower() if isinstance(v, bool) else v
                           for k, v in params.items()})
        resp = self.client.rest_client.pool_manager.request(
            "GET", f"{cfg.host.rstrip('/')}{path}?{query}", headers=headers,
            preload_content=False, retries=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
        if resp.status < 400:
            return resp
        try:
            body = json.loads(resp.data)
            reason = str(body.get("reason") or resp.reason or "") \
                if isinstance(body, dict) else str(resp.reason or "")
        except ValueError:
            reason = str(resp.reason or "")
        finally:
            resp.release_conn()
        raise ApiError(resp.status, reason)

    def close(self) -> None:
        self.client.close()


# --- configuration ----------------------------------------------------------------


def load_config(kubeconfig: str | None) -> Any:
    """A client Configuration: from `kubeconfig` or $KUBECONFIG when given,
    else the pod's service account (in-cluster), else ~/.kube/config."""
    from kubernetes import client
    from kubernetes import config as kconfig

    config: Any = kconfig  # its loaders are untyped
    cfg = client.Configuration()
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or None
    try:
        if path:
            config.load_kube_config(config_file=path, client_configuration=cfg,
                                    persist_config=False)
            how = "kubeconfig"
        else:
            try:
                config.load_incluster_config(client_configuration=cfg)
                how = "in-cluster service account"
            except config.ConfigException:
                config.load_kube_config(client_configuration=cfg, persist_config=False)
                how = "default kubeconfig"
    except (config.ConfigException, yaml.YAMLError, OSError, ValueError, TypeError,
            KeyError) as e:
        where = "the kubeconfig" if path else "in-cluster or ~/.kube/config"
        # The loaders' messages name files and fields, never credentials; a
        # YAML error could quote the file, so it is not repeated.
        why = "not valid YAML" if isinstance(e, yaml.YAMLError) else str(e)
        raise ConfigError(f"no API server configuration from {where}: {why}") from e
    # Our own backoff retries; urllib3's silent retries would only delay it.
    cfg.retries = 0
    # One long-lived watch connection per kind, plus lists.
    cfg.connection_pool_maxsize = 2 * len(RESOURCES) + 2
    # The host only: a kubeconfig path or credentials never reach the log.
    log.info("API server %s (%s)", cfg.host, how)
    return cfg


# --- small helpers ----------------------------------------------------------------


class Backoff:
    """Exponential, capped, with jitter in [d/2, d] so that the agents of a
    whole cluster do not reconnect in lockstep after an outage."""

    def __init__(self, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_CAP,
                 rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = cap
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.cap, self.initial * float(2 ** min(self.failures, 30)))
        self.failures += 1
        return d / 2 + self._rng.uniform(0, d / 2)

    def reset(self) -> None:
        self.failures = 0


_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


def parse_time(value: Any) -> float | None:
    """An RFC 3339 timestamp (nanoseconds allowed) as Unix time, or None."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.match(value.strip())
    if not m:
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        base = datetime.fromisoformat(m.group(1) + zone)
    except ValueError:
        return None
    frac = float(f"0.{m.group(2)}") if m.group(2) else 0.0
    return base.timestamp() + frac


def object_key(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping) or not meta.get("name"):
        return None
    ns = meta.get("namespace")
    return f"{ns}/{meta['name']}" if ns else str(meta["name"])


def _rv(obj: Mapping[str, Any]) -> str | None:
    meta = obj.get("metadata")
    rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
    return str(rv) if rv else None


def _trim(obj: dict[str, Any], res: Resource) -> dict[str, Any]:
    """What is stored: the object with kind and apiVersion (list items lack
    them), without the bulky fields nothing here reads."""
    obj.setdefault("kind", res.kind)
    obj.setdefault("apiVersion", res.api_version)
    meta = obj.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)
        ann = meta.get("annotations")
        if isinstance(ann, dict):
            ann.pop(LAST_APPLIED_ANNOTATION, None)
    return obj


def _annotation(obj: Mapping[str, Any] | None, name: str) -> Any:
    if obj is None:
        return None
    meta = obj.get("metadata")
    ann = meta.get("annotations") if isinstance(meta, Mapping) else None
    return ann.get(name) if isinstance(ann, Mapping) else None


def describe(e: BaseException) -> str:
    """An error in one line, without response bodies, headers or URLs."""
    from urllib3.exceptions import MaxRetryError

    if isinstance(e, ApiError):
        return str(e)
    if isinstance(e, MaxRetryError) and e.reason is not None:
        return describe(e.reason)
    # urllib3 puts the connection object's repr in front: not for a log.
    text = re.sub(r"<[^>]*>:\s*", "", str(e).splitlines()[0] if str(e) else "")
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


# --- the store --------------------------------------------------------------------


class Store:
    """Every kind's objects by key, shared by the reflector threads and the
    agent loop. Stored dicts are never changed, only replaced, so a snapshot
    can be built outside the lock."""

    def __init__(self, kinds: tuple[str, ...], started: float | None = None) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in kinds}
        self._listed: set[str] = set()
        self._dirty = False
        # (kind, key) of every object added, changed or deleted since the last take.
        self._keys: dict[tuple[str, str], None] = {}
        # Network-programming triggers (Unix times) of EndpointSlice changes
        # not yet in a snapshot, and those of the last snapshot taken.
        self._pending: list[float] = []
        self._taken: list[float] = []
        self.changed = threading.Event()
        # Set once every kind has been listed: a snapshot can be taken.
        self.all_listed = threading.Event()
        # Annotation times from before we started describe changes a
        # previous agent programmed (kube-proxy ignores them too).
        self.started = time.time() if started is None else started

    def _trigger(self, kind: str, old: Mapping[str, Any] | None,
                 new: Mapping[str, Any] | None, received: float) -> None:
        if kind != ENDPOINT_SLICES.kind or kind not in self._listed:
            return  # the initial list is startup, not a change to program
        value = _annotation(new, TRIGGER_TIME_ANNOTATION)
        when = parse_time(value)
        if when is not None and value != _annotation(old, TRIGGER_TIME_ANNOTATION) \
                and when >= self.started:
            self._pending.append(when)
        else:
            self._pending.append(received)

    def _mark(self) -> None:
        self._dirty = True
        self.changed.set()

    def replace(self, kind: str, objects: dict[str, dict[str, Any]]) -> int:
        """A complete list's result; returns how many objects differ."""
        received = time.time()
        with self._lock:
            old = self._objects[kind]
            changed = 0
            for key in old.keys() | objects.keys():
                before, after = old.get(key), objects.get(key)
                if before is not None and after is not None and _rv(before) == _rv(after):
                    continue
                changed += 1
                self._keys[(kind, key)] = None
                self._trigger(kind, before, after, received)
            self._objects[kind] = objects
            first = kind not in self._listed
            self._listed.add(kind)
            if self._listed == set(self._objects):
                self.all_listed.set()
            if changed or first:
                self._mark()
            return changed

    def apply(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        """One watch event: ADDED, MODIFIED or DELETED."""
        key = object_key(obj)
        if key is None:
            return
        received = time.time()
        with self._lock:
            objs = self._objects[kind]
            before = objs.get(key)
            if event == "DELETED":
                if before is None:
                    return
                del objs[key]
                self._trigger(kind, before, None, received)
            else:
                if before is not None and _rv(before) == _rv(obj):
                    return
                objs[key] = obj
                self._trigger(kind, before, obj, received)
            self._keys[(kind, key)] = None
            self._mark()

    def listed(self) -> bool:
        return self.all_listed.is_set()

    def get(self, kind: str, key: str) -> dict[str, Any] | None:
        with self._lock:
            return self._objects[kind].get(key)

    def count(self, kind: str) -> int:
        with self._lock:
            return len(self._objects[kind])

    def take(self) -> list[Mapping[str, Any]] | None:
        """Every object, when something changed since the last take and
        every kind has been listed; else None."""
        with self._lock:
            if not self._took():
                return None
            return [o for objs in self._objects.values() for o in objs.values()]

    def take_changes(self) -> dict[tuple[str, str], Mapping[str, Any] | None] | None:
        """What changed since the last take, when every kind has been listed:
        (kind, key) -> the object now, None when it was deleted. None when
        nothing changed."""
        with self._lock:
            keys = self._keys
            if not self._took():
                return None
            return {(kind, key): self._objects[kind].get(key) for kind, key in keys}

    def _took(self) -> bool:
        """Under the lock: whether there is something to take; if so, it is taken."""
        if not self._dirty or not self.all_listed.is_set():
            return False
        self._dirty = False
        self._keys = {}
        self.changed.clear()
        self._taken.extend(self._pending)
        self._pending = []
        return True

    def programmed(self) -> list[float]:
        """Trigger times of the changes the last snapshot held; called once
        that snapshot is in the maps. A failed sync keeps them for the next."""
        with self._lock:
            out, self._taken = self._taken, []
            return out


# --- one reflector per kind -------------------------------------------------------


@dataclass
class Counters:
    """What a reflector did, for metrics (read without a lock: each field is
    written by one thread only, and ints are replaced atomically)."""

    relists: dict[str, int]
    errors: int = 0
    events: int = 0


class Reflector(threading.Thread):
    def __init__(self, api: Any, res: Resource, store: Store, *, resync_period: float,
                 field_selector: str | None = None, page_size: int = PAGE_SIZE,
                 backoff: Backoff | None = None) -> None:
        super().__init__(name=f"watch-{res.kind}", daemon=True)
        self.api = api
        self.res = res
        self.store = store
        self.resync_period = resync_period
        self.field_selector = field_selector
        self.page_size = page_size
        self.backoff = backoff or Backoff()
        self.rv: str | None = None
        self.counters = Counters(relists={})
        self._stopping = threading.Event()
        self._resp: Any = None
        self._resp_lock = threading.Lock()
        self._next_resync = 0.0
        self._relist_reason = "initial"
        self._expired_streak = 0
        self._not_served = False

    # -- lifecycle ----------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            # Unblocks the read the thread sits in.
            try:
                resp.shutdown()
            except Exception:
                resp.close()

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self.rv is None or (self.resync_period > 0
                                       and time.monotonic() >= self._next_resync):
                    self.relist()
                    if self._stopping.is_set():
                        break
                self.watch()
            except NotServed:
                if not self._not_served:
                    log.info("%s: not served by this API server; taken as none",
                             self.res.kind)
                self._not_served = True
                self.store.replace(self.res.kind, {})
                self.rv = None
                self._stopping.wait(NOT_SERVED_RETRY)
            except Expired as e:
                if self._stopping.is_set():
                    break
                log.info("%s: %s; listing again", self.res.kind, e)
                self.rv = None
                self._relist_reason = "expired"
                # The first 410 is relisted at once; more in a row, with no
                # event in between, are paced so that they cannot spin.
                if self._expired_streak:
                    self._stopping.wait(self.backoff.next())
                self._expired_streak += 1
            except Exception as e:
                if self._stopping.is_set():
                    break
                self.counters.errors += 1
                delay = self.backoff.next()
                # Quiet during a long outage: the first failure, then every tenth.
                level = logging.WARNING if self.backoff.failures % 10 == 1 \
                    else logging.DEBUG
                log.log(level, "%s: %s; retrying in %.1f s (the maps keep their state)",
                        self.res.kind, describe(e), delay)
                if isinstance(e, WatchError):
                    self.rv = None
                    self._relist_reason = "error"
                self._stopping.wait(delay)

    # -- list ---------------------------------------------------------------------

    def _call(self, timeout: tuple[float, float], **params: str | int | bool) -> Any:
        if self.field_selector:
            params["fieldSelector"] = self.field_selector
        try:
            return self.api.get(self.res.path, params, timeout)
        except ApiError as e:
            if e.status == 410:
                raise Expired(f"HTTP 410 {e.reason or 'Gone'}") from e
            if e.status == 404 and self.res.optional:
                raise NotServed(self.res.kind) from e
            raise

    def relist(self) -> None:
        """List every object (in pages); the store is replaced only once the
        last page is in."""
        objects: dict[str, dict[str, Any]] = {}
        cont: str | None = None
        while True:
            page: dict[str, str | int | bool] = {"limit": self.page_size}
            if cont:
                page["continue"] = cont
            resp = self._call((CONNECT_TIMEOUT, LIST_READ_TIMEOUT), **page)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            for item in body.get("items") or ():
                if isinstance(item, dict) and (key := object_key(item)):
                    objects[key] = _trim(item, self.res)
            meta = body.get("metadata") or {}
            cont = meta.get("continue")
            if not cont:
                rv = meta.get("resourceVersion")
                break
            if self._stopping.is_set():
                return
        reason = self._relist_reason
        changed = self.store.replace(self.res.kind, objects)
        self.counters.relists[reason] = self.counters.relists.get(reason, 0) + 1
        self.rv = str(rv) if rv else None
        self.backoff.reset()
        self._relist_reason = "resync"
        self._next_resync = time.monotonic() + self.resync_period
        log.info("%s: listed %d (%s, %d changed) at resourceVersion %s", self.res.kind,
                 len(objects), reason, changed, self.rv)

    # -- watch --------------------------------------------------------------------

    def watch(self) -> None:
        """Watch from self.rv until the server ends the watch, the resync
        is due or we stop. Raises on errors."""
        from urllib3.exceptions import ReadTimeoutError

        timeout = random.randint(*WATCH_TIMEOUT)
        if self.resync_period > 0:
            timeout = max(1, min(timeout, int(self._next_resync - time.monotonic()) + 1))
        started = time.monotonic()
        params: dict[str, str | int | bool] = {"watch": True, "allowWatchBookmarks": True,
                                               "timeoutSeconds": timeout}
        if self.rv:
            params["resourceVersion"] = self.rv
        resp = self._call((CONNECT_TIMEOUT, WATCH_READ_TIMEOUT), **params)
        with self._resp_lock:
            self._resp = resp
        events = 0
        try:
            if self._stopping.is_set():
                return
            for line in _lines(resp):
                self.handle(json.loads(line))
                events += 1
                if events == 1:
                    self.backoff.reset()
                    self._expired_streak = 0
        except ReadTimeoutError:
            log.debug("%s: watch silent for %.0f s; reconnecting", self.res.kind,
                      WATCH_READ_TIMEOUT)
            return
        except Exception:
            if self._stopping.is_set():
                return
            raise
        finally:
            with self._resp_lock:
                self._resp = None
            # Never back into the pool: the stream may have been cut mid-way.
            resp.close()
        if not events and time.monotonic() - started < 1.0 and not self._stopping.is_set():
            # Closed at once (a server shutting down): not a reason to spin.
            self._stopping.wait(self.backoff.next())

    def handle(self, event: Mapping[str, Any]) -> None:
        """One decoded watch event."""
        etype = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            raise WatchError(f"watch event {etype!r} without an object")
        if etype == "ERROR":
            code = obj.get("code")
            text = f"{obj.get('reason') or 'Error'}: {obj.get('message') or ''}".strip()
            if code == 410:
                raise Expired(f"watch expired (410 {text})")
            raise WatchError(f"watch error {code} {text}")
        self.counters.events += 1
        rv = _rv(obj)
        log.debug("%s: %s %s at %s", self.res.kind, etype, object_key(obj), rv)
        if etype in ("ADDED", "MODIFIED", "DELETED"):
            self.store.apply(self.res.kind, etype, _trim(obj, self.res))
        elif etype != "BOOKMARK":
            log.debug("%s: ignoring watch event %r", self.res.kind, etype)
            return
        if rv:
            self.rv = rv


def _lines(resp: Any) -> Iterator[str]:
    """The newline-delimited JSON of a watch response, line by line."""
    buf = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buf += chunk
        while (nl := buf.find(b"\n")) >= 0:
            line, buf = buf[:nl], buf[nl + 1:]
            if line.strip():
                yield line.decode("utf-8", errors="replace")
    if buf.strip():
        yield buf.decode("utf-8", errors="replace")


# --- the source -------------------------------------------------------------------


_CLUSTER_MAPS = tuple(f.name for f in fields(Cluster) if isinstance(getattr(Cluster(), f.name),
                                                                        dict))


Key = tuple[str, str]  # (kind, namespace/name)


class ParsedObjects:
    """build_cluster, one object at a time, remembered per object version.

    Each object becomes one entry of one of the Cluster's maps (Endpoints,
    the one kind merged across objects, are not watched), so merging the
    per-object results equals building all at once, while a change costs
    parsing one object instead of every object of the cluster (about a
    second for 20,000 Pods). A bad object is logged once per version.

    The maps and the slices' index are kept between snapshots and copied
    only where a change lands (snapshots never change once handed out), so
    a snapshot costs what changed, not what there is. The objects parsed
    anew (and those gone) are what changed: each snapshot says which
    services they touch, against the snapshot built before it."""

    def __init__(self) -> None:
        self._cache: dict[Key, tuple[Mapping[str, Any], str | None, LoadResult]] = {}
        self._maps: dict[str, dict[str, Any]] = {name: {} for name in _CLUSTER_MAPS}
        self._index: dict[str, tuple[EndpointSlice, ...]] = {}
        self._errors: dict[Key, tuple[ManifestError, ...]] = {}
        self._last: object | None = None  # revision of the snapshot built last

    def build(self, docs: Iterable[Mapping[str, Any]]
              ) -> tuple[Cluster, tuple[ManifestError, ...]]:
        """The snapshot of exactly `docs`, every object there is."""
        seen = {(str(doc.get("kind")), object_key(doc) or ""): doc for doc in docs}
        changes: dict[Key, Mapping[str, Any] | None] = {
            key: doc for key, doc in seen.items() if not self._same(key, doc)}
        changes.update(dict.fromkeys(self._cache.keys() - seen.keys()))
        return self.apply(changes)

    def _same(self, key: Key, doc: Mapping[str, Any]) -> bool:
        hit = self._cache.get(key)
        if hit is None:
            return False
        rv = _rv(doc)
        return hit[0] is doc or (rv is not None and hit[1] == rv)

    def apply(self, changes: Mapping[Key, Mapping[str, Any] | None]
              ) -> tuple[Cluster, tuple[ManifestError, ...]]:
        """The snapshot after `changes`: (kind, key) -> the object now, None
        when it is gone."""
        touched: set[str] = set()
        owned: set[str] = set()  # maps copied for this snapshot
        index = self._index
        for key, doc in changes.items():
            if doc is not None and self._same(key, doc):
                continue
            old = self._cache.pop(key, None)
            if old is not None:
                touched |= _services_of(old[2].cluster)
                index = self._unmerge(old[2].cluster, owned, index)
                self._errors.pop(key, None)
            if doc is None:
                continue
            result = build_cluster([(doc, SOURCE)], API_RULES)
            for err in result.errors:
                log.error("skipped: %s", err)
            for err in result.warnings:
                log.warning("%s", err)
            touched |= _services_of(result.cluster)
            index = self._merge(result.cluster, owned, index)
            if result.errors:
                self._errors[key] = result.errors
            self._cache[key] = (doc, _rv(doc), result)
        self._index = index
        since = self._last
        cluster = Cluster(**self._maps, slice_index=index,
                          changes=Changes(since, frozenset(touched)) if since is not None
                          else None)
        self._last = cluster.revision
        return cluster, tuple(e for errs in self._errors.values() for e in errs)

    def _own(self, name: str, owned: set[str]) -> dict[str, Any]:
        """This snapshot's copy of one map, made on its first change."""
        if name not in owned:
            self._maps[name] = dict(self._maps[name])
            owned.add(name)
        return self._maps[name]

    def _merge(self, part: Cluster, owned: set[str],
               index: dict[str, tuple[EndpointSlice, ...]]
               ) -> dict[str, tuple[EndpointSlice, ...]]:
        for name in _CLUSTER_MAPS:
            entries = getattr(part, name)
            if entries:
                self._own(name, owned).update(entries)
        if part.slices:
            index = dict(index) if index is self._index else index
            for es in part.slices.values():
                index[es.service_key] = (*index.get(es.service_key, ()), es)
        return index

    def _unmerge(self, part: Cluster, owned: set[str],
                 index: dict[str, tuple[EndpointSlice, ...]]
                 ) -> dict[str, tuple[EndpointSlice, ...]]:
        for name in _CLUSTER_MAPS:
            entries = getattr(part, name)
            if entries:
                mine = self._own(name, owned)
                for k in entries:
                    mine.pop(k, None)
        if part.slices:
            index = dict(index) if index is self._index else index
            for es in part.slices.values():
                left = tuple(x for x in index.get(es.service_key, ()) if x.key != es.key)
                if left:
                    index[es.service_key] = left
                else:
                    index.pop(es.service_key, None)
        return index


def _services_of(objects: Cluster) -> set[str]:
    """The services a Service's or an EndpointSlice's parsed form touches."""
    return set(objects.services) | {s.service_key for s in objects.slices.values()}


# --- the source -------------------------------------------------------------------


# The cluster autoscaler's taint on a node it is about to delete.
TO_BE_DELETED_TAINT = "ToBeDeletedByClusterAutoscaler"


def node_eligible(obj: Mapping[str, Any] | None) -> bool:
    """kube-proxy's NodeEligible: the Node is known, not being deleted, and
    not tainted for deletion."""
    if not obj:
        return False
    if (obj.get("metadata") or {}).get("deletionTimestamp"):
        return False
    taints = (obj.get("spec") or {}).get("taints") or []
    return not any(isinstance(t, Mapping) and t.get("key") == TO_BE_DELETED_TAINT
                   for t in taints)


class KubeSource:
    """What the agent polls: a Cluster when something changed, else None."""

    def __init__(self, api: Any, *, node_name: str,
                 resync_period: float = DEFAULT_RESYNC_PERIOD,
                 resources: tuple[Resource, ...] = RESOURCES) -> None:
        self.api = api
        self.node_name = node_name
        self.store = Store(tuple(r.kind for r in resources))
        self.errors: tuple[ManifestError, ...] = ()
        self._said_ipv6: set[str] = set()
        self._parsed = ParsedObjects()
        self.reflectors = [
            Reflector(api, r, self.store, resync_period=resync_period,
                      field_selector=f"metadata.name={node_name}" if r is NODES else None)
            for r in resources
        ]

    @classmethod
    def connect(cls, kubeconfig: str | None, node_name: str | None,
                resync_period: float) -> KubeSource:
        """A source over the API server that `kubeconfig` names (in-cluster
        without one), for `node_name` (default: the host name)."""
        from kubernetes import client

        api = ApiHttp(client.ApiClient(load_config(kubeconfig)))
        return cls(api, node_name=node_name or socket.gethostname().lower(),
                   resync_period=resync_period)

    @property
    def changed(self) -> threading.Event:
        return self.store.changed

    def start(self) -> KubeSource:
        for r in self.reflectors:
            r.start()
        return self

    def stop(self) -> None:
        for r in self.reflectors:
            r.stop()
        for r in self.reflectors:
            r.join(timeout=5)
        self.api.close()

    def wait_listed(self, timeout: float) -> bool:
        """Whether every kind was listed within `timeout` seconds."""
        return self.store.all_listed.wait(timeout)

    def poll(self) -> Cluster | None:
        changes = self.store.take_changes()
        if changes is None:
            return None
        cluster, self.errors = self._parsed.apply(
            {k: d for k, d in changes.items() if k[0] != NODES.kind})  # Nodes feed node() only
        return cluster

    def programmed(self) -> list[float]:
        return self.store.programmed()

    def node(self, given: Node) -> Node:
        """This node as the flags give it, completed from its Node object
        (kube-proxy does the same): the name defaults to the hostname, the
        addresses to the Node's InternalIPs (else ExternalIPs)."""
        out = given if given.name else replace(given, name=self.node_name)
        found = self.store.get(NODES.kind, self.node_name)
        out = replace(out, eligible=node_eligible(found))
        obj = found or {}
        labels = (obj.get("metadata") or {}).get("labels") or {}
        if out.zone is None and isinstance(labels, Mapping) and labels.get(ZONE_LABEL):
            # For zone hints, as kube-proxy reads its Node's labels.
            out = replace(out, zone=str(labels[ZONE_LABEL]))
        if out.ips:
            return out
        addrs = (obj.get("status") or {}).get("addresses") or []
        for kind in ("InternalIP", "ExternalIP"):
            of_kind = [str(a.get("address")) for a in addrs
                       if isinstance(a, Mapping) and a.get("type") == kind]
            ips = tuple(a for a in of_kind if _is_ipv4(a))
            if ips:
                self._say_ipv6(set(of_kind) - set(ips))
                return replace(out, ips=ips)
        return out

    def _say_ipv6(self, addrs: set[str]) -> None:
        """A dual-stack Node's other family, said once per address."""
        new = sorted(addrs - self._said_ipv6)
        if new:
            log.warning("Node %s: %s: IPv6 is not programmed yet; serving IPv4 only",
                        self.node_name, ", ".join(new))
            self._said_ipv6.update(new)

    def stats(self) -> dict[str, Counters]:
        """A copy of each reflector's counters (taken while they run)."""
        return {r.res.kind: Counters(dict(r.counters.relists), r.counters.errors,
                                     r.counters.events) for r in self.reflectors}

    def sizes(self) -> dict[str, int]:
        return {r.res.kind: self.store.count(r.res.kind) for r in self.reflectors}


def _is_ipv4(value: Any) -> bool:
    try:
        socket.inet_pton(socket.AF_INET, str(value))
    except OSError:
        return False
    return True


def kubeconfig_path(value: str) -> str:
    """argparse type for --kubeconfig: must be a readable file."""
    if not Path(value).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return value
