"""Disaggregated serving gives the single-process engine's greedy tokens at every A:F ratio,
with and without micro-batching, under mixed prompt lengths, chunked prefill and an abort."""

from __future__ import annotations

import json
import random
import time

import pytest

from tessera import LLM, SamplingParams
from tessera.afd.trace import hidden_transfer_fraction
from tessera.config import AFDConfig
from tests.afd.conftest import worker_pids

pytestmark = pytest.mark.processes

COMMON = dict(
    dtype="float32",
    device="cpu",
    kv_cache_memory=1 << 22,
    num_threads=1,
    max_num_batched_tokens=24,  # the 40-token prompt is prefilled in chunks
    block_size=8,
)
LENGTHS = [3, 40, 11, 1, 17, 6]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in LENGTHS]


def _run(llm: LLM) -> tuple[dict[str, list[int]], bool]:
    """Generate for every prompt, aborting request "a" once it has its first token; returns
    the tokens of the others and whether the abort went through."""
    engine = llm.engine
    for i, prompt in enumerate(_prompts()):
        engine.add_request(str(i), prompt, GREEDY)
    engine.add_request("a", [7] * 9, SamplingParams(temperature=0.0, max_tokens=900,
                                                    ignore_eos=True))
    results: dict[str, list[int]] = {}
    aborted = False
    while engine.has_unfinished_requests():
        step = engine.step_with_deltas()
        for out in step.finished:
            assert out.outputs[0].finish_reason == "length", out.outputs[0]
            results[out.request_id] = out.outputs[0].token_ids
        if not aborted and any(d.request_id == "a" for d in step.deltas):
            aborted = engine.abort_request("a")
    return results, aborted


@pytest.fixture(scope="module")
def reference(model_factory):
    path, _ = model_factory("llama")
    results, aborted = _run(LLM(str(path), **COMMON))
    assert aborted and len(results) == len(LENGTHS)
    return results


@pytest.mark.parametrize(
    ("num_attention", "num_ffn", "num_micro_batches", "data_plane", "head_share"),
    # auto is the shared-memory plane here; torch is gloo over loopback. A head share splits
    # the LM head's vocabulary: here over the attention worker and two FFN workers, then all
    # of it on the FFN workers.
    [(1, 1, 2, "auto", 0.0), (2, 1, 1, "auto", 0.0), (1, 2, 2, "torch", 0.5),
     (3, 2, 2, "auto", 1.0)],
)
def test_greedy_tokens_match_single_process(
    model_factory, reference, tmp_path, num_attention, num_ffn, num_micro_batches, data_plane,
    head_share,
):
    path, _ = model_factory("llama")
    trace = tmp_path / "trace.json"
    afd = AFDConfig(attention_workers=num_attention, ffn_workers=num_ffn,
                    micro_batches=num_micro_batches, data_plane=data_plane,
                    ffn_head_share=head_share, trace_path=str(trace))
    llm = LLM(str(path), afd=afd, **COMMON)
    try:
        assert len(worker_pids()) == num_attention + num_ffn
        results, aborted = _run(llm)
        assert aborted
        assert results == reference
        # Stats follow the workers' reports: the abort shows once its worker handled it.
        deadline = time.monotonic() + 10
        while llm.engine.stats().num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert llm.engine.stats().num_running == 0
    finally:
        llm.close()
    assert worker_pids() == []
    # The trace has every worker's spans: attention and transfers on attention workers,
    # compute on FFN workers, for every layer.
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M"}
    assert names == {f"attn{i}" for i in range(num_attention)} | {
        f"ffn{i}" for i in range(num_ffn)}
    cats = {(e["pid"], e["cat"]) for e in events if e["ph"] == "X"}
    for rank in range(num_attention + num_ffn):
        want = ("attn", "send", "wait", "step") if rank < num_attention else ("ffn", "recv")
        assert all((rank, c) in cats for c in want), (rank, cats)
    layers = {e["args"]["layer"] for e in events if e["ph"] == "X" and e["cat"] == "ffn"}
    assert layers == {0, 1}
    # The FFN workers computed logits exactly when they hold part of the head.
    head_ranks = {e["pid"] for e in events if e["ph"] == "X" and e["cat"] == "head"}
    assert head_ranks == (set(range(num_attention, num_attention + num_ffn))
                          if head_share else set())
    hidden = hidden_transfer_fraction(events)
    assert hidden is not None and 0.0 <= hidden <= 1.0
    if num_micro_batches > 1:
        # Micro-batches are lanes that step on their own: each has steps, and a step of one
        # starts while a step of another is still running (no barrier at step ends).
        steps = [e for e in events if e["ph"] == "X" and e["cat"] == "step" and e["pid"] == 0]
        assert {e["args"]["micro_batch"] for e in steps} == set(range(num_micro_batches))
        assert any(
            a["args"]["micro_batch"] != b["args"]["micro_batch"]
            and a["ts"] < b["ts"] < a["ts"] + a["dur"]
            for a in steps for b in steps
        )


def test_structured_outputs_through_a_worker_pool(model_factory):
    """Grammar masks apply where the pool samples (the attention workers): the same
    constrained tokens as the single-process engine, and a bad grammar refused at the front."""
    from tessera import StructuredOutputs
    from tessera.structured.grammar import GrammarError

    path, _ = model_factory("llama")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 999},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    params = [SamplingParams(temperature=0.0, max_tokens=40,
                             structured=StructuredOutputs.json_schema(schema)),
              SamplingParams(temperature=1.0, seed=3, max_tokens=10,
                             structured=StructuredOutputs(choice=("yes", "no"))),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)]
    prompts = [[1, 2, 3], [4, 5], [6]]
    expected = LLM(str(path), **COMMON).generate(prompts, params, use_tqdm=False)
    llm = LLM(str(path), afd=AFDConfig(attention_workers=1, ffn_workers=1), **COMMON)
    try:
        got = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == \
            [o.outputs[0].token_ids for o in expected]
        assert set(json.loads(got[0].outputs[0].text)) == {"n", "ok"}
        assert got[1].outputs[0].text in ("yes", "no")
        with pytest.raises(GrammarError):
            llm.engine.add_request("bad", [1], SamplingParams(
                structured=StructuredOutputs(regex="(")))
    finally:
        llm.close()


def test_speculative_decoding_through_a_worker_pool():
    """Drafts are verified on the attention workers (the FFN pool sees only more rows): the
    demo model copies with the single engine's greedy tokens, and the pool's counters show
    the accepted drafts."""
    from tessera.demo_model import model_dir
    from tessera.demo_model.tasks import copy
    from tessera.demo_model.train import render

    options = dict(COMMON, speculative_method="ngram", kv_cache_memory=1 << 24)
    llm0 = LLM(str(model_dir()), **options)
    prompts = [render(copy(w))[0] for w in ("abcdefgh", "qwerty", "zyxwvu", "mnop")]
    params = SamplingParams(temperature=0.0, max_tokens=20)
    expected = [o.outputs[0].token_ids for o in llm0.generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(model_dir()), afd=AFDConfig(attention_workers=1, ffn_workers=1,
                                              micro_batches=2), **options)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        assert got == expected
        spec = llm.engine.stats().spec_decode
        assert spec is not None and spec.num_accepted_tokens_total > 0
    finally:
        llm.close()
