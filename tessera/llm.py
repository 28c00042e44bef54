"""``LLM``: the offline entry point, shaped like vLLM's."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm import tqdm

from tessera.afd.config import AFDConfig
from tessera.config import CacheConfig, EngineConfig, SchedulerConfig
from tessera.engine.factory import create_engine
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams


class LLM:
    """Load a model once and generate for batches of prompts.

    >>> llm = LLM("path/to/hf-model", dtype="float32")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    """

    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        kv_cache_memory: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        enable_chunked_prefill: bool = True,
        max_model_len: int | None = None,
        num_threads: int | None = None,
        kv_cache_memory_fraction: float | None = None,
        kv_cache_dtype: str = "auto",
        attention_workers: int = 0,
        ffn_workers: int = 0,
        micro_batches: int = 2,
        trace_path: str | None = None,
        ray_address: str | None = None,
        afd: AFDConfig | None = None,
    ) -> None:
        """``attention_workers`` and ``ffn_workers`` (both at least 1) run the model
        disaggregated over worker processes (see ``AFDConfig``; ``afd`` gives every option);
        0 and 0 run it in this process. ``ray_address`` places the workers on a Ray cluster
        (``AFDConfig.ray_address``)."""
        if ray_address is not None and afd is None and not (attention_workers or ffn_workers):
            raise ValueError("ray_address needs attention_workers and ffn_workers")
        if afd is None and (attention_workers or ffn_workers):
            afd = AFDConfig(
                attention_workers=attention_workers,
                ffn_workers=ffn_workers,
                micro_batches=micro_batches,
                trace_path=trace_path,
                ray_address=ray_address,
            )
        config = EngineConfig(
            model=model,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            seed=seed,
            num_threads=num_threads,
            scheduler=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                enable_chunked_prefill=enable_chunked_prefill,
            ),
            cache=CacheConfig(
                block_size=block_size,
                kv_cache_memory=kv_cache_memory,
                kv_cache_memory_fraction=kv_cache_memory_fraction,
                enable_prefix_caching=enable_prefix_caching,
                kv_cache_dtype=kv_cache_dtype,
            ),
            afd=afd,
        )
        self.engine = create_engine(config)
        self._next_id = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An ``LLM`` over an engine built from a ready ``EngineConfig`` (used by the CLI)."""
        llm = cls.__new__(cls)
        llm.engine = create_engine(config)
        llm._next_id = 0
        return llm

    def close(self) -> None:
        """Stop worker processes (disaggregated mode); a no-op in single-process mode."""
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | SequenceABC[str] | SequenceABC[SequenceABC[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns one ``RequestOutput`` per prompt, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompt_list: list[Any] = list(prompts)
        for prompt in prompt_list:
            if not isinstance(prompt, str) and not (
                isinstance(prompt, SequenceABC) and all(isinstance(t, int) for t in prompt)
            ):
                raise ValueError("prompts must be a list of strings or a list of token-id lists")
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"got {len(params_list)} sampling params for {len(prompt_list)} prompts"
                )
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, params in zip(prompt_list, params_list, strict=True):
                request_id = str(self._next_id)
                self._next_id += 1
                engine.add_request(
                    request_id, prompt if isinstance(prompt, str) else list(prompt), params
                )
                ids.append(request_id)
            results: dict[str, RequestOutput] = {}
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
                while engine.has_unfinished_requests():
                    for output in engine.step():
                        results[output.request_id] = output
                        bar.update(1)
        except BaseException:
            # Leave the engine clean (no queued requests, no held blocks) for the next call.
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        return [results[i] for i in ids]
