"""Routed experts in one native call on CPU (``moe_experts.cpp``): weight packing and dispatch.

Why: a decode step gives each expert a few dozen rows, where a matmul waits on its weights
streaming from memory. The kernel prefetches the next slice of weights while it computes the
current one and fuses the grouping, gather, activation and weighted scatter-add around the
matmuls. One layer of the benchmark Mixtral's eight experts (512 -> 2x1024 -> 512) at 32 rows
each, one thread on an AMD EPYC: ``benchmarks/moe_kernel.py`` has the figures.

Used for float32 experts with a silu gate on a CPU whose build has AVX-512
(``experts_kernel_available``), when the intermediate size is a multiple of 16 and the hidden size a
multiple of 32; every other case keeps the Python path in ``Experts``.
"""

from __future__ import annotations

import functools

import torch

from tessera.model.kernels.linear import PANEL, panel_available, to_panels

GATE_LANES = PANEL // 2
"""Gate (and up) rows per packed gate/up panel: a panel is 16 gate rows beside 16 up rows."""


def native_experts_fit(gate_up: torch.Tensor, down: torch.Tensor, hidden_act: str) -> bool:
    """Whether experts with stacked weights ``gate_up`` [E, 2I, D] and ``down`` [E, D, I] can
    run natively here."""
    _, two_inter, hidden = gate_up.shape
    return (
        gate_up.device.type == "cpu"
        and gate_up.dtype == torch.float32
        and down.dtype == torch.float32
        and hidden_act == "silu"
        and two_inter % (2 * GATE_LANES) == 0
        and hidden % PANEL == 0
        and gate_up.numel() > 0
        and experts_kernel_available()
    )


@functools.cache
def experts_kernel_available() -> bool:
    """Whether ``moe_experts`` has a body here (weight panels, built with AVX-512)."""
    return panel_available() and bool(torch.ops.tessera_kernels.experts_native())


def pack_gate_up(gate_up: torch.Tensor) -> torch.Tensor:
    """[E, 2I, D] (gate rows, then up rows) -> [E, I/16, D, 32]: for panel q and every input k,
    gate rows 16q..16q+15 then the up rows of the same indices."""
    num_experts, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    w = gate_up.detach()
    gate = w[:, :inter].reshape(num_experts, inter // GATE_LANES, GATE_LANES, hidden)
    up = w[:, inter:].reshape(num_experts, inter // GATE_LANES, GATE_LANES, hidden)
    return torch.cat([gate, up], dim=2).transpose(2, 3).contiguous()  # [E, I/16, D, 32]


def pack_down(down: torch.Tensor) -> torch.Tensor:
    """[E, D, I] -> [E, D/32, I, 32]: each expert's down projection in weight panels."""
    return to_panels(down)


def native_experts(
    x: torch.Tensor,
    local_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    packed_gate_up: torch.Tensor,
    packed_down: torch.Tensor,
) -> torch.Tensor:
    """x [T, D], local_ids [T, k] (slot E = held elsewhere), topk_weights [T, k] -> [T, D]:
    the sum over each token's local experts of weight * down(silu(gate) * up)."""
    return torch.ops.tessera_kernels.moe_experts(
        x.contiguous(),
        local_ids.to(torch.int64).contiguous(),
        topk_weights.to(torch.float32).contiguous(),
        packed_gate_up,
        packed_down,
    )
