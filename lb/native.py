"""The agent's native library (lb/native.c), opened through cffi: the loops
that are too slow in Python at 10k services and more. Built at install
(tools/native.sh); without it each caller runs its Python twin, with the
same results, many times slower."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import cffi

log = logging.getLogger(__name__)

PATH = Path(__file__).with_name("libnative.so")

_CDEF = """
long xdplb_maglev_populate(const uint8_t *names, const uint32_t *lens, const uint32_t *labels,
                           uint32_t n, uint32_t size, const uint8_t *person, uint32_t *entry);
long xdplb_filter_count(const char *addrs, const uint32_t *kinds, const uint32_t *ports,
                        uint32_t n, int delta, uint32_t words, uint8_t *counts,
                        uint64_t *values, uint32_t *out);
"""


@cache
def lib() -> tuple[cffi.FFI, Any] | None:
    """The library and its FFI, or None when it is not built."""
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    try:
        return ffi, ffi.dlopen(str(PATH))
    except OSError as err:
        # Same results: a sync from empty at 10k services takes seconds more.
        log.warning("Maglev tables and pre-filter bits are computed in Python: %s is not "
                    "built (%s)", PATH, err)
        return None


def address(ffi: cffi.FFI, buf: Any, ctype: str = "uint32_t *") -> Any:
    """A pointer to the buffer of an array.array, bytearray or mmap, live
    while it is: a tenth of the cost of ffi.from_buffer per call (a sync
    from empty makes tens of thousands)."""
    if hasattr(buf, "buffer_info"):
        return ffi.cast(ctype, buf.buffer_info()[0])
    return ffi.from_buffer(ctype, buf)
