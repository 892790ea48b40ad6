"""The file source: manifest files, re-read when one changes on disk (what
`lbctl run --file` watches)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from lb.model import Cluster
from lb.sources.manifests import FILE_RULES, ManifestError, Rules, load

log = logging.getLogger("lbctl.agent")

# How long the files must stand still before a change is read.
SETTLE_SECONDS = 0.3


@dataclass
class FileSource:
    """Manifest files, re-read when any of them changes on disk."""

    paths: list[Path]
    rules: Rules = FILE_RULES
    _stamp: tuple[tuple[int, int, int], ...] | None = None
    _pending: tuple[tuple[tuple[int, int, int], ...], float] | None = None
    last_good: Cluster = field(default_factory=Cluster)
    errors: tuple[ManifestError, ...] = ()

    def _current(self) -> tuple[tuple[int, int, int], ...]:
        # The inode too: an editor's or kubectl's atomic replace within one
        # mtime tick, keeping the size, is still a change.
        out = []
        for p in self.paths:
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append((0, 0, -1))
        return tuple(out)

    def _settled(self, stamp: tuple[tuple[int, int, int], ...]) -> bool:
        """A change is read once the files stood still for SETTLE_SECONDS, so
        a file written in place is not read half-written; the first read is
        at once."""
        if self._stamp is None:
            return True
        now = time.monotonic()
        if self._pending is None or self._pending[0] != stamp:
            self._pending = (stamp, now)
        return now - self._pending[1] >= SETTLE_SECONDS

    def poll(self) -> Cluster | None:
        """The cluster when the files changed since the last call, else None.
        A file that does not parse, or holds no objects, keeps the last good
        state (fail static)."""
        stamp = self._current()
        if stamp == self._stamp or not self._settled(stamp):
            return None
        self._stamp, self._pending = stamp, None
        try:
            result = load(self.paths, self.rules)
        except ManifestError as e:
            log.error("keeping the last good state: %s", e)
            return None
        for err in result.errors:
            log.error("skipped: %s", err)
        for err in result.warnings:
            log.warning("%s", err)
        self.errors = result.errors
        self.last_good = result.cluster
        return result.cluster
