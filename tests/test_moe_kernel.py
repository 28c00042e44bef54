"""The native routed-experts kernel (``kernels/moe_experts.cpp``) against the Python path."""

from __future__ import annotations

import pytest
import torch

from tessera.model import experts as experts_mod
from tessera.model.kernels import moe_kernel
from tessera.model.moe import moe_spec_from_config


def moe_cfg(hidden: int, inter: int, act: str = "silu") -> dict:
    return dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", hidden_size=hidden,
        num_hidden_layers=1, num_attention_heads=4, vocab_size=300, intermediate_size=inter,
        num_local_experts=4, num_experts_per_tok=2, hidden_act=act,
    )


def experts_pair(cfg: dict, expert_ids: tuple[int, ...] | None,
                 dtype: torch.dtype = torch.float32
                 ) -> tuple[experts_mod.Experts, experts_mod.Experts]:
    """(plain, packed) experts with the same random weights."""
    moe = moe_spec_from_config(cfg)
    assert moe is not None
    gen = torch.Generator().manual_seed(0)
    plain = experts_mod.Experts(moe, expert_ids).to(dtype)
    with torch.no_grad():
        for p in plain.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    packed = experts_mod.Experts(moe, expert_ids).to(dtype)
    packed.load_state_dict(plain.state_dict())
    packed.pack_weights()
    return plain, packed


def native_or_skip() -> None:
    if not moe_kernel.experts_kernel_available():
        pytest.skip("the native experts kernel needs an AVX-512 build")


def test_packed_layouts_hold_the_weights_where_the_kernel_reads_them():
    gen = torch.Generator().manual_seed(1)
    num_experts, inter, hidden = 3, 32, 64
    gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=gen)
    down = torch.randn(num_experts, hidden, inter, generator=gen)
    gu = moe_kernel.pack_gate_up(gate_up)
    dn = moe_kernel.pack_down(down)
    assert gu.shape == (num_experts, inter // 16, hidden, 32)
    assert dn.shape == (num_experts, hidden // 32, inter, 32)
    e, q, k, j = 2, 1, 5, 3
    assert gu[e, q, k, j] == gate_up[e, 16 * q + j, k]  # gate row 16q + j
    assert gu[e, q, k, 16 + j] == gate_up[e, inter + 16 * q + j, k]  # the up row beside it
    assert dn[e, 1, k, j] == down[e, 32 + j, k]


# Shapes: within one k chunk (64 / 48), and over it with a shorter last chunk (320 / 272: the
# kernel passes over k in chunks of 256).
@pytest.mark.parametrize("hidden,inter", [(64, 48), (320, 272)])
@pytest.mark.parametrize("expert_ids", [None, (3, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_experts_match_the_python_path(hidden, inter, expert_ids, threads):
    native_or_skip()
    plain, packed = experts_pair(moe_cfg(hidden, inter), expert_ids)
    assert packed._native is not None and packed._packed is None
    gen = torch.Generator().manual_seed(2)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # 1 token; 5 and 13 (tails of the 12-row micro-kernel); 40; 300 (many micro-kernel
        # calls); 1400 (about 700 rows per expert: with 320 / 272 features, over one row block).
        for num_tokens in (1, 5, 13, 40, 300, 1400):
            x = torch.randn(num_tokens, hidden, generator=gen)
            ids = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(num_tokens)])
            weights = torch.rand(num_tokens, 2, generator=gen)
            with torch.inference_mode():
                got = packed(x, ids, weights)
                want = plain(x, ids, weights)
            # float32 sums in another order: the same to ~1e-6 of the outputs' scale.
            scale = float(want.abs().max())
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)
    finally:
        torch.set_num_threads(old_threads)


def test_a_token_routed_only_elsewhere_gets_zeros():
    native_or_skip()
    plain, packed = experts_pair(moe_cfg(64, 48), (3, 1))
    x = torch.randn(3, 64)
    ids = torch.tensor([[0, 2], [1, 0], [3, 1]])  # token 0: both experts held elsewhere
    weights = torch.rand(3, 2)
    with torch.inference_mode():
        got = packed(x, ids, weights)
    assert torch.equal(got[0], torch.zeros(64))
    torch.testing.assert_close(got, plain(x, ids, weights), rtol=1e-5, atol=1e-5)


def test_bad_slot_is_an_error_not_a_wild_write():
    native_or_skip()
    _, packed = experts_pair(moe_cfg(64, 48), None)
    assert packed._native is not None
    with pytest.raises(RuntimeError, match="out of range"):
        moe_kernel.native_experts(torch.randn(2, 64), torch.tensor([[0, 5], [1, 2]]),
                                  torch.rand(2, 2), *packed._native)


@pytest.mark.parametrize("case", ["gelu", "bfloat16", "ragged"])
def test_experts_the_kernel_cannot_take_keep_the_python_path(case):
    cfg = moe_cfg(48, 40) if case == "ragged" else moe_cfg(64, 48, "gelu" if case == "gelu"
                                                            else "silu")
    dtype = torch.bfloat16 if case == "bfloat16" else torch.float32
    plain, packed = experts_pair(cfg, None, dtype)
    assert packed._native is None
    hidden = cfg["hidden_size"]
    x = torch.randn(20, hidden).to(dtype)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(20)])
    weights = torch.rand(20, 2)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x, ids, weights), plain(x, ids, weights),
                                   rtol=1e-2, atol=1e-2)
