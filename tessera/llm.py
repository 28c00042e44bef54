"""``LLM``: the offline entry point, shaped like vLLM's."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from tqdm import tqdm

from tessera.config import AFDConfig, EngineConfig
from tessera.engine.protocol import Engine
from tessera.engine_args import engine_config
from tessera.engine_factory import create_engine
from tessera.outputs import RequestOutput
from tessera.sampling_params import SamplingParams


class LLM:
    """Load a model once and generate for batches of prompts.

    >>> llm = LLM("path/to/hf-model", dtype="float32")
    >>> out = llm.generate(["Hello"], SamplingParams(max_tokens=8))
    """

    def __init__(self, model: str, afd: AFDConfig | None = None, **options: Any) -> None:
        """``options`` are the engine's options by field name (``EngineConfig``,
        ``SchedulerConfig``, ``CacheConfig`` and ``AFDConfig``: ``dtype``, ``device``,
        ``kv_cache_memory``, ``max_num_seqs``, ...; ``tessera.engine_args`` lists them).
        ``attention_workers`` and ``ffn_workers`` (or ``afd``) run the model disaggregated
        over worker processes; without them it runs in this process."""
        self.engine: Engine = create_engine(engine_config(model, afd, **options))
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
        self.engine.shutdown()

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
