"""Compiled programs kept between starts (loader/objects.py): what a start loads without
BCC acts as what BCC compiled, on maps like BCC's; a kept entry that does not read back is
compiled over; the key follows what the compile reads."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lb.datapath.instance import SMALL, reconciler_for
from lb.inspect import packets
from lb.model import Node
from lb.service import desired
from lb.sources.manifests import build_cluster
from loader import libbpf, objects
from loader.build import BuildOptions, Datapath, remove_pins
from loader.maps import specs
from loader.programs import PACKET_PROGRAMS, PROG_TYPE, PROGRAMS, TC_FROM_POD, XDP_EXTERNAL
from tests.conftest import new_pin_dir, require_root
from tests.packet.test_datapath import NODE, VIP, web


@pytest.fixture
def pins() -> Iterator[list[Path]]:
    """Pin directories handed out by `fresh`, all removed after."""
    made: list[Path] = []
    yield made
    for p in made:
        remove_pins(p)


def fresh(pins: list[Path]) -> Path:
    pins.append(new_pin_dir("objects"))
    return pins[-1]


def program_web(dp: Datapath, backends: tuple[str, ...] = ("10.244.1.10", "10.244.1.11"),
                node: Node = NODE) -> None:
    cluster = build_cluster((d, "test") for d in web(list(backends))).cluster
    assert not reconciler_for(dp).sync(desired.compute(cluster, node)).errors


def destination(frame: bytes) -> str:
    return socket.inet_ntoa(frame[30:34])  # after Ethernet, the IPv4 header's daddr


def test_kept_programs_act_as_compiled_ones_on_maps_like_bccs(tmp_path: Path,
                                                              pins: list[Path]) -> None:
    require_root()
    with Datapath(BuildOptions(fresh(pins), SMALL, objects=tmp_path)) as compiled:
        assert compiled.kept is None and len(list(tmp_path.glob("*.json"))) == 1
        # A new instance: no pins yet, so the loader creates the maps itself.
        with Datapath(BuildOptions(fresh(pins), SMALL, objects=tmp_path)) as kept:
            assert kept.kept is not None and kept.bpf is None
            for name in specs():
                a = libbpf.map_info(compiled.map(name).fd)
                b = libbpf.map_info(kept.map(name).fd)
                assert (a.type, a.key_size, a.value_size, a.max_entries, a.map_flags) == (
                    b.type, b.key_size, b.value_size, b.max_entries, b.map_flags), name
            for name in PROGRAMS:  # the kernel verifies each as it loads
                assert kept.prog_fd(name) > 0
            program_web(compiled)
            program_web(kept)
            frames = [packets.build("10.244.1.5", sport, VIP, 80, "tcp") for sport in
                      range(40000, 40032)]
            frames += [packets.build("10.244.1.5", 40000, VIP, 53, "udp", payload=b"q"),
                       packets.build("10.244.1.5", 40000, "10.96.0.99", 80, "tcp"),
                       packets.build("192.0.2.9", 40000, "192.0.2.1", 30080, "tcp"),
                       b"\x00" * 14, b"\xff" * 60]
            for prog in PACKET_PROGRAMS:
                for frame in frames:
                    a_out = libbpf.prog_test_run(compiled.prog_fd(prog.name), frame)
                    b_out = libbpf.prog_test_run(kept.prog_fd(prog.name), frame)
                    assert (a_out.retval, a_out.data) == (b_out.retval, b_out.data), prog.name
            # Some frames were translated, so the comparison had something to compare.
            out = libbpf.prog_test_run(kept.prog_fd(TC_FROM_POD.name), frames[0])
            assert destination(out.data) in ("10.244.1.10", "10.244.1.11")
            # Each instance's programs read its own maps: their fds were written in.
            with Datapath(BuildOptions(fresh(pins), SMALL, objects=tmp_path)) as other:
                program_web(other, ("10.244.2.20",))
                out = libbpf.prog_test_run(other.prog_fd(TC_FROM_POD.name), frames[0])
                assert destination(out.data) == "10.244.2.20"
                out = libbpf.prog_test_run(kept.prog_fd(TC_FROM_POD.name), frames[0])
                assert destination(out.data) in ("10.244.1.10", "10.244.1.11")


def test_a_restart_loads_the_kept_programs_over_the_pinned_maps(tmp_path: Path,
                                                                pins: list[Path]) -> None:
    require_root()
    pin_dir = fresh(pins)
    with Datapath(BuildOptions(pin_dir, SMALL, objects=tmp_path)) as first:
        program_web(first)
        entries = dict(first.map("lb_services").raw_items())
    assert entries
    with Datapath(BuildOptions(pin_dir, SMALL, objects=tmp_path)) as again:
        assert again.kept is not None
        assert dict(again.map("lb_services").raw_items()) == entries
        frame = packets.build("10.244.1.5", 40000, VIP, 80, "tcp")
        assert libbpf.prog_test_run(again.prog_fd(TC_FROM_POD.name), frame).data != frame


def test_an_entry_that_does_not_read_back_is_compiled_over(tmp_path: Path,
                                                           pins: list[Path],
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    require_root()
    with Datapath(BuildOptions(fresh(pins), SMALL, objects=tmp_path)):
        pass
    (entry,) = tmp_path.glob("*.json")
    good = entry.read_text()
    for broken in (good[: len(good) // 2], good.replace('"lb_services"', '"lb_nothing"')):
        entry.write_text(broken)
        with Datapath(BuildOptions(fresh(pins), SMALL, objects=tmp_path)) as dp:
            assert dp.kept is None and dp.prog_fd(XDP_EXTERNAL.name) > 0
        assert "compiling again" in caplog.text
        assert entry.read_text() == good  # compiled over, whole
        caplog.clear()


def test_the_key_follows_source_defines_kernel_and_compiler_not_the_pin_dir() -> None:
    base = objects.key("int x;", ["-DA=1", '-DLB_PIN_DIR="/sys/fs/bpf/a"'], "6.1", "0.26")
    assert base == objects.key("int x;", ["-DA=1", '-DLB_PIN_DIR="/sys/fs/bpf/b"'],
                               "6.1", "0.26")
    others = {objects.key("int y;", ["-DA=1"], "6.1", "0.26"),
              objects.key("int x;", ["-DA=2"], "6.1", "0.26"),
              objects.key("int x;", ["-DA=1"], "6.2", "0.26"),
              objects.key("int x;", ["-DA=1"], "6.1", "0.27")}
    assert base not in others and len(others) == 4


def insn(code: int, src: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, src << 4, 0, imm)


def test_a_directory_keeps_the_newest_entries(tmp_path: Path) -> None:
    kept = objects.program("p", insn(0x95), {})
    for i in range(objects.KEEP + 3):
        objects.store(tmp_path, f"e{i}", [kept])
        os.utime(tmp_path / f"e{i}.json", (1000 + i, 1000 + i))
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == sorted(
        f"e{i}" for i in range(3, objects.KEEP + 3))
    got = objects.load(tmp_path, f"e{objects.KEEP + 2}", ["p"], [])
    assert got is not None and got["p"] == kept
    assert objects.load(tmp_path, "e0", ["p"], []) is None
    assert not list(tmp_path.glob(".objects-*"))  # nothing half written left


def test_a_program_the_verifier_refuses_says_why() -> None:
    require_root()
    # exit with r0 never written: the verifier refuses to read it.
    with pytest.raises(libbpf.BpfError, match="R0 !read_ok") as refused:
        libbpf.prog_load(PROG_TYPE["xdp"], "refused", insn(0x95))
    assert refused.value.errno == errno.EACCES


def test_only_map_references_by_fd_are_kept() -> None:
    ld_map = insn(0x18, 1, 7) + insn(0)
    exit_ = insn(0x95)
    p = objects.program("p", ld_map + exit_, {7: "lb_services"})
    assert p.maps == ((0, "lb_services"),)
    assert struct.unpack_from("<i", p.relocated({"lb_services": 42}), 4) == (42,)
    with pytest.raises(objects.NotKeepable, match="object 8"):
        objects.program("p", insn(0x18, 1, 8) + insn(0) + exit_, {7: "lb_services"})
    with pytest.raises(objects.NotKeepable, match="kind 2"):  # a map value (global data)
        objects.program("p", insn(0x18, 2, 7) + insn(0) + exit_, {7: "lb_services"})
    with pytest.raises(objects.NotKeepable, match="subprogram"):
        objects.program("p", insn(0x85, 1, 3) + exit_, {})
    with pytest.raises(objects.NotKeepable, match="whole number"):
        objects.program("p", exit_[:5], {})
