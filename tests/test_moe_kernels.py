"""MoE decode kernels: fused routed experts and the small-batch LM head vs their torch paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessera.model.experts import Experts
from tessera.model.kernels import build as kb
from tessera.model.kernels.moe_experts import FUSED_MAX_TOKENS, fused_experts
from tessera.model.kernels.small_linear import small_linear
from tessera.model.moe_spec import MoESpec

_MOE = MoESpec(num_experts=8, top_k=3, hidden_size=40, moe_intermediate_size=24,
               moe_layers=(True,))


def _experts(expert_ids: list[int] | None, seed: int = 0) -> Experts:
    torch.manual_seed(seed)
    experts = Experts(_MOE, expert_ids)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0.0, 0.3)
        experts.down_proj.normal_(0.0, 0.3)
    return experts


def _routing(num_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, _MOE.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(_MOE.num_experts, generator=g)[: _MOE.top_k]
                       for _ in range(num_tokens)])
    weights = torch.rand(num_tokens, _MOE.top_k, generator=g)
    return x, ids, weights


def _grouped(experts: Experts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The pure-torch grouped path (kernel switched off for this module)."""
    experts._fused_ok = False
    try:
        return experts(x, ids, w)
    finally:
        experts._fused_ok = True


@pytest.fixture()
def kernels() -> None:
    if not kb.kernel_available():
        pytest.skip("native kernels not built here")


@pytest.mark.parametrize("num_tokens", [1, 2, 5, 17])
@pytest.mark.parametrize("expert_ids", [None, [6, 1, 3]])
@torch.inference_mode()
def test_fused_experts_match_grouped_path(kernels: None, num_tokens: int,
                                          expert_ids: list[int] | None) -> None:
    experts = _experts(expert_ids)
    x, ids, w = _routing(num_tokens, seed=num_tokens)
    if 6 not in ids[0].tolist():
        ids[0, 0] = 6  # at least one token reaches a local expert of the partial module
    local = experts._to_local(ids.reshape(-1)).view(num_tokens, -1)
    fused = fused_experts(x, local, w, experts.gate_up_proj, experts.down_proj)
    assert fused is not None, "the kernel should take a small float32 CPU batch"
    ref = _grouped(experts, x, ids, w)
    assert ref.abs().max() > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    # Experts.forward takes the kernel path and agrees too.
    torch.testing.assert_close(experts(x, ids, w), ref, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_fused_experts_partition_sums_to_full_layer(kernels: None) -> None:
    x, ids, w = _routing(6, seed=3)
    full = _experts(None)(x, ids, w)
    halves = [_experts([0, 2, 4, 6]), _experts([7, 5, 3, 1])]
    parts = []
    for half in halves:  # same weights per global expert as the full module
        for slot, g in enumerate(half.expert_ids):
            half.gate_up_proj.data[slot] = _experts(None).gate_up_proj.data[g]
            half.down_proj.data[slot] = _experts(None).down_proj.data[g]
        parts.append(half(x, ids, w))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-5)


def test_fused_experts_declines_what_it_does_not_cover(kernels: None) -> None:
    experts = _experts(None)
    x, ids, w = _routing(FUSED_MAX_TOKENS + 1, seed=1)
    with torch.inference_mode():
        assert fused_experts(x, ids, w, experts.gate_up_proj, experts.down_proj) is None
        small = x[:2].double()
        assert fused_experts(small, ids[:2], w[:2], experts.gate_up_proj.double(),
                             experts.down_proj.double()) is None
    # With grad recording on, autograd needs the torch path.
    assert fused_experts(x[:2], ids[:2], w[:2], experts.gate_up_proj, experts.down_proj) is None


def test_fused_experts_off_when_kernels_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_DISABLE_KERNELS", "1")
    experts = _experts(None)
    x, ids, w = _routing(3, seed=2)
    with torch.inference_mode():
        assert fused_experts(x, ids, w, experts.gate_up_proj, experts.down_proj) is None
        assert experts(x, ids, w).shape == x.shape


@pytest.mark.parametrize("num_tokens", [1, 3, 9])
@torch.inference_mode()
def test_small_linear_matches_linear(kernels: None, num_tokens: int) -> None:
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, 37)  # K not a multiple of the 16-lane vector
    weight = torch.randn(301, 37)  # N not a multiple of the row block or task size
    out = small_linear(x, weight)
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)
    assert out.shape == (num_tokens, 301)
