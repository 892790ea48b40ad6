"""Fixtures shared by every test directory.

Tests that need the kernel fail loudly when they cannot have it: a run that
silently skipped them would report a green it never earned."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agent import object_cache_kept_as_found
from lb.datapath.instance import SMALL, Sizes
from lb.datapath.interface import PacketDatapath
from lb.datapath.userspace.programs import UserspaceDatapath
from loader.build import BPFFS, BuildOptions, Datapath, remove_pins

REPO = Path(__file__).resolve().parent.parent


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root and BPF (run `make test` as root)", pytrace=False)


def new_pin_dir(tag: str = "test") -> Path:
    return BPFFS / f"lbtest-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session", autouse=True)
def _node_object_cache_as_found() -> Iterator[None]:
    with object_cache_kept_as_found():
        yield


@pytest.fixture(scope="session")
def object_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Compiled programs kept for the session (loader/objects.py), as the
    agent keeps them between starts: the first datapath compiles, the rest
    load what it kept."""
    return tmp_path_factory.mktemp("objects")


@pytest.fixture
def datapath(object_cache: Path) -> Iterator[Datapath]:
    """A fresh datapath in its own pin directory, removed after."""
    require_root()
    pin_dir = new_pin_dir()
    try:
        with Datapath(BuildOptions(pin_dir, SMALL, objects=object_cache)) as dp:
            yield dp
    finally:
        remove_pins(pin_dir)


@pytest.fixture(params=["kernel", "userspace"])
def kernel_or_twin(request: pytest.FixtureRequest) -> Iterator[PacketDatapath]:
    """The same test on the kernel's programs and on the userspace twin."""
    if request.param == "kernel":
        yield request.getfixturevalue("datapath")
    else:
        yield UserspaceDatapath.new(SMALL)


@pytest.fixture
def sizes() -> Sizes:
    return SMALL
