"""The few libbpf calls BCC's Python lacks, through cffi (ABI mode):
opening pinned objects, map access from another process, batch updates,
object info and BPF_PROG_TEST_RUN."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import cffi

_CDEF = """
struct bpf_map_batch_opts { size_t sz; uint64_t elem_flags; uint64_t flags; };
struct bpf_test_run_opts {
    size_t sz;
    const void *data_in; void *data_out;
    uint32_t data_size_in; uint32_t data_size_out;
    const void *ctx_in; void *ctx_out;
    uint32_t ctx_size_in; uint32_t ctx_size_out;
    uint32_t retval; int repeat; uint32_t duration;
    uint32_t flags; uint32_t cpu; uint32_t batch_size;
};
struct lb_bpf_map_info {
    uint32_t type; uint32_t id; uint32_t key_size; uint32_t value_size;
    uint32_t max_entries; uint32_t map_flags; char name[16];
};
int bpf_obj_get(const char *pathname);
int bpf_obj_pin(int fd, const char *pathname);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count,
                         const struct bpf_map_batch_opts *opts);
int bpf_map_lookup_batch(int fd, void *in_batch, void *out_batch, void *keys, void *values,
                         uint32_t *count, const struct bpf_map_batch_opts *opts);
int bpf_map_delete_batch(int fd, const void *keys, uint32_t *count,
                         const struct bpf_map_batch_opts *opts);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int bpf_prog_attach(int prog_fd, int attachable_fd, int type, unsigned int flags);
int bpf_prog_detach2(int prog_fd, int attachable_fd, int type);
"""

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


class BpfError(OSError):
    """A libbpf call failed; errno and the call are in the message."""


class MapFull(BpfError):
    """An update found a map at max_entries: no room for a new key,
    whatever else the map holds."""

    def __init__(self, map_name: str, err: int, what: str) -> None:
        # Not strerror: E2BIG reads "Argument list too long".
        super().__init__(err, f"{what}: map {map_name} is full")
        self.map_name = map_name


@cache
def _lib() -> tuple[cffi.FFI, Any]:
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    return ffi, ffi.dlopen("libbpf.so.1")


def ffi() -> cffi.FFI:
    return _lib()[0]


def lib() -> Any:
    return _lib()[1]


def check(ret: int, what: str) -> int:
    """libbpf 1.x returns -errno; turn that into an exception."""
    if ret < 0:
        err = -ret
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_get(path: str) -> int:
    """Open a pinned map or program; the caller owns the fd."""
    return check(lib().bpf_obj_get(path.encode()), f"bpf_obj_get({path})")


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    f = ffi()
    info = f.new("struct lb_bpf_map_info *")
    size = f.new("uint32_t *", f.sizeof("struct lb_bpf_map_info"))
    check(lib().bpf_obj_get_info_by_fd(fd, info, size), "bpf_obj_get_info_by_fd")
    return MapInfo(
        type=info.type,
        id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        map_flags=info.map_flags,
        name=f.string(info.name).decode(),
    )


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(prog_fd: int, data: bytes, repeat: int = 1) -> TestRun:
    """Run a program once (or `repeat` times) on `data` in the kernel."""
    f = ffi()
    # Room for what a program may add in front (XDP headroom) or at the end.
    out = f.new("char[]", len(data) + 512)
    opts = f.new("struct bpf_test_run_opts *")
    opts.sz = f.sizeof("struct bpf_test_run_opts")
    buf = f.from_buffer(bytearray(data))
    opts.data_in = buf
    opts.data_size_in = len(data)
    opts.data_out = out
    opts.data_size_out = len(data) + 512
    opts.repeat = repeat
    check(lib().bpf_prog_test_run_opts(prog_fd, opts), "bpf_prog_test_run_opts")
    return TestRun(
        retval=opts.retval,
        data=bytes(f.buffer(out, opts.data_size_out)),
        duration_ns=opts.duration,
    )
