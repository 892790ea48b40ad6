"""Each header of bpf/lib includes what it uses: compiled on its own (BCC,
the flags of a real build), every one of them builds, so any include order
of the entry-point file compiles."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb.datapath.instance import SMALL
from loader.build import BuildOptions, expand_source, remove_pins
from loader.layout import BPF_DIR
from tests.conftest import new_pin_dir, require_root

HEADERS = sorted((BPF_DIR / "lib").glob("*.h"))


def compile_alone(source: str, tmp_path: Path) -> None:
    """Build one translation unit with the cflags of a real instance; its
    pinned maps (maps.h) go to a pin directory of its own."""
    from bcc import BPF

    unit = tmp_path / "unit.c"
    unit.write_text(source)
    pin_dir = new_pin_dir("hdr")
    pin_dir.mkdir(mode=0o700, parents=True)
    try:
        BPF(text=expand_source(unit).encode(), cflags=BuildOptions(pin_dir, SMALL).cflags()
            ).cleanup()
    finally:
        remove_pins(pin_dir)


def test_every_header_is_checked() -> None:
    names = {h.name for h in HEADERS}
    assert {"common.h", "parse.h", "translate.h", "policy.h", "verdict.h"} <= names


@pytest.mark.parametrize("header", HEADERS, ids=lambda h: h.name)
def test_a_header_compiles_on_its_own(header: Path, tmp_path: Path) -> None:
    require_root()
    compile_alone(f'#include "{header}"\n', tmp_path)


def test_a_header_that_misses_an_include_does_not_compile(tmp_path: Path) -> None:
    """The check can fail: a function of stats.h used without it."""
    require_root()
    with pytest.raises(Exception, match="Failed to compile"):
        compile_alone('#include "' + str(BPF_DIR / "lib" / "common.h") + '"\n'
                      "LB_INLINE void f(void) { lb_count(0, 0); }\n", tmp_path)
