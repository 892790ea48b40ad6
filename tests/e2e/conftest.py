"""Fixtures for end-to-end tests in network namespaces.

They need root: without it they fail with a clear message, they never skip."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from lab.topology import list_namespaces

TOOLS = ("ip", "curl", "ethtool", "sysctl")


@pytest.fixture(autouse=True)
def lab_requirements() -> None:
    """Fail (not skip) when the lab cannot be built here."""
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests build network namespaces and need root "
                    "(run pytest as root)", pytrace=False)
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"end-to-end tests need these tools on PATH: {missing}", pytrace=False)


@pytest.fixture(autouse=True)
def no_leaked_namespaces() -> Iterator[None]:
    """After each test, no lab namespace this process created may remain.

    Leftovers are deleted (so one failure does not litter the machine) and reported."""
    mine = f"lb-{os.getpid()}-"
    before = set(list_namespaces())
    yield
    leaked = sorted(n for n in set(list_namespaces()) - before if n.startswith(mine))
    for ns in leaked:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
    assert not leaked, f"namespaces left behind: {leaked}"
