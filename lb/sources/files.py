"""The file source: manifest files, re-read when one changes on disk (what
`lbctl run --file` watches)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from lb.model import Cluster
from lb.sources.manifests import ManifestError, load

log = logging.getLogger("lbctl.agent")


@dataclass
class FileSource:
    """Manifest files, re-read when any of them changes on disk."""

    paths: list[Path]
    _stamp: tuple[tuple[int, int, int], ...] | None = None
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

    def poll(self) -> Cluster | None:
        """The cluster when the files changed since the last call, else None.
        A file that does not parse keeps the last good state (fail static)."""
        stamp = self._current()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            result = load(self.paths)
        except ManifestError as e:
            log.error("keeping the last good state: %s", e)
            return None
        for err in result.errors:
            log.error("skipped: %s", err)
        self.errors = result.errors
        self.last_good = result.cluster
        return result.cluster
