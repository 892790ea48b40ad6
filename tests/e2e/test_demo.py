"""`make demo` works and shows what it promises: both spreads and the map."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lb.datapath import socklb
from tests.conftest import REPO, require_root


def test_demo_serves_the_tomcat_example_and_cleans_up() -> None:
    require_root()
    out = subprocess.run([sys.executable, "-m", "lab.demo"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    # Three spreads (pod to ClusterIP, outside to NodePort, outside through
    # nginx on the host network), each naming both tomcat pods with a bar.
    assert text.count("tomcat-app-1   #") == 3 and text.count("tomcat-app-2   #") == 3
    assert "translated meanwhile: 0 (the socket hook did the work)" in text
    assert "10.97.222.179:8080" in text and "FRONTEND" in text
    assert "demo finished" in text
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in after.split() if "tomcat-app" in n or "kubernetes-node" in n]
    assert not (Path("/sys/fs/bpf") / "lbdemo").exists()
    # nginx stopped, its cgroup removed.
    assert "lab-nginx-" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                              text=True).stdout
    assert not list(socklb.cgroup2_root().glob("lbdemo-*"))
