"""Fused elementwise ops of the decoder hot path, each a C++ CPU kernel with a torch fallback.

``rms_norm``, ``apply_rotary_`` and ``silu_mul`` each replace 3-20 small tensor ops per call
(see ``fused_ops.cpp``). The fallbacks (``*_reference``) define the semantics, in the Hugging
Face order of float32 compute and casts; the kernels match them to float32 rounding. The
kernels run for CPU tensors of float32, bfloat16 or float16 once the extension is built (see
``build.py``); anything else, or ``TESSERA_DISABLE_KERNELS=1``, takes the fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.model.kernels.build import kernel_available

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def on_cpu_kernel(x: torch.Tensor) -> bool:
    """Whether Tessera's CPU kernels take ``x``: a CPU tensor of a kernel dtype, kernels built."""
    return x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and kernel_available()


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last dim in float32, cast back to x's dtype, then scaled."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``rms_norm_reference`` in one op. x: [T, D] or [T, H, D]; weight: [D]."""
    if (
        x.dim() in (2, 3)
        and x.stride(-1) == 1
        and weight.dtype == x.dtype
        and weight.is_contiguous()
        and on_cpu_kernel(x)
    ):
        return torch.ops.tessera_kernels.rms_norm(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rotate_half_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotary embedding of x [T, H, d] (rotate-half layout) by cos, sin [T, 1, d/2], in float32."""
    dtype = x.dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


def apply_rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Rotate q [T, H, d] and k [T, KVH, d] in place (rotate-half layout) at ``positions`` [T]
    int64, reading rows of the float32 tables cos, sin [max_positions, d/2]. q and k may be
    views into one fused qkv projection; one kernel call handles both."""
    if (
        q.dim() == 3
        and k.dim() == 3
        and q.stride(-1) == 1
        and k.stride(-1) == 1
        and q.dtype == k.dtype
        and positions.dtype == torch.int64
        and positions.is_contiguous()
        and cos.dtype == torch.float32
        and cos.is_contiguous()
        and sin.is_contiguous()
        and on_cpu_kernel(q)
    ):
        torch.ops.tessera_kernels.rotary_(q, k, positions, cos, sin)
        return
    c = cos[positions].unsqueeze(1)  # [T, 1, d/2]
    s = sin[positions].unsqueeze(1)
    q.copy_(rotate_half_reference(q, c, s))
    k.copy_(rotate_half_reference(k, c, s))


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up [T, 2I] holding gate then up; returns [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu_mul_reference`` in one pass over gate_up [T, 2I]; returns [T, I]."""
    if gate_up.dim() == 2 and gate_up.stride(-1) == 1 and on_cpu_kernel(gate_up):
        return torch.ops.tessera_kernels.silu_mul(gate_up)
    return silu_mul_reference(gate_up)
