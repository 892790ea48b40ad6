"""In-memory maps with the interface of loader.maps.BpfMap and the kernel's
semantics, so that the reconciler, `lbctl maps` and the userspace datapath
use them unchanged.

Entries are kept as the raw bytes of the structs of bpf/lb_maps.h (through
loader.layout), so a key or value means exactly what it means in the kernel.
Arrays have a fixed size, read as zeros until written and refuse deletes;
hashes hold at most max_entries and refuse a new key when full (E2BIG), as
a preallocated kernel hash does; LRU hashes evict their least recently used
entry instead; LPM tries match the longest prefix and refuse a new prefix
when full (ENOSPC). Per-CPU maps have one CPU."""

from __future__ import annotations

import errno
import os
import sys
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from loader import layout
from loader.libbpf import BPF_ANY, BPF_EXIST, BPF_NOEXIST, BpfError
from loader.maps import BpfMap, MapSpec, max_entries, specs, update_error
from loader.sizes import Sizes


def _error(code: int, what: str) -> BpfError:
    return BpfError(code, f"{what}: {os.strerror(code)}")


class DictMap(BpfMap):
    """One map held in this process. `ref` and `put` are the datapath's side
    (a BPF program's lookup, which yields the value in place, and update);
    the rest is BpfMap's, the control plane's side."""

    def __init__(self, spec: MapSpec, max_entries: int) -> None:
        # No kernel object behind it: BpfMap's fd-based setup is not wanted.
        self.fd = -1
        self.spec = spec
        self.max_entries = max_entries
        self._ffi = layout.ffi
        self._ksize = layout.sizeof(spec.key_type)
        self._size = layout.sizeof(spec.value_type)
        # A per-CPU value crosses the syscall ABI rounded up to 8 bytes.
        self._vsize = (self._size + 7) // 8 * 8 if spec.percpu else self._size
        self._array = spec.kind.endswith("array")
        self._lru = spec.kind == "lru_hash"
        self._lpm = spec.kind == "lpm_trie"
        # An LPM key is a u32 prefix length, then the bits it counts.
        self._lpm_bits = 8 * (self._ksize - 4)
        # Arrays keep only the slots ever written; the others read as zeros.
        # LPM entries are keyed by prefix length and masked bits, the way
        # the trie tells prefixes apart; _lpm_keys keeps the key as written.
        self._data: OrderedDict[bytes, bytearray] = OrderedDict()
        self._lpm_keys: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"DictMap({self.spec.name}, {self.spec.kind}, {len(self._data)}/{self.max_entries})"

    # --- encoding -----------------------------------------------------------

    def key_bytes(self, key: Any) -> bytes:
        """The raw key of an int, a struct, a pointer to one, or bytes."""
        if isinstance(key, bytes | bytearray):
            if len(key) != self._ksize:
                raise _error(errno.EINVAL, f"key of {self.spec.name}: {len(key)} bytes")
            return bytes(key)
        k = self.key(key)
        if self._ffi.typeof(k).kind == "struct":
            k = self._ffi.new(f"{self.spec.key_type} *", k)
        return bytes(self._ffi.buffer(k, self._ksize))

    def _value_bytes(self, value: Any) -> bytes:
        if isinstance(value, list):
            # Per-CPU: one value for each of our one CPU.
            if len(value) != 1:
                raise _error(errno.EINVAL, f"value of {self.spec.name}: {len(value)} CPUs")
            value = value[0]
        if isinstance(value, bytes | bytearray):
            if len(value) not in (self._size, self._vsize):
                raise _error(errno.EINVAL, f"value of {self.spec.name}: {len(value)} bytes")
            return bytes(value[: self._size])
        if isinstance(value, int) or self._ffi.typeof(value).kind == "struct":
            value = self._ffi.new(f"{self.spec.value_type} *", value)
        return bytes(self._ffi.buffer(value, self._size))

    def _decode(self, raw: Any) -> Any:
        value = layout.from_bytes(self.spec.value_type, bytes(raw))[0]
        return [value] if self.spec.percpu else value

    def _index(self, kb: bytes) -> int:
        return int.from_bytes(kb, sys.byteorder)

    def _prefixlen(self, kb: bytes) -> int:
        return int.from_bytes(kb[:4], sys.byteorder)

    def _prefix(self, kb: bytes, plen: int) -> bytes:
        """The entry key of the first `plen` bits of `kb`'s data."""
        clear = self._lpm_bits - plen
        data = int.from_bytes(kb[4:], "big") >> clear << clear
        return plen.to_bytes(4, sys.byteorder) + data.to_bytes(self._ksize - 4, "big")

    def _longest_match(self, kb: bytes) -> bytes | None:
        plen = self._prefixlen(kb)
        if plen > self._lpm_bits:
            return None
        for p in range(plen, -1, -1):
            entry = self._prefix(kb, p)
            if entry in self._data:
                return entry
        return None

    # --- the datapath's side ---------------------------------------------------

    def ref(self, kb: bytes) -> bytearray | None:
        """The stored value itself (writes go to the map, as through the
        pointer a BPF lookup returns), or None. Marks an LRU entry used."""
        if self._array:
            if self._index(kb) >= self.max_entries:
                return None
            slot = self._data.get(kb)
            if slot is None:
                slot = self._data[kb] = bytearray(self._size)
            return slot
        if self._lpm:
            entry = self._longest_match(kb)
            return None if entry is None else self._data[entry]
        slot = self._data.get(kb)
        if slot is not None and self._lru:
            self._data.move_to_end(kb)
        return slot

    def put(self, kb: bytes, vb: bytes, flags: int = BPF_ANY) -> int:
        """bpf_map_update_elem: 0 or a negative errno, as the helper returns."""
        if flags not in (BPF_ANY, BPF_NOEXIST, BPF_EXIST):
            return -errno.EINVAL
        if self._array:
            if self._index(kb) >= self.max_entries:
                return -errno.E2BIG
            if flags == BPF_NOEXIST:
                return -errno.EEXIST
            self._data[kb] = bytearray(vb)
            return 0
        written = kb
        if self._lpm:
            if self._prefixlen(kb) > self._lpm_bits:
                return -errno.EINVAL
            kb = self._prefix(kb, self._prefixlen(kb))
        present = kb in self._data
        if present and flags == BPF_NOEXIST:
            return -errno.EEXIST
        if not present and flags == BPF_EXIST:
            return -errno.ENOENT
        if not present and len(self._data) >= self.max_entries:
            if self._lpm:
                return -errno.ENOSPC
            if not self._lru:
                return -errno.E2BIG
            self._data.popitem(last=False)
        self._data[kb] = bytearray(vb)
        if self._lpm:
            self._lpm_keys[kb] = written
        if self._lru:
            self._data.move_to_end(kb)
        return 0

    def written_keys(self) -> list[bytes]:
        """Raw keys of the entries held; for an array, of the slots ever
        written (the others are zero)."""
        return list(self._lpm_keys.get(kb, kb) for kb in self._data)

    def clear(self) -> None:
        """Every hash entry deleted, every array slot zero."""
        self._data.clear()
        self._lpm_keys.clear()

    # --- BpfMap's interface ------------------------------------------------------

    def close(self) -> None:
        pass

    def lookup(self, key: Any) -> Any | None:
        kb = self.key_bytes(key)
        if self._array:
            if self._index(kb) >= self.max_entries:
                return None
            return self._decode(self._data.get(kb, bytes(self._size)))
        if self._lpm:
            entry = self._longest_match(kb)
            return None if entry is None else self._decode(self._data[entry])
        # A lookup from the control plane does not count as use, as with
        # the bpf(2) syscall on a kernel LRU map.
        raw = self._data.get(kb)
        return None if raw is None else self._decode(raw)

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        ret = self.put(self.key_bytes(key), self._value_bytes(value), flags)
        if ret < 0:
            raise update_error(self.spec, -ret)

    def delete(self, key: Any) -> bool:
        if self._array:
            raise _error(errno.EINVAL, f"delete from {self.spec.name}")
        kb = self.key_bytes(key)
        if self._lpm:
            if self._prefixlen(kb) > self._lpm_bits:
                raise _error(errno.EINVAL, f"delete from {self.spec.name}")
            kb = self._prefix(kb, self._prefixlen(kb))
            self._lpm_keys.pop(kb, None)
        return self._data.pop(kb, None) is not None

    def _key_of(self, kb: bytes) -> Any:
        return layout.from_bytes(self.spec.key_type, self._lpm_keys.get(kb, kb))[0]

    def keys(self) -> Iterator[Any]:
        if self._array:
            yield from range(self.max_entries)
            return
        # A snapshot, so that deleting while iterating is fine.
        for kb in list(self._data):
            yield self._key_of(kb)

    def items(self) -> Iterator[tuple[Any, Any]]:
        if self._array:
            zero = bytes(self._size)
            for i in range(self.max_entries):
                kb = i.to_bytes(self._ksize, sys.byteorder)
                yield i, self._decode(self._data.get(kb, zero))
            return
        for kb, raw in list(self._data.items()):
            yield self._key_of(kb), self._decode(raw)

    def raw_items(self) -> Iterator[tuple[bytes, bytes]]:
        pad = bytes(self._vsize - self._size)
        if self._array:
            zero = bytes(self._size)
            for i in range(self.max_entries):
                kb = i.to_bytes(self._ksize, sys.byteorder)
                yield kb, bytes(self._data.get(kb, zero)) + pad
            return
        for kb, raw in list(self._data.items()):
            yield self._lpm_keys.get(kb, kb), bytes(raw) + pad

    def read_array(self, first: int, count: int) -> bytes:
        if not self._array or first < 0 or first + count > self.max_entries:
            raise ValueError(f"slots [{first}, {first + count}) of {self.spec.name}")
        pad, zero = bytes(self._vsize - self._size), bytes(self._size)
        return b"".join(bytes(self._data.get(i.to_bytes(self._ksize, sys.byteorder), zero)) + pad
                        for i in range(first, first + count))

    def write_array(self, first: int, values: bytes) -> None:
        count = len(values) // self._vsize
        if not self._array or first < 0:
            raise ValueError(f"slots [{first}, {first + count}) of {self.spec.name}")
        keys = b"".join(i.to_bytes(self._ksize, sys.byteorder)
                        for i in range(first, first + count))
        self.update_batch(keys, values, count)

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        if len(keys) < count * self._ksize or len(values) < count * self._vsize:
            raise _error(errno.EINVAL, f"batch update of {self.spec.name}")
        if self._array and self._ksize == 4:
            # The common case (a Maglev range), without a call per slot.
            idx = memoryview(keys)[: 4 * count].cast("I")
            if count and max(idx) < self.max_entries:
                vs, size = self._vsize, self._size
                self._data.update((keys[4 * i : 4 * i + 4],
                                   bytearray(values[vs * i : vs * i + size]))
                                  for i in range(count))
                return
        _, ret = self._put_some(keys, values, count)
        if ret < 0:
            raise _error(-ret, f"batch update of {self.spec.name}")

    def update_some(self, keys: bytes, values: bytes, count: int) -> int:
        if len(keys) < count * self._ksize or len(values) < count * self._vsize:
            raise _error(errno.EINVAL, f"batch update of {self.spec.name}")
        return self._put_some(keys, values, count)[0]

    def _put_some(self, keys: bytes, values: bytes, count: int) -> tuple[int, int]:
        """Entries put in order until one fails: how many went in, and the
        failure (-errno) or 0."""
        for i in range(count):
            kb = keys[i * self._ksize : (i + 1) * self._ksize]
            vb = values[i * self._vsize : i * self._vsize + self._size]
            ret = self.put(kb, vb)
            if ret < 0:
                return i, ret
        return count, 0


def new_userspace_maps(sizes: Sizes) -> dict[str, DictMap]:
    """Every map of the datapath, sized as a kernel instance of `sizes`."""
    entries = max_entries(sizes.defines())
    return {name: DictMap(spec, entries[name]) for name, spec in specs().items()}
