"""Client helpers that run inside a lab namespace: curl for HTTP, a tiny Python UDP client.

Backends from ``lab.servers`` answer ``f"{name} {client_ip}\\n"``; ``backend_of`` splits
that, the ``*_many`` helpers count backend names.
"""

from __future__ import annotations

import sys
from collections import Counter

from .topology import LabError, NsRef, Topology

# Key under which failed requests are counted when errors are allowed.
FAILED = "<failed>"

_MARK = "\n@@lab@@"
_WRITE_OUT = _MARK + " %{http_code} %{exitcode}\n"

_UDP_CLIENT = r"""
import socket, sys
addr, port, timeout, count, payload = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4]), bytes.fromhex(sys.argv[5])
for _ in range(count):
    # A fresh socket per request: a new source port, so a new flow for the load balancer.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(timeout)
    try:
        s.sendto(payload, (addr, port))
        data, _ = s.recvfrom(65536)
        sys.stdout.write("OK " + data.decode(errors="replace").rstrip("\n") + "\n")
    except OSError as e:
        sys.stdout.write("ERR " + type(e).__name__ + "\n")
    finally:
        s.close()
    sys.stdout.flush()
"""


def backend_of(reply: str) -> str:
    """The backend name in a ``"<name> <client_ip>"`` reply."""
    return reply.split(maxsplit=1)[0] if reply.strip() else ""


def _curl_base(timeout: float) -> list[str]:
    return ["curl", "-sS", "--noproxy", "*", "--max-time", f"{timeout:g}",
            "--connect-timeout", f"{timeout:g}"]


def curl(topo: Topology, ns: NsRef, url: str, timeout: float = 5.0,
         extra: tuple[str, ...] = ()) -> str:
    """GET ``url`` with the curl binary inside ``ns``; returns the body, raises LabError."""
    res = topo.exec(ns, [*_curl_base(timeout), "--fail", *extra, url], check=False,
                    timeout=timeout + 10)
    if res.returncode != 0:
        raise LabError(f"curl {url} from {ns if isinstance(ns, str) else ns.ns} failed "
                       f"(exit {res.returncode}): {res.stderr.strip()}")
    return res.stdout


def curl_many(topo: Topology, ns: NsRef, url: str, count: int, timeout: float = 5.0,
              *, allow_errors: bool = False) -> Counter[str]:
    """``count`` GETs from one curl process, each on a NEW connection; counts backend names.

    Failed requests raise LabError unless ``allow_errors``, then they count under FAILED.
    """
    if count <= 0:
        return Counter()
    # "Connection: close" makes the server close after each reply, so curl cannot reuse it.
    config = "".join(f'url = "{url}"\n' for _ in range(count))
    argv = [*_curl_base(timeout), "-H", "Connection: close", "--write-out", _WRITE_OUT,
            "--config", "-"]
    res = topo.exec(ns, argv, check=False, input=config, timeout=count * timeout + 10)
    counts: Counter[str] = Counter()
    errors: list[str] = []
    # Output: body1 MARK status1 \n body2 MARK status2 \n ...
    parts = res.stdout.split(_MARK)
    body = parts[0]
    for part in parts[1:]:
        status_line, _, rest = part.partition("\n")
        status = status_line.split()
        if status == ["200", "0"]:
            counts[backend_of(body)] += 1
        else:
            errors.append(" ".join(status))
            counts[FAILED] += 1
        body = rest
    missing = count - sum(counts.values())
    if missing > 0:
        errors.append(f"{missing} without result")
        counts[FAILED] += missing
    if errors and not allow_errors:
        raise LabError(f"{len(errors)} of {count} requests to {url} failed "
                       f"(http_code exitcode: {errors[:5]}): {res.stderr.strip()[:500]}")
    return counts


def _udp(topo: Topology, ns: NsRef, addr: str, port: int, payload: bytes | str,
         timeout: float, count: int) -> list[str]:
    data = payload.encode() if isinstance(payload, str) else payload
    res = topo.exec(ns, [sys.executable, "-c", _UDP_CLIENT, addr, str(port), f"{timeout:g}",
                         str(count), data.hex() or "00"], timeout=count * timeout + 10)
    return res.stdout.splitlines()


def udp_request(topo: Topology, ns: NsRef, addr: str, port: int,
                payload: bytes | str = b"ping", timeout: float = 2.0) -> str:
    """Send one datagram from ``ns`` and return the reply line; raises LabError on no reply."""
    lines = _udp(topo, ns, addr, port, payload, timeout, 1)
    if not lines or not lines[0].startswith("OK "):
        raise LabError(f"no UDP reply from {addr}:{port} within {timeout}s: {lines}")
    return lines[0][3:] + "\n"


def udp_many(topo: Topology, ns: NsRef, addr: str, port: int, count: int,
             payload: bytes | str = b"ping", timeout: float = 2.0,
             *, allow_errors: bool = False) -> Counter[str]:
    """``count`` datagrams, each from a new socket (new source port); counts backend names."""
    counts: Counter[str] = Counter()
    for line in _udp(topo, ns, addr, port, payload, timeout, count):
        counts[backend_of(line[3:]) if line.startswith("OK ") else FAILED] += 1
    counts[FAILED] += count - sum(counts.values())
    if counts[FAILED] == 0:
        del counts[FAILED]
    elif not allow_errors:
        raise LabError(f"{counts[FAILED]} of {count} UDP requests to {addr}:{port} failed")
    return counts
