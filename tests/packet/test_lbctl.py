"""`lbctl trace` and `lbctl maps` as a user runs them: real processes, the
real kernel, the seed's Tomcat example."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import yaml

from lab import objects
from lb.datapath.instance import SMALL, THROWAWAY_PREFIX, reconciler_for
from lb.inspect import packets
from lb.model import Node
from lb.service import desired
from lb.sources.manifests import load
from loader.build import BPFFS, BuildOptions, Datapath, remove_pins
from tests.conftest import REPO, new_pin_dir, require_root

TOMCAT = REPO / "deploy" / "examples" / "tomcat.yaml"
CLUSTER_IP = "10.97.222.179"
ENDPOINTS = {"10.244.1.10:8080", "10.244.1.11:8080"}


def lbctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lb.cli", *args], capture_output=True,
                          text=True, check=check, cwd=REPO, timeout=120)


def test_trace_tomcat_clusterip_prints_dnat_to_an_endpoint() -> None:
    require_root()
    out = lbctl("trace", "-f", str(TOMCAT), "--src", "10.244.1.5", "--dst",
                f"{CLUSTER_IP}:8080")
    line = out.stdout.splitlines()[0]
    verdict, backend = line.split()
    assert verdict == "DNAT" and backend in ENDPOINTS


def test_trace_batch_spreads_over_both_endpoints(tmp_path: Path) -> None:
    require_root()
    batch = tmp_path / "probes.jsonl"
    batch.write_text("".join(
        json.dumps({"src": f"10.244.1.5:{port}", "dst": f"{CLUSTER_IP}:8080", "proto": "tcp",
                    "from": "pod"}) + "\n" for port in range(33000, 33200)))
    out = lbctl("trace", "-f", str(TOMCAT), "--batch", str(batch))
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(results) == 200
    assert {r["verdict"] for r in results} == {"DNAT"}
    spread = Counter(r["backend"] for r in results)
    assert set(spread) == ENDPOINTS
    # Maglev spreads evenly: neither endpoint gets less than a third.
    assert min(spread.values()) > 200 / 3, spread
    assert set(results[0]) == {"verdict", "backend", "masquerade", "reason", "entry",
                               "out_packet"}


def test_trace_nodeport_and_load_balancer_from_outside() -> None:
    require_root()
    for dst in ("192.0.2.1:30080", "203.0.113.10:8080"):
        out = lbctl("trace", "-f", str(TOMCAT), "--src", "198.51.100.10", "--dst", dst,
                    "--from", "external", "--node-ip", "192.0.2.1", "-o", "json")
        r = json.loads(out.stdout)
        assert r["verdict"] == "DNAT" and r["backend"] in ENDPOINTS and r["entry"] == "external"


def test_trace_bad_arguments_exit_2_naming_the_field(tmp_path: Path) -> None:
    cases = [
        (["--src", "10.244.1.5", "--dst", CLUSTER_IP], "dst"),
        (["--src", "10.244.300.5", "--dst", f"{CLUSTER_IP}:8080"], "src"),
        (["--src", "10.244.1.5", "--dst", f"{CLUSTER_IP}:8080", "--proto", "icmp"], "proto"),
        (["--src", "10.244.1.5", "--dst", f"{CLUSTER_IP}:99999"], "dst"),
        (["--src", "10.244.1.5", "--dst", f"{CLUSTER_IP}:80", "--from", "moon"], "from"),
    ]
    for args, field in cases:
        out = lbctl("trace", "-f", str(TOMCAT), *args, check=False)
        assert out.returncode == 2, (args, out.stderr)
        assert field in out.stderr, out.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("kind: Service\n  bad: [indent\n")
    out = lbctl("trace", "-f", str(broken), "--src", "1.2.3.4", "--dst", "1.2.3.4:1",
                check=False)
    assert out.returncode == 2 and "yaml" in out.stderr


def test_maps_lists_the_service_from_a_second_process() -> None:
    require_root()
    pin_dir = new_pin_dir("maps")
    try:
        with Datapath(BuildOptions(pin_dir, SMALL)) as dp:
            dp.prog_fd("xdp_lb_external")
            dp.prog_fd("tc_lb_from_pod")
            cluster = load([TOMCAT]).cluster
            reconciler_for(dp).sync(desired.compute(cluster, Node("n1", ("192.0.2.1",))))
            table = lbctl("maps", "services", "--instance", pin_dir.name).stdout
            lines = table.splitlines()
            assert lines[0].split()[:3] == ["FRONTEND", "PROTOCOL", "SCOPE"]
            assert any(line.startswith(f"{CLUSTER_IP}:8080") and "ClusterIP" in line
                       for line in lines)
            rows = json.loads(lbctl("maps", "services", "-o", "json", "--instance",
                                    pin_dir.name).stdout)
            fronts = {(r["frontend"], r["scope"]) for r in rows}
            assert (f"{CLUSTER_IP}:8080", "internal") in fronts
            assert ("192.0.2.1:30080", "external") in fronts
            assert ("203.0.113.10:8080", "external") in fronts
            assert all(r["backends"] == 2 for r in rows)
            mag = json.loads(lbctl("maps", "maglev", "-o", "json", "--instance",
                                   pin_dir.name).stdout)
            for r in mag:
                assert set(r["slots"]) == ENDPOINTS
                assert sum(r["slots"].values()) == r["size"]
            backends = json.loads(lbctl("maps", "backends", "-o", "json", "--instance",
                                        pin_dir.name).stdout)
            assert {b["address"] for b in backends} == ENDPOINTS
    finally:
        remove_pins(pin_dir)


def test_maps_conntrack_ages_flows_by_the_datapaths_clock() -> None:
    """The programs stamp entries with their own clock (jiffies); `lbctl maps
    conntrack` must read the same one, or every age is nonsense."""
    require_root()
    pin_dir = new_pin_dir("ages")
    try:
        with Datapath(BuildOptions(pin_dir, SMALL)) as dp:
            cluster = load([TOMCAT]).cluster
            reconciler_for(dp).sync(desired.compute(cluster, Node("n1", ("192.0.2.1",))))
            syn = packets.build("10.244.1.5", 40001, CLUSTER_IP, 8080)
            assert dp.run("tc_lb_from_pod", syn).data != syn, "the flow was translated"
            time.sleep(1.5)
            rows = json.loads(lbctl("maps", "conntrack", "-o", "json", "--instance",
                                    pin_dir.name).stdout)
            flow = [r for r in rows if r["source"] == "10.244.1.5:40001"]
            assert len(flow) == 1 and flow[0]["direction"] == "forward", rows
            assert 1.4 <= flow[0]["age_s"] <= 4.0, flow
            assert 1.4 <= flow[0]["idle_s"] <= 4.0, flow
    finally:
        remove_pins(pin_dir)


def test_maps_without_an_instance_says_so() -> None:
    out = lbctl("maps", "services", "--instance", "no-such-instance", check=False)
    assert out.returncode == 1 and "no datapath instance" in out.stderr


def load_balancer_dump(path: Path, count: int) -> Path:
    """`count` LoadBalancer services with two ports and two endpoints each:
    a realistic `kubectl get svc,endpointslices -A -o yaml`."""
    docs: list[dict[str, object]] = []
    for i in range(count):
        name, a, b = f"s{i}", i // 250, i % 250 + 1
        docs.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "LoadBalancer", "clusterIP": f"10.96.{a}.{b}", "ports": [
                {"name": "http", "port": 80, "nodePort": 30000 + i},
                {"name": "https", "port": 443, "nodePort": 31000 + i}]},
            "status": {"loadBalancer": {"ingress": [{"ip": f"203.0.{a}.{b}"}]}}})
        docs.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "https", "port": 8443}],
            "endpoints": [{"addresses": [f"10.244.{a}.{b}"]},
                          {"addresses": [f"10.245.{a}.{b}"]}]})
    path.write_text(yaml.safe_dump_all(docs))
    return path


def test_trace_sizes_its_instance_from_the_input(tmp_path: Path) -> None:
    """800 LoadBalancer services are 4,800 frontends: more than the smallest
    instance holds, so trace makes room instead of failing."""
    require_root()
    dump = load_balancer_dump(tmp_path / "dump.yaml", 800)
    out = lbctl("trace", "-f", str(dump), "--src", "198.51.100.10", "--dst", "203.0.3.50:443",
                "--from", "external", "--node-ip", "192.0.2.1")
    assert out.stdout.split()[:1] == ["DNAT"], out.stderr[-2000:]
    assert out.stdout.split()[1] in {"10.244.3.50:8443", "10.245.3.50:8443"}
    assert "refused" not in out.stderr


def test_trace_with_a_nodes_sizes_shows_its_refusals_in_a_screenful(tmp_path: Path) -> None:
    require_root()
    dump = load_balancer_dump(tmp_path / "dump.yaml", 300)
    out = lbctl("trace", "-f", str(dump), "--src", "10.244.9.9", "--dst", "10.96.0.1:80",
                "--max-services", "200", check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    refused = [ln for ln in out.stderr.splitlines() if ln.startswith("lbctl: refused: ")]
    assert len(refused) == 11 and refused[-1].startswith("lbctl: refused: ... and "), refused
    assert "(no room in lb_services)" in refused[0]
    assert len(out.stderr) < 10_000


def test_a_trace_stopped_by_sigterm_removes_its_pins(tmp_path: Path) -> None:
    require_root()
    batch = tmp_path / "probes.jsonl"
    batch.write_text("".join(json.dumps({"src": f"10.244.1.5:{20000 + i % 40000}",
                                         "dst": f"{CLUSTER_IP}:8080"}) + "\n"
                             for i in range(200_000)))
    proc = subprocess.Popen([sys.executable, "-m", "lb.cli", "trace", "-f", str(TOMCAT),
                             "--batch", str(batch)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    pins = BPFFS / f"{THROWAWAY_PREFIX}{proc.pid}-"
    deadline = time.monotonic() + 60
    while not list(BPFFS.glob(pins.name + "*")):
        assert proc.poll() is None and time.monotonic() < deadline, "no instance appeared"
        time.sleep(0.05)
    time.sleep(0.5)  # probing by now
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert not list(BPFFS.glob(pins.name + "*"))


def test_trace_removes_instances_whose_process_is_gone() -> None:
    require_root()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    orphan = BPFFS / f"{THROWAWAY_PREFIX}{dead.stdout.strip()}-deadbeef"
    orphan.mkdir()
    try:
        lbctl("trace", "-f", str(TOMCAT), "--src", "10.244.1.5", "--dst", f"{CLUSTER_IP}:8080")
        assert not orphan.exists()
    finally:
        remove_pins(orphan)


DNS = objects.Port("dns", 53, 5353, "UDP")


def test_trace_frames_replays_a_fragment_train_its_reply_and_an_icmp_error(
        tmp_path: Path) -> None:
    """Frames share one load: later fragments find their first's ports, the
    reply its conntrack entry, the ICMP error the flow it quotes; and the
    kernel and its twin print the same lines."""
    require_root()
    from lb.inspect import packets
    from tests.packet.test_icmp_errors import icmp_error, read_error

    svc = tmp_path / "dns.yaml"
    objects.write(svc, [objects.service("dns", "10.96.0.10", [DNS]),
                        objects.endpoint_slice("dns", [DNS], [("10.244.1.10", "node-a")])])
    client, vip, backend = "10.244.1.5", "10.96.0.10", "10.244.1.10"
    request = packets.build(client, 40000, vip, 53, "udp", payload=bytes(range(256)) * 12)
    train = packets.fragment(request, 1480)
    assert len(train) == 3
    stray = packets.fragment(packets.build(client, 40001, vip, 53, "udp", payload=b"y" * 2000,
                                           ident=99), 1480)[1]
    reply = packets.build(backend, 5353, client, 40000, "udp", payload=b"answer")
    translated = packets.build(client, 40000, backend, 5353, "udp", payload=b"q" * 32)
    error = icmp_error("10.244.1.1", client, translated)
    sent = [("pod", f) for f in train] + [("pod", reply), ("to-pod", error), ("pod", stray)]
    frames = tmp_path / "frames.jsonl"
    frames.write_text("".join(json.dumps({"from": e, "frame": f.hex()}) + "\n"
                              for e, f in sent))
    runs = {dp: lbctl("trace", "-f", str(svc), "--frames", str(frames), "--datapath", dp,
                      "-o", "json").stdout.splitlines()
            for dp in ("kernel", "userspace")}
    assert runs["kernel"] == runs["userspace"]
    got = [json.loads(line) for line in runs["kernel"]]
    assert [(r["verdict"], r["reason"], r["entry"]) for r in got] == [
        ("DNAT", "new", "pod"), ("DNAT", "established", "pod"), ("DNAT", "established", "pod"),
        ("PASS", "reverse-nat", "pod"), ("PASS", "icmp-error-nat", "to-pod"),
        ("PASS", "frag-no-first", "pod")]
    assert [r["backend"] for r in got[:3]] == [f"{backend}:5353", backend, backend]
    outs = [bytes.fromhex(r["out_packet"]) for r in got]
    whole = packets.parse(packets.reassemble(outs[:3]))
    assert whole is not None and whole.l4_csum_ok
    assert (whole.dst, whole.dport, whole.src, whole.sport) == (backend, 5353, client, 40000)
    back = packets.parse(outs[3])
    assert back is not None and back.l4_csum_ok and (back.src, back.sport) == (vip, 53)
    _, _, quote = read_error(outs[4])
    assert (quote.dst, quote.dport) == (vip, 53)
    assert outs[5] == stray
    table = lbctl("trace", "-f", str(svc), "--frames", str(frames)).stdout.splitlines()
    assert table[0].split() == ["FRAME", "FROM", "VERDICT", "BACKEND", "REASON"]
    assert table[5].split() == ["5", "to-pod", "PASS", "<none>", "icmp-error-nat"]
