"""Where each Hugging Face checkpoint tensor goes in Tessera's (fused) parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass

from tessera.model.spec import ModelSpec

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Target:
    """Rows ``[row_offset, row_offset + num_rows)`` of parameter ``param``.

    Stacked expert parameters [E_local, R, C] take two more forms: with ``expert`` the rows
    are those of local expert ``expert`` (a per-expert checkpoint tensor [num_rows, C]); with
    ``source_experts`` the checkpoint tensor stacks all ``num_source_experts`` experts
    [E, num_rows, C] and the listed global experts fill the local slots in order.
    """

    param: str
    row_offset: int
    num_rows: int
    expert: int | None = None
    source_experts: tuple[int, ...] | None = None
    num_source_experts: int = 0
    skip: bool = False
    """A known tensor this model does not hold (an expert placed elsewhere): not loaded."""


SKIP = Target("", 0, 0, skip=True)


def dense_target(spec: ModelSpec, name: str) -> Target | None:
    """Where a dense-family checkpoint tensor goes; None when it is not a dense-layer tensor."""
    h, q, kv, inter = spec.hidden_size, spec.q_size, spec.kv_size, spec.intermediate_size
    if name == "model.embed_tokens.weight":
        return Target("embed.weight", 0, spec.vocab_size)
    if name == "model.norm.weight":
        return Target("norm.weight", 0, h)
    if name == "lm_head.weight":
        return Target("lm_head.weight", 0, spec.vocab_size)
    m = _LAYER.match(name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i >= spec.num_layers:
        return None
    attn, ffn = f"layers.{i}.attn", f"layers.{i}.ffn"
    suffix = rest.rsplit(".", 1)[-1]  # weight or bias
    table = {
        "input_layernorm.weight": Target(f"{attn}.norm.weight", 0, h),
        "post_attention_layernorm.weight": Target(f"{ffn}.norm.weight", 0, h),
        "self_attn.q_norm.weight": Target(f"{attn}.q_norm.weight", 0, spec.head_dim),
        "self_attn.k_norm.weight": Target(f"{attn}.k_norm.weight", 0, spec.head_dim),
    }
    if rest in table:
        return table[rest]
    proj = rest.rsplit(".", 1)[0]
    shards = {
        "self_attn.q_proj": (f"{attn}.qkv_proj", 0, q),
        "self_attn.k_proj": (f"{attn}.qkv_proj", q, kv),
        "self_attn.v_proj": (f"{attn}.qkv_proj", q + kv, kv),
        "self_attn.o_proj": (f"{attn}.o_proj", 0, h),
        "mlp.gate_proj": (f"{ffn}.gate_up_proj", 0, inter),
        "mlp.up_proj": (f"{ffn}.gate_up_proj", inter, inter),
        "mlp.down_proj": (f"{ffn}.down_proj", 0, h),
    }
    if proj in shards:
        param, offset, rows = shards[proj]
        return Target(f"{param}.{suffix}", offset, rows)
    return None
