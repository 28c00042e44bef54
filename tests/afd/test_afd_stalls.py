"""A worker whose main loop is stuck while its heartbeat thread goes on beating is found by its
progress standing still: detected within the bound (well before any transfer deadline), the
in-flight requests end with an error naming it, the pool restarts and serves correctly."""

from __future__ import annotations

import time

import pytest

from tessera import LLM, SamplingParams
from tessera.afd.progress import STALL_ENV
from tessera.config import AFDConfig
from tests.afd.conftest import worker_pids

pytestmark = [pytest.mark.processes, pytest.mark.slow]

COMMON = dict(dtype="float32", device="cpu", kv_cache_memory=1 << 22, num_threads=1)
DETECT_S = 2.0
GREEDY = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
# The stalled worker blocks in this tick of its main loop: past the FFN worker's warm-up
# (6 ticks on the test model) and a few decode steps into the long requests.
STALL_TICK = 30


@pytest.mark.parametrize("victim", ["ffn0", "attn0"])
def test_a_stalled_main_loop_is_detected_and_the_pool_recovers(model_factory, monkeypatch,
                                                               victim):
    path, _ = model_factory("llama")
    reference = LLM(str(path), **COMMON).generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    monkeypatch.setenv(STALL_ENV, f"{victim}.g0:{STALL_TICK}")  # the first generation only
    # A transfer deadline far beyond the test: only the stall detection can end the requests.
    afd = AFDConfig(attention_workers=1, ffn_workers=1, heartbeat_interval_s=0.2,
                    failure_detect_s=DETECT_S, transfer_timeout_s=600.0)
    llm = LLM(str(path), afd=afd, **COMMON)
    engine = llm.engine
    try:
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        engine.add_request("x", [5] * 4, long)
        engine.add_request("y", [9] * 20, long)
        finished = []
        last_token_s = time.monotonic()
        while engine.has_unfinished_requests():
            step = engine.step_with_deltas()
            if step.deltas:
                last_token_s = time.monotonic()
            finished += step.finished
        # From its last token (the stall came right after) to the failure: within the bound
        # plus slack for polling and a loaded machine.
        assert time.monotonic() - last_token_s < DETECT_S + 3.0
        assert {o.request_id for o in finished} == {"x", "y"}
        for out in finished:
            comp = out.outputs[0]
            assert comp.finish_reason == "error", comp
            assert f"worker {victim} made no progress" in (comp.error or ""), comp.error
            assert 0 < len(comp.token_ids) < 400
        assert engine.num_recoveries == 1
        again = llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
        assert again[0].outputs[0].token_ids == reference[0].outputs[0].token_ids
        assert engine.stats().kv_cache_usage == 0.0
    finally:
        llm.close()
    assert worker_pids() == []
