"""An attention worker's model runner: attention units here, FFN units on the FFN workers.

The scheduled batch is split into up to M micro-batches balanced by tokens, each with its own
device inputs and attention metadata (built by ``ModelRunner.prepare``, still the one place
that builds them). Layers are pipelined across micro-batches::

    attn(l, mb0) -> send;  attn(l, mb1) -> send;  wait mb0 -> attn(l+1, mb0) -> send;  ...

so the FFN round trip of one micro-batch runs while the others do attention. Model code is
untouched: the runner walks ``model.units()`` in (attention, FFN) pairs, calls attention units
as they are and, for each FFN unit, applies only its input norm (and a MoE unit's router)
locally and sends the rest.
Every wait shares one deadline counted from the start of the step, so an idle worker is never
timed out but a stalled step always ends.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tessera.afd.remote_ffn import PendingFFN, RemoteFFN
from tessera.afd.trace import Tracer
from tessera.engine.model_runner import ModelRunner
from tessera.engine.scheduler import SchedulerOutput
from tessera.model.moe import MoEFFNUnit


def split_micro_batches(num_new_tokens: list[int], num_micro_batches: int) -> list[list[int]]:
    """Indices of the scheduled sequences per micro-batch, balanced by tokens (largest first
    onto the lightest micro-batch); each keeps the scheduler's order; no empty micro-batch."""
    groups: list[list[int]] = [[] for _ in range(min(num_micro_batches, len(num_new_tokens)))]
    loads = [0] * len(groups)
    for i in sorted(range(len(num_new_tokens)), key=lambda i: -num_new_tokens[i]):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += num_new_tokens[i]
    return [sorted(g) for g in groups if g]


def ffn_input_norm(unit: nn.Module) -> nn.Module:
    """The FFN unit's input norm, applied where the residual stream lives (here)."""
    norm = getattr(unit, "norm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"FFN unit {type(unit).__name__} has no input norm")
    return norm


class AttentionRunner(ModelRunner):
    """``ModelRunner`` whose FFN units run remotely, pipelined over micro-batches."""

    remote: RemoteFFN
    num_micro_batches: int
    transfer_timeout_s: float
    tracer: Tracer
    last_batch: dict[str, int]
    """Size of the last step's batch, for its trace span."""

    def attach(self, remote: RemoteFFN, num_micro_batches: int, transfer_timeout_s: float,
               tracer: Tracer) -> None:
        """Connect the data plane (after the engine built this runner)."""
        self.remote = remote
        self.num_micro_batches = num_micro_batches
        self.transfer_timeout_s = transfer_timeout_s
        self.tracer = tracer

    @torch.inference_mode()
    def compute_logits(self, out: SchedulerOutput) -> tuple[torch.Tensor, list[int]]:
        deadline_s = time.monotonic() + self.transfer_timeout_s
        tracer = self.tracer
        self.last_batch = {"tokens": out.num_batched_tokens, "seqs": len(out.seqs)}
        groups = split_micro_batches(out.num_new_tokens, self.num_micro_batches)
        inputs = [
            self.prepare(
                SchedulerOutput(
                    seqs=[out.seqs[i] for i in g], num_new_tokens=[out.num_new_tokens[i] for i in g]
                )
            )
            for g in groups
        ]
        hidden = [self.model.embed_tokens(inp.input_ids) for inp in inputs]  # [T_m, D] each
        pending: list[PendingFFN | None] = [None] * len(inputs)
        units = self.units
        for layer_id in range(len(units) // 2):
            attn, ffn = units[2 * layer_id], units[2 * layer_id + 1]
            for m, inp in enumerate(inputs):
                p = pending[m]
                if p is not None:
                    hidden[m] = p.wait(deadline_s, tracer)
                start = tracer.now_us()
                h = attn(hidden[m], inp.ctx)  # [T_m, D]
                normed = ffn_input_norm(ffn)(h)  # [T_m, D]
                topk_ids = topk_weights = None
                if isinstance(ffn, MoEFFNUnit):
                    topk_ids, topk_weights = ffn.route(normed)  # [T_m, k] each
                tracer.add(f"attn L{layer_id} mb{m}", "attn", start, tracer.now_us(),
                           {"layer": layer_id, "micro_batch": m, "tokens": h.shape[0]})
                pending[m] = self.remote.submit(
                    layer_id, m, h, normed, topk_ids, topk_weights,
                    all_tokens_to_first=getattr(ffn, "shared_expert", None) is not None,
                )
        logits, rows = [], []
        for m, inp in enumerate(inputs):
            p = pending[m]
            if p is not None:
                hidden[m] = p.wait(deadline_s, tracer)
            logits.append(self.model.compute_logits(hidden[m][inp.sample_rows]))
            rows += [groups[m][j] for j in inp.sample_seq_indices]
        return torch.cat(logits), rows
