"""Faults inside the engine stay with the requests they touch.

A step that raises ends its own requests with ``finish_reason="error"``; the engine keeps
serving the rest with exact tokens, frees every block and leaves no wrong KV in the prefix
cache. The engine core's loop has a net under that. Seeds at both ends of their range work
for every completion of a request.
"""

from __future__ import annotations

import logging

import pytest
import zmq

from tessera import LLM, SamplingParams
from tessera.engine.llm_engine import LLMEngine
from tessera.engine.requests import STEP_FAILED_MESSAGE
from tessera.messages.common import AddRequest
from tessera.messages.core import CoreConfig, RequestFailed
from tessera.sampling_params import MAX_SEED, MIN_SEED
from tessera.serve.engine_core import EngineCore
from tests.models import reference_gaps

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _engine(model_factory, **kwargs) -> tuple[LLMEngine, object]:
    path, hf = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20, **kwargs)
    return llm.engine, hf


def _run(engine: LLMEngine) -> dict:
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({o.request_id: o for o in engine.step()})
    return outputs


def test_a_failing_step_ends_its_requests_and_the_engine_goes_on(model_factory, caplog):
    engine, hf = _engine(model_factory, max_num_seqs=1)
    prompt = list(range(3, 40))  # two full blocks: they would enter the prefix cache
    engine.add_request("victim", prompt, GREEDY)
    engine.add_request("bystander", [7, 8, 9], GREEDY)  # waits: one sequence runs at a time
    engine.step()  # the victim's prefill
    real_execute = engine.runner.execute
    calls = {"n": 0}

    def execute_once_broken(out):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault in /secret/path")
        return real_execute(out)

    engine.runner.execute = execute_once_broken  # type: ignore[method-assign]
    with caplog.at_level(logging.ERROR):
        step = engine.step_with_deltas()
    assert [o.request_id for o in step.finished] == ["victim"] and not step.deltas
    victim = step.finished[0].outputs[0]
    assert victim.finish_reason == "error" and victim.error == STEP_FAILED_MESSAGE
    assert len(victim.token_ids) == 1  # the token of its prefill step, kept
    # Logged once, with the traceback.
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(records) == 1 and records[0].exc_info is not None
    # The bystander runs on, exactly.
    done = _run(engine)
    assert list(done) == ["bystander"]
    assert max(reference_gaps(hf, [7, 8, 9], done["bystander"].outputs[0].token_ids)) <= 1e-4
    assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks
    # The victim's prompt again: whatever the prefix cache gives it is correct KV.
    engine.add_request("again", prompt, GREEDY)
    again = _run(engine)["again"].outputs[0].token_ids
    assert max(reference_gaps(hf, prompt, again)) <= 1e-4


def test_extreme_seeds_sample_every_completion(model_factory):
    engine, _ = _engine(model_factory)
    for i, seed in enumerate((MAX_SEED, MIN_SEED, -1, 0)):
        params = SamplingParams(temperature=1.0, seed=seed, n=3, max_tokens=4, ignore_eos=True)
        engine.add_request(f"s{i}", [5, 6, 7], params)
    outs = _run(engine)
    assert all(len(c.token_ids) == 4 for o in outs.values() for c in o.outputs)
    assert all(c.finish_reason == "length" for o in outs.values() for c in o.outputs)
    # -1 is 2**64 - 1 to the generator, as torch reads it: the same stream.
    assert [c.token_ids for c in outs["s0"].outputs] == [c.token_ids for c in outs["s2"].outputs]
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=MAX_SEED + 1)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams(seed=MIN_SEED - 1)


@pytest.mark.parametrize("field,value", [
    ("temperature", float("inf")), ("top_p", float("nan")), ("presence_penalty", float("-inf")),
    ("max_tokens", 2**63), ("top_k", 2**64), ("n", 2**63), ("stop_token_ids", [2**63]),
    ("temperature", True), ("max_tokens", 1.5),
])  # fmt: skip
def test_sampling_params_refuse_what_the_engine_cannot_represent(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_engine_core_fails_every_request_when_a_step_raises_past_the_engine(
    model_factory, tmp_path
):
    engine, hf = _engine(model_factory)
    ctx = zmq.Context()
    config = CoreConfig(
        engine.config, f"ipc://{tmp_path / 'in'}", f"ipc://{tmp_path / 'out'}", parent_pid=0
    )
    core = EngineCore(config, engine, ctx)
    try:
        failed: list[RequestFailed] = []
        options = GREEDY
        for request_id in ("a", "b"):
            core._handle(AddRequest(request_id, [5, 6, 7], options), failed)
        real_step = engine.step_with_deltas

        def broken_step():
            raise RuntimeError("a bug past the engine's own net")

        engine.step_with_deltas = broken_step  # type: ignore[method-assign]
        deltas = core._step(failed)
        assert deltas == [] and sorted(f.request_id for f in failed) == ["a", "b"]
        assert {f.status_code for f in failed} == {500}
        assert all("secret" not in f.message and "bug" not in f.message for f in failed)
        assert not engine.has_unfinished_requests() and not core.request_ids
        assert engine.block_manager.num_free_blocks == engine.runtime.num_kv_blocks
        # The core serves the next request.
        engine.step_with_deltas = real_step  # type: ignore[method-assign]
        core._handle(AddRequest("c", [5, 6, 7], options), failed)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            tokens += [d.token_id for d in core._step(failed)]
        assert max(reference_gaps(hf, [5, 6, 7], tokens)) <= 1e-4 and not core.request_ids
    finally:
        ctx.destroy(linger=0)
