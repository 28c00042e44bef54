"""``x @ weight.T`` for a few tokens against a large float32 weight (the LM head at decode).

MKL repacks a transposed [N, K] weight on every call, which dominated the LM head of small
decode batches; ``tessera_kernels::small_linear`` (``small_linear.cpp``) streams the weight once
over all intra-op threads instead. Anything the kernel does not cover (other dtypes or devices,
many tokens, kernels unavailable or disabled) runs ``F.linear``; both agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessera.model.kernels.build import kernel_available

# Beyond this many tokens MKL's GEMM (weight reuse across rows) is faster than streaming.
SMALL_LINEAR_MAX_TOKENS = 32


def small_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, K], weight [N, K] -> [T, N] (no bias)."""
    if (
        x.dim() == 2
        and 0 < x.shape[0] <= SMALL_LINEAR_MAX_TOKENS
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
        and kernel_available()
    ):
        return torch.ops.tessera_kernels.small_linear(x.contiguous(), weight)
    return F.linear(x, weight)
