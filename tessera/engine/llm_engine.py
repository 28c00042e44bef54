"""The engine: requests in, finished outputs out. ``step()`` is schedule, run, postprocess.

``step_with_deltas()`` also reports each step's new tokens, for streaming servers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from pathlib import Path

import torch

from tessera.config import EngineConfig, RuntimeInfo, SchedulerConfig
from tessera.engine.block_manager import BlockManager
from tessera.engine.detokenizer import encode_prompt, load_tokenizer
from tessera.engine.grammar_waitlist import GrammarWaitlist
from tessera.engine.model_runner import ModelRunner
from tessera.engine.ngram_drafter import NgramDrafter
from tessera.engine.protocol import StepObserver
from tessera.engine.requests import RequestTable
from tessera.engine.sampler import Sampler
from tessera.engine.scheduler import Scheduler
from tessera.kv.events import KVEvents
from tessera.kv.fingerprint import layout_fingerprint
from tessera.kv.tiered import TieredKVConnector
from tessera.model.dense import DecoderModel
from tessera.model.kernels.linear import pack_linears
from tessera.model.kernels.quant_linear import quantize_linears
from tessera.model.loader import load_model
from tessera.outputs import EngineStats, RequestOutput, StepOutput
from tessera.platform import get_platform
from tessera.sampling_params import SamplingParams
from tessera.structured.compiler import GrammarCompiler
from tessera.structured.matchers import GrammarMatchers

logger = logging.getLogger(__name__)

RunnerFactory = Callable[..., ModelRunner]
"""(model, device, block_size, num_blocks, sampler, kv_dtype) -> runner."""



class LLMEngine:
    """A single-process engine over one model (implements ``tessera.engine.protocol.Engine``).

    Built from four parts, each public so a pool of schedulers over one KV pool (an
    attention worker's lanes) can compose them: ``requests`` (admission and
    post-processing), ``block_manager`` (the KV pool), ``scheduler`` and ``runner``.
    """

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
        # Before the KV pool is sized: quantizing and packing move the weights (see
        # kernels.quant_linear and kernels.linear).
        if config.quantization is not None:
            quantize_linears(self.model, config.quantization)
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
        self.grammars = (GrammarCompiler(self.tokenizer, self.spec.vocab_size)
                         if self.tokenizer is not None else None)
        self.sampler = Sampler(self.platform.device, config.seed,
                               GrammarMatchers(self.grammars) if self.grammars else None)
        self._grammar_waitlist = GrammarWaitlist(self.grammars) if self.grammars else None
        self.runner = (make_runner or ModelRunner)(
            self.model, self.platform.device, cache.block_size, num_blocks, self.sampler, kv_dtype
        )
        self.kv_connector = make_kv_connector(config, self.model, self.runner.kv_caches)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.kv_connector,
                                   make_drafter(config.scheduler, max_model_len))
        self.requests = RequestTable(self.runtime, self.sampler, self.tokenizer)
        self._observers: list[StepObserver] = []

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
        return encode_prompt(self.tokenizer, prompt)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_text: str | None = None) -> None:
        """Queue a request; ValueError for a bad prompt or an id already in use."""
        # Before tokenizing: the cheap check first.
        waitlist = self._grammar_waitlist
        if request_id in self.requests or (waitlist is not None and request_id in waitlist):
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, ids = prompt, self.tokenize(prompt)
        else:
            ids = list(prompt)
        if params.structured is not None and waitlist is not None:
            self.requests.check(ids, params)
            # GrammarError (a ValueError) names why a grammar cannot compile.
            if waitlist.hold(request_id, ids, params, prompt_text):
                return
        self.requests.add(request_id, ids, params, self.scheduler, prompt_text)

    def abort_request(self, request_id: str) -> bool:
        """Stop a request at once and free its KV blocks; False if it is unknown or done."""
        if self._grammar_waitlist is not None and self._grammar_waitlist.abort(request_id):
            return True
        return self.requests.abort(request_id, self.scheduler)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Admit the held-back requests whose grammars are compiled; returns the outputs of
        those whose grammar failed to compile (each ends with an error)."""
        assert self._grammar_waitlist is not None
        ready, failed = self._grammar_waitlist.take_ready(idle=not self.scheduler.has_unfinished())
        for held in ready:
            self.requests.add(held.request_id, held.prompt_token_ids, held.params,
                              self.scheduler, held.prompt)
        return failed

    @property
    def native_decode_rows(self) -> int:
        """Most sequences a decode-only step runs as one native call (0: none; see
        ``tessera.engine.decode_stack``). Known once a step has built the stack."""
        stack = self.runner.decode_stack
        return 0 if stack is None else stack.max_rows

    def add_step_observer(self, observer: StepObserver) -> None:
        """Call ``observer`` with every non-empty batch, after scheduling, before running."""
        self._observers.append(observer)

    def remove_step_observer(self, observer: StepObserver) -> None:
        self._observers.remove(observer)

    def warm_up(self) -> None:
        """Run one tiny request through prefill and decode, then one prefill as large as a step
        can be, before serving, so one-time costs are not paid by the first users: loading the
        decode kernel, and growing the host heap (and a device's caching allocator) to the
        activations of the largest step (whose pages would otherwise fault in one at a time
        during a user's request). Leaves no trace: counters, prefix cache and blocks are as before."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up must run before any request is added")
        s, r = self.scheduler, self.requests
        counters = (r.num_prompt_tokens_total, r.num_generation_tokens_total,
                    s.num_prefix_queried_tokens, s.num_prefix_hit_tokens)
        # A step's worth of prompt tokens, after the tiny request (so the two share no step);
        # max_model_len already fits in the KV pool.
        num_tokens = min(self.config.scheduler.max_num_batched_tokens,
                         self.runtime.max_model_len - 1)
        s.connector = None  # the warm-up's blocks stay out of the KV tiers
        try:
            for request_id, prompt, max_tokens in (
                    ("__warm_up__", [0, 0], 2),
                    ("__warm_up_largest_step__", [0] * num_tokens, 1)):
                self.add_request(request_id, prompt, SamplingParams(
                    temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
                while self.has_unfinished_requests():
                    self.step()
        finally:
            s.connector = self.kv_connector
        (r.num_prompt_tokens_total, r.num_generation_tokens_total,
         s.num_prefix_queried_tokens, s.num_prefix_hit_tokens) = counters
        self.block_manager.reset_prefix_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._grammar_waitlist)

    # ----------------------------------------------------------------- one step
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the requests that finished in it."""
        return self.step_with_deltas().finished

    def step_with_deltas(self) -> StepOutput:
        """Run one batch; returns the finished requests and the token each completion gained."""
        if self._grammar_waitlist:
            failed = self._admit_compiled()
            if failed:
                return StepOutput(finished=failed)
        out = self.scheduler.schedule()
        if out.is_empty:
            return StepOutput()
        for observer in self._observers:
            observer(out)
        connector = self.kv_connector
        if out.loads and connector is not None:
            loaded = connector.load(out.loads)
            if loaded.failed(out.loads):
                out = self.scheduler.drop_failed_loads(out, loaded)
                if out.is_empty:
                    return StepOutput()
        try:
            sampled = self.runner.execute(out)
        except Exception:
            return self.requests.fail(out, self.scheduler)
        self.scheduler.update(out, sampled.tokens, sampled.num_accepted)
        if out.saves and connector is not None:
            connector.save(out.saves)  # before postprocess frees finished sequences' blocks
        return self.requests.postprocess(out, sampled.tokens, sampled.logprobs, self.scheduler,
                                         sampled.prompt_logprobs, sampled.num_accepted)

    # ----------------------------------------------------------------- stats
    def stats(self) -> EngineStats:
        s, bm = self.scheduler, self.block_manager
        return EngineStats(
            num_running=len(s.running),
            num_waiting=len(s.waiting) + len(self._grammar_waitlist or ()),
            num_free_blocks=bm.num_free_blocks,
            kv_cache_usage=bm.usage,
            num_preemptions_total=s.num_preemptions,
            num_prompt_tokens_total=self.requests.num_prompt_tokens_total,
            num_generation_tokens_total=self.requests.num_generation_tokens_total,
            num_prefix_queried_tokens_total=s.num_prefix_queried_tokens,
            num_prefix_hit_tokens_total=s.num_prefix_hit_tokens,
            kv_tiers=() if self.kv_connector is None else self.kv_connector.stats(),
            spec_decode=None if s.drafter is None else s.drafter.stats.snapshot(),
        )

    def take_kv_events(self) -> KVEvents:
        return self.block_manager.take_kv_events()

    def shutdown(self) -> None:
        """Finish the KV tiers' queued writes; safe to call twice."""
        if self.grammars is not None:
            self.grammars.close()
        if self.kv_connector is not None:
            self.kv_connector.close()


def make_drafter(config: SchedulerConfig, max_model_len: int) -> NgramDrafter | None:
    """The drafter ``config.speculative_method`` asks for, if any."""
    if config.speculative_method is None:
        return None
    return NgramDrafter(config, max_model_len)


def make_kv_connector(config: EngineConfig, model: DecoderModel,
                      kv_caches: list[torch.Tensor | None]) -> TieredKVConnector | None:
    """The connector to the KV tiers ``config.cache`` asks for, over ``kv_caches``."""
    cache = config.cache
    if not cache.offloads_kv:
        return None
    caches = [c for c in kv_caches if c is not None]
    assert len(caches) == len(kv_caches), "KV tiers need every layer's cache in this process"
    one, two = model.kv_cache_shape(1, cache.block_size), model.kv_cache_shape(2, cache.block_size)
    block_axis = next(i for i, (a, b) in enumerate(zip(one, two, strict=True)) if a != b)
    block_shape = tuple(n for i, n in enumerate(one) if i != block_axis)
    fingerprint = layout_fingerprint(config.model, str(caches[0].dtype), block_shape,
                                     len(caches))
    return TieredKVConnector(
        caches, block_axis, cache.block_size, fingerprint, host_bytes=cache.kv_offload_memory,
        disk_dir=cache.kv_offload_dir, disk_bytes=cache.kv_offload_disk,
        host_store=cache.kv_host_store, remote_store=cache.kv_store)
