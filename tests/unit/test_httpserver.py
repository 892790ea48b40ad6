"""The agent's HTTP listeners start without a name lookup: http.server's own
server_bind resolves the bound address, which waits 20 s per listener on a
node whose DNS server is unreachable."""

from __future__ import annotations

import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler

import pytest

from lb.agent.httpserver import http_server


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *args: object) -> None:
        pass


def test_listener_starts_and_serves_without_resolving_its_address(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lookup(*_: object) -> str:
        raise AssertionError("name lookup while binding")

    monkeypatch.setattr(socket, "getfqdn", no_lookup)
    srv = http_server("127.0.0.1", 0, Hello)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        port = srv.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert r.read() == b"hello"
        assert srv.server_name == "127.0.0.1"
    finally:
        srv.shutdown()
        srv.server_close()
