"""Python's cyclic collector held off for the length of one sync.

A sync from empty allocates millions of small objects that all live on (the desired
state, the reconciler's bookkeeping), and the collector, started by allocation counts,
walks the ever larger heap again and again meanwhile: 0.15 s of a sync of 10k services
from empty, 1.3 s at 30k (bench/NOTES.md). A sync leaves next to no cyclic garbage, so
the collector waits until the sync is over and then runs as it would have. The switch
is the process's (gc.disable); other threads' garbage waits as long, a few seconds at
most."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def paused() -> Iterator[None]:
    """The collector off inside, back as it was after (nested uses keep it off)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
