"""An FFN worker process: this worker's shard of every layer's FFN, serving any attention rank.

Loop: receive a header from any source (so attention workers never run in lockstep), check it
(``ffn_requests.py``), then the payload from that rank, and with it every other request already queued (on a plane that can
poll); compute each layer's requests as one batch, send each rank its partial back without
waiting for it to drain. It
never blocks on anything but its own receives; an idle worker waits indefinitely (heartbeats
go on in their own thread). Any transfer error ends the process: the front then rebuilds the
pool. Run as ``python -m tessera.afd.ffn_worker CONFIG_JSON`` by the launcher, which writes the
pool's secret to its stdin.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import torch
import zmq

from tessera.afd.dataplane import (
    HEADER_LEN,
    HEADER_TAG,
    IDS_TAG,
    PAYLOAD_TAG,
    RESULT_TAG,
    WEIGHTS_TAG,
    Plane,
    TransferError,
    Work,
    wait,
)
from tessera.afd.ffn_requests import RequestLimits
from tessera.afd.ffn_shard import MoEShard, ffn_shards
from tessera.afd.frames import (
    MAIN_CHANNEL,
    DropLog,
    FrameWriter,
    SealedPush,
    read_secret,
    worker_sender,
)
from tessera.afd.heartbeat import start_heartbeat
from tessera.afd.placement import expert_ids_of, head_split
from tessera.afd.planes import open_plane
from tessera.afd.progress import BUSY, IDLE, Progress
from tessera.afd.trace import Tracer
from tessera.messages.common import Ready, StartupFailed
from tessera.messages.workers import Heartbeat, StepFailed, WorkerConfig
from tessera.model.kernels.linear import pack_linears
from tessera.model.loader import load_model, model_spec, moe_spec_of
from tessera.platform import get_platform

MAX_SENDS = 8
"""Result sends kept in flight before the oldest is waited for (each peer posted its receive
before it sent the request, so that wait is short)."""


def ffn_side(param_name: str) -> bool:
    """Parameters an FFN worker loads: FFN projections and experts (norms, routers and
    attention stay on the attention workers)."""
    return param_name.startswith("layers.") and ".ffn." in param_name and ".norm." not in (
        param_name
    ) and ".router." not in param_name


def head_side(tied: bool) -> Callable[[str], bool]:
    """``ffn_side`` plus the LM head's weight (the embedding's, when the two are tied)."""
    head = {"lm_head.weight", "embed.weight"} if tied else {"lm_head.weight"}
    return lambda name: ffn_side(name) or name in head


@dataclass
class _LayerRequest:
    """One FFN (or LM head) request, received."""

    src: int
    layer_id: int
    micro_batch: int
    normed: torch.Tensor  # [T, D]
    topk_ids: torch.Tensor | None  # [T, k] (MoE layers)
    topk_weights: torch.Tensor | None  # [T, k]
    recv_start_us: int


def _receive(plane: Plane, src: int, fields: list[int], hidden_size: int,
             dtype: torch.dtype, device: torch.device, timeout_s: float,
             tracer: Tracer) -> _LayerRequest:
    """The payload of the request whose header ``fields`` (checked) came from ``src``."""
    recv_start = tracer.now_us()
    _, layer_id, micro_batch, num_tokens, top_k = fields
    deadline_s = time.monotonic() + timeout_s
    normed = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)  # [T, D]
    plane.recv(normed, src, PAYLOAD_TAG, deadline_s)
    topk_ids = topk_weights = None
    if top_k:
        topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
        topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
        plane.recv(topk_ids, src, IDS_TAG, deadline_s)
        plane.recv(topk_weights, src, WEIGHTS_TAG, deadline_s)
    return _LayerRequest(src, layer_id, micro_batch, normed, topk_ids, topk_weights, recv_start)


def serve(plane: Plane, shards: list[torch.nn.Module], num_layers: int, hidden_size: int,
          dtype: torch.dtype, device: torch.device, timeout_s: float, tracer: Tracer,
          limits: RequestLimits, progress: Progress | None = None,
          on_bad_request: Callable[[str], None] | None = None) -> None:
    """Answer requests until a transfer fails. ``shards[layer_id]`` computes a request;
    ``layer_id == num_layers`` is this worker's slice of the LM head, when it holds one.

    Requests that queued up while the worker computed are taken together, and those of one
    layer computed as one batch (their rows side by side), each answered with its own rows.
    Why: every request streams the layer's weights, and an FFN worker serving several
    attention workers (or lanes) is where their tokens meet; a MoE layer's experts see the
    rows of all of them at once, the reason to pool FFNs at all. Nothing waits for a batch
    to fill: a request that arrives to an idle worker runs at once, alone.

    A request outside ``limits`` is dropped (logged at most once a minute) before anything
    is allocated for it, and so is every later request of its sender: the rest of that
    sender's stream can no longer be told apart from the bad request's payload.
    ``on_bad_request`` is told why, once per sender (the front then rebuilds the pool);
    other senders go on being served."""
    progress = progress or Progress()
    drops = DropLog(plane.names[plane.rank], "FFN request(s)")
    bad_senders: set[int] = set()
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    in_flight: deque[tuple[torch.Tensor, Work]] = deque()  # results' sends, oldest first

    def take(src: int) -> _LayerRequest | None:
        """The request whose header just came from ``src``, or None if it is dropped."""
        fields = header.tolist()
        if src in bad_senders:
            drops.drop(f"from {plane.names[src]}, after a malformed one")
            return None
        why = limits.check(src, fields)
        if why is None:
            with progress.waiting():  # each receive has its deadline: not a stall
                req = _receive(plane, src, fields, hidden_size, dtype, device, timeout_s,
                               tracer)
            if req.topk_ids is not None:
                why = limits.check_expert_ids(req.topk_ids)
            if why is None:
                return req
        bad_senders.add(src)
        drops.drop(f"malformed, from {plane.names[src]}")
        if on_bad_request is not None:
            on_bad_request(f"malformed FFN request from {plane.names[src]}: {why}")
        return None

    while True:
        progress.state = IDLE
        src: int | None = plane.recv_any(header, HEADER_TAG)
        progress.state = BUSY
        queued: list[_LayerRequest] = []
        while src is not None:
            if (req := take(src)) is not None:
                queued.append(req)
            src = plane.poll_any(header, HEADER_TAG)
        for batch in _by_layer(queued):
            for partial, req in _compute(shards, num_layers, batch, tracer):
                in_flight.append(
                    (partial, plane.isend(partial, req.src, RESULT_TAG + req.micro_batch))
                )
            progress.tick()
        with progress.waiting():  # bounded by the deadline
            retire_sends(in_flight, timeout_s)


def _by_layer(requests: list[_LayerRequest]) -> list[list[_LayerRequest]]:
    """``requests`` grouped by layer, groups in the order of their first request."""
    groups: dict[int, list[_LayerRequest]] = {}
    for req in requests:
        groups.setdefault(req.layer_id, []).append(req)
    return list(groups.values())


def _compute(shards: list[torch.nn.Module], num_layers: int, batch: list[_LayerRequest],
             tracer: Tracer) -> list[tuple[torch.Tensor, _LayerRequest]]:
    """Compute one layer's requests as one batch; each request's partial [T_i, D] (or slice
    of logits [S_i, V_f])."""
    layer_id = batch[0].layer_id
    sizes = [req.normed.shape[0] for req in batch]
    normed = torch.cat([req.normed for req in batch]) if len(batch) > 1 else batch[0].normed
    ids = weights = None
    if batch[0].topk_ids is not None:
        ids = torch.cat([req.topk_ids for req in batch if req.topk_ids is not None])
        weights = torch.cat([req.topk_weights for req in batch if req.topk_weights is not None])
    start = tracer.now_us()
    with torch.inference_mode():
        out = shards[layer_id](normed, ids, weights)  # [sum T_i, D]
    end = tracer.now_us()
    name, cat = ("head", "head") if layer_id == num_layers else (f"ffn L{layer_id}", "ffn")
    for req in batch:
        args = {"layer": layer_id, "micro_batch": req.micro_batch, "src": req.src,
                "tokens": req.normed.shape[0], "batched": len(batch)}
        tracer.add(f"recv L{layer_id} from {req.src}", "recv", req.recv_start_us, start, args)
    args = {"layer": layer_id, "micro_batch": batch[0].micro_batch, "src": batch[0].src,
            "tokens": normed.shape[0], "batched": len(batch)}
    tracer.add(f"{name} from {batch[0].src}", cat, start, end, args)
    parts = out.split(sizes) if len(batch) > 1 else (out,)
    return list(zip(parts, batch, strict=True))


def retire_sends(in_flight: deque[tuple[torch.Tensor, Work]], timeout_s: float) -> None:
    """Drop the sends that have drained, and wait for the oldest beyond ``MAX_SENDS``: a gloo
    send reports completion only from ``wait``, so without the bound the list (and the results
    it keeps alive) would grow for as long as the worker serves."""
    while in_flight and in_flight[0][1].is_completed():
        in_flight.popleft()
    while len(in_flight) > MAX_SENDS:
        wait(in_flight.popleft()[1], time.monotonic() + timeout_s, "sending an FFN result")


def request_limits(cfg: WorkerConfig, shards: list[torch.nn.Module], num_layers: int,
                   top_k: int, num_experts: int) -> RequestLimits:
    """The bounds of the requests this worker serves (see ``ffn_requests.py``)."""
    sched = cfg.engine.scheduler
    return RequestLimits(
        num_attention=cfg.afd.attention_workers,
        micro_batches=cfg.afd.micro_batches,
        max_tokens=sched.max_num_batched_tokens,
        # Every sampled row is one of the step's tokens.
        max_head_rows=min(sched.max_num_seqs, sched.max_num_batched_tokens),
        top_k=[top_k if isinstance(shard, MoEShard) else 0 for shard in shards],
        num_layers=num_layers,
        num_experts=num_experts,
    )


def main(argv: list[str], secret: bytes | None = None) -> int:
    """Run the worker ``argv[0]`` (its ``WorkerConfig`` as JSON) describes; the pool's
    secret is ``secret``, or read from stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when workers stop
    cfg = msgspec.json.decode(argv[0], type=WorkerConfig)
    if secret is None:
        secret = read_secret(sys.stdin)
    ctx = zmq.Context()
    front = SealedPush(ctx.socket(zmq.PUSH), FrameWriter(
        secret, cfg.generation, worker_sender(cfg.rank, MAIN_CHANNEL), cfg.frame_limit_bytes))
    front.sock.connect(cfg.front_address)
    tracer = Tracer(cfg.afd.trace_path is not None)
    progress = Progress(cfg.name)
    stop_beating = start_heartbeat(ctx, cfg, secret, progress, tracer)
    try:
        platform = get_platform(cfg.engine.device)
        platform.prepare_process()
        if cfg.engine.num_threads is not None:
            torch.set_num_threads(cfg.engine.num_threads)
        moe = moe_spec_of(cfg.engine.model)
        expert_ids = (
            expert_ids_of(moe.num_experts, cfg.afd.ffn_workers, cfg.index) if moe else None
        )
        head_rows = None
        keep: Callable[[str], bool] = ffn_side
        if cfg.afd.ffn_head_share > 0:
            head_spec = model_spec(cfg.engine.model)
            head_rows = head_split(head_spec.vocab_size, cfg.afd.ffn_head_share,
                                   cfg.afd.ffn_workers)[1 + cfg.index]
            keep = head_side(head_spec.tie_word_embeddings)
        spec, model = load_model(cfg.engine.model, cfg.engine.dtype, platform.device,
                                 expert_ids=expert_ids, keep=keep)
        dtype = model.embed.weight.dtype
        shards = ffn_shards(model, cfg.afd.ffn_workers, cfg.index, head_rows)
        del model
        for shard in shards:
            pack_linears(shard)  # after sharding, which slices the plain weights
        limits = request_limits(cfg, shards, spec.num_layers, moe.top_k if moe else 0,
                                moe.num_experts if moe else 0)
        plane = open_plane(cfg, platform.dist_backend, spec.hidden_size, dtype.itemsize,
                           moe.top_k if moe else 0, spec.vocab_size)
    except Exception as e:  # any startup failure becomes one line in the front
        text = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
        front.send(StartupFailed(text, worker=cfg.name))
        stop_beating.set()
        front.close(linger=2000)
        ctx.term()  # delivers the reason (within the linger) before the process ends
        return 1
    front.send(Ready(os.getpid(), worker=cfg.name))

    def report_bad_request(why: str) -> None:
        front.send(StepFailed(cfg.name, why))

    try:
        serve(plane, list(shards), spec.num_layers, spec.hidden_size, dtype, platform.device,
              cfg.afd.transfer_timeout_s, tracer, limits, progress, report_bad_request)
    except TransferError:
        # A peer died or stalled (or the pool is shutting down: attention workers exit first);
        # the front rebuilds the pool if it is still running. Ship the last spans first.
        front.send(Heartbeat(cfg.name, tracer.take(), time.time(), progress.count, IDLE))
        stop_beating.set()
        front.close(linger=1000)
        ctx.term()  # delivers that last message (within the linger) before the process ends
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
