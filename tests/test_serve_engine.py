"""The engine's per-step token deltas, which the server streams, match its final outputs."""

from __future__ import annotations

import msgspec
import pytest

from tessera import LLM, SamplingParams
from tessera.messages.common import AddRequest
from tessera.messages.core import CoreInput


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


def test_sampling_params_cross_the_core_wire_whole():
    # SamplingParams travels as itself: every field survives the msgpack round trip, and the
    # derived stop set is rebuilt (validation runs again on the receiving side).
    p = SamplingParams(temperature=0.5, top_k=3, min_p=0.1, seed=2**64 - 1, max_tokens=9, n=2,
                       stop=["x"], stop_token_ids=[1], logprobs=1, repetition_penalty=1.1)  # fmt: skip
    wire = msgspec.msgpack.encode(AddRequest("r", [1, 2], p))
    back = msgspec.msgpack.decode(wire, type=CoreInput)
    assert isinstance(back, AddRequest) and back.params == p and back.params.stop_set == {1}
    bad = wire.replace(msgspec.msgpack.encode(0.5), msgspec.msgpack.encode(-0.5), 1)
    with pytest.raises(msgspec.ValidationError, match="temperature"):
        msgspec.msgpack.decode(bad, type=CoreInput)
