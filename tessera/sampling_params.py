"""Per-request sampling parameters, validated once at the edge."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tessera.structured.spec import StructuredOutputs

_GREEDY_EPS = 1e-5

MIN_SEED = -(2**63)
MAX_SEED = 2**64 - 1
"""Seeds span what a 64-bit seed can be: torch's generators take [-2**63, 2**64) and read a
negative seed as its two's complement, as the sampler's per-completion offset does."""
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_INT = 2**63 - 1
"""Counts and token ids above this cannot cross the engine's msgpack wire (int64)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completions; names and defaults follow vLLM.

    Invalid values raise ``ValueError`` naming the field, so a bad request fails before it
    reaches the scheduler.
    """

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed in [-2**63, 2**64): the same seed gives the same output whatever else is
    in the batch."""
    max_tokens: int | None = 16
    """Maximum number of generated tokens; None means up to the model's context length."""
    stop: list[str] | None = None
    """Stop strings; generation ends when one appears and it is not included in the text."""
    stop_token_ids: list[int] | None = None
    """Extra token ids that end generation (the token is kept in token_ids)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and this many top alternatives."""
    prompt_logprobs: int | None = None
    """Return, for each prompt token after the first, its log-probability and this many top
    alternatives (the prompt is then computed in full: no prefix-cache reads)."""
    n: int = 1
    """Number of completions for the prompt."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    """Added to these tokens' logits before sampling (OpenAI's: values in [-100, 100])."""
    structured: StructuredOutputs | None = None
    """A grammar every completion follows (JSON schema, regex, choice, Lark/GBNF)."""
    stop_set: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            # bool is an int: a client's `true` is a mistake, not 1.0.
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise bad(name, "must be a number")
            if not math.isfinite(value):
                raise bad(name, "must be a finite number")
        for name in ("top_k", "max_tokens", "logprobs", "prompt_logprobs", "n", "seed"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise bad(name, "must be an integer")
        if not self.temperature >= 0.0:
            raise bad("temperature", "must be non-negative")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not -1 <= self.top_k <= MAX_INT:
            raise bad("top_k", "must be -1 (disabled) or a positive integer below 2**63")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and not 1 <= self.max_tokens <= MAX_INT:
            raise bad("max_tokens", "must be at least 1 and below 2**63")
        if not 1 <= self.n <= MAX_INT:
            raise bad("n", "must be at least 1 and below 2**63")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise bad("logprobs", "must be between 0 and 20")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise bad("prompt_logprobs", "must be between 0 and 20")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise bad("repetition_penalty", "must be in (0, 2]")
        if self.stop is not None:
            if isinstance(self.stop, str):
                object.__setattr__(self, "stop", [self.stop])
            if any(not isinstance(s, str) or not s for s in self.stop or []):
                raise bad("stop", "must be non-empty strings")
        if self.stop_token_ids is not None and any(
            isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_INT
            for t in self.stop_token_ids
        ):
            raise bad("stop_token_ids", "must be non-negative integers below 2**63")
        if self.seed is not None and not MIN_SEED <= self.seed <= MAX_SEED:
            raise bad("seed", "must be in [-2**63, 2**64)")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
                raise bad("logit_bias", f"must map at most {MAX_LOGIT_BIAS_TOKENS} token ids to numbers")
            for t, v in self.logit_bias.items():
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_INT:
                    raise ValueError(f"logit_bias keys must be token ids, got {t!r}")
                if isinstance(v, bool) or not isinstance(v, int | float) or not -100 <= v <= 100:
                    raise ValueError(f"logit_bias values must be numbers in [-100, 100], got {v!r}")
        if self.structured is not None and not isinstance(self.structured, StructuredOutputs):
            raise bad("structured", "must be a StructuredOutputs")
        object.__setattr__(self, "stop_set", frozenset(self.stop_token_ids or ()))

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )
