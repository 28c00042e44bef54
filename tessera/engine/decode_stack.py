"""All layers of a dense model in one native call, for decode steps of a few sequences on CPU.

When every unit runs in this process, the runner may hand a decode-only step of a dense model
(attention units and SiLU FFN units, as in Llama, Mistral, Qwen2/3) to the
``tessera_kernels::dense_decode_stack`` op, which runs each unit's own op sequence in C++ (see
``tessera/model/kernels/decode_units.cpp``): same ops, same order, same result as calling the
units, without two Python calls per layer. ``benchmarks/offline_throughput.py``'s batch-1 decode
is where this shows; steps with a prefill chunk, or with enough rows for a linear's packed path,
call the units as usual. A linear that takes its packed path from one row (large matrices on AMD
CPUs, see ``tessera/model/kernels/linear.py``) is handed to the op in its packed layout, which
the op runs through the same oneDNN op as the Python unit.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.model.context import StepContext
from tessera.model.dense import AttentionUnit, DenseFFNUnit
from tessera.model.kernels.decode_units import (
    decode_units_available,
    max_native_rows,
    op_scales,
    op_weight,
)
from tessera.model.kernels.paged_decode import decode_kernel_applies

# Most rows a step may have to run here. The op saves the launch cost of ~25 small ops per
# layer, which only matters next to the matmuls of a few rows; the bound holds the op to the
# steps it was measured on (the small-matrix packed-path threshold, 16 rows, minus one).
MAX_ROWS = 15


class DenseDecodeStack:
    """The units of a dense model as one native call; build with :meth:`from_units`."""

    def __init__(self, attns: list[AttentionUnit], ffns: list[DenseFFNUnit]) -> None:
        first = attns[0]
        self.num_heads, self.num_kv_heads, self.scale = first.num_heads, first.num_kv_heads, first.scale
        self.eps = first.norm.eps
        rope = first.rope[0]
        self.cos, self.sin = rope.cos, rope.sin
        self.windows = [a.window or 0 for a in attns]
        self.params: list[torch.Tensor | None] = []
        for a, f in zip(attns, ffns, strict=True):
            # Slot order of dense_decode_stack (decode_units.cpp, enum Slot).
            self.params += [
                a.norm.weight, op_weight(a.qkv_proj), a.qkv_proj.bias,
                None if a.q_norm is None else a.q_norm.weight,
                None if a.k_norm is None else a.k_norm.weight,
                op_weight(a.o_proj), a.o_proj.bias,
                f.norm.weight, op_weight(f.gate_up_proj), f.gate_up_proj.bias,
                op_weight(f.down_proj), f.down_proj.bias,
                op_scales(a.qkv_proj), op_scales(a.o_proj), op_scales(f.gate_up_proj),
                op_scales(f.down_proj),
            ]
        linears = [m for a, f in zip(attns, ffns, strict=True)
                   for m in (a.qkv_proj, a.o_proj, f.gate_up_proj, f.down_proj)]
        # Beyond this many rows some linear's Python path would differ from what the op runs.
        self.max_rows = min([MAX_ROWS, *(max_native_rows(m) for m in linears)])

    @classmethod
    def from_units(cls, units: list[nn.Module]) -> DenseDecodeStack | None:
        """The stack for ``units`` (attention, FFN, attention, ...), or None when some unit is
        not a plain dense one the op covers (MoE, MLA, another activation, a non-fused rope,
        different shapes or norms across layers)."""
        attns = [u for u in units[0::2] if type(u) is AttentionUnit]
        ffns = [u for u in units[1::2] if type(u) is DenseFFNUnit and u.fused_silu]
        if not attns or len(attns) != len(ffns) or 2 * len(attns) != len(units):
            return None
        a0 = attns[0]
        eps = a0.norm.eps
        shape = (a0.num_heads, a0.num_kv_heads, a0.head_dim, a0.scale)
        for a, f in zip(attns, ffns, strict=True):
            # The op takes one shape, one eps and one rotary table for every layer.
            if (a.num_heads, a.num_kv_heads, a.head_dim, a.scale) != shape:
                return None
            if a.rope[0] is not a0.rope[0] or not a.rope[0].fused:
                return None
            norms = [n for n in (a.norm, f.norm, a.q_norm, a.k_norm) if n is not None]
            if any(n.eps != eps for n in norms) or (a.q_norm is None) != (a.k_norm is None):
                return None
        stack = cls(attns, ffns)
        return stack if stack.max_rows > 0 else None

    def applies(self, hidden: torch.Tensor, ctx: StepContext) -> bool:
        """Whether this step can run natively: decode tokens only, few rows, CPU kernels."""
        kv_cache = ctx.kv_caches[0]
        return (
            not ctx.attn.prefills
            and hidden.shape[0] <= self.max_rows
            and kv_cache is not None
            and decode_units_available(hidden)
            and decode_kernel_applies(hidden, kv_cache)
        )

    def __call__(self, hidden: torch.Tensor, ctx: StepContext) -> torch.Tensor:
        """Run every layer on ``hidden`` [B, D]; returns the residual stream after the last."""
        meta = ctx.attn
        out: torch.Tensor = torch.ops.tessera_kernels.dense_decode_stack(
            hidden, self.params, self.eps, self.windows, ctx.positions, self.cos, self.sin,
            ctx.kv_caches, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens,
            self.num_heads, self.num_kv_heads, self.scale,
        )  # [B, D]
        return out
