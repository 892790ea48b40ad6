"""The one HTTP server class of the agent's listeners: the metrics port,
kube-proxy's health port and the health-check NodePorts."""

from __future__ import annotations

import socket
import socketserver
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HTTPServer(ThreadingHTTPServer):
    """Request threads that never hold the process up, and no name lookup of
    the bound address: http.server's server_bind asks socket.getfqdn for it,
    which on a node without a reachable DNS server waits 20 s per listener
    (the agent's start, each new health-check port), for a name nothing
    reads."""

    daemon_threads = True

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)


class HTTPServer6(HTTPServer):
    address_family = socket.AF_INET6


def http_server(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> HTTPServer:
    """A listener on host:port (an IPv6 host gets an IPv6 socket)."""
    cls = HTTPServer6 if ":" in host else HTTPServer
    return cls((host, port), handler)
