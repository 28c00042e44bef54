"""Random-weight Hugging Face models for tests, built with transformers ``from_config``.

Each model ships a byte-level tokenizer (256 byte tokens plus <s> and </s>) so text prompts,
stop strings and detokenization can be tested without any download.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tessera.random_models import BOS_ID, EOS_ID, build_random_model

VOCAB_SIZE = 300

SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=1024,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)

MLA = dict(
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    first_k_dense_replace=2,
)
MLA_MOE = dict(
    n_routed_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    n_shared_experts=1,
    routed_scaling_factor=1.5,
)

# name -> (Hugging Face model_type, config overrides)
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama-tied-llama3rope": (
        "llama",
        dict(
            tie_word_embeddings=True,
            num_key_value_heads=4,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=128,
            ),
        ),
    ),
    "mistral-sliding": ("mistral", dict(sliding_window=24)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=32, num_key_value_heads=1)),
    # MoE families: 4-8 experts, top-2, and mixes of dense and MoE layers.
    "mixtral": (
        "mixtral",
        dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64),
    ),
    "qwen2-moe": (
        "qwen2_moe",
        # Layers 0 and 2 MoE (shared expert with its gate), layer 1 dense.
        dict(
            num_hidden_layers=3,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
    ),
    "qwen3-moe": (
        "qwen3_moe",
        # decoder_sparse_step=2: layers 1 and 3 MoE, 0 and 2 dense.
        dict(
            num_hidden_layers=4,
            head_dim=32,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=2,
            norm_topk_prob=True,
        ),
    ),
    # MLA with all layers dense (first_k_dense_replace >= num_hidden_layers).
    "deepseek-v3": ("deepseek_v3", dict(MLA, q_lora_rank=32)),
    "deepseek-v3-yarn": (
        "deepseek_v3",
        dict(
            MLA,
            q_lora_rank=32,
            num_hidden_layers=3,
            first_k_dense_replace=3,
            rope_scaling=dict(
                rope_type="yarn",
                factor=8.0,
                original_max_position_embeddings=128,
                mscale=1.0,
                mscale_all_dim=0.707,
                beta_fast=32,
                beta_slow=1,
            ),
        ),
    ),
    "deepseek-v2-lite": ("deepseek_v2", dict(MLA, q_lora_rank=None)),
    # MLA with MoE layers: layer 0 dense, layers 1 and 2 routed experts plus a shared expert.
    "deepseek-v3-moe": (
        "deepseek_v3",
        dict(MLA, q_lora_rank=32, num_hidden_layers=3, first_k_dense_replace=1, **MLA_MOE,
             n_group=4, topk_group=2),
    ),
    "deepseek-v2-moe": (
        "deepseek_v2",
        dict(MLA, q_lora_rank=None, num_hidden_layers=3, first_k_dense_replace=1, **MLA_MOE,
             topk_method="group_limited_greedy", n_group=4, topk_group=2),
    ),
}


def build_model(name: str, out: Path, tokenizer: bool = True, seed: int = 0, **overrides: Any):
    """Build, save and return (directory, reference HF model in float32 eval mode)."""
    model_type, arch_overrides = ARCHS[name]
    kwargs = {**SMALL, **arch_overrides, **overrides}
    model = build_random_model(
        model_type, out, seed=seed, tokenizer=tokenizer, randomize_norms=True, **kwargs
    )
    return out, model


def reference_gaps(
    model: Any, prompt_ids: list[int], output_ids: list[int], penalties: dict | None = None
) -> list[float]:
    """Teacher-forced check: for each generated token, how far its logit is below the
    reference's best logit at that position (0 means it is the reference's argmax)."""
    if not output_ids:
        return []
    ids = torch.tensor([prompt_ids + output_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    gaps = []
    for j, tok in enumerate(output_ids):
        row = logits[len(prompt_ids) - 1 + j].clone()
        if penalties:
            row = _penalise(row, prompt_ids, output_ids[:j], **penalties)
        gaps.append(float(row.max() - row[tok]))
    return gaps


def _penalise(
    row: torch.Tensor,
    prompt: list[int],
    out: list[int],
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> torch.Tensor:
    for t in set(prompt + out):
        row[t] = row[t] / repetition_penalty if row[t] > 0 else row[t] * repetition_penalty
    for t in set(out):
        c = out.count(t)
        row[t] -= frequency_penalty * c + presence_penalty
    return row
