"""MoE unit, router and loader: expert partitions add up, router counts, DeepSeek-style routing
against transformers' own MoE modules, both checkpoint layouts, expert shards, bad configs.
(Greedy output against transformers for Mixtral / Qwen2-MoE / Qwen3-MoE runs in
test_correctness.py over the MoE entries of ``tests.models.ARCHS``.)"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tessera.model.dense import DenseFFNUnit
from tessera.model.loader import ModelLoadError, load_model, target_slice
from tessera.model.moe import MoEFFNUnit, MoESpec, moe_spec_from_config
from tessera.model.moe_models import MoEDecoderModel
from tessera.model.spec import ModelConfigError, spec_from_config

CPU = torch.device("cpu")


def _spec_pair(cfg: dict[str, Any]):
    spec = spec_from_config(cfg)
    moe = moe_spec_from_config(cfg)
    assert moe is not None
    return spec, moe


def _random_unit(moe_cfg: dict[str, Any], expert_ids=None, seed: int = 0) -> MoEFFNUnit:
    spec, moe = _spec_pair(moe_cfg)
    unit = MoEFFNUnit(spec, moe, layer_id=0, expert_ids=expert_ids)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return unit


QWEN2_MOE_CFG = dict(
    architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", hidden_size=32,
    num_hidden_layers=1, num_attention_heads=4, vocab_size=300, intermediate_size=64,
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=24, norm_topk_prob=False,
)


def test_expert_partition_sums_to_full_layer():
    full = _random_unit(QWEN2_MOE_CFG)
    parts = [[0, 5, 2], [7, 1], [3, 4, 6]]
    shards = []
    for ids in parts:
        shard = _random_unit(QWEN2_MOE_CFG, expert_ids=ids)
        shard.load_state_dict({
            k: (v[list(ids)] if k.startswith("experts.") else v)
            for k, v in full.state_dict().items()
        })
        shards.append(shard)
    x = torch.randn(37, 32)
    ids, weights = full.route(x)
    whole = full.experts_forward(x, ids, weights)
    partial = sum(s.experts_forward(x, ids, weights) for s in shards)
    torch.testing.assert_close(partial, whole, rtol=1e-5, atol=1e-6)
    # Against a dense loop over every (token, chosen expert): the sparse path is exact.
    gate_up, down = full.experts.gate_up_proj, full.experts.down_proj
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g, u = (gate_up[e] @ x[t]).chunk(2)
            ref[t] += weights[t, j] * (down[e] @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    # The whole unit: residual + routed + gated shared expert.
    hidden = torch.randn(5, 32)
    normed = full.norm(hidden)
    shared = full.shared_forward(normed)
    assert shared is not None
    expected = hidden + full.experts_forward(normed, *full.route(normed)) + shared
    torch.testing.assert_close(full(hidden), expected)


def test_router_counts_and_weights():
    unit = _random_unit(QWEN2_MOE_CFG)
    x = torch.randn(50, 32)
    ids, weights = unit.route(x)
    counts = unit.router.last_expert_counts
    assert counts is not None and counts.shape == (8,)
    assert int(counts.sum()) == 50 * 2
    assert counts.tolist() == [int((ids == e).sum()) for e in range(8)]
    # Each token's two experts are distinct and are its two highest softmax scores.
    probs = torch.softmax(x @ unit.router.weight.T, dim=-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(ids.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(weights.sort(-1).values, top.values.sort(-1).values)
    assert unit.experts(x[:0], ids[:0], weights[:0]).shape == (0, 32)


def _deepseek_case(version: int) -> tuple[Any, dict[str, Any]]:
    import transformers

    common = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=300,
        intermediate_size=48, moe_intermediate_size=16, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=2,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8,
    )
    if version == 3:
        cfg = transformers.DeepseekV3Config(
            **common, routed_scaling_factor=2.5, norm_topk_prob=True
        )
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as Moe
    else:
        cfg = transformers.DeepseekV2Config(
            **common, routed_scaling_factor=1.5, topk_method="group_limited_greedy"
        )
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Moe
    torch.manual_seed(version)
    ref = Moe(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3)
        for b in ref.buffers():  # e_score_correction_bias: large enough to change the choice
            b.normal_(0, 0.3)
    raw = cfg.to_dict()
    raw["architectures"] = [f"DeepseekV{version}ForCausalLM"]
    return ref, raw


@pytest.mark.parametrize("version", [3, 2])
def test_deepseek_routing_matches_transformers(version):
    ref, raw = _deepseek_case(version)
    spec, moe = _spec_pair(raw)
    assert moe.moe_layers == (False, True)
    assert moe.num_groups == 4 and moe.topk_groups == 2
    assert moe.shared_intermediate_size == 2 * 16 and moe.shared_gate is False
    if version == 3:
        assert (moe.scoring, moe.group_score, moe.has_score_bias) == ("sigmoid", "top2_sum", True)
        assert moe.routed_scaling_factor == 2.5 and moe.norm_topk_prob
    else:
        assert (moe.scoring, moe.group_score, moe.has_score_bias) == ("softmax", "max", False)
    unit = MoEFFNUnit(spec, moe, layer_id=1)
    _load_tensors(unit, {f"mlp.{k}": v for k, v in ref.state_dict().items()})
    x = torch.randn(64, 32)
    with torch.no_grad():
        _, ref_weights, ref_ids = ref.gate(x)
        ids, weights = unit.route(x)
        ref_out = ref(x.unsqueeze(0))[0]
        normed_out = unit.experts_forward(x, ids, weights) + unit.shared_forward(x)
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)
    torch.testing.assert_close(weights.gather(1, order.indices),
                               ref_weights.gather(1, ref_order.indices))
    torch.testing.assert_close(normed_out, ref_out, rtol=1e-5, atol=1e-5)
    if version == 3:
        # The bias must matter here, or the test would not check that it is used.
        unbiased = torch.sigmoid(x @ ref.gate.weight.T).topk(4, -1).indices.sort(-1).values
        assert not torch.equal(unbiased, order.values)


def _load_tensors(unit: MoEFFNUnit, tensors: dict[str, torch.Tensor]) -> None:
    """Load layer-relative checkpoint tensors through the unit's targets (as the loader does)."""
    params = dict(unit.named_parameters())
    loaded = dict.fromkeys(params, 0)
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = unit.checkpoint_target(name, "ffn")
            assert target is not None, name
            if target.skip:
                continue
            param_name = target.param.removeprefix("ffn.")
            want, dest = target_slice(params[param_name], target)
            assert tuple(tensor.shape) == want, name
            if target.source_experts is not None:
                tensor = tensor[list(target.source_experts)]
            dest.copy_(tensor)
            loaded[param_name] += dest.numel()
    assert all(loaded[n] == p.numel() for n, p in params.items() if n != "norm.weight")


def test_stacked_checkpoint_layout_and_expert_shard(model_factory, tmp_path):
    path, hf = model_factory("qwen2-moe")
    _, full = load_model(path, "float32", CPU)
    # transformers 5.x holds experts stacked in memory (experts.gate_up_proj [E, 2I, D]);
    # a checkpoint written from that state dict must load to the same parameters.
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in hf.state_dict())
    _, stacked = load_model(tmp_path, "float32", CPU)
    for (name, a), (_, b) in zip(full.named_parameters(), stacked.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    # An expert shard loads only its experts from either layout; the rest are skipped.
    from tessera.model.loader import _safetensors_files, load_weights

    for directory in (path, tmp_path):
        spec = full.spec
        with torch.device("meta"):
            shard = MoEDecoderModel(spec, expert_ids=[6, 1, 3])
        shard.to_empty(device=CPU)
        load_weights(shard, spec, _safetensors_files(Path(directory)))
        ffn, full_ffn = shard.layers[2].ffn, full.layers[2].ffn
        assert isinstance(ffn, MoEFFNUnit) and isinstance(full_ffn, MoEFFNUnit)
        assert isinstance(shard.layers[1].ffn, DenseFFNUnit)
        assert ffn.experts.gate_up_proj.shape[0] == 3
        assert torch.equal(ffn.experts.gate_up_proj, full_ffn.experts.gate_up_proj[[6, 1, 3]])
        assert torch.equal(ffn.experts.down_proj, full_ffn.experts.down_proj[[6, 1, 3]])


def test_missing_expert_tensor_is_named(model_factory, tmp_path):
    path, _ = model_factory("mixtral")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"layers\.1\.ffn\.experts\.gate_up_proj"):
        load_model(tmp_path, "float32", CPU)
    tensors["model.layers.1.block_sparse_moe.experts.9.w3.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor .*experts\.9\.w3"):
        load_model(tmp_path, "float32", CPU)


# Field excerpts of published configs (Mixtral-8x7B, Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B,
# DeepSeek-V3): what each family's spec must come out as.
REAL_CONFIGS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    (dict(model_type="mixtral", num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
          num_local_experts=8, num_experts_per_tok=2),
     dict(num_experts=8, top_k=2, moe_intermediate_size=14336, norm_topk_prob=True,
          shared_intermediate_size=0, moe_layers=(True,) * 32)),
    (dict(model_type="qwen2_moe", num_hidden_layers=24, hidden_size=2048, num_experts=60,
          num_experts_per_tok=4, moe_intermediate_size=1408, norm_topk_prob=False,
          shared_expert_intermediate_size=5632, decoder_sparse_step=1, mlp_only_layers=[]),
     dict(num_experts=60, top_k=4, norm_topk_prob=False, shared_intermediate_size=5632,
          shared_gate=True, moe_layers=(True,) * 24)),
    (dict(model_type="qwen3_moe", num_hidden_layers=48, hidden_size=2048, num_experts=128,
          num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
          decoder_sparse_step=1, mlp_only_layers=[]),
     dict(num_experts=128, top_k=8, norm_topk_prob=True, shared_intermediate_size=0)),
    (dict(model_type="deepseek_v3", num_hidden_layers=61, hidden_size=7168,
          n_routed_experts=256, num_experts_per_tok=8, moe_intermediate_size=2048,
          n_shared_experts=1, n_group=8, topk_group=4, routed_scaling_factor=2.5,
          norm_topk_prob=True, first_k_dense_replace=3, moe_layer_freq=1,
          scoring_func="sigmoid", topk_method="noaux_tc"),
     dict(num_experts=256, top_k=8, scoring="sigmoid", has_score_bias=True, num_groups=8,
          topk_groups=4, group_score="top2_sum", shared_intermediate_size=2048,
          routed_scaling_factor=2.5, moe_layers=(False,) * 3 + (True,) * 58)),
]


@pytest.mark.parametrize("cfg,expected", REAL_CONFIGS, ids=lambda v: v.get("model_type", ""))
def test_moe_spec_of_published_configs(cfg, expected):
    moe = moe_spec_from_config(cfg)
    assert isinstance(moe, MoESpec)
    for field, value in expected.items():
        assert getattr(moe, field) == value, field


def test_qwen_layer_patterns_and_non_moe_configs():
    base = dict(model_type="qwen3_moe", num_hidden_layers=6, hidden_size=8, num_experts=4,
                num_experts_per_tok=2, moe_intermediate_size=4)
    moe = moe_spec_from_config({**base, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert moe is not None and moe.moe_layers == (False, True, False, False, False, True)
    assert moe_spec_from_config({**base, "num_experts": 0}) is None
    assert moe_spec_from_config({"model_type": "llama", "num_hidden_layers": 2}) is None


@pytest.mark.parametrize("bad,message", [
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(n_group=3), "n_group"),
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "exceeds"),
])
def test_bad_moe_config_is_one_clear_error(bad, message, tmp_path):
    cfg = dict(model_type="deepseek_v3", num_hidden_layers=2, hidden_size=8,
               n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=4,
               n_group=2, topk_group=1, first_k_dense_replace=0)
    with pytest.raises(ModelConfigError, match=message):
        moe_spec_from_config({**cfg, **bad})
    # Through the loader it is a ModelLoadError with the same one-line message.
    mixtral = dict(architectures=["MixtralForCausalLM"], model_type="mixtral",
                   num_hidden_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=10,
                   intermediate_size=4, num_local_experts=2, num_experts_per_tok=3)
    (tmp_path / "config.json").write_text(json.dumps(mixtral))
    with pytest.raises(ModelLoadError, match="num_experts_per_tok"):
        load_model(tmp_path, "float32", CPU)


def test_kimi_k2_config_reads_as_deepseek_v3(model_factory):
    # Kimi-K2 ships the DeepSeek-V3 architecture under model_type "kimi_k2": its experts
    # must be read, not silently dropped (a dense reading would load no routed experts).
    path, _ = model_factory("deepseek-v3-moe")
    cfg = json.loads((path / "config.json").read_text())
    v3 = moe_spec_from_config(cfg)
    assert v3 is not None
    assert moe_spec_from_config({**cfg, "model_type": "kimi_k2"}) == v3
