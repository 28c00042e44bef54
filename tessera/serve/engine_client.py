"""The API process's handle on the engine core: start it, feed it, route its tokens.

One reader task receives ``StepResult`` messages and puts each request's deltas on that
request's queue; HTTP handlers only await their own queue. A watchdog notices when the core
process dies and fails every in-flight request, so the API never hangs on a dead core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from tessera.config import EngineConfig
from tessera.serve.protocol import (
    AbortRequests,
    AddRequest,
    CoreConfig,
    CoreOutput,
    Delta,
    EngineStats,
    Ready,
    SamplingOptions,
    Shutdown,
    StartupFailed,
    StepResult,
)

_WATCHDOG_PERIOD_S = 0.2


class EngineStartupError(RuntimeError):
    """The engine core could not start (bad model directory, not enough memory, ...)."""


class EngineDeadError(RuntimeError):
    """The engine core process is gone."""


@dataclass(frozen=True)
class Finished:
    """The request ended outside the core: ``reason`` is "abort" (shutdown) or "error"."""

    reason: str
    error: str | None = None
    status_code: int = 500


Event = list[Delta] | Finished


class EngineClient:
    """Owns the core process and its sockets; all methods run on the API's event loop."""

    def __init__(self, engine_config: EngineConfig) -> None:
        self.engine_config = engine_config
        self._dir = tempfile.TemporaryDirectory(prefix="tessera-")
        base = Path(self._dir.name)
        self._input_address = f"ipc://{base / 'input'}"
        self._output_address = f"ipc://{base / 'output'}"
        # Sends are non-blocking on a plain socket; only receiving needs the event loop.
        self._sync_ctx = zmq.Context()
        self._input = self._sync_ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        # Connecting (the core binds) queues messages even before the core is up.
        self._input.connect(self._input_address)
        self._ctx = zmq.asyncio.Context()
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self._output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutput)
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: Ready | None = None
        self.stats = EngineStats()
        self.alive = False
        self.stopping = False
        self.on_stats: Callable[[EngineStats], None] | None = None

    # ----------------------------------------------------------------- lifecycle
    async def start(self, timeout_s: float = 600.0) -> Ready:
        """Spawn the core and wait until its engine is loaded; raises EngineStartupError."""
        config = CoreConfig(
            self.engine_config, self._input_address, self._output_address, os.getpid()
        )
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tessera.serve.engine_core", msgspec.json.encode(config)],
            stdin=subprocess.DEVNULL,
        )
        deadline_s = time.monotonic() + timeout_s
        while True:
            if await self._output.poll(100):
                msg = self._decoder.decode(await self._output.recv())
                if isinstance(msg, Ready):
                    break
                if isinstance(msg, StartupFailed):
                    self._reap()
                    raise EngineStartupError(msg.message)
            if self.process.poll() is not None:
                raise EngineStartupError(
                    f"the engine core exited with code {self.process.returncode} while starting"
                )
            if time.monotonic() > deadline_s:
                self._reap()
                raise EngineStartupError(f"the engine core did not start in {timeout_s:.0f} s")
        self.ready = msg
        self.alive = True
        self._tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._watchdog()),
        ]
        return msg

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (aborting whatever it still runs) and wait for it to exit."""
        self.stopping = True
        self.fail_all(Finished("abort"))
        if self.alive:
            self._send(Shutdown())
        proc = self.process
        if proc is not None:
            end_s = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < end_s:
                await asyncio.sleep(0.05)
        self._reap()
        for task in self._tasks:
            task.cancel()
        self.alive = False
        self._ctx.destroy(linger=0)
        self._sync_ctx.destroy(linger=0)
        self._dir.cleanup()

    def _reap(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    # ----------------------------------------------------------------- requests
    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions
    ) -> asyncio.Queue[Event]:
        """Send a request to the core; its events arrive on the returned queue."""
        if not self.alive:
            raise EngineDeadError("the engine core is not running")
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[request_id] = queue
        self._send(AddRequest(request_id, prompt_token_ids, options))
        return queue

    def _send(self, msg: AddRequest | AbortRequests | Shutdown) -> None:
        # A connecting PUSH with no high-water mark always queues; Again cannot happen, but a
        # send must never block the event loop, so say so.
        with contextlib.suppress(zmq.Again):
            self._input.send(self._encoder.encode(msg), zmq.NOBLOCK)

    def release(self, request_id: str, abort: bool) -> None:
        """Forget a request; with ``abort`` also stop it in the core (frees its KV blocks)."""
        self._queues.pop(request_id, None)
        if abort and self.alive:
            self._send(AbortRequests([request_id]))

    def fail_all(self, event: Finished) -> None:
        """End every in-flight request with ``event`` (shutdown or a dead core)."""
        ids = list(self._queues)
        for queue in self._queues.values():
            queue.put_nowait(event)
        self._queues.clear()
        if ids and self.alive and event.reason == "abort":
            self._send(AbortRequests(ids))

    # ----------------------------------------------------------------- background
    async def _read_loop(self) -> None:
        while True:
            msg = self._decoder.decode(await self._output.recv())
            if not isinstance(msg, StepResult):
                continue
            by_request: dict[str, list[Delta]] = {}
            for delta in msg.deltas:
                by_request.setdefault(delta.request_id, []).append(delta)
            for request_id, deltas in by_request.items():
                queue = self._queues.get(request_id)
                if queue is not None:
                    queue.put_nowait(deltas)
            for fail in msg.failed:
                queue = self._queues.pop(fail.request_id, None)
                if queue is not None:
                    queue.put_nowait(Finished("error", fail.message, fail.status_code))
            self.stats = msg.stats
            if self.on_stats is not None:
                self.on_stats(msg.stats)

    async def _watchdog(self) -> None:
        proc = self.process
        assert proc is not None
        while proc.poll() is None:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
        self.alive = False
        if self.stopping:
            self.fail_all(Finished("abort"))
        else:
            print(
                f"tessera: error: the engine core exited with code {proc.returncode}",
                file=sys.stderr,
            )
            self.fail_all(Finished("error", "the engine core died; the request was lost"))
