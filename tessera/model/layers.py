"""Small building blocks shared by the model families: RMSNorm, rotary embedding, activations."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels import apply_rotary_, rms_norm
from tessera.model.spec import RopeSpec, yarn_mscale


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32, cast back, then scaled (as the HF reference)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)  # one fused op on CPU


def _inv_freq(head_dim: int, rope: RopeSpec) -> torch.Tensor:
    inv_freq = 1.0 / (
        rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    )
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        # Llama 3.1 scaling: long wavelengths are slowed by `factor`, short ones kept, and the
        # band between is interpolated smoothly.
        old_len = rope.original_max_position_embeddings or 8192
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    elif rope.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(inv_freq, head_dim, rope)
    return inv_freq


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, rope: RopeSpec) -> torch.Tensor:
    # YaRN: high-frequency dimensions (many rotations within the original context) keep their
    # frequency, low-frequency ones are slowed by `factor`, with a linear ramp between.
    assert rope.original_max_position_embeddings is not None
    old_len = rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta)
        )

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    return inv_freq / rope.factor * (1 - keep) + inv_freq * keep


def rope_attention_factor(rope: RopeSpec) -> float:
    """Scale HF applies to the cos/sin tables (YaRN's attention factor; 1 otherwise)."""
    if rope.rope_type != "yarn":
        return 1.0
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the whole head.

    The default layout rotates halves (HF Llama); ``interleaved`` rotates adjacent pairs
    (x0, x1), (x2, x3), ... (DeepSeek) and returns the rotated evens then odds, as HF
    DeepSeek-V3 does; q and k get the same permutation, so their dot product is unchanged.
    """

    def __init__(
        self, head_dim: int, max_positions: int, rope: RopeSpec, interleaved: bool = False
    ) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.rope_spec = head_dim, max_positions, rope
        self.interleaved = interleaved
        # The rotate-half layout has a fused in-place CPU op (apply_rotary_); interleaved does not.
        self.fused = not interleaved
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build_tables(self, device: torch.device) -> None:
        """Compute the cos/sin tables on ``device``; the loader calls this once the model's
        parameters are materialised (models are built on the 'meta' device first)."""
        inv_freq = _inv_freq(self.head_dim, self.rope_spec)  # [head_dim/2]
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim/2], float32
        scale = rope_attention_factor(self.rope_spec)
        self.cos = (freqs.cos() * scale).to(device)
        self.sin = (freqs.sin() * scale).to(device)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, d]; k: [T, KVH, d]
        if self.fused and q.device.type == "cpu":
            # One op for q and k, in place (they are fresh projections nobody else holds).
            apply_rotary_(q, k, positions, self.cos, self.sin)
            return q, k
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, d/2]
        sin = self.sin[positions].unsqueeze(1)
        return (
            _rotate(q, cos, sin, self.interleaved),
            _rotate(k, cos, sin, self.interleaved),
        )


def _rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    dtype = x.dtype
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation named by an HF ``hidden_act``."""
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu
