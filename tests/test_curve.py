"""CURVE on engine-core sockets that leave the host: a server admits the client key it was
given and no other, and a client without the server's key cannot talk to it."""

from __future__ import annotations

import zmq

from tessera.serve.curve import Gate, as_client, as_server, new_keys


def _received(server: zmq.Socket, timeout_ms: int) -> bytes | None:
    return server.recv() if server.poll(timeout_ms) else None


def test_only_the_named_client_gets_in() -> None:
    ctx = zmq.Context()
    try:
        server_public, server_secret = new_keys()
        friend_public, friend_secret = new_keys()
        stranger_public, stranger_secret = new_keys()
        gate = Gate(ctx, {friend_public})
        server = ctx.socket(zmq.PULL)
        as_server(server, server_public, server_secret)
        port = server.bind_to_random_port("tcp://127.0.0.1")
        address = f"tcp://127.0.0.1:{port}"
        senders = []  # kept open: a closed socket drops what it has not sent
        def send(public: bytes | None, secret: bytes | None, server_key: bytes | None,
                 payload: bytes) -> None:
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            if public is not None and secret is not None and server_key is not None:
                as_client(sock, public, secret, server_key)
            sock.connect(address)
            sock.send(payload)
            senders.append(sock)

        send(stranger_public, stranger_secret, server_public, b"stranger")
        send(None, None, None, b"plain")  # no CURVE at all
        assert _received(server, 1000) is None
        send(friend_public, friend_secret, server_public, b"friend")
        assert _received(server, 10_000) == b"friend"
        assert _received(server, 500) is None
        gate.stop()
    finally:
        ctx.destroy(linger=0)
