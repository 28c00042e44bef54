"""A worker's heartbeat thread: proof of life and of progress for the front, and the orphan check.

It runs beside the worker's main loop (torch releases the GIL while computing), so a busy
worker keeps beating and only a dead or stopped process falls silent; each beat carries the
main loop's progress (``progress.py``), so a main loop stuck while its heartbeat goes on is
found too. It also ships the worker's trace spans and ends the process when the front (its
parent) is gone, removing what the pool had on this host (the shared-memory plane's directory
and the front's ipc sockets): nobody else is left to. A Ray actor has no such parent
(``parent_pid`` 0): Ray kills actors whose owner, the front, has died.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time

import zmq

from tessera.afd.frames import BEAT_CHANNEL, FrameTooLarge, FrameWriter, worker_sender
from tessera.afd.progress import Progress
from tessera.afd.trace import Tracer
from tessera.messages.workers import Heartbeat, WorkerConfig


def remove_pool_files(cfg: WorkerConfig) -> None:
    """Remove the pool's files on this host: its shared-memory plane and the front's ipc
    directory (for a worker whose front has died)."""
    for path in (cfg.plane_dir, cfg.ipc_dir):
        if path is not None:
            shutil.rmtree(path, ignore_errors=True)


def start_heartbeat(ctx: zmq.Context, cfg: WorkerConfig, secret: bytes, progress: Progress,
                    tracer: Tracer | None = None) -> threading.Event:
    """Start beating; setting the returned event stops the thread and closes its socket (so
    the context can be terminated, flushing the worker's last messages)."""
    stop = threading.Event()
    writer = FrameWriter(secret, cfg.generation, worker_sender(cfg.rank, BEAT_CHANNEL),
                         cfg.frame_limit_bytes)

    def beat() -> None:
        sock = ctx.socket(zmq.PUSH)  # sockets are per thread
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cfg.front_address)
        while not stop.is_set():
            if cfg.parent_pid and os.getppid() != cfg.parent_pid:
                remove_pool_files(cfg)
                os._exit(1)  # the front died: never linger as an orphan
            spans = tracer.take() if tracer is not None else []
            msg = Heartbeat(cfg.name, spans, time.time(), progress.count, progress.state)
            with contextlib.suppress(zmq.ZMQError, FrameTooLarge):
                for frame in writer.seal_all(msg):
                    sock.send(frame, zmq.NOBLOCK)
            stop.wait(cfg.afd.heartbeat_interval_s)
        sock.close()

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop
