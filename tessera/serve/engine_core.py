"""The engine-core process: ``LLMEngine.step`` in a loop behind two ZeroMQ sockets.

Run as ``python -m tessera.serve.engine_core CONFIG_JSON`` by the API process. It pulls
``CoreInput`` messages, steps the engine while anything is unfinished and pushes one
``CoreStep`` (new tokens plus stats) per step. Between steps it only drains its input socket
without blocking, so HTTP work in the API process never delays a step and a step never waits
on HTTP. It exits on ``Shutdown``, or when its parent process is gone (no orphans).

A failure is contained to the requests it touches: the engine ends the requests of a step
that raised with ``finish_reason="error"``; should a step raise past the engine anyway, the
core ends every request it holds the same way and keeps serving. Each failure is logged once
with its traceback; clients get a message without internals (HTTP 500 or an error event).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time

import msgspec
import zmq

from tessera.engine.protocol import Engine
from tessera.engine.requests import STEP_FAILED_MESSAGE
from tessera.engine_factory import create_engine
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown, StartupFailed
from tessera.messages.core import CoreConfig, CoreInput, CoreStep, Delta, RequestFailed
from tessera.outputs import RequestOutput
from tessera.serve.curve import Gate, as_client, as_server

_IDLE_POLL_MS = 200
"""How long an idle core blocks on its input before checking that its parent still lives."""

logger = logging.getLogger("tessera.engine_core")


def output_socket(ctx: zmq.Context, config: CoreConfig) -> zmq.Socket:
    """The core's output, connected to its front (as a CURVE client over TCP)."""
    sock = ctx.socket(zmq.PUSH)
    if config.curve is not None:
        as_client(sock, config.curve.core_public, config.curve.core_secret,
                  config.curve.front_public)
    sock.connect(config.output_address)
    return sock


class EngineCore:
    """Owns the engine and the two sockets; ``run`` returns when told to shut down."""

    def __init__(self, config: CoreConfig, engine: Engine, ctx: zmq.Context) -> None:
        self.config = config
        self.engine = engine
        # The core binds its input and connects its output; the API process does the
        # opposite. The connecting side of a ZeroMQ pipe queues messages from the start, so
        # neither side can lose a message sent before the other has finished connecting.
        self.inputs = ctx.socket(zmq.PULL)
        self.gate: Gate | None = None
        if config.curve is not None:  # TCP: admit only the front
            self.gate = Gate(ctx, {config.curve.front_public})
            as_server(self.inputs, config.curve.core_public, config.curve.core_secret)
        self.inputs.bind(config.input_address)
        self.outputs = output_socket(ctx, config)
        self.outputs.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
        self.decoder = msgspec.msgpack.Decoder(CoreInput)
        self.encoder = msgspec.msgpack.Encoder()
        self.request_ids: set[str] = set()
        """Requests added and not yet finished or aborted."""

    def send(self, msg: msgspec.Struct) -> None:
        # Again means the API process is gone; the parent check then ends the loop.
        with contextlib.suppress(zmq.Again):
            self.outputs.send(self.encoder.encode(msg), zmq.NOBLOCK)

    def _handle(self, msg: CoreInput, failed: list[RequestFailed]) -> bool:
        """Apply one input; False when the core must stop."""
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
            except ValueError as e:
                failed.append(RequestFailed(msg.request_id, str(e)))
            except Exception:
                logger.exception("adding request %s failed", msg.request_id)
                failed.append(RequestFailed(msg.request_id, STEP_FAILED_MESSAGE, 500))
            else:
                self.request_ids.add(msg.request_id)
        elif isinstance(msg, AbortRequests):
            for request_id in msg.request_ids:
                self.engine.abort_request(request_id)
                self.request_ids.discard(request_id)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def _step(self, failed: list[RequestFailed],
              finished: list[RequestOutput] | None = None) -> list[Delta]:
        """One engine step; its finished requests leave ``request_ids`` (and go to
        ``finished`` for a cluster front), failed ones go to ``failed`` (500)."""
        try:
            step = self.engine.step_with_deltas()
        except Exception:
            # The engine contains a failing step itself; this is the net under it.
            logger.exception("an engine step raised; ending the %d requests in the core",
                             len(self.request_ids))
            for request_id in self.request_ids:
                self.engine.abort_request(request_id)
                failed.append(RequestFailed(request_id, STEP_FAILED_MESSAGE, 500))
            self.request_ids.clear()
            return []
        if self.config.instance and finished is not None:
            finished += step.finished
        for out in step.finished:
            self.request_ids.discard(out.request_id)
            # A failed step or a lost worker (disaggregated serving): a server error.
            if out.outputs and out.outputs[0].finish_reason == "error":
                failed.append(
                    RequestFailed(out.request_id, out.outputs[0].error or "request failed", 500)
                )
        return [
            Delta(d.request_id, d.index, d.token_id, d.logprobs, d.finish_reason,
                  d.prompt_logprobs, d.prompt_token_ranks)
            for d in step.deltas
        ]

    def run(self) -> None:
        engine = self.engine
        poller = zmq.Poller()
        poller.register(self.inputs, zmq.POLLIN)
        pid = os.getpid()
        while True:
            busy = engine.has_unfinished_requests()
            # Busy: only pick up what has arrived. Idle: sleep on the socket.
            ready = dict(poller.poll(0 if busy else _IDLE_POLL_MS))
            failed: list[RequestFailed] = []
            num_inputs = 0
            while self.inputs in ready:
                try:
                    raw = self.inputs.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                num_inputs += 1
                try:
                    msg = self.decoder.decode(raw)
                except msgspec.DecodeError:
                    logger.warning("dropped an undecodable input message (%d bytes)", len(raw))
                    continue
                if not self._handle(msg, failed):
                    return
            if self.config.parent_pid and os.getppid() != self.config.parent_pid:
                return  # the API process died; do not linger as an orphan
            deltas: list[Delta] = []
            finished: list[RequestOutput] = []
            if engine.has_unfinished_requests():
                deltas = self._step(failed, finished)
            elif not num_inputs:
                continue
            # Also sent after inputs alone, so an abort shows in the stats at once.
            events = (engine.take_kv_events()
                      if self.config.instance or self.config.publish_kv_events else None)
            self.send(CoreStep(deltas, failed, engine.stats(), pid, finished, events))


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    with contextlib.suppress(ValueError):  # not the main thread (a Ray actor): nothing to do
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(format="tessera: %(levelname)s: %(message)s", level=logging.WARNING)
    config = msgspec.json.decode(argv[0], type=CoreConfig)
    ctx = zmq.Context()
    core: EngineCore | None = None
    try:
        engine: Engine | None = None
        try:
            engine = create_engine(config.engine)
            warm_up_start_s = time.monotonic()
            engine.warm_up()
            warm_up_s = time.monotonic() - warm_up_start_s
        except Exception as e:  # any load failure becomes one line in the API process
            out = output_socket(ctx, config)
            # ValueError and OSError already read as sentences (bad path, bad value).
            text = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
            out.send(msgspec.msgpack.encode(StartupFailed(text)))
            out.close(linger=2000)
            return 1
        core = EngineCore(config, engine, ctx)
        rt = engine.runtime
        core.send(Ready(os.getpid(), rt.max_model_len, rt.num_kv_blocks, rt.vocab_size,
                        warm_up_s))
        core.run()
        return 0
    finally:
        if engine is not None:
            engine.shutdown()  # stop disaggregated workers
        if core is not None and core.gate is not None:
            core.gate.stop()
        ctx.destroy(linger=0)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed; skipping interpreter teardown (about a second with torch loaded)
    # lets the server stop promptly.
    os._exit(exit_code)
