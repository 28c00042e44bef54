"""ZeroMQ CURVE for engine-core sockets that leave the host (instances placed by Ray): the
traffic is encrypted, and each end admits only the one peer whose public key it was given, so
nobody else on the network can send a core requests or a front outputs.

The keys travel with the core's config, which a Ray actor receives as an argument (never on a
command line). A ZAP handler (pyzmq's ``ThreadAuthenticator``) runs in each process that binds;
it must be started before the bind, since without one libzmq admits every client.
"""

from __future__ import annotations

import zmq
import zmq.auth.thread


def new_keys() -> tuple[bytes, bytes]:
    """A fresh (public, secret) pair, Z85-encoded."""
    public, secret = zmq.curve_keypair()
    return public, secret


ZAP_DOMAIN = "tessera"
"""The ZAP domain of our server sockets: the gate answers for it (ZAP looks providers up by
the socket's exact domain)."""


def as_server(sock: zmq.Socket, public: bytes, secret: bytes) -> None:
    """``sock`` (before it binds) encrypts with this pair and asks ZAP about each client."""
    sock.zap_domain = ZAP_DOMAIN.encode()
    sock.curve_server = True
    sock.curve_publickey = public
    sock.curve_secretkey = secret


def as_client(sock: zmq.Socket, public: bytes, secret: bytes, server_public: bytes) -> None:
    """``sock`` (before it connects) talks only to the server holding ``server_public``."""
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.curve_serverkey = server_public


class Gate:
    """The ZAP handler of ``ctx``: admits the client keys in ``allowed`` (Z85), no other."""

    def __init__(self, ctx: zmq.Context, allowed: set[bytes]) -> None:
        self.allowed = set(allowed)
        self._auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.allowed

    def stop(self) -> None:
        self._auth.stop()
