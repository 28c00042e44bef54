"""A worker's heartbeat thread: proof of life for the front, and the orphan check.

It runs beside the worker's main loop (torch releases the GIL while computing), so a busy
worker keeps beating and only a dead or stopped process falls silent. It also ships the
worker's trace spans and ends the process when the front (its parent) is gone. A Ray actor has
no such parent (``parent_pid`` 0): Ray kills actors whose owner, the front, has died.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import msgspec
import zmq

from tessera.afd.messages import Heartbeat
from tessera.afd.trace import Tracer


def start_heartbeat(
    ctx: zmq.Context, front_address: str, worker: str, interval_s: float, parent_pid: int,
    tracer: Tracer | None = None,
) -> threading.Event:
    """Start beating; setting the returned event stops the thread and closes its socket (so
    the context can be terminated, flushing the worker's last messages)."""
    stop = threading.Event()

    def beat() -> None:
        sock = ctx.socket(zmq.PUSH)  # sockets are per thread
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(front_address)
        encoder = msgspec.msgpack.Encoder()
        while not stop.is_set():
            if parent_pid and os.getppid() != parent_pid:
                os._exit(1)  # the front died: never linger as an orphan
            spans = tracer.take() if tracer is not None else []
            with contextlib.suppress(zmq.ZMQError):
                sock.send(encoder.encode(Heartbeat(worker, spans, time.time())), zmq.NOBLOCK)
            stop.wait(interval_s)
        sock.close()

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop
