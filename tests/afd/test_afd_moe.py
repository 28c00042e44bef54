"""MoE models disaggregated: router on the attention workers, experts split over the FFN
workers. Greedy tokens equal the single-process engine's whatever the expert partition."""

from __future__ import annotations

import pytest

from tessera import LLM, SamplingParams
from tessera.config import AFDConfig
from tests.afd.conftest import worker_pids
from tests.afd.test_afd_correctness import COMMON, _prompts

pytestmark = pytest.mark.processes

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(model_factory):
    # Qwen2-MoE: 8 experts, top-2, a gated shared expert, and a dense layer in between.
    path, _ = model_factory("qwen2-moe")
    outs = LLM(str(path), **COMMON).generate(_prompts(), GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize(
    # With a third of the LM head on the three FFN workers in the first case.
    ("num_attention", "num_ffn", "num_micro_batches", "head_share"),
    [(1, 3, 2, 0.3), (2, 2, 1, 0.0)],
)
def test_moe_tokens_match_whatever_the_partition(
    model_factory, reference, num_attention, num_ffn, num_micro_batches, head_share
):
    path, _ = model_factory("qwen2-moe")
    afd = AFDConfig(attention_workers=num_attention, ffn_workers=num_ffn,
                    micro_batches=num_micro_batches, ffn_head_share=head_share)
    llm = LLM(str(path), afd=afd, **COMMON)
    try:
        outs = llm.generate(_prompts(), GREEDY, use_tqdm=False)
    finally:
        llm.close()
    assert [o.outputs[0].token_ids for o in outs] == reference
    assert worker_pids() == []


def test_more_ffn_workers_than_experts_is_refused(model_factory):
    path, _ = model_factory("qwen2-moe")
    with pytest.raises(ValueError, match=r"ffn_workers \(9\) exceeds the number of experts \(8\)"):
        LLM(str(path), attention_workers=1, ffn_workers=9, **COMMON)
    assert worker_pids() == []
