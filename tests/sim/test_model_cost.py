"""Cost model against hand-computed FLOPs and bytes on small configs."""

import numpy as np
import pytest

from tessera.model.moe_spec import moe_spec_from_config
from tessera.sim.costmodel import (
    PoolCost,
    PoolLayout,
    causal_pairs,
    decode_load,
    prefill_core_flops,
)
from tessera.sim.errors import SimError
from tessera.sim.hardware import get_system
from tessera.sim.model import costs_from_config, load_model

DENSE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "vocab_size": 100, "intermediate_size": 128}
MLA = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
       "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "vocab_size": 100,
       "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 8,
       "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
       "q_lora_rank": 16, "kv_lora_rank": 8, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8,
       "v_head_dim": 8, "num_nextn_predict_layers": 1}


def test_dense_gqa_counts() -> None:
    m = costs_from_config(DENSE)
    hd = 16
    assert m.attn_params == 64 * hd * 4 + 2 * 64 * hd * 2 + 4 * hd * 64
    assert m.kv_elements_per_token == 2 * 2 * hd
    assert m.attn_flops_per_kv_decode == 4 * 4 * hd
    assert m.dense_ffn_params == 3 * 64 * 128
    assert m.num_dense_layers == 2 and m.num_moe_layers == 0
    assert m.total_params() == 2 * (m.attn_params + m.dense_ffn_params) + 2 * 100 * 64


def test_mla_moe_counts() -> None:
    m = costs_from_config(MLA)
    q = 64 * 16 + 16 * 4 * 12
    kv = 64 * (8 + 4) + 8 * 4 * (8 + 8)
    assert m.attn_params == q + kv + 4 * 8 * 64
    assert m.kv_elements_per_token == 12
    assert m.attn_flops_per_kv_decode == 2 * 4 * 12 + 2 * 4 * 8
    assert m.attn_flops_per_pair_prefill == 2 * 4 * 12 + 2 * 4 * 8
    assert (m.num_dense_layers, m.num_moe_layers, m.num_mtp_layers) == (1, 2, 1)
    assert m.expert_params == 3 * 64 * 32 and m.shared_expert_params == 3 * 64 * 32
    active = 3 * m.attn_params + m.dense_ffn_params + 2 * (2 * m.expert_params
                                                          + m.shared_expert_params + 64 * 8)
    assert m.active_params_per_token() == active + 100 * 64


def test_bundled_models_match_published_sizes() -> None:
    assert load_model("deepseek-v3").total_params(with_mtp=False) == pytest.approx(671e9, rel=0.01)
    assert load_model("deepseek-v3").active_params_per_token() == pytest.approx(37e9, rel=0.02)
    assert load_model("llama-3-70b").total_params() == pytest.approx(70.6e9, rel=0.01)
    assert load_model("qwen3-235b-a22b").active_params_per_token() == pytest.approx(22e9, rel=0.03)


def test_prefix_hit_still_pays_attention_over_the_prefix() -> None:
    dense, mla = costs_from_config(DENSE), costs_from_config(MLA)
    assert dense.kv_up_flops_per_context_token == 0
    assert mla.kv_up_flops_per_context_token == 2 * 8 * 4 * (8 + 8)  # latent -> K_nope, V
    for m in (dense, mla):
        cold = prefill_core_flops(m, 100.0, 0.0)
        assert cold == m.attn_flops_per_pair_prefill * 100 * 101 / 2
        hit = prefill_core_flops(m, 100.0, 300.0)  # same 100 new tokens after a 300-token hit
        assert hit == (m.attn_flops_per_pair_prefill * (100 * 300 + 100 * 101 / 2)
                       + m.kv_up_flops_per_context_token * 300)
        assert hit > cold


def test_causal_pairs() -> None:
    assert causal_pairs(4, 0) == 10
    assert causal_pairs(2, 3) == 2 * 3 + 3


def test_decode_step_is_memory_bound_roofline() -> None:
    m = costs_from_config(DENSE)
    sys = get_system("dgx-h100")
    cost = PoolCost(sys, m, PoolLayout(1, 1, 1, False, 1, "bf16"))
    eff = sys.chip.efficiency
    one = np.ones(1)
    load = decode_load(m, one, one * 10)
    weights = 2 * (m.attn_params + m.dense_ffn_params) + 100 * 64
    kv = 2 * 10 * m.kv_elements_per_token * 2.0
    expect = (weights * 2.0 + kv) / (sys.chip.memory_bytes_per_s * eff.memory)
    expect += 2 * eff.ops_per_layer * eff.op_overhead_us * 1e-6 + eff.step_overhead_ms * 1e-3
    assert cost.step_s(load) == pytest.approx(expect, rel=1e-9)


def test_more_tokens_cost_more_and_balancer_helps() -> None:
    m = load_model("deepseek-v3")
    sys = get_system("cloudmatrix384")
    lay = PoolLayout(64, 1, 64, False, 2, "int8", True, 0)
    bal, unbal = PoolCost(sys, m, lay), PoolCost(sys, m, PoolLayout(64, 1, 64, False, 2, "int8", False))
    n = np.full(64, 32.0)
    small, big = decode_load(m, n, n * 1000), decode_load(m, n * 2, n * 2000)
    assert bal.step_s(big) > bal.step_s(small)
    assert unbal.step_s(big) > bal.step_s(big)


def test_moe_layers_are_where_the_engine_puts_them() -> None:
    """One reader of the config: a Qwen3-MoE's sparse layers follow ``decoder_sparse_step`` and
    ``mlp_only_layers`` exactly as the engine builds them (the simulator's own parser once
    counted the listed dense layers and ignored the step)."""
    cfg = {**DENSE, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
           "num_hidden_layers": 8, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    m = costs_from_config(cfg)
    engine_moe = moe_spec_from_config(cfg)
    assert engine_moe is not None
    # Every second layer is sparse, except layer 3, listed dense.
    assert m.moe_layers == engine_moe.moe_layers == (False, True, False, False,
                                                     False, True, False, True)
    assert (m.num_dense_layers, m.num_moe_layers) == (5, 3)
    assert [m.is_moe_layer(i) for i in range(8)] == list(engine_moe.moe_layers)


def test_configs_the_engine_cannot_read_are_one_line_errors() -> None:
    with pytest.raises(SimError, match="architectures"):
        costs_from_config({k: v for k, v in DENSE.items() if k != "architectures"})
    with pytest.raises(SimError, match="hidden_size"):
        costs_from_config({k: v for k, v in DENSE.items() if k != "hidden_size"})
    with pytest.raises(SimError, match="positive integer"):
        costs_from_config({**MLA, "kv_lora_rank": 0.5})
    # Experts of a family the engine does not read would be costed as one dense FFN each.
    with pytest.raises(SimError, match="routed experts"):
        costs_from_config({**MLA, "model_type": "some_moe"})
    with pytest.raises(SimError, match="intermediate_size"):
        costs_from_config({k: v for k, v in DENSE.items() if k != "intermediate_size"})
