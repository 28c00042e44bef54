"""The engine: requests in, finished outputs out. ``step()`` is schedule, run, postprocess.

``step_with_deltas()`` also reports each step's new tokens, for streaming servers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tessera.config import EngineConfig, RuntimeInfo
from tessera.engine.block_manager import BlockManager
from tessera.engine.detokenizer import (
    IncrementalDetokenizer,
    TokenizerError,
    find_stop,
    load_tokenizer,
)
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import Scheduler, SchedulerOutput
from tessera.engine.sequence import Sequence, check_prompt_ids
from tessera.model.kernels.linear import pack_linears
from tessera.model.loader import load_model
from tessera.outputs import CompletionOutput, RequestOutput, StepOutput, TokenDelta
from tessera.platform import get_platform
from tessera.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STEP_FAILED_MESSAGE = "the engine failed while running this request (see the server log)"
"""The error of a request whose step raised; the traceback goes to the log, not the client."""

RunnerFactory = Callable[..., ModelRunner]
"""(model, device, block_size, num_blocks, sampler, kv_dtype) -> runner."""


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None] = field(default_factory=list)
    stop_texts: dict[int, str] = field(default_factory=dict)
    """Text of a completion cut at its stop string, by completion index."""

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    """A single-process engine over one model; not thread-safe (one caller drives ``step``)."""

    def __init__(
        self, config: EngineConfig, make_runner: RunnerFactory | None = None,
        expert_ids: SequenceABC[int] | None = None,
        keep_param: Callable[[str], bool] | None = None,
    ) -> None:
        """``make_runner`` builds the model runner (default ``ModelRunner``); a disaggregated
        attention worker passes one that sends FFN units to remote workers, and
        ``expert_ids=[]`` and ``keep_param`` so it loads no FFN weights (see ``load_model``)."""
        self.config = config
        self.platform = get_platform(config.device)
        self.platform.prepare_process()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.spec, self.model = load_model(
            config.model, config.dtype, self.platform.device, expert_ids=expert_ids,
            keep=keep_param,
        )
        # Before the KV pool is sized: packing moves the weights (see kernels.linear).
        pack_linears(self.model)
        self.tokenizer = load_tokenizer(config.model)

        cache = config.cache
        kv_dtype = None if cache.kv_cache_dtype == "auto" else getattr(torch, cache.kv_cache_dtype)
        bytes_per_block = ModelRunner.kv_bytes_per_block(self.model, cache.block_size, kv_dtype)
        if cache.kv_cache_memory is not None:
            kv_bytes = cache.kv_cache_memory
        else:
            frac = cache.kv_cache_memory_fraction
            if frac is None:
                frac = 0.25 if self.platform.name == "cpu" else 0.8
            kv_bytes = int(self.platform.free_memory_bytes() * frac)
        num_blocks = kv_bytes // bytes_per_block
        if num_blocks < 2:
            raise ValueError(
                f"KV cache of {kv_bytes} bytes holds fewer than 2 blocks "
                f"({bytes_per_block} bytes each); raise kv_cache_memory"
            )
        max_model_len = min(
            config.max_model_len or self.spec.max_position_embeddings,
            self.spec.max_position_embeddings,
            num_blocks * cache.block_size,
        )
        if not config.scheduler.enable_chunked_prefill:
            # A whole prompt (or a preempted sequence's tokens) must fit in one step.
            max_model_len = min(max_model_len, config.scheduler.max_num_batched_tokens)
        self.runtime = RuntimeInfo(
            num_kv_blocks=num_blocks,
            max_model_len=max_model_len,
            eos_token_ids=frozenset(self._eos_ids()),
            vocab_size=self.spec.vocab_size,
        )
        self.block_manager = BlockManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.sampler = Sampler(self.platform.device, config.seed)
        self.runner = (make_runner or ModelRunner)(
            self.model, self.platform.device, cache.block_size, num_blocks, self.sampler, kv_dtype
        )
        self.requests: dict[str, Request] = {}
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def _eos_ids(self) -> set[int]:
        ids = set(self.spec.eos_token_ids)
        gen_cfg = Path(self.config.model) / "generation_config.json"
        if gen_cfg.is_file():
            try:
                value = json.loads(gen_cfg.read_text()).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError):
                value = None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    # ----------------------------------------------------------------- requests
    def tokenize(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError(
                "this model directory has no tokenizer; pass prompts as token-id lists"
            )
        return list(self.tokenizer.encode(prompt))

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams,
        scheduler: Scheduler | None = None,
    ) -> None:
        """Queue a request (on ``scheduler``, default the engine's: an attention worker runs
        several over one KV pool); ValueError for a bad prompt or an id already in use."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        check_prompt_ids(ids, self.spec.vocab_size, self.runtime.max_model_len)
        now = time.monotonic()
        seqs = [Sequence(request_id, ids, params, index=i, arrival_s=now) for i in range(params.n)]
        detoks: list[IncrementalDetokenizer | None] = [
            IncrementalDetokenizer(self.tokenizer, ids)
            if params.stop and self.tokenizer is not None
            else None
            for _ in seqs
        ]
        self.requests[request_id] = Request(request_id, text, ids, params, seqs, detoks)
        for seq in seqs:
            (scheduler or self.scheduler).add(seq)
        self.num_prompt_tokens_total += len(ids)

    def abort_request(self, request_id: str, scheduler: Scheduler | None = None) -> bool:
        """Stop a request at once and free its KV blocks; False if it is unknown or done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            (scheduler or self.scheduler).finish(seq, "abort")
            self.sampler.release(seq)
        return True

    def warm_up(self) -> None:
        """Run one tiny request through prefill and decode, then one prefill as large as a step
        can be, before serving, so one-time costs are not paid by the first users: loading the
        decode kernel, and growing the host heap (and a device's caching allocator) to the
        activations of the largest step. On CPU the first 2048-token prefill of the ~100M Llama
        took 2.5 s against 2.0-2.2 s later, its pages faulted in one at a time (27k faults).
        Leaves no trace: counters, prefix cache and blocks are as before."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up must run before any request is added")
        s = self.scheduler
        counters = (self.num_prompt_tokens_total, self.num_generation_tokens_total,
                    s.num_prefix_queried_tokens, s.num_prefix_hit_tokens)
        # A step's worth of prompt tokens, after the tiny request (so the two share no step);
        # max_model_len already fits in the KV pool.
        num_tokens = min(self.config.scheduler.max_num_batched_tokens,
                         self.runtime.max_model_len - 1)
        for request_id, prompt, max_tokens in (("__warm_up__", [0, 0], 2),
                                               ("__warm_up_largest_step__", [0] * num_tokens, 1)):
            self.add_request(request_id, prompt, SamplingParams(
                temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            while self.has_unfinished_requests():
                self.step()
        (self.num_prompt_tokens_total, self.num_generation_tokens_total,
         s.num_prefix_queried_tokens, s.num_prefix_hit_tokens) = counters
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ----------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the requests that finished in it."""
        return self.step_with_deltas().finished

    def step_with_deltas(self) -> StepOutput:
        """Run one batch; returns the finished requests and the token each completion gained."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return StepOutput()
        try:
            tokens, logprobs = self.runner.execute(out)
        except Exception:
            return self._fail_step(out)
        self.scheduler.update(out, tokens)
        return self.postprocess(out, tokens, logprobs)

    def _fail_step(self, out: SchedulerOutput) -> StepOutput:
        """Contain a step that raised: its requests end with ``finish_reason="error"`` and
        free their blocks; every other request goes on. The step's KV writes only touched
        blocks not yet published to the prefix cache (``update`` publishes them), so freeing
        them leaves no wrong KV behind."""
        logger.exception("an engine step of %d sequences failed", len(out.seqs))
        result = StepOutput()
        for request_id in dict.fromkeys(seq.request_id for seq in out.seqs):
            req = self.requests.pop(request_id, None)
            if req is None:
                continue
            for seq in req.seqs:
                self.scheduler.finish(seq, "error")
                self.sampler.release(seq)
            output = self._make_output(req)
            for completion in output.outputs:
                if completion.finish_reason == "error":
                    completion.error = STEP_FAILED_MESSAGE
            result.finished.append(output)
        return result

    def postprocess(
        self,
        out: SchedulerOutput,
        tokens: list[int | None],
        logprobs: list[dict[int, float] | None],
        scheduler: Scheduler | None = None,
    ) -> StepOutput:
        """Append the sampled tokens, finish what stopped (on ``scheduler``, default the
        engine's, which scheduled ``out``) and say what changed."""
        result = StepOutput()
        scheduler = scheduler or self.scheduler
        max_len = self.runtime.max_model_len
        eos = self.runtime.eos_token_ids
        for seq, token, lp in zip(out.seqs, tokens, logprobs, strict=True):
            if token is None or seq.is_finished:
                continue
            self.num_generation_tokens_total += 1
            p = seq.params
            if seq.logprobs is not None and lp is not None:
                seq.logprobs.append(lp)
                seq.cumulative_logprob += lp[token]
            req = self.requests[seq.request_id]
            reason = None
            if (not p.ignore_eos and token in eos) or token in p.stop_set:
                reason = "stop"
            else:
                detok = req.detokenizers[seq.index]
                if detok is not None and p.stop:
                    delta = detok.step(seq.token_ids)
                    cut = find_stop(detok.text, len(delta), p.stop) if delta else -1
                    if cut != -1:
                        req.stop_texts[seq.index] = detok.text[:cut]
                        reason = "stop"
            if reason is None and (
                (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens)
                or seq.num_tokens >= max_len
            ):
                reason = "length"
            result.deltas.append(TokenDelta(seq.request_id, seq.index, token, lp, reason))
            if reason is not None:
                scheduler.finish(seq, reason)
                self.sampler.release(seq)
                if req.finished:
                    result.finished.append(self._make_output(req))
                    del self.requests[req.request_id]
        return result

    def _make_output(self, req: Request) -> RequestOutput:
        outputs = []
        for seq in req.seqs:
            ids = seq.output_token_ids
            text = req.stop_texts.get(seq.index)
            if text is None:
                text = (
                    self.tokenizer.decode(ids, skip_special_tokens=True)
                    if self.tokenizer is not None
                    else ""
                )
            outputs.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=ids,
                    finish_reason=seq.finish_reason,
                    logprobs=seq.logprobs,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outputs,
            finished=True,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
        )

    # ----------------------------------------------------------------- stats
    def stats(self) -> dict[str, Any]:
        s = self.scheduler
        return {
            "num_running": len(s.running),
            "num_waiting": len(s.waiting),
            "kv_cache_usage": self.block_manager.usage,
            "num_preemptions": s.num_preemptions,
            "prefix_queried_tokens": s.num_prefix_queried_tokens,
            "prefix_hit_tokens": s.num_prefix_hit_tokens,
        }
