"""The tutorial's single entry point: a real nginx (Debian's package) on the
node's host network, proxying to a ClusterIP as ingress-nginx does with
`nginx.ingress.kubernetes.io/service-upstream: "true"` (one upstream, the
service, instead of the pods). A host-network process has no veth of its
own, so its connections to the ClusterIP are translated by the socket hooks
(connect4 gives each connect() a pod's address): it runs in the cgroup they
are attached to, inside the node's network namespace."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from lab import processes
from lab.topology import LabError, Node, Topology

NGINX_PORT = 80


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                      else None)
    if found is None:
        raise LabError("nginx is not installed (Debian's nginx-light; tools/setup.sh installs it)")
    return found


def nginx_conf(prefix: Path, listen: str, upstream: str, host: str) -> str:
    """A whole nginx.conf of one server: `host` on listen:80, everything to
    http://upstream. nginx talks HTTP/1.0 to upstreams, one connection per
    request, so every request is balanced afresh at connect()."""
    temps = "".join(f"    {kind}_temp_path {prefix}/{kind};\n"
                    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""\
user root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temps}    server {{
        listen {listen}:{NGINX_PORT} default_server;
        server_name {host};
        location / {{
            proxy_pass http://{upstream};
            proxy_set_header Host $host;
        }}
    }}
}}
"""


@contextlib.contextmanager
def host_network_nginx(topo: Topology, node: Node, cgroup: Path, upstream: str,
                       host: str) -> Iterator[subprocess.Popen[bytes]]:
    """nginx in `node`'s namespace and in `cgroup`, serving node.ip:80 until
    the context ends; then stopped, and its files removed."""
    prefix = Path(tempfile.mkdtemp(prefix="lab-nginx-"))
    try:
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_conf(prefix, node.ip, upstream, host))
        # The shell joins the cgroup, then becomes `ip netns exec`, then nginx:
        # one pid, and the workers are born there. (The cgroup first: `ip
        # netns exec` mounts a sysfs of its own, without the cgroup tree.)
        argv = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh",
                "ip", "netns", "exec", node.ns,
                nginx_binary(), "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            _wait_listening(topo, node, proc, prefix)
            yield proc
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """nginx's master and workers: its own process group (start_new_session)."""
    processes.stop(proc, 5, group=True)


def _wait_listening(topo: Topology, node: Node, proc: subprocess.Popen[bytes], prefix: Path,
                    timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = (prefix / "error.log").read_text() if (prefix / "error.log").exists() else ""
            raise LabError(f"nginx exited ({proc.returncode}): {err[-500:]}")
        listening = topo.exec(node.ns, ["ss", "-Htln", f"sport = :{NGINX_PORT}"], check=False)
        if listening.stdout.strip():
            return
        time.sleep(0.1)
    raise LabError(f"nginx is not listening on {node.ip}:{NGINX_PORT} after {timeout}s")
