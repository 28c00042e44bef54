"""``x @ weight.T`` for a few tokens against a large float32 weight (the LM head at decode).

MKL repacks a transposed [N, K] weight on every call, which dominated the LM head of small
decode batches; ``tessera_kernels::small_linear`` (``small_linear.cpp``) streams the weight once
over all intra-op threads instead. Anything the kernel does not cover (other dtypes or devices,
many tokens, kernels unavailable or disabled) runs ``F.linear``; both agree to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels.build import kernel_available

# Beyond this many tokens MKL's GEMM (weight reuse across rows) is faster than streaming.
SMALL_LINEAR_MAX_TOKENS = 32
# Inside a decoder layer (smaller weights than the LM head) the measured gain was at 1-4 rows;
# from there on the GEMM is left to do it.
LAYER_MAX_TOKENS = 4


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 max_tokens: int = SMALL_LINEAR_MAX_TOKENS) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: x [T, K], weight [N, K] -> [T, N]; streamed when T is at
    most ``max_tokens``."""
    if (
        x.dim() == 2
        and 0 < x.shape[0] <= max_tokens
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and kernel_available()
    ):
        y = torch.ops.tessera_kernels.small_linear(x.contiguous(), weight)  # [T, N]
        return y if bias is None else y.add_(bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) whose decode-sized calls, at most
    ``max_tokens`` rows, stream the weight with ``small_linear``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 max_tokens: int = LAYER_MAX_TOKENS) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.max_tokens = max_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_linear(x, self.weight, self.bias, self.max_tokens)
