"""A real Kubernetes control plane on loopback for tests.

`ControlPlane` builds (or reuses) etcd, kube-apiserver, kube-controller-manager
and kubectl through tools/k8s-build.sh, then runs them as child processes bound
to 127.0.0.1 on free ports, with everything they write kept in one temporary
directory that is removed on exit. There is no kubelet and no scheduler: tests
create Pods with spec.nodeName set and write their status themselves (see
tests/cluster/objects.py); the controller manager turns them into
EndpointSlices.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lab import processes

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tools" / "k8s-build.sh"

SERVICE_CLUSTER_IP_RANGE = "10.96.0.0/12"
LOOPBACK = "127.0.0.1"
ADMIN_USER = "xdplb-admin"

# Enough for Services with selectors to get EndpointSlices, for namespaces to
# get their default ServiceAccount (Pod admission needs it), and for deleted
# Services and namespaces to have their dependents cleaned up.
DEFAULT_CONTROLLERS: tuple[str, ...] = (
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "endpoints-controller",
    "serviceaccount-controller",
    "namespace-controller",
    "garbage-collector-controller",
)

LOG_TAIL_LINES = 40


class ControlPlaneError(RuntimeError):
    """The control plane could not be built, started or used."""


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports on loopback that are free right now."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for s in socks:
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"<no log at {path}: {e}>"
    return "\n".join(text.splitlines()[-lines:])


def build_binaries(log_path: Path, timeout: float = 3600.0) -> Path:
    """Run tools/k8s-build.sh and return the directory holding the binaries.

    The build is cached machine-wide, so after the first time this is instant.
    Its progress goes to log_path.
    """
    if not BUILD_SCRIPT.is_file():
        raise ControlPlaneError(f"build script missing: {BUILD_SCRIPT}")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["bash", str(BUILD_SCRIPT)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            # SIGTERM lets the script stop its compilers and remove its files.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise ControlPlaneError(
                f"{BUILD_SCRIPT} did not finish within {timeout:.0f}s; "
                f"last lines of {log_path}:\n{log_tail(log_path)}"
            ) from e
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise ControlPlaneError(
            f"{BUILD_SCRIPT} failed with exit code {proc.returncode}; "
            f"last lines of {log_path}:\n{log_tail(log_path)}"
        )
    bin_dir = Path(lines[-1])
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl"):
        if not os.access(bin_dir / name, os.X_OK):
            raise ControlPlaneError(f"{BUILD_SCRIPT} reported {bin_dir} but {name} is missing")
    return bin_dir


def binaries_ready() -> bool:
    """Whether tools/k8s-build.sh would return at once (nothing to build)."""
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--check"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    return proc.returncode == 0


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback.

    Use as a context manager; on exit it stops only the processes it started
    (by pid) and removes its temporary directory.
    """

    def __init__(
        self,
        *,
        controllers: Sequence[str] = DEFAULT_CONTROLLERS,
        startup_timeout: float = 90.0,
        build_timeout: float = 3600.0,
        keep_dir: bool = False,
    ) -> None:
        self.controllers = tuple(controllers)
        self.startup_timeout = startup_timeout
        self.build_timeout = build_timeout
        self.keep_dir = keep_dir
        self.token = secrets.token_hex(24)
        self._dir: Path | None = None
        self._bin_dir: Path | None = None
        self._procs: dict[str, _Process] = {}
        # Kept after close(), so a caller can check that nothing was left.
        self.created_dir: Path | None = None
        self.started_pids: list[int] = []
        self.etcd_port = 0
        self.etcd_peer_port = 0
        self.apiserver_port = 0
        self.controller_manager_port = 0

    # -- paths and addresses -------------------------------------------------

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise ControlPlaneError("control plane is not started")
        return self._dir

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            raise ControlPlaneError("control plane is not started")
        return self._bin_dir

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://{LOOPBACK}:{self.apiserver_port}"

    @property
    def ca_file(self) -> Path:
        """The API server's serving certificate followed by its CA."""
        return self.dir / "apiserver-certs" / "apiserver.crt"

    @property
    def etcd_url(self) -> str:
        return f"http://{LOOPBACK}:{self.etcd_port}"

    def log_path(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        if self._dir is not None:
            raise ControlPlaneError("control plane already started")
        self._dir = Path(tempfile.mkdtemp(prefix="xdplb-k8s-"))
        self.created_dir = self._dir
        try:
            self._bin_dir = build_binaries(self.log_path("build"), self.build_timeout)
            self._write_credentials()
            (
                self.etcd_port,
                self.etcd_peer_port,
                self.apiserver_port,
                self.controller_manager_port,
            ) = free_ports(4)
            self._start_etcd()
            self.start_apiserver()
            self._write_kubeconfig()
            self.start_controller_manager()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for name in ("kube-controller-manager", "kube-apiserver", "etcd"):
            self._stop(name)
        for name in list(self._procs):
            self._stop(name)
        if self._dir is not None and not self.keep_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def stop_apiserver(self, *, kill: bool = False) -> None:
        """Stop only the API server (SIGTERM, or SIGKILL with kill=True)."""
        self._stop("kube-apiserver", kill=kill)

    def start_apiserver(self) -> None:
        """Start the API server on its port and wait until /readyz is ok."""
        if "kube-apiserver" in self._procs:
            raise ControlPlaneError("kube-apiserver is already running")
        d = self.dir
        args = [
            f"--etcd-servers={self.etcd_url}",
            f"--bind-address={LOOPBACK}",
            f"--advertise-address={LOOPBACK}",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={d / 'apiserver-certs'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            "--authorization-mode=RBAC",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            # The apiserver would publish 127.0.0.1 as the endpoint of the
            # "kubernetes" Service; loopback addresses are not valid there.
            "--endpoint-reconciler-type=none",
            # Without this, a graceful stop waits 60 s for open watches.
            "--shutdown-watch-termination-grace-period=2s",
            "--profiling=false",
        ]
        self._spawn("kube-apiserver", [str(self.bin_dir / "kube-apiserver"), *args])
        self._wait_http(
            "kube-apiserver",
            f"{self.server}/readyz",
            lambda status, body: status == 200 and body.strip() == "ok",
            token=self.token,
        )

    def stop_controller_manager(self) -> None:
        self._stop("kube-controller-manager")

    def start_controller_manager(self) -> None:
        if "kube-controller-manager" in self._procs:
            raise ControlPlaneError("kube-controller-manager is already running")
        kubeconfig = str(self.kubeconfig)
        args = [
            f"--kubeconfig={kubeconfig}",
            f"--controllers={','.join(self.controllers)}",
            "--use-service-account-credentials=false",
            "--leader-elect=false",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            f"--bind-address={LOOPBACK}",
            f"--secure-port={self.controller_manager_port}",
            f"--cert-dir={self.dir / 'controller-manager-certs'}",
            "--profiling=false",
        ]
        self._spawn(
            "kube-controller-manager", [str(self.bin_dir / "kube-controller-manager"), *args]
        )
        self._wait_http(
            "kube-controller-manager",
            f"https://{LOOPBACK}:{self.controller_manager_port}/healthz",
            lambda status, body: status == 200 and body.strip() == "ok",
        )

    # -- kubectl ---------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this control plane; raise on failure if check."""
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(
            cmd,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} failed with exit code {proc.returncode}:\n"
                f"{proc.stderr.strip()}"
            )
        return proc

    # -- internals -------------------------------------------------------------

    def _write_credentials(self) -> None:
        d = self.dir
        # One static token for a cluster admin (system:masters bypasses RBAC).
        (d / "tokens.csv").write_text(f'{self.token},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        (d / "tokens.csv").chmod(0o600)
        for cmd in (
            ["openssl", "genrsa", "-out", str(d / "sa.key"), "2048"],
            ["openssl", "rsa", "-in", str(d / "sa.key"), "-pubout", "-out", str(d / "sa.pub")],
        ):
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            except FileNotFoundError as e:
                raise ControlPlaneError("openssl is needed to make the service-account key") from e
            if proc.returncode != 0:
                raise ControlPlaneError(f"{' '.join(cmd)} failed:\n{proc.stderr}")

    def _write_kubeconfig(self) -> None:
        # The API server made itself a CA and a serving certificate for
        # 127.0.0.1; its certificate file holds both, so clients can verify it.
        try:
            ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        except OSError as e:
            raise ControlPlaneError(f"kube-apiserver wrote no certificate: {e}") from e
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "xdplb-test",
                    "cluster": {"server": self.server, "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": ADMIN_USER, "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "xdplb-test",
                    "context": {"cluster": "xdplb-test", "user": ADMIN_USER},
                }
            ],
            "current-context": "xdplb-test",
        }
        # JSON is YAML, and both kubectl and the Python client read it.
        self.kubeconfig.write_text(json.dumps(config, indent=2) + "\n")
        self.kubeconfig.chmod(0o600)

    def _start_etcd(self) -> None:
        peer = f"http://{LOOPBACK}:{self.etcd_peer_port}"
        args = [
            "--name=xdplb-test",
            f"--data-dir={self.dir / 'etcd-data'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=xdplb-test={peer}",
            "--initial-cluster-state=new",
            # The data only has to outlive API server restarts, not the machine.
            "--unsafe-no-fsync",
            "--log-level=warn",
        ]
        self._spawn("etcd", [str(self.bin_dir / "etcd"), *args])
        self._wait_http(
            "etcd",
            f"{self.etcd_url}/health",
            lambda status, body: status == 200 and '"health":"true"' in body.replace(" ", ""),
        )

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = self.log_path(name)
        with open(log, "ab") as out:
            out.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )
        self._procs[name] = _Process(name, popen, log)
        self.started_pids.append(popen.pid)

    def _stop(self, name: str, *, kill: bool = False, grace: float = 15.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is not None:
            processes.stop(proc.popen, grace, first=signal.SIGKILL if kill else signal.SIGTERM)

    def _failure(self, name: str, why: str) -> ControlPlaneError:
        return ControlPlaneError(
            f"{name} {why}; last lines of {self.log_path(name)}:\n{log_tail(self.log_path(name))}"
        )

    def _wait_http(
        self,
        name: str,
        url: str,
        ok: Callable[[int, str], bool],
        token: str | None = None,
    ) -> None:
        proc = self._procs[name]
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        while True:
            rc = proc.popen.poll()
            if rc is not None:
                raise self._failure(name, f"exited with code {rc} during startup")
            try:
                req = urllib.request.Request(url, headers=headers)
                with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                    status = resp.status
                    body = resp.read().decode(errors="replace")
            except urllib.error.HTTPError as e:
                status = e.code
                body = e.read().decode(errors="replace")
            except (OSError, ValueError) as e:
                status, body = 0, str(e)
            if ok(status, body):
                return
            last = f"{status} {body.strip()[-500:]}"
            if time.monotonic() > deadline:
                raise self._failure(
                    name, f"not ready within {self.startup_timeout:.0f}s ({url}: {last})"
                )
            time.sleep(0.2)
