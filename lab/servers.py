"""Small backends for the lab: HTTP/1.1, UDP echo and TCP echo, standard library only.

Run inside a namespace as::

    python -m lab.servers http --name NAME --port PORT [--port PORT2 ...] [--workers N]
    python -m lab.servers udp --name NAME --port PORT
    python -m lab.servers tcp-echo --name NAME --port PORT [--greet]

Every reply names the backend and the client address it saw, so tests can check both the
backend choice and the source IP after NAT:

* HTTP: body ``f"{name} {client_ip}\\n"`` and headers ``X-Backend: <name>``,
  ``X-Client: <client ip>:<client port>``; keep-alive unless the client asks to close.
* UDP: each datagram gets ``f"{name} {client_ip}\\n"`` back.
* tcp-echo: bytes are echoed back; with ``--greet`` the line ``f"{name} {client_ip}\\n"`` is
  sent first on every new connection.

Once all sockets listen, a single line ``READY <mode> <name> <port>...`` goes to stdout; nothing
else is written to stdout afterwards (the parent may stop reading the pipe).

``http.server`` is not used on purpose: it answers with Nagle on (40 ms stalls on keep-alive)
and listens with a backlog of 5.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

BACKLOG = 1024
MAX_HEAD = 64 * 1024
RECV_SIZE = 65536
DRAIN_S = 2.0


def reply_line(name: str, client_ip: str) -> bytes:
    """The line every server sends: backend name and the client IP it saw."""
    return f"{name} {client_ip}\n".encode()


def _listen_tcp(bind: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


def _bind_udp(bind: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    sock.setblocking(False)
    return sock


class _Conn:
    """One accepted TCP connection with its buffers."""

    def __init__(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.close_after_flush = False


_Handler = Callable[[_Conn], None]


class _Loop:
    """A selectors loop shared by all modes."""

    def __init__(self, watch_parent: bool) -> None:
        self.sel = selectors.DefaultSelector()
        self.parent = os.getppid() if watch_parent else 0
        # SIGTERM drains, as a pod being terminated does: answers carry
        # "Connection: close", and the server leaves once no connection is
        # left (or after DRAIN_S).
        self.draining = False
        self.drain_deadline = 0.0
        signal.signal(signal.SIGTERM, self._drain)

    def _drain(self, signum: int, frame: object) -> None:
        self.draining = True
        self.drain_deadline = time.monotonic() + DRAIN_S
        # No new connections from here on: the ones open finish.
        for key in list(self.sel.get_map().values()):
            if key.data[0] == "listen":
                self.sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]

    def _drained(self) -> bool:
        conns = [k for k in self.sel.get_map().values() if k.data[0] == "conn"]
        return not conns or time.monotonic() > self.drain_deadline

    # -- registration -------------------------------------------------------------------
    def add_listener(self, sock: socket.socket, on_accept: _Handler, on_data: _Handler) -> None:
        self.sel.register(sock, selectors.EVENT_READ, ("listen", on_accept, on_data))

    def add_udp(self, sock: socket.socket, name: str) -> None:
        self.sel.register(sock, selectors.EVENT_READ, ("udp", name))

    # -- connection helpers ---------------------------------------------------------------
    def close(self, conn: _Conn) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()

    def flush(self, conn: _Conn) -> None:
        """Send what is buffered; wait for writability only when the kernel buffer is full."""
        while conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
            except BlockingIOError:
                break
            except OSError:
                self.close(conn)
                return
            del conn.outbuf[:sent]
        if conn.outbuf:
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                            self.sel.get_key(conn.sock).data)
            return
        if conn.close_after_flush:
            self.close(conn)
            return
        key = self.sel.get_key(conn.sock)
        if key.events != selectors.EVENT_READ:
            self.sel.modify(conn.sock, selectors.EVENT_READ, key.data)

    # -- events ---------------------------------------------------------------------------
    def _accept(self, lsock: socket.socket, on_accept: _Handler, on_data: _Handler) -> None:
        for _ in range(256):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            sock.setblocking(False)
            # Small replies on keep-alive connections must not wait for the peer's ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, (peer[0], peer[1]))
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn, on_data))
            on_accept(conn)

    def _read(self, conn: _Conn, on_data: _Handler) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if not data:
            self.close(conn)
            return
        conn.inbuf += data
        on_data(conn)
        if conn.sock.fileno() >= 0:
            self.flush(conn)

    def _udp(self, sock: socket.socket, name: str) -> None:
        for _ in range(256):
            try:
                _, addr = sock.recvfrom(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            with contextlib.suppress(OSError):
                sock.sendto(reply_line(name, addr[0]), addr)

    def run(self) -> None:
        while True:
            # Workers forked by a parent leave when it is gone instead of
            # lingering (a draining one finishes draining first).
            if self.parent and os.getppid() != self.parent and not self.draining:
                return
            if self.draining and self._drained():
                return
            for key, mask in self.sel.select(timeout=0.1 if self.draining else 1.0):
                data = key.data
                if data[0] == "listen":
                    self._accept(key.fileobj, data[1], data[2])  # type: ignore[arg-type]
                elif data[0] == "udp":
                    self._udp(key.fileobj, data[1])  # type: ignore[arg-type]
                else:
                    conn: _Conn = data[1]
                    if mask & selectors.EVENT_WRITE:
                        self.flush(conn)
                    if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                        self._read(conn, data[2])


# -- HTTP -----------------------------------------------------------------------------------

def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    lines = head.split(b"\r\n")
    parts = lines[0].split()
    if len(parts) != 3:
        return None
    method, _target, version = (p.decode("latin-1") for p in parts)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        key, sep, value = line.partition(b":")
        if not sep:
            return None
        headers[key.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return method, version, headers


def _http_response(status: str, body: bytes, extra: Sequence[tuple[str, str]],
                   keep_alive: bool, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", "Content-Type: text/plain",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in extra]
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only else out + body


def _http_handler(name: str, loop: _Loop) -> _Handler:
    def on_data(conn: _Conn) -> None:
        # Several requests may be pipelined in one read: answer them in order.
        while not conn.close_after_flush:
            end = conn.inbuf.find(b"\r\n\r\n")
            if end < 0:
                if len(conn.inbuf) > MAX_HEAD:
                    conn.outbuf += _http_response("431 Request Header Fields Too Large", b"",
                                                  (), False, False)
                    conn.close_after_flush = True
                return
            parsed = _parse_head(bytes(conn.inbuf[:end]))
            if parsed is None:
                conn.outbuf += _http_response("400 Bad Request", b"", (), False, False)
                conn.close_after_flush = True
                return
            method, version, headers = parsed
            if "transfer-encoding" in headers:
                conn.outbuf += _http_response("411 Length Required", b"", (), False, False)
                conn.close_after_flush = True
                return
            try:
                length = int(headers.get("content-length", "0"))
            except ValueError:
                length = -1
            if length < 0:
                conn.outbuf += _http_response("400 Bad Request", b"", (), False, False)
                conn.close_after_flush = True
                return
            total = end + 4 + length
            if len(conn.inbuf) < total:
                return
            del conn.inbuf[:total]
            connection = headers.get("connection", "").lower()
            if version == "HTTP/1.0":
                keep_alive = "keep-alive" in connection
            else:
                keep_alive = "close" not in connection
            keep_alive = keep_alive and not loop.draining
            ip, port = conn.peer
            conn.outbuf += _http_response(
                "200 OK", reply_line(name, ip),
                (("X-Backend", name), ("X-Client", f"{ip}:{port}")),
                keep_alive, method == "HEAD")
            if not keep_alive:
                conn.close_after_flush = True

    return on_data


def _nothing(conn: _Conn) -> None:
    del conn


def _echo(conn: _Conn) -> None:
    conn.outbuf += conn.inbuf
    conn.inbuf.clear()


def _greeter(name: str, loop: _Loop) -> _Handler:
    def on_accept(conn: _Conn) -> None:
        conn.outbuf += reply_line(name, conn.peer[0])
        loop.flush(conn)

    return on_accept


# -- entry point -----------------------------------------------------------------------------

def _ready(mode: str, name: str, ports: Sequence[int]) -> None:
    sys.stdout.write(f"READY {mode} {name} {' '.join(str(p) for p in ports)}\n")
    sys.stdout.flush()


def _fork_workers(count: int) -> bool:
    """Pre-fork ``count - 1`` workers accepting on the same sockets; True in a worker."""
    return any(os.fork() == 0 for _ in range(count - 1))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("http", "udp", "tcp-echo"))
    parser.add_argument("--name", required=True, help="backend name put in every reply")
    parser.add_argument("--port", type=int, action="append", required=True,
                        help="port to listen on (repeatable)")
    parser.add_argument("--bind", default="0.0.0.0", help="address to bind (default: all)")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes sharing the listening sockets (http, tcp-echo)")
    parser.add_argument("--greet", action="store_true",
                        help="tcp-echo: send the name/client line on each new connection")
    args = parser.parse_args(argv)
    name: str = args.name
    ports: list[int] = args.port

    if args.mode == "udp":
        udp_socks = [_bind_udp(args.bind, port) for port in ports]
        _ready(args.mode, name, ports)
        loop = _Loop(watch_parent=False)
        for sock in udp_socks:
            loop.add_udp(sock, name)
    else:
        listeners = [_listen_tcp(args.bind, port) for port in ports]
        _ready(args.mode, name, ports)
        loop = _Loop(watch_parent=_fork_workers(max(1, args.workers)))
        on_accept: _Handler = _nothing
        on_data: _Handler = _echo
        if args.mode == "http":
            on_data = _http_handler(name, loop)
        elif args.greet:
            on_accept = _greeter(name, loop)
        for sock in listeners:
            loop.add_listener(sock, on_accept, on_data)
    with contextlib.suppress(KeyboardInterrupt):
        loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
