"""The attention worker's side of the FFN protocol: issue a layer's FFN, collect it later.

``submit`` sends the header and the normed hidden state to every FFN worker that must see it
and posts the receives for their partials at once, so the transfer and the remote compute run
while the caller does other work (attention of the next micro-batch); ``PendingFFN.wait``
sums the partials into the residual stream. Dense layers go to all F shards; a MoE layer would
send each token only to the workers owning its experts (with its expert ids and routing
weights) and scatter-add the weighted partials back. ``submit_head`` sends the final-normed
rows to sample to the FFN workers holding part of the LM head (``AFDConfig.ffn_head_share``);
each answers with its slice of the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tessera.afd.dataplane import (
    HEADER_LEN,
    HEADER_TAG,
    IDS_TAG,
    PAYLOAD_TAG,
    RESULT_TAG,
    WEIGHTS_TAG,
    Plane,
    Work,
    wait,
)
from tessera.afd.progress import Progress
from tessera.afd.trace import Tracer


@dataclass
class PendingFFN:
    """One micro-batch's FFN of one layer, in flight."""

    residual: torch.Tensor  # [T, D]
    # (FFN worker, partial [T_f, D], its receive, rows of the micro-batch it covers or None
    # for all rows)
    results: list[tuple[str, torch.Tensor, Work, torch.Tensor | None]]
    # (worker, tensor, work): the tensor stays referenced until its send completes
    sends: list[tuple[str, torch.Tensor, Work]] = field(default_factory=list)
    layer_id: int = 0
    micro_batch: int = 0
    start_us: int = 0
    progress: Progress = field(default_factory=Progress)

    def ready(self) -> bool:
        """Whether every partial has arrived (``wait`` would not block on them). Always False
        on gloo, whose receives report completion only from ``wait``: the lane driver then
        blocks on the oldest request, which the FFN workers (serving in arrival order) answer
        first anyway."""
        return all(work.is_completed() for _, _, work, _ in self.results)

    def wait(self, deadline_s: float, tracer: Tracer) -> torch.Tensor:
        """The residual stream after this FFN: residual + sum of the partials. [T, D]"""
        wait_start = tracer.now_us()
        total: torch.Tensor | None = None
        with self.progress.waiting():  # each wait has its deadline: not a stall
            for worker, partial, work, rows in self.results:
                wait(work, deadline_s, f"FFN result of layer {self.layer_id} from {worker}")
                if rows is None:
                    total = partial if total is None else total + partial
                else:
                    if total is None:
                        total = torch.zeros_like(self.residual)
                    total = total.index_add(0, rows, partial)
            for worker, _, work in self.sends:
                wait(work, deadline_s, f"FFN request of layer {self.layer_id} to {worker}")
        end = tracer.now_us()
        args = {"layer": self.layer_id, "micro_batch": self.micro_batch}
        tracer.add(f"ffn L{self.layer_id} mb{self.micro_batch}", "send", self.start_us, end, args)
        tracer.add(f"wait L{self.layer_id} mb{self.micro_batch}", "wait", wait_start, end, args)
        # Partials first, then the residual: with one FFN worker this is the single-process
        # engine's arithmetic exactly.
        return self.residual if total is None else self.residual + total


@dataclass
class PendingHead:
    """The FFN workers' slices of the LM head for one micro-batch's rows to sample, in flight."""

    # (FFN worker, logits slice [S, V_f], its receive), in vocabulary order
    results: list[tuple[str, torch.Tensor, Work]]
    sends: list[tuple[str, torch.Tensor, Work]]
    micro_batch: int
    start_us: int
    progress: Progress = field(default_factory=Progress)

    def ready(self) -> bool:
        """Whether every logit slice has arrived."""
        return all(work.is_completed() for _, _, work in self.results)

    def wait(self, deadline_s: float, tracer: Tracer) -> list[torch.Tensor]:
        """The logit slices [S, V_f], in vocabulary order (the model's dtype)."""
        wait_start = tracer.now_us()
        with self.progress.waiting():  # each wait has its deadline: not a stall
            for worker, _, work in self.results:
                wait(work, deadline_s, f"LM head logits from {worker}")
            for worker, _, work in self.sends:
                wait(work, deadline_s, f"LM head request to {worker}")
        end = tracer.now_us()
        args = {"micro_batch": self.micro_batch}
        tracer.add(f"head mb{self.micro_batch}", "send", self.start_us, end, args)
        tracer.add(f"wait head mb{self.micro_batch}", "wait", wait_start, end, args)
        return [logits for _, logits, _ in self.results]


class RemoteFFN:
    """Sends FFN requests from this attention rank to the FFN ranks."""

    def __init__(self, plane: Plane, ffn_ranks: list[int], tracer: Tracer,
                 expert_owners: torch.Tensor | None = None,
                 head_cols: list[int] | None = None, progress: Progress | None = None) -> None:
        self.plane = plane
        self.ffn_ranks = ffn_ranks
        self.tracer = tracer
        self.expert_owners = expert_owners  # [E] FFN worker index per expert (MoE models)
        self.head_cols = head_cols or [0] * len(ffn_ranks)
        """Vocabulary rows of the LM head on each FFN worker (0: none)."""
        self.progress = progress or Progress()
        """The worker's main-loop progress: waits for results are marked as waiting."""

    def submit_head(self, head_id: int, micro_batch: int, normed: torch.Tensor) -> PendingHead:
        """Start the FFN workers' slices of the LM head over the final-normed rows to sample
        ``normed`` [S, D], S > 0. ``head_id`` (the number of layers) marks the request as the
        head's; workers holding no rows of it are skipped."""
        pending = PendingHead([], [], micro_batch, self.tracer.now_us(), self.progress)
        normed = normed.contiguous()
        header = torch.tensor([self.plane.rank, head_id, micro_batch, normed.shape[0], 0],
                              dtype=torch.int64)
        for rank, cols in zip(self.ffn_ranks, self.head_cols, strict=True):
            if cols == 0:
                continue
            worker = self.plane.names[rank]
            logits = normed.new_empty(normed.shape[0], cols)  # [S, V_f]
            recv = self.plane.irecv(logits, rank, RESULT_TAG + micro_batch)
            pending.results.append((worker, logits, recv))
            for tensor, tag in ((header, HEADER_TAG), (normed, PAYLOAD_TAG)):
                pending.sends.append((worker, tensor, self.plane.isend(tensor, rank, tag)))
        return pending

    def submit(
        self, layer_id: int, micro_batch: int, residual: torch.Tensor, normed: torch.Tensor,
        topk_ids: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
        all_tokens_to_first: bool = False,
    ) -> PendingFFN:
        """Start a layer's FFN. Dense (no ``topk_ids``): every FFN worker gets every token.
        MoE: each worker gets only the tokens routed to its experts, with their ids and
        weights (worker 0 gets all of them when ``all_tokens_to_first``: the shared expert)."""
        start = self.tracer.now_us()
        normed = normed.contiguous()
        pending = PendingFFN(residual, [], [], layer_id, micro_batch, start, self.progress)
        owners = None
        if topk_ids is not None:
            assert self.expert_owners is not None, "MoE routing without an expert placement"
            owners = self.expert_owners.to(topk_ids.device)[topk_ids]  # [T, k]
        for f, rank in enumerate(self.ffn_ranks):
            rows = None
            x, ids, weights = normed, topk_ids, topk_weights
            if owners is not None and not (f == 0 and all_tokens_to_first):
                rows = (owners == f).any(dim=1).nonzero().squeeze(1)  # [T_f]
                if rows.numel() == 0:
                    continue  # nothing routed to this worker
                assert ids is not None and weights is not None
                x, ids, weights = x[rows], ids[rows], weights[rows]
            top_k = 0 if ids is None else ids.shape[1]
            header = torch.tensor(
                [self.plane.rank, layer_id, micro_batch, x.shape[0], top_k], dtype=torch.int64
            )
            assert header.numel() == HEADER_LEN
            partial = torch.empty_like(x)  # [T_f, D]
            worker = self.plane.names[rank]
            # Post the receive first so the reply never waits for a buffer.
            recv = self.plane.irecv(partial, rank, RESULT_TAG + micro_batch)
            pending.results.append((worker, partial, recv, rows))
            sends = [(header, HEADER_TAG), (x, PAYLOAD_TAG)]
            if ids is not None and weights is not None:
                sends += [(ids.contiguous(), IDS_TAG),
                          (weights.float().contiguous(), WEIGHTS_TAG)]
            for tensor, tag in sends:
                pending.sends.append((worker, tensor, self.plane.isend(tensor, rank, tag)))
        return pending
