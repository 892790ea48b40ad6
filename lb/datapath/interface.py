"""The one interface of a datapath that packets run through: the kernel's
(loader.build.Datapath, BPF_PROG_TEST_RUN) and the userspace twin's
(lb.datapath.userspace.programs.UserspaceDatapath). The tracer, and anything else
that runs frames and reads maps, takes either."""

from __future__ import annotations

from typing import Any, Protocol

from loader.sizes import Sizes


class Run(Protocol):
    """A program's result on one frame."""

    @property
    def retval(self) -> int: ...

    @property
    def data(self) -> bytes: ...


class PacketDatapath(Protocol):
    @property
    def sizes(self) -> Sizes:
        """The map sizes the instance was built with."""
        ...

    def map(self, name: str) -> Any:
        """The map `name` (a loader.maps.BpfMap, or a userspace DictMap)."""
        ...

    def run(self, program: str, frame: bytes) -> Run:
        """`frame` through the program `program` (loader/programs.py)."""
        ...
