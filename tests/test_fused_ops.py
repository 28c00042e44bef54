"""Fused CPU ops (RMSNorm, rotary, SiLU-and-mul): C++ kernels vs their torch references."""

from __future__ import annotations

import pytest
import torch

from tessera.model.kernels import build as kb
from tessera.model.kernels import fused

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# float32 differs from the reference only by summation order / exp rounding; the half types
# round at the same points, so they may differ by one unit in the last place of the dtype.
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def _kernel() -> None:
    if kb.kernels_disabled():
        pytest.skip("TESSERA_DISABLE_KERNELS is set")
    if not kb.kernel_available():
        pytest.skip("C++ kernels could not be built here (see the warning log)")


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 768), (37, 80), (300, 17), (4, 5, 64)])
def test_rms_norm_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape) * 100 + shape[-1])
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    _close(fused.rms_norm(x, w, 1e-6), fused.rms_norm_reference(x, w, 1e-6), dtype)


def test_rms_norm_on_a_strided_head_view() -> None:
    # Qwen3's q/k norm reads heads out of the fused qkv row: [T, H, d] with a row stride > H*d.
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(9, 4 * 16 + 2 * 2 * 16, generator=g)
    q = qkv[:, : 4 * 16].view(9, 4, 16)
    assert not q.is_contiguous()
    w = torch.randn(16, generator=g)
    _close(fused.rms_norm(q, w, 1e-5), fused.rms_norm_reference(q, w, 1e-5), torch.float32)


def test_rms_norm_mismatched_weight_dtype_uses_reference() -> None:
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    w = torch.randn(32)  # float32 weight: the reference promotes, the kernel would not
    got = fused.rms_norm(x, w, 1e-6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fused.rms_norm_reference(x, w, 1e-6))


def _tables(max_pos: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (3, 1)])
def test_rotary_in_place_on_qkv_views(dtype: torch.dtype, heads: tuple[int, int]) -> None:
    num_heads, num_kv_heads = heads
    head_dim, tokens = 32, 11
    g = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    cos, sin = _tables(64, head_dim // 2)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    ref = qkv.clone()
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q = qkv[:, :q_size].view(tokens, num_heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim)
    fused.apply_rotary_(q, k, positions, cos, sin)
    c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
    ref_q = fused.rotate_half_reference(ref[:, :q_size].view(tokens, num_heads, head_dim), c, s)
    ref_k = fused.rotate_half_reference(
        ref[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim), c, s
    )
    _close(q, ref_q, dtype)
    _close(k, ref_k, dtype)
    assert torch.equal(qkv[:, q_size + kv_size :], ref[:, q_size + kv_size :]), "v untouched"


def test_rotary_fallback_is_in_place_too(monkeypatch: pytest.MonkeyPatch) -> None:
    cos, sin = _tables(16, 8)
    q, k = torch.randn(5, 2, 16), torch.randn(5, 1, 16)
    positions = torch.tensor([0, 3, 7, 15, 2])
    q2, k2 = q.clone(), k.clone()
    fused.apply_rotary_(q, k, positions, cos, sin)
    monkeypatch.setenv("TESSERA_DISABLE_KERNELS", "1")
    fused.apply_rotary_(q2, k2, positions, cos, sin)
    torch.testing.assert_close(q, q2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k, k2, atol=1e-6, rtol=1e-6)
    assert not torch.equal(q2, q2.new_zeros(q2.shape))


def test_rotary_rejects_a_position_past_the_table() -> None:
    cos, sin = _tables(8, 4)
    q, k = torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    with pytest.raises(RuntimeError, match="position out of range"):
        fused.apply_rotary_(q, k, torch.tensor([1, 8]), cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 2048), (33, 2 * 100), (70, 2 * 512)])
def test_silu_mul_matches_reference(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(shape[0])
    gate_up = (torch.randn(shape, generator=g) * 6).to(dtype)
    _close(fused.silu_mul(gate_up), fused.silu_mul_reference(gate_up), dtype)


def test_silu_mul_extremes() -> None:
    # Large |x| saturates exp: silu(-100) ~ -0, silu(100) = 100; no inf or NaN.
    gate = torch.tensor([[-100.0, -30.0, -1.0, 0.0, 1e-30, 1.0, 30.0, 100.0]])
    gate_up = torch.cat([gate, torch.full_like(gate, 2.0)], dim=1)
    got = fused.silu_mul(gate_up)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, fused.silu_mul_reference(gate_up), atol=1e-6, rtol=1e-6)


def test_disabled_kernels_take_the_references(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_DISABLE_KERNELS", "1")
    monkeypatch.setattr(torch.ops, "tessera_kernels", None)  # any kernel call would fail
    x, w = torch.randn(3, 16), torch.randn(16)
    assert torch.equal(fused.rms_norm(x, w, 1e-6), fused.rms_norm_reference(x, w, 1e-6))
    gu = torch.randn(3, 32)
    assert torch.equal(fused.silu_mul(gu), fused.silu_mul_reference(gu))
