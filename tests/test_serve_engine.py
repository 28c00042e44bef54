"""The engine's per-step token deltas, which the server streams, match its final outputs."""

from __future__ import annotations

import dataclasses

from tessera import LLM, SamplingParams
from tessera.serve.protocol import SamplingOptions


def test_step_deltas_add_up_to_outputs(device, model_factory):
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              max_num_batched_tokens=16)  # fmt: skip
    engine = llm.engine
    params = [
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, seed=3, max_tokens=5, n=2, ignore_eos=True),
    ]
    engine.add_request("a", list(range(40)), params[0])  # chunked prefill over steps
    engine.add_request("b", [5, 6, 7], params[1])
    tokens: dict[tuple[str, int], list[int]] = {}
    lps: dict[tuple[str, int], list] = {}
    reasons: dict[tuple[str, int], str | None] = {}
    finished = {}
    while engine.has_unfinished_requests():
        step = engine.step_with_deltas()
        for d in step.deltas:
            key = (d.request_id, d.index)
            assert reasons.get(key) is None  # nothing after a finish
            tokens.setdefault(key, []).append(d.token_id)
            lps.setdefault(key, []).append(d.logprobs)
            reasons[key] = d.finish_reason
        finished.update({o.request_id: o for o in step.finished})
    for request_id, out in finished.items():
        for c in out.outputs:
            key = (request_id, c.index)
            assert tokens[key] == c.token_ids and reasons[key] == c.finish_reason == "length"
            assert lps[key] == (c.logprobs or [None] * len(c.token_ids))
    assert set(finished) == {"a", "b"} and len(finished["b"].outputs) == 2


def test_sampling_options_round_trip():
    p = SamplingParams(temperature=0.5, top_k=3, min_p=0.1, seed=4, max_tokens=9, n=2,
                       stop=["x"], stop_token_ids=[1], logprobs=1, repetition_penalty=1.1)  # fmt: skip
    back = SamplingOptions.from_params(p).to_params()
    # Stop strings stay in the API process; everything else crosses unchanged.
    assert back.stop is None
    assert back == dataclasses.replace(p, stop=None)


def test_sampling_options_carry_every_param_but_stop_strings():
    # A new SamplingParams field must cross to the core (or be listed here on purpose).
    params_fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
    assert set(SamplingOptions.__struct_fields__) == params_fields - {"stop"}
