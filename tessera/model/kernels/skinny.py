"""Linear layers that take the C++ skinny matmul at decode batch sizes.

At 1-4 rows a linear layer streams its weights once; ``skinny_gemm.cpp`` does that at close to
the memory bandwidth, where the general GEMM path reaches well under it on CPU. ``Linear`` is an
``nn.Linear`` (same parameters, same checkpoint names) whose forward takes the kernel for
float32 CPU inputs of at most ``MAX_ROWS`` rows once the extension is built (``build.py``), and
``F.linear`` otherwise (more rows, other dtypes or devices, autograd, or
``TESSERA_DISABLE_KERNELS=1``). Results match ``F.linear`` to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.model.kernels.build import kernel_available

MAX_ROWS = 4
"""Most input rows the kernel takes; above it the matmul reuses weights and GEMM wins."""


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight)`` runs on the skinny kernel."""
    return (
        x.dim() == 2
        and x.shape[0] <= MAX_ROWS
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and kernel_available()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; x [M, K], weight [N, K] -> [M, N]."""
    if skinny_applies(x, weight):
        y = torch.ops.tessera_kernels.skinny_gemm(x.contiguous(), weight)  # [M, N]
        return y if bias is None else y.add_(bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose decode-sized calls take the skinny kernel (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
