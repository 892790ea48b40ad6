"""Pins are private to root; oversized objects are refused without
disturbing the rest."""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys

from lb.datapath.instance import reconciler_for
from lb.inspect import packets
from lb.service import desired
from lb.sources.manifests import build_cluster
from loader import libbpf
from loader.build import Datapath
from loader.maps import specs
from tests.conftest import REPO
from tests.packet.test_datapath import NODE, TC, VIP, endpoint_slice, service, web


def test_pins_are_root_only(datapath: Datapath) -> None:
    pin_dir = datapath.opts.pin_dir
    assert stat.S_IMODE(pin_dir.stat().st_mode) == 0o700
    for name in specs():
        assert stat.S_IMODE((pin_dir / name).stat().st_mode) == 0o600, name


def test_a_non_root_process_cannot_open_or_change_the_maps(datapath: Datapath) -> None:
    setpriv = shutil.which("setpriv")
    assert setpriv, "setpriv (util-linux) is needed to drop privileges"
    pin = datapath.opts.pin_dir / "lb_services"
    probe = ("import sys\nfrom loader import libbpf\ntry:\n"
             f" libbpf.obj_get('{pin}')\n print('opened')\n"
             "except OSError as e:\n print('refused', e.errno)")
    out = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                          sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=REPO, timeout=30)
    assert out.stdout.split()[0] == "refused", out.stdout + out.stderr
    lbctl = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-m", "lb.cli", "maps", "--instance",
                            datapath.opts.pin_dir.name], capture_output=True, text=True,
                           cwd=REPO, timeout=30)
    assert lbctl.returncode == 1


def test_huge_endpoint_list_is_refused_and_others_keep_working(datapath: Datapath) -> None:
    ips = [f"10.245.{i // 250}.{i % 250 + 1}" for i in range(2000)]
    docs = [*web(["10.244.1.10"]),
            service("huge", "10.96.0.20", [{"name": "p", "port": 80}]),
            endpoint_slice("huge", ips, [{"name": "p", "port": 80}])]
    cluster = build_cluster((d, "t") for d in docs).cluster
    res = reconciler_for(datapath).sync(desired.compute(cluster, NODE))
    assert res.errors and all("default/huge" in e for e in res.errors)
    out = libbpf.prog_test_run(datapath.prog_fd(TC), packets.build("10.244.1.5", 1, VIP, 80))
    p = packets.parse(out.data)
    assert p is not None and p.dst == "10.244.1.10"
