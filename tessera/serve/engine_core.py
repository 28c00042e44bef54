"""The engine-core process: ``LLMEngine.step`` in a loop behind two ZeroMQ sockets.

Run as ``python -m tessera.serve.engine_core CONFIG_JSON`` by the API process. It pulls
``CoreInput`` messages, steps the engine while anything is unfinished and pushes one
``StepResult`` (new tokens plus stats) per step. Between steps it only drains its input socket
without blocking, so HTTP work in the API process never delays a step and a step never waits
on HTTP. It exits on ``Shutdown``, or when its parent process is gone (no orphans).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import msgspec
import zmq

from tessera.engine.factory import Engine, create_engine
from tessera.serve.protocol import (
    AbortRequests,
    AddRequest,
    CoreConfig,
    CoreInput,
    Delta,
    EngineStats,
    Ready,
    RequestFailed,
    Shutdown,
    StartupFailed,
    StepResult,
)

_IDLE_POLL_MS = 200
"""How long an idle core blocks on its input before checking that its parent still lives."""


def engine_stats(engine: Engine) -> EngineStats:
    s = engine.stats()
    return EngineStats(
        num_running=s["num_running"],
        num_waiting=s["num_waiting"],
        kv_cache_usage=s["kv_cache_usage"],
        num_preemptions=s["num_preemptions"],
        num_prompt_tokens_total=engine.num_prompt_tokens_total,
        num_generation_tokens_total=engine.num_generation_tokens_total,
        num_prefix_queried_tokens_total=s["prefix_queried_tokens"],
        num_prefix_hit_tokens_total=s["prefix_hit_tokens"],
    )


class EngineCore:
    """Owns the engine and the two sockets; ``run`` returns when told to shut down."""

    def __init__(self, config: CoreConfig, engine: Engine, ctx: zmq.Context) -> None:
        self.config = config
        self.engine = engine
        # The core binds its input and connects its output; the API process does the
        # opposite. The connecting side of a ZeroMQ pipe queues messages from the start, so
        # neither side can lose a message sent before the other has finished connecting.
        self.inputs = ctx.socket(zmq.PULL)
        self.inputs.bind(config.input_address)
        self.outputs = ctx.socket(zmq.PUSH)
        self.outputs.setsockopt(zmq.SNDHWM, 0)  # never block a step on a slow reader
        self.outputs.connect(config.output_address)
        self.decoder = msgspec.msgpack.Decoder(CoreInput)
        self.encoder = msgspec.msgpack.Encoder()

    def send(self, msg: msgspec.Struct) -> None:
        # Again means the API process is gone; the parent check then ends the loop.
        with contextlib.suppress(zmq.Again):
            self.outputs.send(self.encoder.encode(msg), zmq.NOBLOCK)

    def _handle(self, msg: CoreInput, failed: list[RequestFailed]) -> bool:
        """Apply one input; False when the core must stop."""
        if isinstance(msg, AddRequest):
            try:
                self.engine.add_request(
                    msg.request_id, msg.prompt_token_ids, msg.options.to_params()
                )
            except ValueError as e:
                failed.append(RequestFailed(msg.request_id, str(e)))
        elif isinstance(msg, AbortRequests):
            for request_id in msg.request_ids:
                self.engine.abort_request(request_id)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def run(self) -> None:
        engine = self.engine
        poller = zmq.Poller()
        poller.register(self.inputs, zmq.POLLIN)
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
                if not self._handle(self.decoder.decode(raw), failed):
                    return
            if os.getppid() != self.config.parent_pid:
                return  # the API process died; do not linger as an orphan
            deltas: list[Delta] = []
            if engine.has_unfinished_requests():
                step = engine.step_with_deltas()
                deltas = [
                    Delta(d.request_id, d.index, d.token_id, d.logprobs, d.finish_reason)
                    for d in step.deltas
                ]
                # Requests lost to a failed worker (disaggregated serving) end as server errors.
                failed += [
                    RequestFailed(out.request_id, out.outputs[0].error or "request failed", 500)
                    for out in step.finished
                    if out.outputs and out.outputs[0].finish_reason == "error"
                ]
            elif not num_inputs:
                continue
            # Also sent after inputs alone, so an abort shows in the stats at once.
            self.send(StepResult(deltas, failed, engine_stats(engine)))


def main(argv: list[str]) -> int:
    # Ctrl-C reaches the whole process group; the API process decides when the core stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = msgspec.json.decode(argv[0], type=CoreConfig)
    ctx = zmq.Context()
    try:
        engine: Engine | None = None
        try:
            engine = create_engine(config.engine)
            engine.warm_up()
        except Exception as e:  # any load failure becomes one line in the API process
            out = ctx.socket(zmq.PUSH)
            out.connect(config.output_address)
            # ValueError and OSError already read as sentences (bad path, bad value).
            text = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
            out.send(msgspec.msgpack.encode(StartupFailed(text)))
            out.close(linger=2000)
            return 1
        core = EngineCore(config, engine, ctx)
        rt = engine.runtime
        core.send(Ready(rt.max_model_len, rt.vocab_size, rt.num_kv_blocks, os.getpid()))
        core.run()
        return 0
    finally:
        shutdown = getattr(engine, "shutdown", None)
        if shutdown is not None:
            shutdown()  # stop disaggregated workers
        ctx.destroy(linger=0)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is closed; skipping interpreter teardown (about a second with torch loaded)
    # lets the server stop promptly.
    os._exit(exit_code)
