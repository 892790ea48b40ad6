"""lbctl on operator input that used to crash: a one-line refusal (exit 2)
or a warning, never a traceback. The userspace datapath: no root needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

TOMCAT = REPO / "deploy" / "examples" / "tomcat.yaml"
CLUSTER_IP = "10.97.222.179"


def lbctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)


def trace(*extra: str, dst: str = f"{CLUSTER_IP}:8080") -> subprocess.CompletedProcess[str]:
    return lbctl("trace", "-f", str(TOMCAT), "--src", "10.244.1.5", "--dst", dst,
                 "--datapath", "userspace", *extra)


def test_a_cidr_node_ip_is_refused_in_one_line() -> None:
    out = trace("--node-ip", "192.0.2.1/24")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip() == ("lbctl: --node-ip: '192.0.2.1/24' is not an IP address "
                                  "(an address, not a CIDR)")


def test_a_dual_stack_node_serves_ipv4_and_says_ipv6_is_not_programmed() -> None:
    out = trace("--node-ip", "fd00::1", "--node-ip", "192.0.2.1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("DNAT 10.244.1.1")
    assert "--node-ip fd00::1: IPv6 is not programmed yet" in out.stderr
    assert "Traceback" not in out.stderr


def test_an_ipv6_only_node_is_refused() -> None:
    out = trace("--node-ip", "fd00::1")
    assert out.returncode == 2
    assert "give at least one IPv4 address" in out.stderr


def test_an_ipv6_service_cidr_is_said_and_left_out() -> None:
    out = trace("--service-cidr", "fd00:10:96::/112", "--service-cidr", "10.96.0.0/12")
    assert out.returncode == 0, out.stderr
    assert "--service-cidr fd00:10:96::/112: IPv6 is not programmed yet" in out.stderr


def test_the_node_port_range_flag(tmp_path: Path) -> None:
    svc = tmp_path / "np.yaml"
    svc.write_text("""
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  clusterIP: 10.96.0.50
  ports: [{port: 80, nodePort: 8080}]
""")
    args = ("trace", "-f", str(svc), "--src", "198.51.100.7", "--dst", "192.0.2.1:8080",
            "--from", "external", "--node-ip", "192.0.2.1", "--datapath", "userspace")
    refused = lbctl(*args)
    assert refused.returncode == 0
    assert "outside the node-port range 30000-32767" in refused.stderr
    assert refused.stdout.strip() == "PASS not-service"
    taken = lbctl(*args, "--service-node-port-range", "8000-9000")
    assert taken.stdout.strip() == "REJECT no-endpoints", taken.stderr
    bad = lbctl(*args, "--service-node-port-range", "9000-8000")
    assert bad.returncode == 2 and "is not LO-HI" in bad.stderr


def test_version() -> None:
    out = lbctl("--version")
    assert out.returncode == 0 and out.stdout.startswith("lbctl ")


def test_help_lists_choices_and_defaults() -> None:
    run = lbctl("run", "--help").stdout
    for text in ("(default 0.2)", "(default 21600)", "(default 30000-32767)", "(default lb)",
                 "(default 65536)"):
        assert text in " ".join(run.split()), text
    trace = " ".join(lbctl("trace", "--help").stdout.split())
    for text in ("{kernel,userspace}", "{pod,external}", "{tcp,udp}", "(default kernel)",
                 "(default sized to the input)"):
        assert text in trace, text


def test_trace_warns_of_a_node_flag_the_answer_depends_on(tmp_path: Path) -> None:
    svc = tmp_path / "local.yaml"
    svc.write_text("""
apiVersion: v1
kind: Service
metadata: {name: np, namespace: default}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  clusterIP: 10.96.0.50
  ports: [{port: 80, nodePort: 30080}]
""")
    base = ("trace", "-f", str(svc), "--src", "198.51.100.7", "--dst", "192.0.2.1:30080",
            "--from", "external", "--datapath", "userspace")
    bare = lbctl(*base).stderr
    assert "no --node-ip says where NodePorts answer" in bare
    assert "no --node-name says which endpoints are this node's" in bare
    given = lbctl(*base, "--node-ip", "192.0.2.1", "--node-name", "n1").stderr
    assert "warning" not in given, given


def test_a_maglev_floor_off_the_ladder_is_refused() -> None:
    out = lbctl("run", "-f", str(TOMCAT), "--iface", "eth0", "--maglev-min-table-size", "1000")
    assert out.returncode == 2
    assert "--maglev-min-table-size: invalid choice: 1000" in out.stderr


def test_bad_frames_are_refused_naming_the_line_and_field(tmp_path: Path) -> None:
    frames = tmp_path / "frames.jsonl"
    cases = [
        ('{"from": "pod", "frame": "zz"}', "--frames line 2: frame: not hex"),
        ('{"from": "moon", "frame": "00"}', "--frames line 2: from: expected pod, external "
                                            "or to-pod"),
        ('{"from": "pod", "frame": "0011"}', "--frames line 2: frame: 2 bytes is shorter"),
        ('{"from": "pod"}', "--frames line 2: frame: expected the hex"),
        ("[1]", "--frames line 2: line: expected a JSON object"),
        ("{", "--frames line 2: not JSON"),
    ]
    good = '{"from": "external", "frame": "' + "00" * 60 + '"}'
    for line, said in cases:
        frames.write_text(good + "\n" + line + "\n")
        out = lbctl("trace", "-f", str(TOMCAT), "--frames", str(frames),
                    "--datapath", "userspace")
        assert out.returncode == 2 and said in out.stderr, (line, out.stderr)
    out = lbctl("trace", "-f", str(TOMCAT), "--frames", str(frames), "--src", "10.244.1.5",
                "--datapath", "userspace")
    assert out.returncode == 2 and "give packets one way" in out.stderr
    # A frame that is no IP at all still gets a verdict.
    frames.write_text(good + "\n")
    out = lbctl("trace", "-f", str(TOMCAT), "--frames", str(frames), "--datapath",
                "userspace", "-o", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["verdict"] == "PASS"
