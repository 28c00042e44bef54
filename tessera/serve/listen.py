"""The listening socket of an HTTP server (``tessera serve``, ``tessera router``)."""

from __future__ import annotations

import socket


def listen_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` and listening; OSError naming the address when the
    bind fails.

    Its protocol is named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto
    says TCP, and accepted sockets take the listener's. With Nagle on, a response written in
    two parts (headers, then body) waited for the client's delayed ACK: about 40 ms on every
    request of a kept-alive connection after the first two."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
