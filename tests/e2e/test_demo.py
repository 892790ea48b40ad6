"""`make demo` works and shows what it promises: both spreads and the map."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, require_root


def test_demo_serves_the_tomcat_example_and_cleans_up() -> None:
    require_root()
    out = subprocess.run([sys.executable, "-m", "lab.demo"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    text = out.stdout
    # Two spreads, each naming both tomcat pods with a bar.
    assert text.count("tomcat-app-1   #") == 2 and text.count("tomcat-app-2   #") == 2
    assert "10.97.222.179:8080" in text and "FRONTEND" in text
    assert "demo finished" in text
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in after.split() if "tomcat-app" in n or "kubernetes-node" in n]
    assert not (Path("/sys/fs/bpf") / "lbdemo").exists()
