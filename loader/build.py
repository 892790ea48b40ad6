"""Compile bpf/ with BCC, pin its maps under one instance directory and
hand out program fds and maps; or, when the same compile was kept
(loader/objects.py), load what it made without BCC.

BCC rewrites map calls (`m.lookup(&k)`) only in the file it is given, not in
included headers, so the local `#include "..."` tree is expanded into one
text first; `#line` markers keep compiler messages pointing at the real
files."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from loader import layout, libbpf, objects
from loader.clock import DatapathClock
from loader.maps import BpfMap, kernel_type, max_entries, specs
from loader.programs import PROG_TYPE, PROGRAMS, Program
from loader.sizes import Sizes

log = logging.getLogger(__name__)

MAIN_SOURCE = layout.BPF_DIR / "lb.c"
BPFFS = Path("/sys/fs/bpf")
_INCLUDE = re.compile(r'\s*#include\s+"([^"]+)"')


class BpffsMissing(RuntimeError):
    """No BPF filesystem where the pins go."""


def require_bpffs(path: Path = BPFFS) -> None:
    """Pins need a bpffs at `path`; without one, BCC's pinning fails deep in
    a build with a message that does not say so."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return
    if not any(f.split()[1:3] == [str(path), "bpf"] for f in mounts if len(f.split()) > 2):
        raise BpffsMissing(f"no BPF filesystem at {path}: mount one (mount -t bpf bpf {path}); "
                           f"in a pod, mount the host's {path}")


class LayoutMismatch(RuntimeError):
    """Pinned maps were written by a datapath with another layout or size."""


@dataclass(frozen=True)
class BuildOptions:
    """Node-specific compile-time settings, passed to the C as -D defines."""

    pin_dir: Path
    sizes: Sizes = field(default_factory=Sizes)
    defines: dict[str, str] = field(default_factory=dict)
    clock: DatapathClock = field(default_factory=DatapathClock.of_kernel)
    # Where compiled programs are kept between starts (loader/objects.py);
    # None: compile every time.
    objects: Path | None = None

    def max_entries(self) -> dict[str, int]:
        return max_entries(self.sizes.defines())

    def cflags(self) -> list[str]:
        flags = {
            "LB_PIN_DIR": f'"{self.pin_dir}"',
            "LB_NSEC_PER_JIFFY": f"{self.clock.nsec_per_jiffy}ULL",
            **{k: str(v) for k, v in self.sizes.defines().items()},
            **self.defines,
        }
        # A call of an undeclared function is a header that misses an include.
        return [f"-D{k}={v}" for k, v in flags.items()] + [
            "-Wno-macro-redefined", "-Werror=implicit-function-declaration"]


def expand_source(path: Path = MAIN_SOURCE, seen: set[Path] | None = None) -> str:
    """The C of `path` with its local includes inlined, each once."""
    seen = set() if seen is None else seen
    out: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        inc = (path.parent / m.group(1)).resolve()
        if inc not in seen:
            seen.add(inc)
            out.append(f'#line 1 "{inc}"')
            out.append(expand_source(inc, seen))
        out.append(f'#line {lineno + 1} "{path}"')
    return "\n".join(out)


def check_pins(opts: BuildOptions) -> None:
    """Refuse pinned maps that this build would misread."""
    sizes = opts.max_entries()
    for name, spec in specs().items():
        pin = opts.pin_dir / name
        if not pin.exists():
            continue
        fd = libbpf.obj_get(str(pin))
        try:
            info = libbpf.map_info(fd)
        finally:
            os.close(fd)
        want_value = layout.sizeof(spec.value_type)
        problems = []
        if info.type != kernel_type(spec):
            problems.append(f"type {info.type} != {kernel_type(spec)}")
        if info.key_size != layout.sizeof(spec.key_type):
            problems.append(f"key size {info.key_size} != {layout.sizeof(spec.key_type)}")
        if info.value_size != want_value:
            problems.append(f"value size {info.value_size} != {want_value}")
        if info.max_entries != sizes[name]:
            problems.append(f"max entries {info.max_entries} != {sizes[name]}")
        if problems:
            raise LayoutMismatch(
                f"pinned map {pin}: {', '.join(problems)}; "
                "remove the old instance with `lbctl down` first"
            )
    meta = opts.pin_dir / "lb_meta"
    if meta.exists():
        with BpfMap.open_pinned(opts.pin_dir, "lb_meta") as m:
            found = m.lookup(0)
        version = layout.const("LB_LAYOUT_VERSION")
        if found is not None and found.layout_version not in (0, version):
            raise LayoutMismatch(
                f"{meta}: layout version {found.layout_version}, this build has {version}"
            )


def compiler_version() -> str:
    """BCC's version, read without importing it (that alone takes 0.6 s)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.submodule_search_locations:
        return "no bcc"
    version = Path(next(iter(spec.submodule_search_locations))) / "version.py"
    try:
        return version.read_text().strip()
    except OSError:
        return "bcc of unknown version"


class Datapath:
    """The compiled programs of one instance and its pinned maps."""

    def __init__(self, opts: BuildOptions) -> None:
        require_bpffs()
        self.opts = opts
        self._progs: dict[str, int] = {}
        # Programs may be verified on another thread while this one programs the maps.
        self._progs_lock = threading.Lock()
        self._maps: dict[str, BpfMap] = {}
        opts.pin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        opts.pin_dir.chmod(0o700)
        check_pins(opts)
        source, cflags = expand_source(), opts.cflags()
        # Either BCC's module, or the programs a compile kept.
        self.bpf: Any = None
        self.kept: dict[str, objects.Program] | None = None
        entry = None
        if opts.objects is not None:
            uname = os.uname()
            entry = objects.key(source, cflags, f"{uname.release} {uname.version}",
                                compiler_version())
            self.kept = objects.load(opts.objects, entry, PROGRAMS, specs())
        if self.kept is not None:
            self._create_maps()
        else:
            self._compile(source, cflags, entry)
        for name in specs():
            (opts.pin_dir / name).chmod(0o600)
        self.map("lb_meta").update(
            0, layout.new("struct lb_meta", layout_version=layout.const("LB_LAYOUT_VERSION"))[0]
        )

    def _compile(self, source: str, cflags: list[str], entry: str | None) -> None:
        """BCC's compile; kept under `entry` when there is an object cache."""
        from bcc import BPF  # Debian's python3-bpfcc, seen through a .pth

        self.bpf = BPF(text=source.encode(), cflags=cflags)
        if self.opts.objects is None or entry is None:
            return
        fds = {self.bpf.get_table(name.encode()).map_fd: name for name in specs()}
        try:
            objects.store(self.opts.objects, entry, [
                objects.program(name, self.bpf.dump_func(name.encode()), fds)
                for name in PROGRAMS])
        except (OSError, objects.NotKeepable) as e:
            log.warning("compiled programs not kept in %s: %s", self.opts.objects, e)

    def _create_maps(self) -> None:
        """What BCC does for a pinned map: open it if pinned, else create
        and pin it."""
        sizes = self.opts.max_entries()
        for name, spec in specs().items():
            pin = self.opts.pin_dir / name
            if pin.exists():
                continue
            fd = libbpf.map_create(kernel_type(spec), name, layout.sizeof(spec.key_type),
                                   layout.sizeof(spec.value_type), sizes[name], spec.flags)
            try:
                libbpf.obj_pin(fd, str(pin))
            finally:
                os.close(fd)

    def prog_fd(self, name: str) -> int:
        """Load (once) the program `name` (loader/programs.py)."""
        with self._progs_lock:
            return self._prog_fd(name)

    def _prog_fd(self, name: str) -> int:
        if name not in self._progs:
            prog = PROGRAMS[name]
            if self.kept is not None:
                self._progs[name] = self._load_kept(prog)
            elif prog.kind == "cgroup_sock_addr":
                # cgroup sock_addr programs are verified for one hook.
                fn = self.bpf.load_func(name.encode(), self.bpf.CGROUP_SOCK_ADDR,
                                        attach_type=prog.attach_type)
                self._progs[name] = fn.fd
            else:
                kind = self.bpf.XDP if prog.kind == "xdp" else self.bpf.SCHED_CLS
                self._progs[name] = self.bpf.load_func(name.encode(), kind).fd
        return self._progs[name]

    def _load_kept(self, prog: Program) -> int:
        assert self.kept is not None
        kept = self.kept[prog.name]
        fds = {name: self.map(name).fd for _, name in kept.maps}
        return libbpf.prog_load(PROG_TYPE[prog.kind], prog.name, kept.relocated(fds),
                                prog.attach_type or 0)

    @property
    def sizes(self) -> Sizes:
        return self.opts.sizes

    def run(self, program: str, frame: bytes) -> libbpf.TestRun:
        """`frame` through `program`, in the kernel (BPF_PROG_TEST_RUN)."""
        return libbpf.prog_test_run(self.prog_fd(program), frame)

    def map(self, name: str) -> BpfMap:
        if name not in self._maps:
            self._maps[name] = BpfMap.open_pinned(self.opts.pin_dir, name)
        return self._maps[name]

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()
        if self.bpf is not None:
            self.bpf.cleanup()
        else:
            for fd in self._progs.values():
                os.close(fd)
        self._progs.clear()

    def __enter__(self) -> Datapath:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def remove_pins(pin_dir: Path) -> None:
    """Unpin every map of an instance and remove its directory."""
    if not pin_dir.exists():
        return
    for entry in pin_dir.iterdir():
        entry.unlink()
    pin_dir.rmdir()
