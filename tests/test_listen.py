"""The servers' listening socket: accepted connections have Nagle off."""

from __future__ import annotations

import asyncio
import socket

import pytest

from tessera.serve.listen import listen_tcp


def test_accepted_connections_have_nagle_off():
    """A response written in two parts must not wait for the client's delayed ACK: asyncio
    sets TCP_NODELAY on accepted sockets only when the listener's proto says TCP."""

    async def run() -> int:
        sock = listen_tcp("127.0.0.1", 0)
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            seen.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname())
            value = await asyncio.wait_for(seen, 30)
            writer.close()
        return value

    assert asyncio.run(run()) != 0


def test_a_taken_port_is_one_clear_error():
    first = listen_tcp("127.0.0.1", 0)
    port = first.getsockname()[1]
    try:
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            listen_tcp("127.0.0.1", port)
    finally:
        first.close()
