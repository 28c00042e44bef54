"""The mixture-of-experts facts of a Hugging Face config, for every MoE family, checked once.

Families differ in how they score and pick experts; ``MoESpec`` names each variant so one
router serves them all:

- Mixtral: softmax over all experts, top-k, renormalised.
- Qwen2-MoE / Qwen3-MoE: softmax, top-k, renormalised only with ``norm_topk_prob``; Qwen2-MoE
  adds a shared expert behind a sigmoid gate; ``decoder_sparse_step`` and ``mlp_only_layers``
  mix dense and MoE layers.
- DeepSeek-V2: softmax; ``topk_method="group_limited_greedy"`` first keeps the ``topk_group``
  groups with the highest max score; weights times ``routed_scaling_factor``.
- DeepSeek-V3: sigmoid; a learnt ``e_score_correction_bias`` is added for selection only;
  groups are ranked by the sum of their top-2 (biased) scores; weights come from the unbiased
  scores, renormalised, times ``routed_scaling_factor``. Layers below
  ``first_k_dense_replace`` are dense (both DeepSeek versions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tessera.model.spec import ModelConfigError

Scoring = Literal["softmax", "sigmoid"]
GroupScore = Literal["max", "top2_sum"]


@dataclass(frozen=True)
class MoESpec:
    """Shape and routing rule of the MoE layers of a model."""

    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    """Intermediate size of one routed expert."""
    moe_layers: tuple[bool, ...]
    """Per layer: is its FFN a MoE (False means a dense MLP of ``intermediate_size``)."""
    hidden_act: str = "silu"
    scoring: Scoring = "softmax"
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' weights to sum to 1."""
    num_groups: int = 1
    """Experts are split into this many equal groups; 1 means no group-limited routing."""
    topk_groups: int = 1
    """Only experts of the best ``topk_groups`` groups may be chosen."""
    group_score: GroupScore = "max"
    has_score_bias: bool = False
    """A per-expert bias (DeepSeek-V3 ``e_score_correction_bias``) added for selection only."""
    routed_scaling_factor: float = 1.0
    shared_intermediate_size: int = 0
    """Intermediate size of the always-on shared expert MLP; 0 means none."""
    num_shared_experts: int = 0
    """DeepSeek's ``n_shared_experts``, already folded into ``shared_intermediate_size``."""
    shared_gate: bool = False
    """The shared expert's output is scaled by sigmoid(Linear(D, 1)) (Qwen2-MoE)."""

    def is_moe_layer(self, layer_id: int) -> bool:
        return self.moe_layers[layer_id]


def _get(cfg: dict[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key)
    return default if value is None else value


def _num_experts(cfg: dict[str, Any], key: str, default: int) -> int:
    # transformers 5.x saves some families' expert count under ``num_local_experts``.
    for k in (key, "num_local_experts"):
        if cfg.get(k) is not None:
            return int(cfg[k])
    return default


def _qwen_layers(cfg: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    step = int(_get(cfg, "decoder_sparse_step", 1))
    if step < 1:
        raise ModelConfigError(f"decoder_sparse_step must be at least 1, got {step}")
    dense = set(_get(cfg, "mlp_only_layers", []))
    return tuple(
        i not in dense and num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers)
    )


def _num_shared(cfg: dict[str, Any], default: int) -> int:
    # Absent means transformers' default; an explicit null means no shared experts.
    if "n_shared_experts" not in cfg:
        return default
    return int(cfg["n_shared_experts"] or 0)


def _deepseek_layers(cfg: dict[str, Any], num_layers: int, first_dense: int) -> tuple[bool, ...]:
    first = int(_get(cfg, "first_k_dense_replace", first_dense))
    freq = int(_get(cfg, "moe_layer_freq", 1))
    if freq < 1:
        raise ModelConfigError(f"moe_layer_freq must be at least 1, got {freq}")
    return tuple(i >= first and i % freq == 0 for i in range(num_layers))


MOE_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "kimi_k2",
)
"""The ``model_type`` values whose experts :func:`moe_spec_from_config` reads (one branch each);
a config of any other type is read as having none."""


def moe_spec_from_config(cfg: dict[str, Any]) -> MoESpec | None:
    """The ``MoESpec`` of a Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 or DeepSeek-V3 config;
    None for a config without routed experts. Raises ``ModelConfigError`` on bad fields."""
    model_type = cfg.get("model_type", "")
    num_layers = int(_get(cfg, "num_hidden_layers", 0))
    hidden = int(_get(cfg, "hidden_size", 0))
    act = str(_get(cfg, "hidden_act", "silu"))
    top_k = int(_get(cfg, "num_experts_per_tok", 2))
    kwargs: dict[str, Any]
    if model_type == "mixtral":
        num_experts = _num_experts(cfg, "num_local_experts", 8)
        kwargs = dict(
            moe_intermediate_size=int(_get(cfg, "intermediate_size", 0)),
            moe_layers=(True,) * num_layers,
            norm_topk_prob=True,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        num_experts = _num_experts(cfg, "num_experts", 0)
        kwargs = dict(
            moe_intermediate_size=int(_get(cfg, "moe_intermediate_size", 0)),
            moe_layers=_qwen_layers(cfg, num_layers, num_experts),
            norm_topk_prob=bool(_get(cfg, "norm_topk_prob", False)),
        )
        if model_type == "qwen2_moe":
            kwargs.update(
                shared_intermediate_size=int(_get(cfg, "shared_expert_intermediate_size", 0)),
                num_shared_experts=1,
                shared_gate=True,
            )
    elif model_type == "deepseek_v2":
        num_experts = _num_experts(cfg, "n_routed_experts", 64)
        method = str(_get(cfg, "topk_method", "greedy"))
        if method not in ("greedy", "group_limited_greedy"):
            raise ModelConfigError(f"unsupported DeepSeek-V2 topk_method {method!r}")
        grouped = method == "group_limited_greedy"
        num_shared = _num_shared(cfg, 2)
        inter = int(_get(cfg, "moe_intermediate_size", 0))
        kwargs = dict(
            moe_intermediate_size=inter,
            moe_layers=_deepseek_layers(cfg, num_layers, 0),
            scoring="softmax",
            norm_topk_prob=bool(_get(cfg, "norm_topk_prob", False)),
            num_groups=int(_get(cfg, "n_group", 1)) if grouped else 1,
            topk_groups=int(_get(cfg, "topk_group", 1)) if grouped else 1,
            group_score="max",
            routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 1.0)),
            shared_intermediate_size=inter * num_shared,
            num_shared_experts=num_shared,
        )
    elif model_type in ("deepseek_v3", "kimi_k2"):  # Kimi-K2 is the V3 architecture
        num_experts = _num_experts(cfg, "n_routed_experts", 256)
        num_shared = _num_shared(cfg, 1)
        inter = int(_get(cfg, "moe_intermediate_size", 0))
        num_groups = int(_get(cfg, "n_group", 1))
        kwargs = dict(
            moe_intermediate_size=inter,
            moe_layers=_deepseek_layers(cfg, num_layers, 3),
            scoring="sigmoid",
            norm_topk_prob=bool(_get(cfg, "norm_topk_prob", True)),
            num_groups=num_groups,
            topk_groups=int(_get(cfg, "topk_group", num_groups)),
            group_score="top2_sum",
            has_score_bias=True,
            routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", 2.5)),
            shared_intermediate_size=inter * num_shared,
            num_shared_experts=num_shared,
        )
    else:
        return None
    if num_experts <= 0 or not any(kwargs["moe_layers"]):
        return None
    spec = MoESpec(num_experts=num_experts, top_k=top_k, hidden_size=hidden, hidden_act=act,
                   **kwargs)
    _check(spec)
    return spec


def _check(spec: MoESpec) -> None:
    if spec.moe_intermediate_size <= 0:
        raise ModelConfigError("MoE config lacks a positive expert intermediate size")
    if not 1 <= spec.top_k <= spec.num_experts:
        raise ModelConfigError(
            f"num_experts_per_tok ({spec.top_k}) must be between 1 and the number of experts "
            f"({spec.num_experts})"
        )
    if spec.num_groups < 1 or spec.num_experts % spec.num_groups:
        raise ModelConfigError(
            f"n_group ({spec.num_groups}) must divide the number of experts ({spec.num_experts})"
        )
    per_group = spec.num_experts // spec.num_groups
    if not 1 <= spec.topk_groups <= spec.num_groups:
        raise ModelConfigError(
            f"topk_group ({spec.topk_groups}) must be between 1 and n_group ({spec.num_groups})"
        )
    if spec.num_groups > 1 and spec.top_k > spec.topk_groups * per_group:
        raise ModelConfigError(
            f"num_experts_per_tok ({spec.top_k}) exceeds the experts of the topk_group groups"
        )
    if spec.num_groups > 1 and spec.group_score == "top2_sum" and per_group < 2:
        raise ModelConfigError("group-limited routing needs at least 2 experts per group")
