"""The map layouts of bpf/lb_maps.h, read by cffi from the same header the
BPF programs include, so that no layout is written twice."""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cffi

BPF_DIR = Path(__file__).resolve().parent.parent / "bpf"
HEADER = BPF_DIR / "lb_maps.h"

_PRELUDE = """
typedef uint8_t __u8;
typedef uint16_t __u16;
typedef uint32_t __u32;
typedef uint64_t __u64;
"""


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def _build() -> tuple[cffi.FFI, dict[str, int]]:
    text = _strip_comments(HEADER.read_text())
    ffi = cffi.FFI()
    ffi.cdef(_PRELUDE + text)
    consts = {
        m.group(1): int(m.group(2), 0)
        for m in re.finditer(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", text, re.M)
    }
    return ffi, consts


ffi, CONSTS = _build()


def c_defaults(overrides: Mapping[str, str] | None = None) -> dict[str, int]:
    """The integer defaults of bpf/lib/common.h (the conntrack lifetimes), with
    -D style overrides, so the lifetimes are written in one place only."""
    text = (BPF_DIR / "lib" / "common.h").read_text()
    found = {m.group(1): int(m.group(2), 0) for m in
             re.finditer(r"^#define\s+(LB_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*$", text, re.M)}
    for k, v in (overrides or {}).items():
        found[k] = int(v, 0)
    return found


def const(name: str) -> int:
    """An integer #define of the header, by name."""
    return CONSTS[name]


def new(ctype: str, **fields: int) -> Any:
    """A zeroed struct of the header's type `ctype`, with `fields` set."""
    obj = ffi.new(f"{ctype} *")
    for key, value in fields.items():
        setattr(obj, key, value)
    return obj


_FORMATS = {("primitive", 1): "B", ("primitive", 2): "H", ("primitive", 4): "I",
            ("primitive", 8): "Q"}


def packer(ctype: str, names: tuple[str, ...]) -> struct.Struct:
    """A struct.Struct that packs `ctype` from the values of its fields `names`, which
    must be all of them in declaration order (checked: a reordered header fails here, not
    in the maps). Built from the header's layout (offsets and padding as the compiler lays
    them out): for writing or reading many entries at once, where a cffi object per entry
    costs more than the syscall."""
    fields = ffi.typeof(ctype).fields
    if tuple(name for name, _ in fields) != names:
        raise TypeError(f"{ctype} has fields {[name for name, _ in fields]}, not {list(names)}")
    fmt = "="
    at = 0
    for _, f in fields:
        key = (f.type.kind, ffi.sizeof(f.type))
        if key not in _FORMATS or f.bitsize != -1:
            raise TypeError(f"{ctype}: field of type {f.type.cname} cannot be packed")
        fmt += "x" * (f.offset - at) + _FORMATS[key]
        at = f.offset + key[1]
    fmt += "x" * (ffi.sizeof(ctype) - at)
    return struct.Struct(fmt)


def to_bytes(obj: Any) -> bytes:
    return bytes(ffi.buffer(obj))


def from_bytes(ctype: str, data: bytes) -> Any:
    obj = ffi.new(f"{ctype} *")
    ffi.memmove(obj, data, ffi.sizeof(ctype))
    return obj


def sizeof(ctype: str) -> int:
    return int(ffi.sizeof(ctype))
