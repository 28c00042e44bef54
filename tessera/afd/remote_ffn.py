"""The attention worker's side of the FFN protocol: issue a layer's FFN, collect it later.

``submit`` sends the header and the normed hidden state to every FFN worker that must see it
and posts the receives for their partials at once, so the transfer and the remote compute run
while the caller does other work (attention of the next micro-batch); ``PendingFFN.wait``
sums the partials into the residual stream. Dense layers go to all F shards; a MoE layer would
send each token only to the workers owning its experts (with its expert ids and routing
weights) and scatter-add the weighted partials back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tessera.afd.dataplane import HEADER_LEN, HEADER_TAG, PAYLOAD_TAG, RESULT_TAG, DataPlane, wait
from tessera.afd.trace import Tracer


@dataclass
class PendingFFN:
    """One micro-batch's FFN of one layer, in flight."""

    residual: torch.Tensor  # [T, D]
    results: list[tuple[str, torch.Tensor, dist.Work]]  # (FFN worker, partial [T, D], receive)
    sends: list[tuple[torch.Tensor, dist.Work]] = field(default_factory=list)
    layer_id: int = 0
    micro_batch: int = 0
    start_us: int = 0

    def wait(self, deadline_s: float, tracer: Tracer) -> torch.Tensor:
        """The residual stream after this FFN: residual + sum of the partials. [T, D]"""
        wait_start = tracer.now_us()
        out = self.residual
        for worker, partial, work in self.results:
            wait(work, deadline_s, f"FFN result of layer {self.layer_id} from {worker}")
            out = out + partial
        for _, work in self.sends:
            wait(work, deadline_s, f"FFN request of layer {self.layer_id}")
        end = tracer.now_us()
        args = {"layer": self.layer_id, "micro_batch": self.micro_batch}
        tracer.add(f"ffn L{self.layer_id} mb{self.micro_batch}", "send", self.start_us, end, args)
        tracer.add(f"wait L{self.layer_id} mb{self.micro_batch}", "wait", wait_start, end, args)
        return out


class RemoteFFN:
    """Sends FFN requests from this attention rank to the FFN ranks."""

    def __init__(self, plane: DataPlane, ffn_ranks: list[int], tracer: Tracer) -> None:
        self.plane = plane
        self.ffn_ranks = ffn_ranks
        self.tracer = tracer

    def submit(
        self, layer_id: int, micro_batch: int, residual: torch.Tensor, normed: torch.Tensor
    ) -> PendingFFN:
        """Start a dense FFN: every FFN rank gets all tokens and returns its partial."""
        start = self.tracer.now_us()
        num_tokens = normed.shape[0]
        normed = normed.contiguous()
        header = torch.tensor(
            [self.plane.rank, layer_id, micro_batch, num_tokens, 0], dtype=torch.int64
        )
        assert header.numel() == HEADER_LEN
        pending = PendingFFN(residual, [], [], layer_id, micro_batch, start)
        for rank in self.ffn_ranks:
            partial = torch.empty_like(normed)  # [T, D]
            # Post the receive first so the reply never waits for a buffer.
            recv = self.plane.irecv(partial, rank, RESULT_TAG + micro_batch)
            pending.results.append((f"ffn{rank - self.ffn_ranks[0]}", partial, recv))
            pending.sends.append((header, self.plane.isend(header, rank, HEADER_TAG)))
            pending.sends.append((normed, self.plane.isend(normed, rank, PAYLOAD_TAG)))
        return pending

