"""The native decode paths (one call per unit, one call per step) run the units' own ops: their
outputs are bit-identical to the Python unit bodies, and they only take the steps they cover."""

from __future__ import annotations

import random

import pytest
import torch

import tessera.model.dense as dense
import tessera.model.kernels.build as kb
import tessera.model.kernels.linear as kl
from tessera import LLM, SamplingParams
from tessera.engine.decode_stack import MAX_ROWS, DenseDecodeStack

pytestmark = pytest.mark.skipif(
    kb.kernels_disabled() or not kb.kernel_available(), reason="native kernels unavailable"
)

PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


def _generate(path, prompts, params=PARAMS):
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


def _count_stack_calls(monkeypatch) -> list[int]:
    calls = [0]
    original = DenseDecodeStack.__call__

    def counting(self, hidden, ctx):
        calls[0] += 1
        return original(self, hidden, ctx)

    monkeypatch.setattr(DenseDecodeStack, "__call__", counting)
    return calls


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral-sliding"])
def test_native_decode_is_bit_identical_to_python_units(model_factory, monkeypatch, arch):
    path, _ = model_factory(arch)
    # Batches of 1 and 3 sequences; prompts cross blocks (16) and the sliding window (24).
    for prompts in (_prompts(0, [40]), _prompts(1, [5, 17, 33])):
        calls = _count_stack_calls(monkeypatch)
        llm, native = _generate(path, prompts)
        assert llm.engine.runner.decode_stack is not None
        assert calls[0] >= PARAMS.max_tokens - 1  # every decode-only step went native

        # Per-unit native calls only (no stack), then the plain Python bodies.
        monkeypatch.setattr(DenseDecodeStack, "from_units", classmethod(lambda cls, u: None))
        _, per_unit = _generate(path, prompts)
        monkeypatch.setattr(dense, "decode_units_available", lambda hidden: False)
        _, python = _generate(path, prompts)
        monkeypatch.undo()
        assert native == python  # token ids and logprobs, exactly
        assert per_unit == python


@pytest.mark.parametrize("layout", ["panels", "oneDNN"])
def test_stack_runs_packed_linears_as_the_units_do(layout, model_factory, monkeypatch):
    """Where linears take their packed path from one row (always in panels; large matrices on
    AMD CPUs in oneDNN's layout), the op multiplies by their packed weights and still gives the
    Python units' results bit for bit."""
    if layout == "panels" and not kl.panel_available():
        pytest.skip("the weight-panel kernel needs the C++ kernels built with AVX-512")
    if layout == "oneDNN":
        if not kl.packing_available():
            pytest.skip("oneDNN packing unavailable")
        monkeypatch.setattr(kl, "panel_available", lambda: False)
    monkeypatch.setattr(kl, "min_packed_rows", lambda weight: 1)
    path, _ = model_factory("qwen2")  # qkv bias: the packed op with a bias
    prompts = _prompts(6, [9, 30])
    calls = _count_stack_calls(monkeypatch)
    llm, native = _generate(path, prompts)
    stack = llm.engine.runner.decode_stack
    assert stack is not None and stack.max_rows == MAX_ROWS
    # Every layer's qkv, o, gate_up and down weights (the test model's sizes fill panels).
    packed = [p for p in stack.params if p is not None and (p.is_mkldnn or p.dim() == 3)]
    assert len(packed) == 4 * len(stack.windows)
    assert all(p.is_mkldnn == (layout == "oneDNN") for p in packed)
    assert calls[0] >= PARAMS.max_tokens - 1  # every decode-only step went native
    monkeypatch.setattr(DenseDecodeStack, "from_units", classmethod(lambda cls, u: None))
    monkeypatch.setattr(dense, "decode_units_available", lambda hidden: False)
    _, python = _generate(path, prompts)
    assert native == python  # token ids and logprobs, exactly


def test_stack_is_only_built_for_plain_dense_models(model_factory):
    for arch in ("qwen3-moe", "deepseek-v3", "mixtral"):
        path, _ = model_factory(arch)
        llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
        assert llm.engine.runner.decode_stack is None, arch
        # Their dense attention units still take the per-unit native call (MLA does not).
        out = llm.generate(_prompts(2, [9]), PARAMS, use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == PARAMS.max_tokens


def test_stack_takes_only_decode_steps_of_few_rows(model_factory, monkeypatch):
    path, _ = model_factory("llama")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20,
              max_num_batched_tokens=64)
    stack = llm.engine.runner.decode_stack
    assert stack is not None and stack.max_rows >= 1
    seen: list[tuple[int, bool]] = []
    original = DenseDecodeStack.applies

    def recording(self, hidden, ctx):
        ok = original(self, hidden, ctx)
        seen.append((hidden.shape[0], bool(ctx.attn.prefills)))
        assert ok == (not ctx.attn.prefills and hidden.shape[0] <= self.max_rows)
        return ok

    monkeypatch.setattr(DenseDecodeStack, "applies", recording)
    # More sequences than max_rows decoding together: those steps must call the units.
    n = stack.max_rows + 2
    llm.generate(_prompts(3, [3] * n), SamplingParams(temperature=0.0, max_tokens=3,
                                                      ignore_eos=True), use_tqdm=False)
    assert any(prefill for _, prefill in seen)
    assert any(rows > stack.max_rows and not prefill for rows, prefill in seen)


def test_stack_op_matches_python_units_on_one_step(model_factory, monkeypatch):
    """The op on one decode step gives the unit loop's residual stream, bit for bit."""
    path, _ = model_factory("qwen3")
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=4 << 20)
    engine, runner = llm.engine, llm.engine.runner
    for i, prompt in enumerate(_prompts(4, [20, 7])):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # both prefills
    inputs = runner.prepare(engine.scheduler.schedule())
    stack = runner.decode_stack
    with torch.inference_mode():
        hidden = runner.model.embed_tokens(inputs.input_ids)  # [2, D]
        assert stack is not None and stack.applies(hidden, inputs.ctx)
        native = stack(hidden, inputs.ctx)
        # The Python bodies write the same K/V to the same slots again, then read them.
        monkeypatch.setattr(dense, "decode_units_available", lambda h: False)
        h = hidden
        for unit in runner.units:
            h = unit(h, inputs.ctx)
    assert torch.equal(native, h)
    assert not torch.equal(native, hidden)


def test_native_decode_is_bit_identical_in_bfloat16(model_factory, monkeypatch):
    path, _ = model_factory("qwen2")  # qkv bias: the optional-bias arguments of the op

    def run():
        llm = LLM(str(path), dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20)
        outs = llm.generate(_prompts(5, [6, 21]), PARAMS, use_tqdm=False)
        return llm, [o.outputs[0].token_ids for o in outs]

    calls = _count_stack_calls(monkeypatch)
    llm, native = run()
    assert llm.engine.runner.decode_stack is not None and calls[0] > 0
    monkeypatch.setattr(DenseDecodeStack, "from_units", classmethod(lambda cls, u: None))
    monkeypatch.setattr(dense, "decode_units_available", lambda hidden: False)
    _, python = run()
    assert native == python
