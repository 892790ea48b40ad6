"""lb.datapath.netns: netlink, sockets and cookies of another network namespace, made
by a thread inside it; the process forks nothing for them."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from lb.datapath.netns import call_in, iproute
from lb.datapath.socklb import netns_cookie
from tests.conftest import require_root

FORKS: list[int] = []
os.register_at_fork(before=lambda: FORKS.append(os.getpid()))


@pytest.fixture
def netns() -> Iterator[str]:
    require_root()
    name = f"lbtest-ns-{os.getpid()}-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "lbt0", "type", "veth", "peer",
                        "name", "lbt1"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_netlink_of_a_namespace_sees_its_links_and_forks_nothing(netns: str) -> None:
    forks = len(FORKS)
    with iproute(netns) as ipr:
        names = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    with iproute(None) as ipr:
        here = {link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    assert names == {"lo", "lbt0", "lbt1"}
    assert not {"lbt0", "lbt1"} & here
    assert len(FORKS) == forks  # pyroute2's own netns sockets come from a forked child


def test_a_namespace_has_its_own_cookie_and_a_missing_one_is_an_error(netns: str) -> None:
    assert netns_cookie(netns) != netns_cookie()
    assert netns_cookie(netns) == netns_cookie(netns)
    with pytest.raises(FileNotFoundError):
        netns_cookie(netns + "-missing")
    with pytest.raises(FileNotFoundError):
        call_in(netns + "-missing", lambda: None)
