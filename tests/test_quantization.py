"""Weight-only int8 quantization: the quantizer's error bound, the int8 kernel against the
dequantized weight, and models that answer as they do in float32."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tessera import LLM, SamplingParams
from tessera.config import AFDConfig, EngineConfig
from tessera.demo_model import model_dir
from tessera.demo_model.tasks import copy, held_out_additions, is_correct, word
from tessera.demo_model.train import render
from tessera.model.kernels.quant_linear import Int8Linear, quantize_int8, quantize_linears
from tests.models import reference_gaps


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.floats(1e-4, 1e3), st.integers(0, 2**31))
def test_every_weight_is_within_half_a_step(rows, cols, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * scale
    w[0] = 0.0  # an all-zero channel keeps a usable scale
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    assert torch.all(scales > 0)
    err = (q.float() * scales[:, None] - w).abs()
    assert torch.all(err <= scales[:, None] / 2 * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 64, 65, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_matches_its_dequantized_weight(rows, bias):
    """The kernel (few rows) and the widen-then-MKL path (many) compute x W_q^T * s + b."""
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(320, 96, bias=bias)  # k over one 256-wide chunk; 3 panels
    with torch.no_grad():
        linear.weight.copy_(torch.randn(96, 320, generator=gen) * 0.05)
    q = Int8Linear(linear)
    x = torch.randn(rows, 320, generator=gen)
    want = F.linear(x, q.dequantized(), None if q.bias is None else q.bias)
    torch.testing.assert_close(q(x), want, rtol=1e-5, atol=1e-5)
    # And close to the float layer it replaced.
    torch.testing.assert_close(q(x), linear(x), rtol=0.0, atol=0.06)


def test_quantize_linears_replaces_all_but_the_kept_ones():
    class Unit(nn.Module):
        keep_plain_linears = ("reads_weight",)

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(32, 64)
            self.reads_weight = nn.Linear(32, 64)

    model = nn.Sequential(Unit(), nn.Linear(64, 32))
    assert quantize_linears(model, "int8") == 2
    assert isinstance(model[0].proj, Int8Linear) and isinstance(model[1], Int8Linear)
    assert type(model[0].reads_weight) is nn.Linear
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        quantize_linears(model, "int3")


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe", "deepseek-v3"])
def test_random_models_stay_close_to_the_reference(model_factory, arch):
    """Teacher-forced against the float32 transformers model: every token within a small
    margin of the reference's best logit (int8 moves logits by about a hundredth here)."""
    path, hf = model_factory(arch)
    llm = LLM(str(path), dtype="float32", quantization="int8", kv_cache_memory=4 << 20)
    rng = random.Random(2)
    prompts = [[rng.randrange(0, 256) for _ in range(n)] for n in (5, 17, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        gaps = reference_gaps(hf, prompt, out.outputs[0].token_ids)
        assert max(gaps) <= 0.05, gaps
    assert any(isinstance(m, Int8Linear) for m in llm.engine.model.modules())


def test_demo_model_answers_as_well_in_int8():
    """The demo's checks under int8: the same answers to held-out additions and copies as in
    float32, and top-1 agreement with float32 on every token of them."""
    fp32 = LLM(str(model_dir()), dtype="float32")
    int8 = LLM(str(model_dir()), dtype="float32", quantization="int8")
    rng = random.Random(4)
    examples = held_out_additions(40) + [copy(word(rng)) for _ in range(10)]
    prompts = [render(e)[0] for e in examples]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    want = fp32.generate(prompts, params, use_tqdm=False)
    got = int8.generate(prompts, params, use_tqdm=False)
    right_fp32 = sum(is_correct(e, o.outputs[0].text) for e, o in zip(examples, want, strict=True))
    right_int8 = sum(is_correct(e, o.outputs[0].text) for e, o in zip(examples, got, strict=True))
    assert right_int8 >= right_fp32 - 1 and right_fp32 >= 45
    same = sum(a.outputs[0].token_ids == b.outputs[0].token_ids
               for a, b in zip(want, got, strict=True))
    assert same >= 0.95 * len(examples)


def test_int8_weights_take_a_quarter_of_the_memory():
    fp32 = LLM(str(model_dir()), dtype="float32").engine.model
    int8 = LLM(str(model_dir()), dtype="float32", quantization="int8").engine.model

    def linear_bytes(model: nn.Module) -> int:
        total = 0
        for m in model.modules():
            if isinstance(m, Int8Linear):
                total += m.qweight.numel() + 4 * m.scales.numel()
            elif isinstance(m, nn.Linear) and m.weight is not model.embed.weight:
                total += sum(t.numel() * t.element_size() for t in m.state_dict(
                    keep_vars=True).values())
        return total

    assert linear_bytes(int8) < 0.3 * linear_bytes(fp32)


def test_bad_quantization_options_are_refused():
    with pytest.raises(ValueError, match="quantization must be one of int8"):
        EngineConfig(model="m", quantization="int4")
    with pytest.raises(ValueError, match="not supported in a Transformerless pool"):
        EngineConfig(model="m", quantization="int8", afd=AFDConfig())
