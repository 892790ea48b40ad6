"""Where `--cgroup auto` attaches the socket hooks, from /proc/self/cgroup."""

from __future__ import annotations

from pathlib import Path

from lb.datapath.socklb import node_cgroup

ROOT = Path("/sys/fs/cgroup/unified")


def test_under_kubelets_cgroup_root_of_a_nested_node() -> None:
    text = ("4:memory:/xk-n1/kubepods/besteffort/pod1/abc\n"
            "0::/xk-n1/kubepods/besteffort/pod1/abc\n")
    assert node_cgroup(text, ROOT) == ROOT / "xk-n1"


def test_systemd_driver_slices() -> None:
    text = "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-x\n"
    assert node_cgroup(text, Path("/sys/fs/cgroup")) == Path("/sys/fs/cgroup")


def test_private_cgroup_namespace_is_the_root() -> None:
    assert node_cgroup("0::/\n", ROOT) == ROOT


def test_no_unified_line_is_the_root() -> None:
    assert node_cgroup("1:cpu:/xk-n2/kubepods/x\n", ROOT) == ROOT
