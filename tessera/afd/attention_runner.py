"""An attention worker's model runner: attention units here, FFN units on the FFN workers.

One step of one lane (see ``tessera.afd.lanes``) is a generator: it builds the device inputs
(``ModelRunner.prepare``, still the one place that builds them), embeds, and per layer runs
the attention unit, applies the FFN unit's input norm (and a MoE unit's router) locally,
sends the rest to the FFN workers and yields; resumed, it waits for that FFN result and goes
on. The lane driver resumes the M lanes in turn (passing over those still waiting), so the
FFN round trip of one lane runs while another does attention, and the LM head, sampling and
scheduling of one lane run while another's layers are on the FFN workers. With part of the
LM head on the FFN workers (``AFDConfig.ffn_head_share``) the final-normed rows to sample go
there first, this worker computes its own vocabulary rows meanwhile, and the lane yields once
more for the rest::

    lane0: attn L0 -> send | lane1: attn L5 -> send | lane0: wait, attn L1 -> send | ...

Model code is untouched: the runner walks ``model.units()`` in (attention, FFN) pairs.
Every wait shares one deadline counted from the start of the step, so an idle worker is never
timed out but a stalled step always ends.
"""

from __future__ import annotations

import time
from collections.abc import Generator

import torch
from torch import nn

from tessera.afd.remote_ffn import PendingFFN, PendingHead, RemoteFFN
from tessera.afd.trace import Tracer
from tessera.engine.model_runner import ModelRunner, SampledTokens
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import SchedulerOutput
from tessera.model.dense import DecoderModel
from tessera.model.moe import MoEFFNUnit

# What a suspended lane step waits for; the lane driver resumes first the lanes whose
# transfers are in.
Pending = PendingFFN | PendingHead


def ffn_input_norm(unit: nn.Module) -> nn.Module:
    """The FFN unit's input norm, applied where the residual stream lives (here)."""
    norm = getattr(unit, "norm", None)
    if not isinstance(norm, nn.Module):
        raise TypeError(f"FFN unit {type(unit).__name__} has no input norm")
    return norm


class AttentionRunner(ModelRunner):
    """``ModelRunner`` whose FFN units run remotely, pipelined over micro-batches."""

    def __init__(self, model: DecoderModel, device: torch.device, block_size: int,
                 num_blocks: int, sampler: Sampler, kv_dtype: torch.dtype | None, *,
                 remote: RemoteFFN, tracer: Tracer, transfer_timeout_s: float,
                 local_head: nn.Module | None = None) -> None:
        """``remote`` reaches the FFN workers; ``local_head`` is this worker's vocabulary
        rows of a split LM head (None: the model's whole head). ``transfer_timeout_s``
        bounds one step's waits and may be changed between steps (warm-up meets FFN
        workers still loading and gets the start-up deadline)."""
        super().__init__(model, device, block_size, num_blocks, sampler, kv_dtype)
        self.remote = remote
        self.tracer = tracer
        self.transfer_timeout_s = transfer_timeout_s
        self.local_head = local_head

    def lane_step(self, out: SchedulerOutput,
                  lane: int) -> Generator[Pending, None, SampledTokens]:
        """One step of ``lane`` over ``out``, yielding what it sent after each FFN submit;
        returns the sampled token and logprobs entry per scheduled sequence (as ``execute``).

        The caller runs it under ``torch.inference_mode()``: a mode entered here would leak
        into the other lanes while this one is suspended."""
        deadline_s = time.monotonic() + self.transfer_timeout_s
        tracer = self.tracer
        inp = self.prepare(out)
        hidden = self.model.embed_tokens(inp.input_ids)  # [T, D]
        units = self.units
        for layer_id in range(len(units) // 2):
            attn, ffn = units[2 * layer_id], units[2 * layer_id + 1]
            start = tracer.now_us()
            h = attn(hidden, inp.ctx)  # [T, D]
            normed = ffn_input_norm(ffn)(h)  # [T, D]
            topk_ids = topk_weights = None
            if isinstance(ffn, MoEFFNUnit):
                topk_ids, topk_weights = ffn.route(normed)  # [T, k] each
            tracer.add(f"attn L{layer_id} mb{lane}", "attn", start, tracer.now_us(),
                       {"layer": layer_id, "micro_batch": lane, "tokens": h.shape[0]})
            pending = self.remote.submit(
                layer_id, lane, h, normed, topk_ids, topk_weights,
                all_tokens_to_first=getattr(ffn, "shared_expert", None) is not None,
            )
            yield pending
            hidden = pending.wait(deadline_s, tracer)  # [T, D]
        rows = hidden[inp.sample_rows]  # [S, D]
        if self.local_head is None:
            logits = self.model.compute_logits(rows)  # [S, V]
        elif rows.shape[0] == 0:  # mid-prompt chunks only: nothing to sample
            logits = rows.new_empty(0, self.model.spec.vocab_size).float()
        else:
            # compute_logits split by vocabulary: the final norm here, the remote slices
            # started first, this worker's slice meanwhile, then the same float cast.
            normed = self.model.norm(rows)  # [S, D]
            head = self.remote.submit_head(len(units) // 2, lane, normed)
            start = tracer.now_us()
            local = self.local_head(normed)  # [S, V_0]
            tracer.add(f"head mb{lane}", "attn", start, tracer.now_us(), {"micro_batch": lane})
            yield head
            logits = torch.cat([local, *head.wait(deadline_s, tracer)], dim=1).float()
        return self.sample(out, logits, inp.sample_seq_indices, inp.row_drafts)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> SampledTokens:
        """A whole step on its own (warm-up): one lane, nothing to interleave with."""
        step = self.lane_step(out, 0)
        while True:
            try:
                next(step)
            except StopIteration as done:
                return done.value
