"""The API process's handle on the engine core: start it, feed it, route its tokens, and
replace it when it fails.

One reader task receives the core's messages and puts each request's deltas on that request's
queue; HTTP handlers only await their own queue. A watchdog notices a core that died, or one
that stalled: no step result for ``stall_timeout_s`` while requests are pending (a step result
is the core's heartbeat, sent after every step, so a core stuck inside a step falls silent
even if it is alive). Either way, and also when a background task of this process fails,
every in-flight request ends with an error at once, ``alive`` turns False (``/health`` 503),
the core is killed, and a new core is started (or, with ``exit_on_failure``, ``on_fatal``
asks the server to exit non-zero for a supervisor to restart it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tessera.config import EngineConfig
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown, StartupFailed
from tessera.messages.core import CoreConfig, CoreOutput, CoreStep, Delta
from tessera.outputs import EngineStats
from tessera.sampling_params import SamplingParams
from tessera.serve.kv_feed import KVFeed

logger = logging.getLogger("tessera.serve")

_WATCHDOG_PERIOD_S = 0.2
_KILL_WAIT_S = 10.0
_STALL_WARM_UP_FACTOR = 10.0
"""A step may take this many warm-ups (which run the largest step) before it is a stall."""
_MAX_FAILED_STARTS = 3
"""Failed restarts in a row after which the server gives up and exits non-zero."""
_RESTART_BACKOFF_S = (1.0, 4.0, 16.0)


class EngineStartupError(RuntimeError):
    """The engine core could not start (bad model directory, not enough memory, ...)."""


class EngineDeadError(RuntimeError):
    """The engine core is not running (dead, stalled or being restarted)."""


@dataclass(frozen=True)
class Finished:
    """The request ended outside the core: ``reason`` is "abort" (shutdown) or "error"."""

    reason: str
    error: str | None = None
    status_code: int = 500


Event = list[Delta] | Finished


class EngineClient:
    """Owns the core process and its sockets; all methods run on the API's event loop."""

    def __init__(
        self, engine_config: EngineConfig, stall_timeout_s: float = 60.0,
        exit_on_failure: bool = False, startup_timeout_s: float = 600.0,
    ) -> None:
        self.engine_config = engine_config
        self.stall_timeout_s = stall_timeout_s
        self.exit_on_failure = exit_on_failure
        self.startup_timeout_s = startup_timeout_s
        self._dir = tempfile.TemporaryDirectory(prefix="tessera-")
        self._output_address = f"ipc://{Path(self._dir.name) / 'output'}"
        # Sends are non-blocking on a plain socket; only receiving needs the event loop.
        self._sync_ctx = zmq.Context()
        self._input: zmq.Socket | None = None
        self._ctx = zmq.asyncio.Context()
        self._output = self._ctx.socket(zmq.PULL)
        self._output.bind(self._output_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreOutput)
        self._queues: dict[str, asyncio.Queue[Event]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._handshake: asyncio.Future[Ready] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._generation = 0
        self._input_path: Path | None = None
        self._last_progress_s = time.monotonic()
        self.process: subprocess.Popen[bytes] | None = None
        self.ready: Ready | None = None
        self.stats = EngineStats()
        self.kv_feed = KVFeed()
        """The prefix blocks the core's device cache holds (``GET /kv_events``)."""
        self.alive = False
        self.stopping = False
        self.num_restarts = 0
        self.on_stats: Callable[[EngineStats], None] | None = None
        self.on_fatal: Callable[[str], None] | None = None
        """Called when the server should exit non-zero (``exit_on_failure``, or restarts that
        keep failing)."""

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> Ready:
        """Spawn the core and wait until its engine is loaded; raises EngineStartupError."""
        self._revive_tasks()
        try:
            ready = await self._spawn()
        except BaseException:
            await self._stop_tasks()
            raise
        return ready

    async def _spawn(self) -> Ready:
        """Start a core (a new generation with its own input socket) and wait for Ready."""
        self._generation += 1
        self._input_path = Path(self._dir.name) / f"input-{self._generation}"
        input_address = f"ipc://{self._input_path}"
        if self._input is not None:
            self._input.close(linger=0)
        self._input = self._sync_ctx.socket(zmq.PUSH)
        self._input.setsockopt(zmq.SNDHWM, 0)
        # Connecting (the core binds) queues messages even before the core is up.
        self._input.connect(input_address)
        config = CoreConfig(self.engine_config, input_address, self._output_address, os.getpid(),
                            publish_kv_events=True)
        loop = asyncio.get_running_loop()
        self._handshake = loop.create_future()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tessera.serve.engine_core", msgspec.json.encode(config)],
            stdin=subprocess.DEVNULL,
        )
        deadline_s = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    ready = await asyncio.wait_for(asyncio.shield(self._handshake), 0.1)
                    break
                if self.process.poll() is not None:
                    raise EngineStartupError(
                        f"the engine core exited with code {self.process.returncode} while "
                        "starting"
                    )
                if time.monotonic() > deadline_s:
                    raise EngineStartupError(
                        f"the engine core did not start in {self.startup_timeout_s:.0f} s"
                    )
        except BaseException:
            await self._kill()
            raise
        finally:
            self._handshake = None
        self.ready = ready
        self._last_progress_s = time.monotonic()
        if self.on_stats is not None:
            self.on_stats(EngineStats())  # a new core's counters start from zero
        self.alive = True
        return ready

    @property
    def effective_stall_timeout_s(self) -> float:
        warm_up_s = self.ready.warm_up_s if self.ready is not None else 0.0
        return max(self.stall_timeout_s, _STALL_WARM_UP_FACTOR * warm_up_s)

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (aborting whatever it still runs) and wait for it to exit."""
        self.stopping = True
        self.fail_all(Finished("abort"))
        if self._recovery is not None:
            self._recovery.cancel()
        if self.alive:
            self._send(Shutdown())
        proc = self.process
        if proc is not None:
            end_s = time.monotonic() + timeout_s
            while proc.poll() is None and time.monotonic() < end_s:
                await asyncio.sleep(0.05)
        await self._kill()
        await self._stop_tasks()
        self.alive = False
        self._ctx.destroy(linger=0)
        self._sync_ctx.destroy(linger=0)
        self._dir.cleanup()

    def _revive_tasks(self) -> None:
        """Start the reader and the watchdog, or restart whichever of them ended."""
        loops = (self._read_loop, self._watchdog)
        old: list[asyncio.Task[None] | None] = [*self._tasks] or [None] * len(loops)
        self._tasks = [
            task if task is not None and not task.done() else self._supervised(loop())
            for task, loop in zip(old, loops, strict=True)
        ]

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _kill(self) -> None:
        """Kill the core (SIGKILL: a stalled or stopped core answers no gentler signal), wait,
        bounded, until it is gone, and remove the socket file it bound."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.kill()
            end_s = time.monotonic() + _KILL_WAIT_S
            while proc.poll() is None and time.monotonic() < end_s:
                await asyncio.sleep(0.02)
        if self._input_path is not None and (proc is None or proc.poll() is not None):
            self._input_path.unlink(missing_ok=True)

    # ----------------------------------------------------------------- requests
    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> asyncio.Queue[Event]:
        """Send a request to the core; its events arrive on the returned queue."""
        if not self.alive:
            raise EngineDeadError("the engine core is not running")
        if not self._queues:
            # Work after a quiet spell: the stall clock starts now, not at the last result.
            self._last_progress_s = time.monotonic()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        self._queues[request_id] = queue
        self._send(AddRequest(request_id, prompt_token_ids, params))
        return queue

    def _send(self, msg: AddRequest | AbortRequests | Shutdown) -> None:
        # A connecting PUSH with no high-water mark always queues; Again cannot happen, but a
        # send must never block the event loop, so say so.
        if self._input is None:
            return
        with contextlib.suppress(zmq.Again):
            self._input.send(self._encoder.encode(msg), zmq.NOBLOCK)

    def release(self, request_id: str, abort: bool) -> None:
        """Forget a request; with ``abort`` also stop it in the core (frees its KV blocks)."""
        self._queues.pop(request_id, None)
        if abort and self.alive:
            self._send(AbortRequests([request_id]))

    def fail_all(self, event: Finished) -> None:
        """End every in-flight request with ``event`` (shutdown or a failed core)."""
        ids = list(self._queues)
        for queue in self._queues.values():
            queue.put_nowait(event)
        self._queues.clear()
        if ids and self.alive and event.reason == "abort":
            self._send(AbortRequests(ids))

    # ----------------------------------------------------------------- failures
    def _supervised(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A background task whose unexpected end fails the core like a crash would, so no
        request waits forever on a reader that is gone."""
        task = asyncio.ensure_future(coro)

        def done(t: asyncio.Task[None]) -> None:
            if t.cancelled() or self.stopping:
                return
            exc = t.exception()
            logger.error("a background task of the API process ended", exc_info=exc)
            self.fail("an internal task of the server failed")

        task.add_done_callback(done)
        return task

    def fail(self, reason: str) -> None:
        """The core can no longer be trusted: fail in-flight requests, then replace it."""
        if self.stopping or self._recovery is not None:
            return
        was_alive = self.alive
        self.alive = False
        self.fail_all(Finished("error", f"{reason}; the request was lost"))
        if was_alive:
            logger.error("%s", reason)
        self._recovery = asyncio.ensure_future(self._recover(reason))

    async def _recover(self, reason: str) -> None:
        try:
            await self._kill()
            self._revive_tasks()  # a failed reader must be replaced to hear the new core
            if self.exit_on_failure:
                self._fatal(f"{reason} (exiting: --exit-on-engine-failure)")
                return
            for attempt in range(_MAX_FAILED_STARTS):
                try:
                    await self._spawn()
                except (EngineStartupError, OSError) as e:
                    logger.error("restarting the engine core failed: %s", e)
                    await asyncio.sleep(_RESTART_BACKOFF_S[attempt])
                    continue
                self.num_restarts += 1
                logger.warning("the engine core was restarted (%d so far)", self.num_restarts)
                return
            self._fatal(f"the engine core failed to restart {_MAX_FAILED_STARTS} times")
        finally:
            self._recovery = None

    def _fatal(self, message: str) -> None:
        logger.error("%s", message)
        if self.on_fatal is not None:
            self.on_fatal(message)

    # ----------------------------------------------------------------- background
    async def _read_loop(self) -> None:
        while True:
            raw = await self._output.recv()
            try:
                msg = self._decoder.decode(raw)
            except msgspec.DecodeError:
                logger.warning("dropped an undecodable message from the engine core")
                continue
            if isinstance(msg, Ready | StartupFailed):
                self._on_handshake(msg)
            elif self.alive and self.process is not None and msg.pid == self.process.pid:
                self._on_step(msg)
            # Anything else is from a core that is gone (still queued in the socket).

    def _on_handshake(self, msg: Ready | StartupFailed) -> None:
        handshake = self._handshake
        if handshake is None or handshake.done():
            return
        if isinstance(msg, StartupFailed):
            handshake.set_exception(EngineStartupError(msg.message))
        elif self.process is not None and msg.pid == self.process.pid:
            handshake.set_result(msg)

    def _on_step(self, msg: CoreStep) -> None:
        self._last_progress_s = time.monotonic()
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
        if msg.kv_events is not None:
            self.kv_feed.apply(msg.kv_events)
        if self.on_stats is not None:
            self.on_stats(msg.stats)

    def _stalled(self) -> bool:
        if not self._queues:
            return False
        if time.monotonic() - self._last_progress_s <= self.effective_stall_timeout_s:
            return False
        # A late check after a long pause of this event loop: results may be waiting unread.
        return not int(self._output.get(zmq.EVENTS)) & zmq.POLLIN

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(_WATCHDOG_PERIOD_S)
            proc = self.process
            if not self.alive or proc is None or self.stopping:
                continue
            if proc.poll() is not None:
                self.fail(f"the engine core exited with code {proc.returncode}")
            elif self._stalled():
                self.fail(
                    "the engine core made no progress for "
                    f"{self.effective_stall_timeout_s:.0f} s with requests pending"
                )
