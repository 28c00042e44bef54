"""Weight-only int8 linears: int8 weights with one float32 scale per output channel.

Why: a decode step of a few sequences reads every weight once, so on CPU its time is about the
weights' bytes over the memory rate, and int8 weights are a quarter of float32's. Activations
stay float32; the kernel widens each weight to float in registers (``panel_gemm.h``, int8
panels) and applies the column's scale once per output, after the sum over k. Many rows (a
prefill chunk) compute, not stream: there the weight is widened to float32 once for the call
and multiplied by MKL, which is faster at that size than widening it inside every row block.

Quantization is symmetric per output channel: ``scale = max|w| / 127``, ``q = round(w /
scale)``, so every weight is within half a step (``scale / 2``) of the original; zero rows get
scale 1. The LM head is quantized too (as llama.cpp's ``q8_0`` does). Linears a module reads
the weight of directly (``keep_plain_linears``), the embedding and MoE experts' stacked weights
stay float.

Where the panel kernel is not built (no AVX2 or AVX-512, another device), a quantized linear
keeps int8 weights in plain layout and widens them on each call: correct and compact, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config import QUANTIZATION_SCHEMES as SCHEMES
from tessera.model.kernels.linear import PANEL, panel_available, panel_max_rows, to_panels


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q [N, K] int8, scales [N] float32) with ``q * scales[:, None]``
    within ``scales / 2`` of ``weight`` everywhere."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)  # [N]
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Module):
    """An ``nn.Linear`` (float32 activations, inference only) whose weight is held as int8 with
    per-output-channel scales; replaces the float weight, so the float copy is freed."""

    qweight: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scales = quantize_int8(linear.weight)
        self.panels = panel_available() and q.device.type == "cpu" and \
            self.out_features % PANEL == 0
        # [N/32, K, 32] for the kernel, else [N, K].
        self.register_buffer("qweight", to_panels(q) if self.panels else q)
        self.register_buffer("scales", scales)
        self.bias = None if linear.bias is None else nn.Parameter(
            linear.bias.detach().float(), requires_grad=False)
        # Above this many rows a call widens the weight once and takes MKL (module docstring).
        self.max_panel_rows = min(panel_max_rows(linear.weight), 64)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] float32 as the kernel sees it (int8 times scale)."""
        q = self.qweight
        if self.panels:
            q = q.transpose(-1, -2).reshape(self.out_features, self.in_features)
        return q.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.panels and x.dtype == torch.float32 and \
                x.numel() <= self.max_panel_rows * self.in_features:
            out: torch.Tensor = torch.ops.tessera_kernels.int8_panel_linear(
                x, self.qweight, self.scales, self.bias)  # [..., N]
            return out
        return F.linear(x, self.dequantized().to(x.dtype),
                        None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8{' panels' if self.panels else ''}")


def quantize_linears(model: nn.Module, scheme: str) -> int:
    """Replace every ``nn.Linear`` under ``model`` (but those a module lists in
    ``keep_plain_linears``) with its ``scheme`` version; returns how many were replaced."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    count = 0
    for parent in list(model.modules()):
        keep = getattr(parent, "keep_plain_linears", ())
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and name not in keep:
                setattr(parent, name, Int8Linear(child))
                count += 1
    return count
