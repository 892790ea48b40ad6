"""The few libbpf calls BCC's Python lacks, through cffi (ABI mode):
opening pinned objects, map access from another process, batch updates,
object info, BPF_PROG_TEST_RUN, and creating maps and loading programs
without BCC (loader.objects)."""

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
struct bpf_map_create_opts {
    size_t sz;
    uint32_t btf_fd; uint32_t btf_key_type_id; uint32_t btf_value_type_id;
    uint32_t btf_vmlinux_value_type_id;
    uint32_t inner_map_fd; uint32_t map_flags; uint64_t map_extra;
    uint32_t numa_node; uint32_t map_ifindex;
};
struct bpf_prog_load_opts {
    size_t sz;
    int attempts;
    int expected_attach_type;
    uint32_t prog_btf_fd; uint32_t prog_flags; uint32_t prog_ifindex; uint32_t kern_version;
    uint32_t attach_btf_id; uint32_t attach_prog_fd; uint32_t attach_btf_obj_fd;
    const int *fd_array;
    const void *func_info; uint32_t func_info_cnt; uint32_t func_info_rec_size;
    const void *line_info; uint32_t line_info_cnt; uint32_t line_info_rec_size;
    uint32_t log_level; uint32_t log_size; char *log_buf;
};
int bpf_map_create(int map_type, const char *map_name, uint32_t key_size, uint32_t value_size,
                   uint32_t max_entries, const struct bpf_map_create_opts *opts);
int bpf_prog_load(int prog_type, const char *prog_name, const char *license,
                  const void *insns, size_t insn_cnt, const struct bpf_prog_load_opts *opts);
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


def obj_pin(fd: int, path: str) -> None:
    check(lib().bpf_obj_pin(fd, path.encode()), f"bpf_obj_pin({path})")


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int,
               flags: int = 0) -> int:
    """A new map; the caller owns the fd."""
    f = ffi()
    opts = f.new("struct bpf_map_create_opts *")
    opts.sz = f.sizeof("struct bpf_map_create_opts")
    opts.map_flags = flags
    # The kernel keeps 15 characters of a map's name.
    return check(lib().bpf_map_create(map_type, name[:15].encode(), key_size, value_size,
                                      max_entries, opts), f"creating map {name}")


# The verifier's account of a refused program is kept to this much.
VERIFIER_LOG_SIZE = 1 << 20


def prog_load(prog_type: int, name: str, insns: bytes, expected_attach_type: int = 0) -> int:
    """Load (and so verify) a program; the caller owns the fd. Refused: the
    error carries the end of the verifier's log."""
    f = ffi()
    opts = f.new("struct bpf_prog_load_opts *")
    opts.sz = f.sizeof("struct bpf_prog_load_opts")
    opts.expected_attach_type = expected_attach_type
    args = (prog_type, name[:15].encode(), b"GPL", insns, len(insns) // 8, opts)
    ret = lib().bpf_prog_load(*args)
    if ret >= 0:
        return int(ret)
    # Again with the log, only now: a log costs the verifier time.
    buf = f.new("char[]", VERIFIER_LOG_SIZE)
    opts.log_level, opts.log_size, opts.log_buf = 1, VERIFIER_LOG_SIZE, buf
    again = lib().bpf_prog_load(*args)
    if again >= 0:
        return int(again)
    # The first refusal's errno: with the log on, a long log can fail as ENOSPC.
    tail = f.string(buf).decode(errors="replace").strip().splitlines()[-8:]
    raise BpfError(-ret, f"loading program {name}: {os.strerror(-ret)}: " + " | ".join(tail))


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
