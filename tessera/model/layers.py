"""Small building blocks shared by the model families: RMSNorm, rotary embedding, activations."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels import apply_rotary_, rms_norm
from tessera.model.spec import RopeSpec


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
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding over the whole head (rotate-half layout, as HF Llama)."""

    def __init__(self, head_dim: int, max_positions: int, rope: RopeSpec) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.rope_spec = head_dim, max_positions, rope
        self.fused = True  # rotate-half layout: apply_rotary_ handles it
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def build_tables(self, device: torch.device) -> None:
        """Compute the cos/sin tables on ``device``; the loader calls this once the model's
        parameters are materialised (models are built on the 'meta' device first)."""
        inv_freq = _inv_freq(self.head_dim, self.rope_spec)  # [head_dim/2]
        positions = torch.arange(self.max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_positions, head_dim/2], float32
        self.cos = freqs.cos().to(device)
        self.sin = freqs.sin().to(device)

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
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation named by an HF ``hidden_act``."""
    if name == "silu":
        return F.silu
    if name == "gelu_pytorch_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    return F.gelu
