"""An attention worker process: one data-parallel engine whose FFN units run remotely.

It is an ``LLMEngine`` (block manager, sampler, KV cache, embedding, attention units, final
norm and LM head, or its first vocabulary rows with ``AFDConfig.ffn_head_share``) with an
``AttentionRunner`` and M lanes (``tessera.afd.lanes``: one scheduler per micro-batch), in a
loop like the serve engine core: take requests from the front without blocking while busy,
advance the lanes, and push a ``StepReport`` (token deltas, finished outputs, stats, trace
spans) per lane step, once the lane's next step is under way (see ``run``). A failed transfer
ends the step with ``StepFailed`` and the process; the front then rebuilds the pool. Inputs
are sealed frames (``frames.py``): anything else is dropped. Run as ``python -m
tessera.afd.attention_worker CONFIG_JSON`` by the launcher, which writes the pool's secret to
its stdin.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys

import msgspec
import torch
import zmq
from torch import nn

from tessera.afd.attention_runner import AttentionRunner
from tessera.afd.dataplane import TransferError
from tessera.afd.frames import (
    MAIN_CHANNEL,
    FrameReader,
    FrameTooLarge,
    FrameWriter,
    SealedPush,
    read_secret,
    worker_sender,
)
from tessera.afd.head_slice import HeadSlice, RemovedHead
from tessera.afd.heartbeat import start_heartbeat
from tessera.afd.lanes import Lanes
from tessera.afd.placement import expert_owners, head_split
from tessera.afd.planes import open_plane
from tessera.afd.progress import BUSY, IDLE, Progress
from tessera.afd.remote_ffn import RemoteFFN
from tessera.afd.trace import Tracer
from tessera.engine.llm_engine import LLMEngine
from tessera.engine.sampler import Sampler
from tessera.messages.common import AbortRequests, AddRequest, Ready, Shutdown, StartupFailed
from tessera.messages.workers import StepFailed, StepReport, WorkerConfig, WorkerInput
from tessera.model.dense import DecoderModel
from tessera.model.kernels.linear import pack_linears
from tessera.model.loader import moe_spec_of
from tessera.outputs import CompletionOutput, RequestOutput, StepOutput
from tessera.platform import get_platform

_IDLE_POLL_MS = 100
_ENCODER = msgspec.msgpack.Encoder()


_DENSE_FFN_PARAM = re.compile(r"^layers\.\d+\.ffn\.(gate_up_proj|down_proj)\.")


def attention_side(param_name: str) -> bool:
    """Parameters an attention worker loads: all but dense FFN projections (they live on the
    FFN workers; the FFN norms stay here)."""
    return not _DENSE_FFN_PARAM.match(param_name)


def local_head(lm_head: nn.Linear, start: int, end: int) -> nn.Module:
    """The attention worker's rows of a split LM head, packed like the engine's head."""
    head = HeadSlice(lm_head, start, end)
    pack_linears(head)
    return head


def run(cfg: WorkerConfig, lanes: Lanes, inputs: zmq.Socket, reader: FrameReader,
        front: SealedPush, tracer: Tracer, progress: Progress) -> int:
    poller = zmq.Poller()
    poller.register(inputs, zmq.POLLIN)
    # Reports of ended lane steps wait until that lane's next step has sent its first FFN
    # request, or until this worker would block on the FFN workers, whichever comes first.
    # Sending wakes the front, which on a host short of cores runs in this worker's place;
    # right after a step's end that delay lands on the lane's critical path (nothing is queued
    # on the FFN workers for it yet). At most one ``advance`` later, so a token's report is
    # late by at most about one layer's time.
    unsent: list[StepOutput] = []

    def report() -> None:
        for step in unsent:
            send_report(front, StepReport(cfg.name, step.deltas, step.finished, lanes.stats(),
                                          tracer.take()))
        unsent.clear()

    while True:
        progress.state = BUSY if lanes.has_work() else IDLE
        ready = dict(poller.poll(0 if lanes.has_work() else _IDLE_POLL_MS))
        num_inputs = 0
        while inputs in ready:
            try:
                msg = reader.open(inputs.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if msg is None:
                continue  # dropped (and logged) by the reader
            num_inputs += 1
            progress.tick()
            if isinstance(msg, AddRequest):
                # The front validated the prompt against this worker's limits already.
                lanes.add_request(msg.request_id, msg.prompt, msg.prompt_token_ids, msg.params)
            elif isinstance(msg, AbortRequests):
                for request_id in msg.request_ids:
                    lanes.abort_request(request_id)
            elif isinstance(msg, Shutdown):
                report()
                return 0
        if not lanes.has_work():
            if unsent:
                report()
            elif num_inputs:
                front.send(StepReport(cfg.name, [], [], lanes.stats()))
            continue
        progress.state = BUSY
        try:
            with torch.inference_mode():
                ended = lanes.advance(before_block=report)
        except TransferError as e:
            report()  # steps that ended before the failure did end: their tokens stand
            front.send(StepFailed(cfg.name, str(e)))
            return 1
        report()
        unsent.extend(ended)


def send_report(front: SealedPush, report: StepReport) -> None:
    """Send ``report``; a finished output too large for any control frame (a prompt with many
    long completions and logprobs) ends with an error instead, the others as they are."""
    try:
        front.send(report)
    except FrameTooLarge as e:
        limit_bytes = front.writer.limit_bytes // 2
        finished = [out if len(_ENCODER.encode(out)) <= limit_bytes else _too_large(out, str(e))
                    for out in report.finished]
        front.send(msgspec.structs.replace(report, finished=finished))


def _too_large(out: RequestOutput, why: str) -> RequestOutput:
    outputs = [CompletionOutput(c.index, "", [], "error", error=f"output too large: {why}")
               for c in out.outputs]
    return RequestOutput(out.request_id, None, [], outputs, True)


def main(argv: list[str], secret: bytes | None = None) -> int:
    """Run the worker ``argv[0]`` (its ``WorkerConfig`` as JSON) describes; the pool's
    secret is ``secret``, or read from stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when workers stop
    cfg = msgspec.json.decode(argv[0], type=WorkerConfig)
    assert cfg.input_address is not None
    if secret is None:
        secret = read_secret(sys.stdin)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.connect(cfg.front_address)
    front = SealedPush(sock, FrameWriter(secret, cfg.generation,
                                         worker_sender(cfg.rank, MAIN_CHANNEL),
                                         cfg.frame_limit_bytes))
    tracer = Tracer(cfg.afd.trace_path is not None)
    progress = Progress(cfg.name)
    stop_beating = start_heartbeat(ctx, cfg, secret, progress)
    inputs = ctx.socket(zmq.PULL)
    try:
        inputs.setsockopt(zmq.MAXMSGSIZE, cfg.frame_limit_bytes)
        inputs.bind(cfg.input_address)
        reader = FrameReader(secret, WorkerInput, cfg.generation, f"{cfg.name} input",
                             from_front=True)
        moe = moe_spec_of(cfg.engine.model)
        runners: list[AttentionRunner] = []

        def make_runner(model: DecoderModel, device: torch.device, block_size: int,
                        num_blocks: int, sampler: Sampler,
                        kv_dtype: torch.dtype | None) -> AttentionRunner:
            """The engine's runner, joined to the data plane once the model is loaded."""
            spec = model.spec
            plane = open_plane(cfg, get_platform(cfg.engine.device).dist_backend,
                               spec.hidden_size, model.embed.weight.dtype.itemsize,
                               moe.top_k if moe else 0, spec.vocab_size)
            owners = expert_owners(moe.num_experts, cfg.afd.ffn_workers) if moe else None
            head = head_split(spec.vocab_size, cfg.afd.ffn_head_share, cfg.afd.ffn_workers)
            remote = RemoteFFN(plane, cfg.afd.ffn_ranks(), tracer, owners,
                               [end - start for start, end in head[1:]], progress)
            split = head[0][1] < spec.vocab_size
            own_head = local_head(model.lm_head, *head[0]) if split else None
            if split:  # only this worker's slice is used: free the whole head
                model.lm_head = RemovedHead(model.lm_head)
            runner = AttentionRunner(model, device, block_size, num_blocks, sampler, kv_dtype,
                                     remote=remote, tracer=tracer, local_head=own_head,
                                     transfer_timeout_s=cfg.afd.startup_timeout_s)
            runners.append(runner)
            return runner

        # Routed experts live on the FFN workers only; the router stays here.
        engine = LLMEngine(cfg.engine, make_runner=make_runner,
                           expert_ids=[] if moe else None, keep_param=attention_side)
        (runner,) = runners
        engine.warm_up()
        runner.transfer_timeout_s = cfg.afd.transfer_timeout_s
        tracer.take()  # warm-up spans are not part of the workload
    except Exception as e:  # any startup failure becomes one line in the front
        text = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
        front.send(StartupFailed(text, worker=cfg.name))
        stop_beating.set()
        inputs.close(linger=0)
        front.close(linger=2000)
        # Closing does not wait for the send; terminating the context does (within the
        # linger), so the reason reaches the front before the process exits.
        ctx.term()
        return 1
    rt = engine.runtime
    front.send(Ready(os.getpid(), rt.max_model_len, rt.num_kv_blocks, worker=cfg.name))
    try:
        return run(cfg, Lanes(engine, runner, cfg.afd.micro_batches, progress), inputs, reader,
                   front, tracer, progress)
    finally:
        with contextlib.suppress(Exception):
            engine.shutdown()  # lands the KV tiers' queued writes (bounded)
        with contextlib.suppress(Exception):
            front.close(linger=1000)


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
