"""An FFN worker process: this worker's shard of every layer's FFN, serving any attention rank.

Loop: receive a header from any source (so attention workers never run in lockstep), then the
payload from that rank, and with it every other request already queued (on a plane that can
poll); compute each layer's requests as one batch, send each rank its partial back without
waiting for it to drain. It
never blocks on anything but its own receives; an idle worker waits indefinitely (heartbeats
go on in their own thread). Any transfer error ends the process: the front then rebuilds the
pool. Run as ``python -m tessera.afd.ffn_worker CONFIG_JSON`` by the launcher.
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
    open_plane,
    wait,
)
from tessera.afd.ffn_shard import ffn_shards
from tessera.afd.heartbeat import start_heartbeat
from tessera.afd.messages import Heartbeat, Ready, StartupFailed, WorkerConfig
from tessera.afd.placement import expert_ids_of, head_split
from tessera.afd.trace import Tracer
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
class _Request:
    """One FFN (or LM head) request, received."""

    src: int
    layer_id: int
    micro_batch: int
    normed: torch.Tensor  # [T, D]
    topk_ids: torch.Tensor | None  # [T, k] (MoE layers)
    topk_weights: torch.Tensor | None  # [T, k]
    recv_start_us: int


def _receive(plane: Plane, src: int, header: torch.Tensor, hidden_size: int,
             dtype: torch.dtype, device: torch.device, timeout_s: float,
             tracer: Tracer) -> _Request:
    """The payload of the request whose ``header`` came from ``src``."""
    recv_start = tracer.now_us()
    _, layer_id, micro_batch, num_tokens, top_k = header.tolist()
    deadline_s = time.monotonic() + timeout_s
    normed = torch.empty(num_tokens, hidden_size, dtype=dtype, device=device)  # [T, D]
    plane.recv(normed, src, PAYLOAD_TAG, deadline_s)
    topk_ids = topk_weights = None
    if top_k:
        topk_ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=device)
        topk_weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
        plane.recv(topk_ids, src, IDS_TAG, deadline_s)
        plane.recv(topk_weights, src, WEIGHTS_TAG, deadline_s)
    return _Request(src, layer_id, micro_batch, normed, topk_ids, topk_weights, recv_start)


def serve(plane: Plane, shards: list[torch.nn.Module], num_layers: int, hidden_size: int,
          dtype: torch.dtype, device: torch.device, timeout_s: float, tracer: Tracer) -> None:
    """Answer requests until a transfer fails. ``shards[layer_id]`` computes a request;
    ``layer_id == num_layers`` is this worker's slice of the LM head, when it holds one.

    Requests that queued up while the worker computed are taken together, and those of one
    layer computed as one batch (their rows side by side), each answered with its own rows.
    Why: every request streams the layer's weights, and an FFN worker serving several
    attention workers (or lanes) is where their tokens meet; a MoE layer's experts see the
    rows of all of them at once, the reason to pool FFNs at all. Nothing waits for a batch
    to fill: a request that arrives to an idle worker runs at once, alone."""
    header = torch.empty(HEADER_LEN, dtype=torch.int64)
    in_flight: deque[tuple[torch.Tensor, Work]] = deque()  # results' sends, oldest first
    while True:
        src = plane.recv_any(header, HEADER_TAG)
        queued = [_receive(plane, src, header, hidden_size, dtype, device, timeout_s, tracer)]
        while (more := plane.poll_any(header, HEADER_TAG)) is not None:
            queued.append(_receive(plane, more, header, hidden_size, dtype, device, timeout_s,
                                   tracer))
        for batch in _by_layer(queued):
            for partial, req in _compute(shards, num_layers, batch, tracer):
                in_flight.append(
                    (partial, plane.isend(partial, req.src, RESULT_TAG + req.micro_batch))
                )
        retire_sends(in_flight, timeout_s)


def _by_layer(requests: list[_Request]) -> list[list[_Request]]:
    """``requests`` grouped by layer, groups in the order of their first request."""
    groups: dict[int, list[_Request]] = {}
    for req in requests:
        groups.setdefault(req.layer_id, []).append(req)
    return list(groups.values())


def _compute(shards: list[torch.nn.Module], num_layers: int, batch: list[_Request],
             tracer: Tracer) -> list[tuple[torch.Tensor, _Request]]:
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


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when workers stop
    cfg = msgspec.json.decode(argv[0], type=WorkerConfig)
    ctx = zmq.Context()
    front = ctx.socket(zmq.PUSH)
    front.connect(cfg.front_address)
    encoder = msgspec.msgpack.Encoder()
    tracer = Tracer(cfg.afd.trace_path is not None)
    stop_beating = start_heartbeat(ctx, cfg.front_address, cfg.name,
                                   cfg.afd.heartbeat_interval_s, cfg.parent_pid, tracer)
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
        plane = open_plane(cfg, platform.dist_backend, spec.hidden_size, dtype.itemsize,
                           moe.top_k if moe else 0, spec.vocab_size)
    except Exception as e:  # any startup failure becomes one line in the front
        text = str(e) if isinstance(e, ValueError | OSError) else f"{type(e).__name__}: {e}"
        front.send(encoder.encode(StartupFailed(cfg.name, text)))
        front.close(linger=2000)
        return 1
    front.send(encoder.encode(Ready(cfg.name, os.getpid())))
    try:
        serve(plane, list(shards), spec.num_layers, spec.hidden_size, dtype, platform.device,
              cfg.afd.transfer_timeout_s, tracer)
    except TransferError:
        # A peer died or stalled (or the pool is shutting down: attention workers exit first);
        # the front rebuilds the pool if it is still running. Ship the last spans first.
        front.send(encoder.encode(Heartbeat(cfg.name, tracer.take(), time.time())))
        stop_beating.set()
        front.close(linger=1000)
        ctx.term()  # delivers that last message (within the linger) before the process ends
        return 1
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)
