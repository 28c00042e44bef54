"""Routed experts for small token counts (MoE decode) as one C++ CPU op.

``fused_experts`` runs ``tessera_kernels::moe_experts`` (see ``moe_experts.cpp``): each active
expert's weights are read once and applied to all of its tokens, experts run in parallel over the
intra-op threads, and each token sums its weighted expert outputs in increasing local expert
order. It returns None when the kernel cannot run here (not float32 on CPU, kernels not built, or
``TESSERA_DISABLE_KERNELS=1``); the caller then runs its grouped pure-torch path, which defines
the semantics the kernel matches to float32 rounding.
"""

from __future__ import annotations

import torch

from tessera.model.kernels.build import kernel_available

# Above this many tokens per step the grouped path's GEMMs (MKL, compute-bound prefill) win;
# at or below it the step is bound by reading expert weights, which the kernel does once per
# expert and on every thread.
FUSED_MAX_TOKENS = 32
_MAX_TOP_K = 64  # the kernel's per-token pair buffer


def fused_experts(
    x: torch.Tensor,
    local_ids: torch.Tensor,
    weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
) -> torch.Tensor | None:
    """x [T, D], local_ids [T, k] int64 (``E_local`` = held elsewhere), weights [T, k] float32,
    gate_up [E_local, 2I, D], down [E_local, D, I] -> [T, D]; None when the kernel cannot run."""
    if not (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and gate_up.dtype == torch.float32
        and down.dtype == torch.float32
        and weights.dtype == torch.float32
        and local_ids.dtype == torch.int64
        and x.shape[0] <= FUSED_MAX_TOKENS
        and local_ids.shape[1] <= _MAX_TOP_K
        and gate_up.is_contiguous()
        and down.is_contiguous()
        and not torch.is_grad_enabled()
        and kernel_available()
    ):
        return None
    return torch.ops.tessera_kernels.moe_experts(x.contiguous(), local_ids, weights, gate_up, down)
