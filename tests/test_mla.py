"""Multi-head latent attention (DeepSeek-V2/V3): logprobs match transformers under mixed
batches, chunked prefill and prefix-cache hits; absorbed decode equals expanded attention;
the KV cache holds only the latent and the rope key."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from tessera import LLM, SamplingParams
from tessera.engine.model_runner import ModelRunner
from tessera.model.layers import RotaryEmbedding, _inv_freq, rope_attention_factor
from tessera.model.loader import ModelLoadError, load_model
from tessera.model.mla_attention import (
    _length_groups,
    absorbed_decode,
    expanded_prefill,
    write_latent,
)
from tests.models import reference_gaps

# Greedy argmax checks barely see attention details on flat random models, so these tests
# compare the top-5 logprobs themselves: a wrong softmax scale or rope moves them by ~1e-3.
LOGPROB_TOL = 2e-5
MLA_ARCHS = [
    "deepseek-v3", "deepseek-v3-yarn", "deepseek-v2-lite", "deepseek-v3-moe", "deepseek-v2-moe"
]


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(n)] for n in lengths]


def _max_logprob_error(hf, prompts, outputs) -> float:
    worst = 0.0
    for prompt, out in zip(prompts, outputs, strict=True):
        comp = out.outputs[0]
        assert comp.logprobs is not None and len(comp.logprobs) == len(comp.token_ids) > 0
        with torch.no_grad():
            ref = hf(torch.tensor([prompt + comp.token_ids])).logits[0].float().log_softmax(-1)
        for j, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs, strict=True)):
            row = ref[len(prompt) - 1 + j]
            assert float(row.max() - row[tok]) <= 1e-4, "token off the reference argmax"
            worst = max(worst, max(abs(float(row[t]) - v) for t, v in entry.items()))
    return worst


PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)


@pytest.mark.parametrize("arch", MLA_ARCHS)
def test_mixed_chunked_batch_logprobs_match_reference(device, model_factory, arch):
    path, hf = model_factory(arch)
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              max_num_batched_tokens=48, enable_prefix_caching=False)
    # Decodes and prefill chunks share steps; 70 and 130 span several 48-token chunks.
    prompts = _prompts(1, [1, 7, 16, 33, 70, 130])
    outputs = llm.generate(prompts, PARAMS, use_tqdm=False)
    assert _max_logprob_error(hf, prompts, outputs) <= LOGPROB_TOL
    assert llm.engine.block_manager.num_free_blocks == llm.engine.runtime.num_kv_blocks


def test_prefix_cache_hits_logprobs_match_reference(device, model_factory):
    path, hf = model_factory("deepseek-v3-yarn")
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=4 << 20,
              max_num_batched_tokens=64)
    shared = _prompts(2, [50])[0]
    first = [shared + t for t in _prompts(3, [5])]
    second = [shared + t for t in _prompts(4, [3, 40])] + [shared[:48]]
    assert _max_logprob_error(hf, first, llm.generate(first, PARAMS, use_tqdm=False)) <= LOGPROB_TOL
    hits_before = llm.engine.scheduler.num_prefix_hit_tokens
    outputs = llm.generate(second, PARAMS, use_tqdm=False)
    assert llm.engine.scheduler.num_prefix_hit_tokens - hits_before >= 2 * 48 + 32
    assert _max_logprob_error(hf, second, outputs) <= LOGPROB_TOL


def test_kv_cache_holds_latent_and_rope_key_only(device, model_factory):
    path, _ = model_factory("deepseek-v3-yarn")
    cfg = json.loads((path / "config.json").read_text())
    _, model = load_model(path, "float32", torch.device("cpu"))
    values_per_token = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]  # 32 + 16
    layers = cfg["num_hidden_layers"]
    for kv_dtype in (None, torch.float16):
        itemsize = 2 if kv_dtype is torch.float16 else 4
        per_block = ModelRunner.kv_bytes_per_block(model, 16, kv_dtype)
        assert per_block == 16 * values_per_token * layers * itemsize
    llm = LLM(str(path), dtype="float32", device=device, kv_cache_memory=1 << 20)
    caches = llm.engine.runner.kv_caches
    assert len(caches) == layers
    assert all(c is not None and c.shape[1:] == (16, values_per_token) for c in caches)


def _random_latent_cache(num_blocks: int, block_size: int, rank: int, rope_dim: int):
    torch.manual_seed(0)
    cache = torch.zeros(num_blocks, block_size, rank + rope_dim)
    latent = torch.randn(num_blocks * block_size, rank)
    k_rope = torch.randn(num_blocks * block_size, rope_dim)
    write_latent(cache, latent, k_rope, torch.arange(num_blocks * block_size))
    return cache


def _naive(q_nope, q_rope, latent, k_rope, w_kv, v_dim, scale):
    """One query [H, *] over all rows, K and V expanded per head, in float64: [H, v]."""
    num_heads, nope = q_nope.shape
    kv = (latent.double() @ w_kv.double().T).view(latent.shape[0], num_heads, -1)
    k_nope, values = kv.split([nope, v_dim], dim=-1)
    scores = torch.einsum("hn,thn->ht", q_nope.double(), k_nope)
    scores = scores + q_rope.double() @ k_rope.double().T
    return torch.einsum("ht,thv->hv", (scores * scale).softmax(-1), values)


def test_absorbed_decode_equals_expanded_attention():
    heads, nope, rope_dim, rank, v_dim, bs = 4, 32, 16, 24, 20, 4
    cache = _random_latent_cache(10, bs, rank, rope_dim)
    w_kv = torch.randn(heads * (nope + v_dim), rank) * 0.3
    # Two sequences over scattered blocks; the shorter one's table is padded with block 0.
    tables = torch.tensor([[7, 2, 5], [3, 9, 0]])
    seq_lens = torch.tensor([11, 6])
    q_nope, q_rope = torch.randn(2, heads, nope), torch.randn(2, heads, rope_dim)
    scale = 0.3
    out = absorbed_decode(q_nope, q_rope, cache, tables, seq_lens, w_kv, v_dim, scale)
    assert out.shape == (2, heads, v_dim)
    for b in range(2):
        rows = cache[tables[b]].view(-1, rank + rope_dim)[: int(seq_lens[b])]
        want = _naive(q_nope[b], q_rope[b], rows[:, :rank], rows[:, rank:], w_kv, v_dim, scale)
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)
        # The expanded (prefill) path agrees for a query at the sequence's last position.
        n = int(seq_lens[b])
        pre = expanded_prefill(q_nope[b : b + 1], q_rope[b : b + 1], rows[:, :rank],
                               rows[:, rank:], w_kv, v_dim, n - 1, scale)
        torch.testing.assert_close(pre[0].double(), want, atol=1e-5, rtol=1e-5)


def test_absorbed_decode_length_groups_match_one_padded_batch():
    """A batch with very different lengths is split into length groups (less padding);
    each sequence's output must equal the naive attention over its own rows."""
    heads, nope, rope_dim, rank, v_dim, bs = 2, 8, 4, 12, 6, 2
    num_seqs, num_blocks = 10, 200
    cache = _random_latent_cache(num_blocks, bs, rank, rope_dim)
    w_kv = torch.randn(heads * (nope + v_dim), rank) * 0.3
    lens = [1, 40, 3, 2, 37, 5, 1, 4, 2, 3]  # most short, two long: groups kick in
    perm = torch.randperm(num_blocks)
    width = max(-(-n // bs) for n in lens)
    tables = perm[: num_seqs * width].view(num_seqs, width)
    seq_lens = torch.tensor(lens)
    groups = _length_groups(seq_lens, bs)
    assert groups is not None  # the split path is the one under test
    order, bounds = groups
    assert sorted(order.tolist()) == list(range(num_seqs)) and len(bounds) > 1
    q_nope, q_rope = torch.randn(num_seqs, heads, nope), torch.randn(num_seqs, heads, rope_dim)
    out = absorbed_decode(q_nope, q_rope, cache, tables, seq_lens, w_kv, v_dim, 0.4)
    for b in range(num_seqs):
        rows = cache[tables[b]].view(-1, rank + rope_dim)[: lens[b]]
        want = _naive(q_nope[b], q_rope[b], rows[:, :rank], rows[:, rank:], w_kv, v_dim, 0.4)
        torch.testing.assert_close(out[b].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_context_tokens", [0, 5])
def test_prefill_plain_attention_equals_sdpa(monkeypatch, num_context_tokens):
    """Small CPU prefill chunks use explicit scores; they must match the SDPA path."""
    import tessera.model.mla_attention as mla_attention

    torch.manual_seed(1)
    heads, nope, rope_dim, rank, v_dim, n = 3, 8, 4, 12, 6, 7
    total = num_context_tokens + n
    q_nope, q_rope = torch.randn(n, heads, nope), torch.randn(n, heads, rope_dim)
    latent, k_rope = torch.randn(total, rank), torch.randn(total, rope_dim)
    w_kv = torch.randn(heads * (nope + v_dim), rank) * 0.3
    args = (q_nope, q_rope, latent, k_rope, w_kv, v_dim, num_context_tokens, 0.3)
    plain = expanded_prefill(*args)
    monkeypatch.setattr(mla_attention, "_MATH_MAX_SCORES", 0)  # force SDPA
    fused = expanded_prefill(*args)
    assert plain.shape == (n, heads, v_dim)
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=1e-5)


def test_yarn_rope_tables_match_reference(model_factory):
    path, hf = model_factory("deepseek-v3-yarn")
    spec, model = load_model(path, "float32", torch.device("cpu"))
    rotary = model.rotary
    assert isinstance(rotary, RotaryEmbedding) and rotary.interleaved
    ref = hf.model.rotary_emb
    torch.testing.assert_close(_inv_freq(rotary.head_dim, spec.rope), ref.inv_freq.float())
    assert rope_attention_factor(spec.rope) == pytest.approx(ref.attention_scaling)
    assert rope_attention_factor(spec.rope) != pytest.approx(1.0)  # the test model exercises it
    attn = model.layers[0].attn
    assert attn.mla.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling)


def test_mtp_layers_ignored_unknown_attention_tensor_rejected(model_factory, tmp_path):
    src, _ = model_factory("deepseek-v3")
    tensors = load_file(str(src / "model.safetensors"))
    num_layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    # A multi-token-prediction layer after the decoder layers, as DeepSeek-V3 ships one.
    mtp = {f"model.layers.{num_layers}.eh_proj.weight": torch.zeros(4, 4)}
    save_file({**tensors, **mtp}, str(tmp_path / "model.safetensors"))
    load_model(tmp_path, "float32", torch.device("cpu"))
    bad = {"model.layers.0.self_attn.k_proj.weight": torch.zeros(4, 4)}
    save_file({**tensors, **bad}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected tensor 'model.layers.0.self_attn.k_proj"):
        load_model(tmp_path, "float32", torch.device("cpu"))


def test_missing_mla_field_is_a_clear_error(model_factory, tmp_path):
    src, _ = model_factory("deepseek-v3")
    cfg = json.loads((src / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="kv_lora_rank"):
        load_model(tmp_path, "float32", torch.device("cpu"))


@pytest.mark.parametrize(("dtype", "kv_dtype"), [("float32", "float16"), ("bfloat16", "auto")])
def test_narrow_cache_or_model_close_to_reference(device, model_factory, dtype, kv_dtype):
    path, hf = model_factory("deepseek-v3")
    llm = LLM(str(path), dtype=dtype, device=device, kv_cache_memory=4 << 20,
              kv_cache_dtype=kv_dtype, max_num_batched_tokens=32)
    cache = llm.engine.runner.kv_caches[0]
    want = dtype if kv_dtype == "auto" else kv_dtype
    assert cache is not None and str(cache.dtype) == f"torch.{want}"
    prompts = _prompts(7, [5, 40])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False), strict=True):
        # About 3 significant digits: allow a small gap to the float32 reference's best logit.
        assert max(reference_gaps(hf, prompt, out.outputs[0].token_ids)) < 0.05
