"""What a front over other processes (the Transformerless pool, a cluster) checks before it
sends a request on: what the engine receiving it would refuse, refused here with a ValueError
the caller sees at once, rather than as a failure coming back from another process."""

from __future__ import annotations

from tessera.engine.sequence import check_logit_bias, check_prompt_ids
from tessera.sampling_params import SamplingParams
from tessera.structured.grammar import check_grammar


def check_request(ids: list[int], params: SamplingParams, vocab_size: int,
                  max_model_len: int) -> None:
    """ValueError (GrammarError for a grammar) for a prompt or params the engine refuses."""
    check_prompt_ids(ids, vocab_size, max_model_len)
    if params.structured is not None:
        check_grammar(params.structured, None)
    check_logit_bias(params.logit_bias, vocab_size)
