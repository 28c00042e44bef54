"""The processes of a cluster: one serve engine core (``tessera.serve.engine_core``) per
instance, run in instance mode, with its own pair of sockets per start.

An instance binds its input and connects to the output its front binds. A restarted
instance gets fresh socket paths, so nothing a dead one sent is mistaken for the new one's.
Instances end with their front: on ``kill``, at exit, and by their own parent check when
the front is killed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import zmq

from tessera.config import EngineConfig
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown
from tessera.messages.core import CoreConfig, CoreOutput
from tessera.outputs import EngineStats

if TYPE_CHECKING:
    from tessera.cluster.ray_instances import RayFront, RayProcess

_live: weakref.WeakSet[InstanceProcess] = weakref.WeakSet()
_ENCODER = msgspec.msgpack.Encoder()


@dataclass(eq=False)
class InstanceProcess:
    """One start of instance ``index``; ``ready`` is set once its engine is loaded."""

    index: int
    generation: int
    process: subprocess.Popen[bytes] | RayProcess
    input: zmq.Socket
    output: zmq.Socket
    started_s: float
    ready: Ready | None = None
    stats: EngineStats = field(default_factory=EngineStats)
    last_seen_s: float = 0.0
    request_ids: set[str] = field(default_factory=set)
    closed: bool = False
    """Killed: its sockets are closed and must not be polled."""

    @classmethod
    def start(cls, ctx: zmq.Context, engine: EngineConfig, index: int, generation: int,
              ipc_dir: str) -> InstanceProcess:
        stem = f"ipc://{ipc_dir}/i{index}.g{generation}"
        output = ctx.socket(zmq.PULL)
        output.bind(f"{stem}.out")
        inputs = ctx.socket(zmq.PUSH)
        inputs.setsockopt(zmq.SNDHWM, 0)
        inputs.setsockopt(zmq.LINGER, 0)
        inputs.connect(f"{stem}.in")  # queues until the instance binds
        config = CoreConfig(engine, f"{stem}.in", f"{stem}.out", os.getpid(), instance=True)
        process = subprocess.Popen(
            [sys.executable, "-m", "tessera.serve.engine_core", msgspec.json.encode(config)],
            stdin=subprocess.DEVNULL)
        now = time.monotonic()
        proc = cls(index, generation, process, inputs, output, now, last_seen_s=now)
        _live.add(proc)
        return proc

    @classmethod
    def start_on_ray(cls, front: RayFront, ctx: zmq.Context, engine: EngineConfig, index: int,
                     generation: int, timeout_s: float) -> InstanceProcess:
        """The same, as a Ray actor (``tessera.cluster.ray_instances``)."""
        process, inputs, output = front.start(ctx, engine, timeout_s)
        now = time.monotonic()
        proc = cls(index, generation, process, inputs, output, now, last_seen_s=now)
        _live.add(proc)
        return proc

    @property
    def name(self) -> str:
        return f"instance {self.index}"

    def send(self, msg: AddRequest | AbortRequests | Shutdown) -> None:
        # No high-water mark: a send queues and never blocks.
        self.input.send(_ENCODER.encode(msg), zmq.NOBLOCK)

    def exited(self) -> int | None:
        return self.process.poll()

    def kill(self, graceful_s: float = 0.0) -> None:
        """End the process (asking first when ``graceful_s`` > 0) and close its sockets; safe
        to call twice."""
        _live.discard(self)
        if self.closed:
            return
        self.closed = True
        if graceful_s > 0 and self.process.poll() is None:
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(graceful_s)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.input.close(linger=0)
        self.output.close(linger=0)


def decode_output(raw: bytes) -> CoreOutput | None:
    """An instance's message, or None if it cannot be decoded (dropped)."""
    try:
        return msgspec.msgpack.decode(raw, type=CoreOutput)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


@atexit.register
def _kill_live() -> None:
    for proc in list(_live):
        with contextlib.suppress(Exception):
            proc.kill()
