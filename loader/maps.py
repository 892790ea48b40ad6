"""Typed access to the datapath's maps, whoever created them.

Which maps exist, their kernel type and their key and value structs are read
from bpf/lib/maps.h, the same declarations BCC compiles; the structs come
from bpf/lb_maps.h through loader.layout."""

from __future__ import annotations

import errno
import mmap
import os
import re
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from loader import layout, libbpf

MAPS_H = layout.BPF_DIR / "lib" / "maps.h"

# BPF_MAP_TYPE_* numbers of the kinds the datapath declares.
# What an update of a full map of each kind returns (hash tables and LPM
# tries refuse a new key at max_entries; LRU maps evict instead).
_FULL_ERRNO = {"hash": errno.E2BIG, "lpm_trie": errno.ENOSPC}

_KERNEL_TYPE = {"hash": 1, "array": 2, "percpu_array": 6, "lru_hash": 9, "lpm_trie": 11}
# An array created with it can be mapped into memory (kernel 5.5); its slots are then
# round_up(value_size, 8) bytes apart (kernel/bpf/arraymap.c, array_map_alloc).
BPF_F_MMAPABLE = 1 << 10


def update_error(spec: MapSpec, err: int) -> libbpf.BpfError:
    """What a failed update raises: MapFull when the map had no room."""
    what = f"update of {spec.name}"
    if err == _FULL_ERRNO.get(spec.kind):
        return libbpf.MapFull(spec.name, err, what)
    return libbpf.BpfError(err, f"{what}: {os.strerror(err)}")


@dataclass(frozen=True)
class MapSpec:
    name: str
    kind: str
    key_type: str
    value_type: str
    size: str  # as declared: a number, or a define of loader/sizes.py or bpf/lb_maps.h
    flags: int = 0  # map_flags as declared (BPF_F_*)

    @property
    def percpu(self) -> bool:
        return self.kind.startswith("percpu")


@cache
def specs() -> dict[str, MapSpec]:
    """Every pinned map declared in bpf/lib/maps.h, by name."""
    text = re.sub(r"/\*.*?\*/", "", MAPS_H.read_text(), flags=re.S)
    found = re.finditer(
        r'BPF_TABLE_PINNED\(\s*"(\w+)"\s*,\s*([^,]+?)\s*,\s*([^,]+?)\s*,\s*(\w+)\s*,'
        r'\s*(\w+)\s*,\s*[^,)]+?(?:,\s*([\w\s|]+?))?\s*\)', text
    )
    return {m.group(4): MapSpec(m.group(4), m.group(1), m.group(2), m.group(3), m.group(5),
                                _flags(m.group(6) or ""))
            for m in found}


# The map_flags bpf/lib/maps.h names (uapi/linux/bpf.h).
_FLAGS = {"BPF_F_NO_PREALLOC": 1, "BPF_F_MMAPABLE": BPF_F_MMAPABLE}


def _flags(declared: str) -> int:
    out = 0
    for name in filter(None, (f.strip() for f in declared.split("|"))):
        if name not in _FLAGS:
            raise ValueError(f"{MAPS_H}: map flag {name} unknown to loader/maps.py")
        out |= _FLAGS[name]
    return out


def max_entries(defines: dict[str, int]) -> dict[str, int]:
    """Each map's capacity: its declared size, with the build's `defines`
    (loader.sizes.Sizes.defines) and the fixed sizes of bpf/lb_maps.h."""
    def size(expr: str) -> int:
        if expr.isdigit():
            return int(expr)
        return defines[expr] if expr in defines else layout.const(expr)

    return {name: size(spec.size) for name, spec in specs().items()}


@cache
def possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class BpfMap:
    """One open map: lookups, updates, deletes and iteration with the
    header's structs (or plain ints for __u32 keys and values)."""

    def __init__(self, fd: int, spec: MapSpec) -> None:
        self.fd = fd
        self.spec = spec
        self._ffi = layout.ffi
        self._mem: mmap.mmap | None = None
        self._mem_slots = 0
        self._mem_tried = False
        self._vsize = layout.sizeof(spec.value_type)
        if spec.percpu:
            self._vsize = ((self._vsize + 7) // 8 * 8) * possible_cpus()

    @classmethod
    def open_pinned(cls, pin_dir: Path, name: str) -> BpfMap:
        return cls(libbpf.obj_get(str(pin_dir / name)), specs()[name])

    def close(self) -> None:
        if self._mem is not None:
            self._mem.close()
            self._mem = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Keys and values cross as cffi objects of the header's types.
    def key(self, value: Any = None) -> Any:
        if isinstance(value, int) or value is None:
            return self._ffi.new(f"{self.spec.key_type} *", value or 0)
        if isinstance(value, (bytes, bytearray)):
            return self._ffi.from_buffer(bytearray(value))
        return value

    def _value_buf(self) -> Any:
        return self._ffi.new("char[]", self._vsize)

    def _decode(self, buf: Any) -> Any:
        vt = self.spec.value_type
        size = layout.sizeof(vt)
        if not self.spec.percpu:
            return self._ffi.cast(f"{vt} *", buf)[0]
        stride = (size + 7) // 8 * 8
        raw = bytes(self._ffi.buffer(buf, self._vsize))
        return [layout.from_bytes(vt, raw[i * stride : i * stride + size])[0]
                for i in range(possible_cpus())]

    def lookup(self, key: Any) -> Any | None:
        k = self.key(key)
        buf = self._value_buf()
        ret = libbpf.lib().bpf_map_lookup_elem(self.fd, k, buf)
        if ret == -2:  # ENOENT
            return None
        libbpf.check(ret, f"lookup in {self.spec.name}")
        value = self._decode(buf)
        if self.spec.value_type.startswith("struct") and not self.spec.percpu:
            # Copy out of the scratch buffer so the caller owns it.
            return layout.from_bytes(self.spec.value_type, bytes(self._ffi.buffer(buf,
                                     layout.sizeof(self.spec.value_type))))[0]
        return value

    def update(self, key: Any, value: Any, flags: int = libbpf.BPF_ANY) -> None:
        k = self.key(key)
        if isinstance(value, int) or self._ffi.typeof(value).kind == "struct":
            v = self._ffi.new(f"{self.spec.value_type} *", value)
        else:
            v = value
        ret = libbpf.lib().bpf_map_update_elem(self.fd, k, v, flags)
        if ret < 0:
            raise update_error(self.spec, -ret)

    def delete(self, key: Any) -> bool:
        ret = libbpf.lib().bpf_map_delete_elem(self.fd, self.key(key))
        if ret == -2:
            return False
        libbpf.check(ret, f"delete from {self.spec.name}")
        return True

    def keys(self) -> Iterator[Any]:
        prev = None
        while True:
            nxt = self._ffi.new(f"{self.spec.key_type} *")
            ret = libbpf.lib().bpf_map_get_next_key(self.fd, prev if prev is not None
                                                    else self._ffi.NULL, nxt)
            if ret == -2:
                return
            libbpf.check(ret, f"iteration of {self.spec.name}")
            yield nxt[0]
            prev = nxt

    def items(self) -> Iterator[tuple[Any, Any]]:
        for k in self.keys():
            value = self.lookup(self._ffi.new(f"{self.spec.key_type} *", k))
            if value is not None:
                yield k, value

    def raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every entry as the bytes of its key and value."""
        ksize = layout.sizeof(self.spec.key_type)
        for k in self.keys():
            kbuf = self._ffi.new(f"{self.spec.key_type} *", k)
            vbuf = self._value_buf()
            if libbpf.lib().bpf_map_lookup_elem(self.fd, kbuf, vbuf) == 0:
                yield (bytes(self._ffi.buffer(kbuf, ksize)),
                       bytes(self._ffi.buffer(vbuf, self._vsize)))

    def read_array(self, first: int, count: int) -> bytes:
        """The packed values of array slots [first, first + count), in as few
        syscalls as the kernel allows (a Maglev range, read back on restart).
        The batch token of an array is the index before the first one read."""
        if self.spec.kind != "array" or first < 0:
            raise ValueError(f"slots [{first}, {first + count}) of {self.spec.name}")
        f = libbpf.ffi()
        out = bytearray()
        token = f.new("uint32_t *", (first - 1) & 0xFFFFFFFF)
        nxt = f.new("uint32_t *")
        opts = f.new("struct bpf_map_batch_opts *")
        opts.sz = f.sizeof("struct bpf_map_batch_opts")
        while len(out) < count * self._vsize:
            want = count - len(out) // self._vsize
            n = f.new("uint32_t *", want)
            keys = f.new("uint32_t[]", want)
            values = f.new("char[]", want * self._vsize)
            ret = libbpf.lib().bpf_map_lookup_batch(
                self.fd, f.NULL if token[0] == 0xFFFFFFFF else token, nxt, keys, values, n, opts)
            if ret < 0 and ret != -2:  # ENOENT: the array's end, with n[0] read
                libbpf.check(ret, f"batch lookup in {self.spec.name}")
            if n[0] == 0:
                raise libbpf.BpfError(errno.EIO,
                                      f"batch lookup in {self.spec.name}: nothing at {first}")
            out += f.buffer(values, n[0] * self._vsize)
            token[0] = nxt[0]
        return bytes(out)

    def _memory(self) -> mmap.mmap | None:
        """The array's slots mapped into this process (u32 values only), or None when
        the map was not created mappable (pins of an older build)."""
        if not self._mem_tried:
            self._mem_tried = True
            if self.spec.kind == "array" and self._vsize == 4:
                info = libbpf.map_info(self.fd)
                if info.map_flags & BPF_F_MMAPABLE:
                    length = -(-info.max_entries * 8 // mmap.PAGESIZE) * mmap.PAGESIZE
                    self._mem = mmap.mmap(self.fd, length, mmap.MAP_SHARED,
                                          mmap.PROT_READ | mmap.PROT_WRITE)
                    self._mem_slots = info.max_entries
        return self._mem

    def write_array(self, first: int, values: bytes) -> None:
        """Packed u32 values into the array slots from `first` on (a new Maglev range):
        stores into the mapped array where it is mappable (no syscall, 10M slots in tens
        of milliseconds; each 4-byte store is whole to a reader), else one batch update."""
        count = len(values) // self._vsize
        if first < 0 or self.spec.kind != "array":
            raise ValueError(f"slots [{first}, {first + count}) of {self.spec.name}")
        mem = self._memory()
        if mem is not None and first + count <= self._mem_slots:
            # Each slot is 8 bytes: the value in its low half (little-endian), zero above
            # (never written). A strided view copies in C, one 4-byte store per slot.
            with memoryview(mem) as raw, raw.cast("I") as view:
                view[2 * first : 2 * (first + count) : 2] = memoryview(values).cast("I")
            return
        self.update_batch(array("I", range(first, first + count)).tobytes(), values, count)

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        """Write `count` packed keys and values in one syscall (arrays and
        hashes alike), e.g. a whole Maglev range."""
        libbpf.check(self._update_batch(keys, values, count)[0],
                     f"batch update of {self.spec.name}")

    def update_some(self, keys: bytes, values: bytes, count: int) -> int:
        """Write packed entries in order, in one syscall, until one fails (a
        full hash map): how many went in. The caller learns why the next one
        failed by writing it alone."""
        ret, written = self._update_batch(keys, values, count)
        return count if ret == 0 else written

    def _update_batch(self, keys: bytes, values: bytes, count: int) -> tuple[int, int]:
        f = libbpf.ffi()
        n = f.new("uint32_t *", count)
        opts = f.new("struct bpf_map_batch_opts *")
        opts.sz = f.sizeof("struct bpf_map_batch_opts")
        # On failure the kernel leaves in *n the entries it wrote
        # (kernel/bpf/syscall.c, generic_map_update_batch).
        ret = libbpf.lib().bpf_map_update_batch(self.fd, keys, values, n, opts)
        return ret, int(n[0])


def open_all(pin_dir: Path) -> dict[str, BpfMap]:
    """Every pinned map of an instance (`lbctl maps` in a second process)."""
    return {name: BpfMap.open_pinned(pin_dir, name) for name in specs()}


def kernel_type(spec: MapSpec) -> int:
    return _KERNEL_TYPE[spec.kind]
