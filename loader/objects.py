"""Compiled programs kept between starts.

BCC compiles bpf/ in about 2 s, most of an agent's start at 1,000 services; a restarted
agent compiles the very same text. After a compile, each program's instructions are kept in a
directory, with the place of every map they name, under a key of everything the compile
read: the source, the defines except the pin directory (it names where maps are pinned,
not what the code does), the kernel it was built against and BCC's version. A later start
with the same key creates or opens the pinned maps itself, writes their fds into the
instructions and has the kernel verify and load them, without BCC. Cilium keeps its
compiled objects the same way, keyed by a hash of the datapath's configuration
(pkg/datapath/loader/cache.go, objectCache).

An entry that cannot be read, or that names something the loader does not know, is a miss:
the programs are compiled again and the entry rewritten."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Raised when what an entry holds changes meaning.
FORMAT = 1
_INSN = 8  # bytes per instruction
_LD_IMM64 = 0x18  # BPF_LD | BPF_IMM | BPF_DW: the first half of a 16-byte load
_PSEUDO_MAP_FD = 1  # its src_reg when imm is a map's fd
_CALL = 0x85
# Entries kept per directory, the most recently written: a node's agent needs one, tests
# and benchmarks of several sizes a few.
KEEP = 8


class NotKeepable(ValueError):
    """A program refers to something other than the maps by fd."""


@dataclass(frozen=True)
class Program:
    """One program's instructions; `maps` gives, for each map reference, the
    instruction whose imm holds the fd and the map's name."""

    name: str
    insns: bytes
    maps: tuple[tuple[int, str], ...]

    def relocated(self, fds: Mapping[str, int]) -> bytes:
        """The instructions with this process's fd of each map."""
        out = bytearray(self.insns)
        for index, name in self.maps:
            struct.pack_into("<i", out, index * _INSN + 4, fds[name])
        return bytes(out)


def key(source: str, cflags: Iterable[str], kernel: str, compiler: str) -> str:
    """The key of a compile: equal keys compile to equal instructions."""
    h = hashlib.sha256(f"xdplb objects {FORMAT}\0{kernel}\0{compiler}\0".encode())
    for flag in cflags:
        if not flag.startswith("-DLB_PIN_DIR="):
            h.update(flag.encode() + b"\0")
    h.update(source.encode())
    return h.hexdigest()


def program(name: str, insns: bytes, map_names: Mapping[int, str]) -> Program:
    """`insns` as BCC loads them (map fds written in), with `map_names`
    naming each fd; NotKeepable if they name anything else."""
    if len(insns) % _INSN:
        raise NotKeepable(f"{name}: {len(insns)} bytes is no whole number of instructions")
    refs = []
    for i in range(len(insns) // _INSN):
        code, regs = insns[i * _INSN], insns[i * _INSN + 1]
        src = regs >> 4
        if code == _LD_IMM64 and src:
            (imm,) = struct.unpack_from("<i", insns, i * _INSN + 4)
            if src != _PSEUDO_MAP_FD or imm not in map_names:
                raise NotKeepable(f"{name}: instruction {i} loads object {imm} of kind {src}")
            refs.append((i, map_names[imm]))
        elif code == _CALL and src:
            # A call of a subprogram or a kernel function needs BTF to load.
            raise NotKeepable(f"{name}: instruction {i} calls by BTF or to a subprogram")
    return Program(name, insns, tuple(refs))


def store(directory: Path, entry: str, programs: Iterable[Program]) -> None:
    """Keep `programs` under `entry`, whole or not at all (written aside,
    then renamed)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"format": FORMAT, "programs": [
        {"name": p.name, "insns": p.insns.hex(), "maps": [list(m) for m in p.maps]}
        for p in programs]}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".objects-")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, directory / f"{entry}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _prune(directory)


def _prune(directory: Path) -> None:
    """All but the KEEP newest entries removed."""
    def written(p: Path) -> float:
        try:
            return p.stat().st_mtime
        except FileNotFoundError:  # removed by another agent meanwhile
            return 0.0

    for old in sorted(directory.glob("*.json"), key=written, reverse=True)[KEEP:]:
        old.unlink(missing_ok=True)


def load(directory: Path, entry: str, names: Iterable[str], maps: Iterable[str]
         ) -> dict[str, Program] | None:
    """The programs `names` kept under `entry`, or None: none kept, or an
    entry that does not read back whole (logged once, then compiled over)."""
    path = directory / f"{entry}.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("compiled programs in %s unreadable (%s); compiling again", path, e)
        return None
    known = set(maps)
    try:
        if doc["format"] != FORMAT:
            return None
        got = {}
        for p in doc["programs"]:
            refs = tuple((int(i), str(m)) for i, m in p["maps"])
            insns = bytes.fromhex(p["insns"])
            if any(m not in known or not 0 <= i < len(insns) // _INSN for i, m in refs):
                raise ValueError(f"program {p['name']} names a map or place out of range")
            got[str(p["name"])] = Program(str(p["name"]), insns, refs)
        missing = set(names) - got.keys()
        if missing:
            raise ValueError(f"no program {', '.join(sorted(missing))}")
    except (KeyError, TypeError, ValueError) as e:
        log.warning("compiled programs in %s unusable (%s); compiling again", path, e)
        return None
    return got
