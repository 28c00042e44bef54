"""Decoder units in one native call for decode steps of a few sequences on CPU.

A batch-1 decode step is the weight matmuls plus ~25 small ops per layer, and launching each of
those from Python costs more than the op itself (see ``decode_units.cpp``). The dense attention
and FFN units hand such steps to ``attention_decode`` / ``ffn_decode``, which run the units' own
op sequence in C++: same ops, same order, same results. The units fall back to their Python
bodies whenever a step has a prefill chunk, a linear would take its packed path (see
``linear.py``), or the kernels are unavailable.
"""

from __future__ import annotations

import sys
from typing import TypeGuard

import torch
from torch import nn

from tessera.model.kernels.fused import on_cpu_kernel
from tessera.model.kernels.linear import PackedLinear
from tessera.model.kernels.quant_linear import Int8Linear


def max_plain_rows(linear: nn.Module) -> int:
    """Most rows for which ``linear(x)`` is exactly ``F.linear(x, weight, bias)``."""
    if isinstance(linear, PackedLinear):
        return linear.min_packed_rows - 1
    return sys.maxsize if type(linear) is nn.Linear else -1


def always_packed(linear: nn.Module) -> TypeGuard[PackedLinear]:
    """Whether ``linear`` takes its packed path from one row (up to ``max_packed_rows``)."""
    return isinstance(linear, PackedLinear) and linear.min_packed_rows <= 1


def op_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a native op multiplies by: the packed layout for a linear that always takes its
    packed path, the plain weight otherwise (the ops run each as the Python unit would)."""
    if isinstance(linear, Int8Linear):
        return linear.qweight
    if always_packed(linear):
        return linear.packed_weight
    weight = linear.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def op_scales(linear: nn.Module) -> torch.Tensor | None:
    """The per-column scales of an int8 linear's weight (None for float weights)."""
    return linear.scales if isinstance(linear, Int8Linear) else None


def max_native_rows(linear: nn.Module) -> int:
    """Most rows for which a native op computes ``linear(x)`` as the Python unit does."""
    if isinstance(linear, Int8Linear):
        return linear.max_panel_rows if linear.panels else -1
    if always_packed(linear):
        return linear.max_packed_rows
    return max_plain_rows(linear)


def decode_units_available(hidden: torch.Tensor) -> bool:
    """Whether the fused unit ops can run on ``hidden`` [T, D] (CPU, kernel dtype, built)."""
    return on_cpu_kernel(hidden)
